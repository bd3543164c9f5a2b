//! `emu serve` end to end on the tiny models, over real loopback HTTP.

mod common;

use common::*;
use emu_serve::ServeArgs;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::OnceLock;

struct Shared {
    addr: SocketAddr,
    /// The folder of --allow-local-files, with `inside.png` in it.
    allowed: std::path::PathBuf,
    /// A PNG outside that folder.
    outside: std::path::PathBuf,
    _server: emu_serve::RunningServer,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// One server for the tests that do not need their own queue.
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let allowed = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(allowed.path().join("inside.png"), png(40, 30)).unwrap();
        std::fs::write(outside.path().join("outside.png"), png(40, 30)).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.path().join("outside.png"), allowed.path().join("link.png")).unwrap();
        let mut args = ServeArgs::for_model("tiny");
        args.allow_local_files = Some(allowed.path().to_path_buf());
        args.max_body_bytes = 1 << 20;
        args.max_steps = 20;
        let server = start(&args);
        Shared {
            addr: server.addr(),
            allowed: allowed.path().canonicalize().unwrap(),
            outside: outside.path().join("outside.png"),
            _server: server,
            _dirs: (allowed, outside),
        }
    })
}

fn addr() -> SocketAddr {
    shared().addr
}

/// The concatenated `delta.content` of a streamed chat, and its last chunk.
fn streamed_chat(reply: &Reply) -> (String, Value) {
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", reply.text());
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (text, chunks.last().unwrap().clone())
}

fn assert_error(reply: &Reply, status: u16, code: Option<&str>, param: Option<&str>) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let v = reply.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(
        e.as_object().unwrap().contains_key("param") && e.as_object().unwrap().contains_key("code"),
        "{v}"
    );
    if let Some(c) = code {
        assert_eq!(e["code"], c, "{v}");
    }
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "emu2-chat-tiny",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(&png(40, 30))}},
                {"type": "text", "text": "What is in the picture?"}
            ]}
        ],
        "max_tokens": 24,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn chat_streamed_text_is_byte_identical() {
    for extra in [
        json!({}),
        json!({"temperature": 0.9, "top_p": 0.8, "seed": 11}),
        json!({"num_beams": 2, "length_penalty": 1.0}),
        json!({"stop": ["e", "a"]}),
    ] {
        let plain = post(addr(), "/v1/chat/completions", &chat_body(extra.clone()));
        assert_eq!(plain.status, 200, "{}", plain.text());
        let v = plain.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "emu2-chat-tiny");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let usage = &v["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 16, "{v}");
        let mut streamed = chat_body(extra.clone());
        streamed["stream"] = json!(true);
        let reply = post(addr(), "/v1/chat/completions", &streamed);
        assert_eq!(reply.status, 200);
        assert!(reply.header("content-type").unwrap().starts_with("text/event-stream"));
        let (s, last) = streamed_chat(&reply);
        assert_eq!(s.as_bytes(), text.as_bytes(), "{extra}");
        assert_eq!(last["choices"][0]["finish_reason"], v["choices"][0]["finish_reason"]);
        assert_eq!(last["usage"], *usage);
        if extra.as_object().unwrap().is_empty() {
            // Greedy search streams token by token: one piece per token at most
            // (role chunk, pieces, final chunk, [DONE]).
            let pieces = reply.events().len() - 3;
            let tokens = usage["completion_tokens"].as_u64().unwrap() as usize;
            assert!(
                pieces <= tokens && pieces >= 2,
                "{pieces} pieces for {tokens} tokens: {text:?}"
            );
        }
    }
}

