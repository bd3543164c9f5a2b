//! The HTTP side: routes, authentication, body limits, server-sent events.

use crate::api::{self, Limits};
use crate::deps::ModelFamily;
use crate::engine::{Event, Job, ModelInfo, Output, Queue, Task};
use crate::error::ApiError;
use crate::images::{ImagePolicy, RequestFiles};
use crate::metrics::Metrics;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub struct AppState {
    pub queue: Queue,
    pub models: Vec<ModelInfo>,
    pub limits: Limits,
    pub images: ImagePolicy,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    next_id: AtomicU64,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queue: Queue,
        models: Vec<ModelInfo>,
        limits: Limits,
        images: ImagePolicy,
        metrics: Arc<Metrics>,
        api_key: Option<String>,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            queue,
            models,
            limits,
            images,
            metrics,
            api_key,
            max_body_bytes,
            next_id: AtomicU64::new(1),
        }
    }

    /// The model of `family` a request asks for (its `model` field may be
    /// omitted when the server has one).
    fn model(&self, asked: Option<&str>, family: ModelFamily) -> Result<&ModelInfo, ApiError> {
        match asked {
            Some(id) => {
                let m = self.models.iter().find(|m| m.id == id).ok_or_else(|| {
                    let ids: Vec<&str> = self.models.iter().map(|m| m.id.as_str()).collect();
                    ApiError::not_found(format!(
                        "model `{id}` does not exist; this server has {}",
                        ids.join(", ")
                    ))
                    .with_param("model")
                    .with_code("model_not_found")
                })?;
                if m.family != family {
                    return Err(ApiError::param(
                        "model",
                        format!(
                            "model `{id}` is {}, which does not serve this endpoint",
                            m.family.repo_id()
                        ),
                    )
                    .with_code("model_not_supported"));
                }
                Ok(m)
            }
            None => self.models.iter().find(|m| m.family == family).ok_or_else(|| {
                ApiError::param("model", format!("this server has no {} model", family.repo_id()))
                    .with_code("model_not_found")
            }),
        }
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/images/generations", post(images))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/", get(|| async { Html(PAGE_HTML) }))
        .route(
            "/app.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], PAGE_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], PAGE_CSS) }),
        )
        .route("/health", get(health))
        .fallback(|| async {
            error_response(ApiError::not_found(
                "no such route; see /v1/models, /v1/chat/completions, /v1/completions, /v1/images/generations",
            ))
        })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/app.js");
const PAGE_CSS: &str = include_str!("page/style.css");

/// Labels every response in `/metrics` by route, status and error kind.
async fn count(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let r = next.run(req).await;
    let kind = r.extensions().get::<ErrorKind>().map(|k| k.0);
    s.metrics.response(&route, r.status().as_u16(), kind);
    r
}