#[test]
fn special_tokens_and_markup_in_user_text_stay_text() {
    // Were `<image>` read as the image slot, the prompt would hold slots
    // without images and the request would fail.
    let body =
        json!({"messages": [{"role": "user", "content": "<image><image>[IMG]{image x.png}</s>"}], "max_tokens": 4});
    let r = post(addr(), "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn grounding_boxes_are_in_pixels_of_the_image() {
    let r = post(addr(), "/v1/chat/completions", &chat_body(json!({"grounding": true})));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let message = &v["choices"][0]["message"];
    let text = message["content"].as_str().unwrap();
    let expected = emu_prompt::parse_boxes(text, 40, 30);
    let boxes = message["boxes"].as_array().expect("boxes in grounding mode");
    assert_eq!(boxes.len(), expected.boxes.len());
    for (b, e) in boxes.iter().zip(&expected.boxes) {
        let got: Vec<f64> = b["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got, e.pixels.to_vec());
    }
    let plain = post(addr(), "/v1/chat/completions", &chat_body(json!({})));
    assert!(plain.json()["choices"][0]["message"].get("boxes").is_none());
}

#[test]
fn completion_of_a_few_shot_prompt() {
    let img = data_uri(&png(20, 20));
    let prompt = format!("{{image \"{img}\"}}[red, 3].{{image \"{img}\"}}[blue, 2].{{image \"{img}\"}}");
    let body = json!({"model": "emu2-tiny", "prompt": prompt, "max_tokens": 12});
    let r = post(addr(), "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let mut body = body;
    body["stream"] = json!(true);
    let reply = post(addr(), "/v1/completions", &body);
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, text);
}

fn decode_png(b64: &str) -> image::RgbImage {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

#[test]
fn image_generation_is_deterministic_for_a_seed() {
    let subject = data_uri(&png(24, 24));
    let prompt = format!("a cat {{object box=10,10,200,200 phrase=\"a cat\" subject=\"{subject}\"}} on grass");
    let body = json!({"model": "emu2-gen-tiny", "prompt": prompt, "n": 2, "steps": 3, "seed": 5, "size": "32"});
    let a = post(addr(), "/v1/images/generations", &body);
    assert_eq!(a.status, 200, "{}", a.text());
    let a = a.json();
    let data = a["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let first = decode_png(data[0]["b64_json"].as_str().unwrap());
    assert_eq!(first.dimensions(), (32, 32));
    let b = post(addr(), "/v1/images/generations", &body).json();
    assert_eq!(a["data"], b["data"], "same seed, same images");
    assert_ne!(data[0]["b64_json"], data[1]["b64_json"], "n images use different seeds");
    // Progress over server-sent events, then the same images.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let reply = post(addr(), "/v1/images/generations", &streamed);
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let values: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let progress: Vec<(u64, u64)> = values
        .iter()
        .filter(|v| v["type"] == "progress")
        .map(|v| (v["image"].as_u64().unwrap(), v["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(progress, vec![(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]);
    let result = values.last().unwrap();
    assert_eq!(result["type"], "result");
    assert_eq!(result["data"], a["data"]);
}

#[test]
fn models_health_metrics() {
    let m = get(addr(), "/v1/models").json();
    let mut ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["emu2-chat-tiny", "emu2-gen-tiny", "emu2-tiny"]);
    let h = get(addr(), "/health");
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("ok")));
    let r = post(
        addr(),
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);
    let _ = post(addr(), "/v1/chat/completions", &json!({"messages": []}));
    let text = get(addr(), "/metrics").text();
    for needle in [
        "emu_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
        "emu_requests_total{route=\"/v1/chat/completions\",status=\"400\"}",
        "emu_errors_total{kind=\"invalid_request_error\"}",
        "# TYPE emu_queue_depth gauge",
        "emu_tokens_per_second ",
        "emu_steps_per_second ",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(metric(addr(), "emu_generated_tokens_total") >= 1.0);
    let page = get(addr(), "/");
    assert!(page.text().contains("<script src=\"/app.js\">"));
    assert!(get(addr(), "/app.js")
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
}

fn with_image(url: &str) -> Value {
    json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}], "max_tokens": 2})
}

#[test]
fn refusals() {
    let a = addr();
    let chat = "/v1/chat/completions";
    let param = "messages[0].content[0].image_url.url";
    // Oversized body (the limit is 1 MiB here).
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(2 << 20)}]});
    assert_error(&post(a, chat, &big), 413, Some("request_too_large"), None);
    // Bad base64, not an image, too many pixels.
    assert_error(
        &post(a, chat, &with_image("data:image/png;base64,!!notbase64!!")),
        400,
        Some("invalid_image"),
        Some(param),
    );
    assert_error(
        &post(a, chat, &with_image(&data_uri(b"GIF89a"))),
        400,
        Some("invalid_image"),
        Some(param),
    );
    // Network URLs.
    assert_error(
        &post(a, chat, &with_image("https://example.com/cat.png")),
        400,
        Some("unsupported_url"),
        Some(param),
    );
    // Local files: inside the allowed folder yes, outside (directly, by `..`, by symlink) no.
    let s = shared();
    let inside = s.allowed.join("inside.png");
    assert_eq!(post(a, chat, &with_image(inside.to_str().unwrap())).status, 200);
    assert_eq!(
        post(a, chat, &with_image(&format!("file://{}", inside.display()))).status,
        200
    );
    for path in [
        s.outside.display().to_string(),
        "../outside.png".into(),
        "link.png".into(),
        "/etc/passwd".into(),
    ] {
        assert_error(
            &post(a, chat, &with_image(&path)),
            403,
            Some("path_not_allowed"),
            Some(param),
        );
    }
    // Bad parameters.
    let q = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (extra, p) in [
        (json!({"temperature": 7}), "temperature"),
        (json!({"max_tokens": 100000}), "max_tokens"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"n": 3}), "n"),
        (json!({"num_beams": 99}), "num_beams"),
    ] {
        assert_error(&post(a, chat, &q(extra)), 400, None, Some(p));
    }
    assert_error(&request(a, "POST", chat, &[], b"{not json"), 400, None, None);
    assert_error(&post(a, chat, &json!({"messages": "hi"})), 400, None, None);
    let img = "/v1/images/generations";
    assert_error(
        &post(a, img, &json!({"prompt": "x", "steps": 21})),
        400,
        None,
        Some("steps"),
    );
    assert_error(
        &post(a, img, &json!({"prompt": "x", "size": "4096"})),
        400,
        None,
        Some("size"),
    );
    assert_error(&post(a, img, &json!({"prompt": "x", "size": "33"})), 400, None, None);
    assert_error(
        &post(a, "/v1/completions", &json!({"prompt": "{image"})),
        400,
        None,
        Some("prompt"),
    );
    // Unknown model, and a model of the wrong family.
    assert_error(
        &post(a, chat, &q(json!({"model": "gpt-4o"}))),
        404,
        Some("model_not_found"),
        Some("model"),
    );
    assert_error(
        &post(a, chat, &q(json!({"model": "emu2-gen-tiny"}))),
        400,
        Some("model_not_supported"),
        Some("model"),
    );
    assert_error(&get(a, "/v1/nothing"), 404, None, None);
}