#[derive(Clone, Copy)]
struct ErrorKind(&'static str);

fn error_response(e: ApiError) -> Response {
    let kind = e.metric_kind();
    let mut r = e.into_response();
    r.extensions_mut().insert(ErrorKind(kind));
    r
}

/// `Authorization: Bearer KEY` when the server has a key.
async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.as_bytes(), key.as_bytes()) {
            return error_response(ApiError::unauthorized());
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference (no timing hint about the key).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "models": s.models.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        "queue_depth": s.metrics.queued.load(Ordering::Relaxed),
    }))
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    let data: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": "emu-rs",
                "emu_family": m.family.repo_id(),
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The body, at most `max_body_bytes`.
async fn read_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(format!(
            "the request body is larger than this server's limit of {} bytes",
            s.max_body_bytes
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.max_body_bytes as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, s.max_body_bytes)
        .await
        .map_err(|_| too_large())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sets the job's cancellation flag when dropped: a handler future or a
/// response stream is dropped when its client disconnects.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Queues `task`; returns the event stream and the cancellation guard.
fn submit(s: &AppState, task: Task, files: RequestFiles) -> Result<(UnboundedReceiver<Event>, CancelOnDrop), ApiError> {
    let (tx, rx) = unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    s.queue.submit(Job {
        task,
        cancel: cancel.clone(),
        events: tx,
        _files: files,
    })?;
    Ok((rx, CancelOnDrop(cancel)))
}

/// Waits for the job's result, ignoring streamed pieces.
async fn finish(mut rx: UnboundedReceiver<Event>, _guard: CancelOnDrop) -> Result<Output, ApiError> {
    while let Some(ev) = rx.recv().await {
        if let Event::Done(r) = ev {
            return r;
        }
    }
    Err(ApiError::internal("the model worker stopped"))
}

/// Server-sent events from a job: `translate` turns each job event into
/// zero or more SSE events (the result's events end the stream, followed
/// by `data: [DONE]`). Dropping the stream (client gone) cancels the job.
fn sse_stream(
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    first: Vec<Value>,
    translate: impl FnMut(Event) -> Vec<Value> + Send + 'static,
) -> Response {
    struct St<F> {
        rx: UnboundedReceiver<Event>,
        _guard: CancelOnDrop,
        pending: VecDeque<SseEvent>,
        done: bool,
        translate: F,
    }
    let st = St {
        rx,
        _guard: guard,
        pending: first.into_iter().map(data).collect(),
        done: false,
        translate,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(ev) => {
                    let end = matches!(ev, Event::Done(_));
                    st.pending.extend((st.translate)(ev).into_iter().map(data));
                    if end {
                        st.pending.push_back(SseEvent::default().data("[DONE]"));
                        st.done = true;
                    }
                }
                None => {
                    st.pending
                        .push_back(data(ApiError::internal("the model worker stopped").body()));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn data(v: Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn finish_reason(ids: usize, max: usize) -> &'static str {
    if ids >= max {
        "length"
    } else {
        "stop"
    }
}

fn usage(a: &crate::deps::ChatAnswer) -> Value {
    json!({
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.ids.len(),
        "total_tokens": a.prompt_tokens + a.ids.len(),
    })
}

/// Grounding boxes in pixels of the first image (`[left, top, right, bottom]`).
fn boxes(a: &crate::deps::ChatAnswer) -> Option<Value> {
    a.grounding.as_ref().map(|g| {
        Value::Array(
            g.boxes
                .iter()
                .map(|b| json!({"box": b.pixels, "grid": b.grid, "text": a.text.get(b.span.clone())}))
                .collect(),
        )
    })
}

async fn chat(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    chat_inner(&s, &headers, body).await.unwrap_or_else(error_response)
}

async fn chat_inner(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(s, headers, body).await?;
    let req: api::ChatRequest = api::parse(&bytes)?;
    let model = s.model(req.model.as_deref(), ModelFamily::Emu2Chat)?.id.clone();
    let stream = req.stream;
    let mut files = RequestFiles::new();
    let (prompt, opts) = api::chat_task(req, &s.limits, &s.images, &mut files)?;
    let max = opts.generation.max_new_tokens;
    let (rx, guard) = submit(s, Task::Chat { prompt, opts, stream }, files)?;
    let id = s.id("chatcmpl");
    let created = now();
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |delta: Value, finish: Option<&str>, extra: Option<(Value, Option<Value>)>| {
            let mut choice = json!({"index": 0, "delta": delta, "finish_reason": finish});
            let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model});
            if let Some((usage, boxes)) = extra {
                v["usage"] = usage;
                if let Some(b) = boxes {
                    choice["boxes"] = b;
                }
            }
            v["choices"] = json!([choice]);
            v
        }
    };
    if stream {
        let first = vec![chunk(json!({"role": "assistant", "content": ""}), None, None)];
        return Ok(sse_stream(rx, guard, first, move |ev| match ev {
            Event::Text(t) => vec![chunk(json!({"content": t}), None, None)],
            Event::Step { .. } => vec![],
            Event::Done(Ok(Output::Text(a))) => {
                vec![chunk(
                    json!({}),
                    Some(finish_reason(a.ids.len(), max)),
                    Some((usage(&a), boxes(&a))),
                )]
            }
            Event::Done(Ok(Output::Images(_))) => vec![ApiError::internal("unexpected output").body()],
            Event::Done(Err(e)) => vec![e.body()],
        }));
    }
    let Output::Text(a) = finish(rx, guard).await? else {
        return Err(ApiError::internal("unexpected output"));
    };
    let mut message = json!({"role": "assistant", "content": a.text});
    if let Some(b) = boxes(&a) {
        message["boxes"] = b;
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(a.ids.len(), max)}],
        "usage": usage(&a),
    }))
    .into_response())
}

async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    completions_inner(&s, &headers, body)
        .await
        .unwrap_or_else(error_response)
}

async fn completions_inner(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(s, headers, body).await?;
    let req: api::CompletionRequest = api::parse(&bytes)?;
    let model = s.model(req.model.as_deref(), ModelFamily::Emu2)?.id.clone();
    let stream = req.stream;
    let mut files = RequestFiles::new();
    let (prompt, opts) = api::completion_task(req, &s.limits, &s.images, &mut files)?;
    let max = opts.generation.max_new_tokens;
    let (rx, guard) = submit(s, Task::Complete { prompt, opts, stream }, files)?;
    let id = s.id("cmpl");
    let created = now();
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |text: &str, finish: Option<&str>, usage: Option<Value>| {
            let mut v = json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            });
            if let Some(u) = usage {
                v["usage"] = u;
            }
            v
        }
    };
    if stream {
        return Ok(sse_stream(rx, guard, vec![], move |ev| match ev {
            Event::Text(t) => vec![chunk(&t, None, None)],
            Event::Step { .. } => vec![],
            Event::Done(Ok(Output::Text(a))) => vec![chunk("", Some(finish_reason(a.ids.len(), max)), Some(usage(&a)))],
            Event::Done(Ok(Output::Images(_))) => vec![ApiError::internal("unexpected output").body()],
            Event::Done(Err(e)) => vec![e.body()],
        }));
    }
    let Output::Text(a) = finish(rx, guard).await? else {
        return Err(ApiError::internal("unexpected output"));
    };
    Ok(Json(chunk(&a.text, Some(finish_reason(a.ids.len(), max)), Some(usage(&a)))).into_response())
}

async fn images(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    images_inner(&s, &headers, body).await.unwrap_or_else(error_response)
}

fn images_body(created: u64, pngs: &[crate::engine::Png]) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    json!({
        "created": created,
        "data": pngs.iter().map(|p| json!({"b64_json": b64.encode(&p.bytes), "width": p.width, "height": p.height})).collect::<Vec<_>>(),
    })
}

async fn images_inner(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(s, headers, body).await?;
    let req: api::ImageRequest = api::parse(&bytes)?;
    let info = s.model(req.model.as_deref(), ModelFamily::Emu2Gen)?;
    let mut files = RequestFiles::new();
    let default_size = info.default_size.unwrap_or(1024);
    let (prompt, runs) = api::image_task(&req, &s.limits, default_size, &s.images, &mut files)?;
    let progress = req.stream;
    let (rx, guard) = submit(s, Task::Generate { prompt, runs, progress }, files)?;
    let created = now();
    if progress {
        return Ok(sse_stream(rx, guard, vec![], move |ev| match ev {
            Event::Step { image, step, total } => {
                vec![json!({"type": "progress", "image": image, "step": step, "total": total})]
            }
            Event::Text(_) => vec![],
            Event::Done(Ok(Output::Images(p))) => {
                let mut v = images_body(created, &p);
                v["type"] = json!("result");
                vec![v]
            }
            Event::Done(Ok(Output::Text(_))) => vec![ApiError::internal("unexpected output").body()],
            Event::Done(Err(e)) => vec![e.body()],
        }));
    }
    let Output::Images(p) = finish(rx, guard).await? else {
        return Err(ApiError::internal("unexpected output"));
    };
    Ok(Json(images_body(created, &p)).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_comparison() {
        assert!(super::same(b"abc", b"abc"));
        assert!(!super::same(b"abc", b"abd"));
        assert!(!super::same(b"abc", b"abcd"));
    }
}