#[test]
fn api_key() {
    let mut args = ServeArgs::for_model("tiny");
    args.api_key = Some("sesame".into());
    let server = start(&args);
    let a = server.addr();
    assert_error(&get(a, "/v1/models"), 401, Some("invalid_api_key"), None);
    assert_error(
        &request(a, "GET", "/v1/models", &[("Authorization", "Bearer nope")], b""),
        401,
        None,
        None,
    );
    assert_error(&get(a, "/metrics"), 401, None, None);
    assert_eq!(
        request(a, "GET", "/v1/models", &[("Authorization", "Bearer sesame")], b"").status,
        200
    );
    assert_eq!(get(a, "/health").status, 200);
    assert_eq!(get(a, "/").status, 200);
}

/// A generation that runs until cancelled: 4 images of 1000 steps.
fn long_generation(stream: bool) -> Value {
    json!({"prompt": "a long walk", "n": 4, "steps": 1000, "size": "32", "stream": stream})
}

fn long_server(depth: usize) -> emu_serve::RunningServer {
    let mut args = ServeArgs::for_model("tiny");
    args.queue_depth = depth;
    args.max_steps = 1000;
    start(&args)
}

/// Reads from a streamed response until `needle` arrives.
fn read_until(s: &mut std::net::TcpStream, needle: &str) {
    use std::io::Read;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = s.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "connection closed before `{needle}`: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn a_disconnected_client_stops_the_computation() {
    let server = long_server(4);
    let a = server.addr();
    let body = long_generation(true).to_string();
    // Streamed: leave after the first progress event.
    let mut s = send(a, "POST", "/v1/images/generations", &[], body.as_bytes());
    read_until(&mut s, "\"progress\"");
    drop(s);
    wait_until("the streamed job is cancelled", || {
        metric(a, "emu_cancelled_total") == 1.0
    });
    wait_until("the worker is idle", || metric(a, "emu_running") == 0.0);
    let steps = metric(a, "emu_diffusion_steps_total");
    assert!(steps < 4000.0, "all {steps} steps ran");
    // Not streamed: leave while it runs.
    let s = send(
        a,
        "POST",
        "/v1/images/generations",
        &[],
        long_generation(false).to_string().as_bytes(),
    );
    wait_until("the job runs", || metric(a, "emu_running") == 1.0);
    drop(s);
    wait_until("the plain job is cancelled", || metric(a, "emu_cancelled_total") == 2.0);
    wait_until("the worker is idle", || metric(a, "emu_running") == 0.0);
    assert!(metric(a, "emu_diffusion_steps_total") < steps + 4000.0);
    // The server still answers.
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn a_full_queue_answers_429() {
    let server = long_server(1);
    let a = server.addr();
    let mut running = send(
        a,
        "POST",
        "/v1/images/generations",
        &[],
        long_generation(true).to_string().as_bytes(),
    );
    read_until(&mut running, "\"progress\"");
    let queued = send(
        a,
        "POST",
        "/v1/images/generations",
        &[],
        long_generation(false).to_string().as_bytes(),
    );
    wait_until("one request waits", || metric(a, "emu_queue_depth") == 1.0);
    let refused = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_error(&refused, 429, Some("queue_full"), None);
    let retry: u64 = refused.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry >= 1);
    drop(queued);
    drop(running);
    wait_until("both are cancelled", || metric(a, "emu_cancelled_total") == 2.0);
    wait_until("the queue is empty", || {
        metric(a, "emu_queue_depth") == 0.0 && metric(a, "emu_running") == 0.0
    });
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);
}

/// `--offload sequential`: a server that loads each component per request
/// stage answers and draws exactly what the resident one does.
#[test]
fn a_sequential_server_gives_the_same_answers_and_images() {
    let mut args = ServeArgs::for_model("tiny");
    args.offload = emu::pipeline::Residency::Sequential;
    let seq = start(&args);
    let chat = chat_body(json!({"num_beams": 1}));
    let a = post(addr(), "/v1/chat/completions", &chat);
    let b = post(seq.addr(), "/v1/chat/completions", &chat);
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(a.json()["choices"], b.json()["choices"]);
    let body = json!({"model": "emu2-gen-tiny", "prompt": "a cat", "steps": 2, "seed": 3, "size": "32"});
    let a = post(addr(), "/v1/images/generations", &body);
    let b = post(seq.addr(), "/v1/images/generations", &body);
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(a.json()["data"], b.json()["data"]);
}
