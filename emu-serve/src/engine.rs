//! The model side: one dedicated thread loads the models once and runs
//! requests from a bounded queue: one at a time, except that text requests
//! decoded greedily or by sampling (no beams) that wait together run as one
//! batch of up to `max_batch`, one forward per generated token for all of
//! them. The pipelines are synchronous, so they never run on the async
//! runtime's threads.

use crate::deps::{
    check_dtype, BackendKind, Backends, BatchItem, ChatAnswer, ChatOptions, ChatPipeline, CompletionOptions,
    CompletionPipeline, Component, GenerationOptions, GenerationPipeline, ModelDir, ModelFamily, PipelineError,
    Residency, TINY_NOTICE,
};
use crate::error::{ApiError, ServeError};
use crate::images::RequestFiles;
use crate::metrics::Metrics;
use emu_core::{Backend, DType};
use emu_prompt::Prompt;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// A model the server answers for.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// What requests put in `model`.
    pub id: String,
    pub family: ModelFamily,
    /// Image generation only: the default output side and the multiple every side must be.
    pub default_size: Option<usize>,
}

/// What to load and where.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `tiny` (all three tiny models) or one model directory / cached repo id.
    pub model: String,
    pub backend: BackendKind,
    pub dtype: Option<DType>,
    pub vision_dtype: Option<DType>,
    /// `--offload`: every component resident, or each loaded per stage.
    pub residency: Residency,
}

/// One request's work.
pub enum Task {
    Chat {
        prompt: Prompt,
        opts: ChatOptions,
        stream: bool,
    },
    Complete {
        prompt: Prompt,
        opts: CompletionOptions,
        stream: bool,
    },
    Generate {
        prompt: Prompt,
        runs: Vec<GenerationOptions>,
        progress: bool,
    },
}

/// What the worker tells the request's handler.
#[derive(Debug)]
pub enum Event {
    /// The next piece of streamed text.
    Text(String),
    /// Image `image` finished denoising step `step` of `total`.
    Step {
        image: usize,
        step: usize,
        total: usize,
    },
    Done(Result<Output, ApiError>),
}

#[derive(Debug)]
pub enum Output {
    Text(ChatAnswer),
    Images(Vec<Png>),
}

/// An encoded PNG.
#[derive(Debug)]
pub struct Png {
    pub width: usize,
    pub height: usize,
    pub bytes: Vec<u8>,
}

pub struct Job {
    pub task: Task,
    /// Set when the client goes away; checked between tokens and steps.
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<Event>,
    /// The request's decoded images, deleted after the job.
    pub _files: RequestFiles,
}

/// The handle requests are submitted through.
#[derive(Clone)]
pub struct Queue {
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// Queues `job`, or refuses it with 429 when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        // Counted before sending so the worker's decrement never runs first.
        self.metrics.queued.fetch_add(1, Ordering::SeqCst);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => {
                        let waiting = self.metrics.queued.load(Ordering::SeqCst) + 1;
                        let secs = (self.metrics.mean_job_seconds() * waiting as f64).ceil();
                        Err(ApiError::busy(secs.clamp(1.0, 600.0) as u64))
                    }
                    TrySendError::Disconnected(_) => Err(ApiError::internal("the model worker has stopped")),
                }
            }
        }
    }
}

/// Starts the worker thread, loads the models on it and waits until they are
/// ready. `depth` is how many requests may wait behind the running ones;
/// `max_batch` is the most text requests decoded together (1: none).
pub fn start(
    spec: LoadSpec,
    depth: usize,
    max_batch: usize,
    metrics: Arc<Metrics>,
) -> Result<(Queue, Vec<ModelInfo>), ServeError> {
    let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(depth);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Vec<ModelInfo>, ServeError>>();
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("emu-serve-model".into())
        .spawn(move || {
            // Backends are opened on this thread: a GPU device need not move between threads.
            let opened = Backends::default().open(spec.backend);
            match opened {
                Ok(any) => emu::with_backend!(any, |b| worker(b, &spec, max_batch, ready_tx, rx, &m)),
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                }
            }
        })?;
    let models = ready_rx
        .recv()
        .map_err(|_| ServeError::Args("the model worker stopped while loading".into()))??;
    Ok((Queue { jobs, metrics }, models))
}

struct Loaded<B: Backend> {
    chat: Option<ChatPipeline<B, B>>,
    complete: Option<CompletionPipeline<B, B>>,
    generate: Option<GenerationPipeline<B, B, B>>,
    /// Keeps the tiny models' folders alive while the pipelines use them.
    _dirs: Vec<ModelDir>,
}

/// The id requests use for a model: `tiny` gives one per family, a folder its name.
fn model_id(spec: &str, dir: &ModelDir) -> String {
    if dir.is_tiny() {
        return match dir.family() {
            ModelFamily::Emu2 => "emu2-tiny",
            ModelFamily::Emu2Chat => "emu2-chat-tiny",
            ModelFamily::Emu2Gen => "emu2-gen-tiny",
        }
        .into();
    }
    let trimmed = spec.trim_end_matches(['/', '\\']);
    std::path::Path::new(trimmed)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(trimmed)
        .to_string()
}

fn load<B: Backend>(b: &B, spec: &LoadSpec) -> Result<(Loaded<B>, Vec<ModelInfo>), ServeError> {
    let dirs = if spec.model == "tiny" {
        eprintln!("{TINY_NOTICE}");
        vec![
            ModelDir::tiny(ModelFamily::Emu2Chat)?,
            ModelDir::tiny(ModelFamily::Emu2)?,
            ModelDir::tiny(ModelFamily::Emu2Gen)?,
        ]
    } else {
        vec![ModelDir::resolve_any(&spec.model, ModelFamily::Emu2Chat)?]
    };
    let mut loaded = Loaded {
        chat: None,
        complete: None,
        generate: None,
        _dirs: Vec::new(),
    };
    let mut infos = Vec::new();
    for dir in dirs {
        let default = if dir.is_tiny() { DType::F32 } else { DType::BF16 };
        let dtype = spec.dtype.unwrap_or(default);
        let vision = Component::new(b.clone(), spec.vision_dtype.unwrap_or(dtype));
        let llm = Component::new(b.clone(), dtype);
        check_dtype(b, vision.dtype, "vision encoder")?;
        check_dtype(b, dtype, "language model")?;
        let mut default_size = None;
        match dir.family() {
            ModelFamily::Emu2Chat => {
                loaded.chat = Some(ChatPipeline::load_with_residency(&dir, &vision, &llm, spec.residency)?)
            }
            ModelFamily::Emu2 => {
                loaded.complete = Some(CompletionPipeline::load_with_residency(
                    &dir,
                    &vision,
                    &llm,
                    spec.residency,
                )?)
            }
            ModelFamily::Emu2Gen => {
                let p = GenerationPipeline::load_with_residency(&dir, &vision, &llm, &llm, spec.residency)?;
                default_size = Some(p.default_size());
                loaded.generate = Some(p);
            }
        }
        infos.push(ModelInfo {
            id: model_id(&spec.model, &dir),
            family: dir.family(),
            default_size,
        });
        loaded._dirs.push(dir);
    }
    Ok((loaded, infos))
}

fn worker<B: Backend>(
    b: B,
    spec: &LoadSpec,
    max_batch: usize,
    ready: std::sync::mpsc::Sender<Result<Vec<ModelInfo>, ServeError>>,
    jobs: Receiver<Job>,
    metrics: &Metrics,
) {
    let loaded = match load(&b, spec) {
        Ok((l, infos)) => {
            let _ = ready.send(Ok(infos));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // Jobs taken off the channel to look for batch mates. They still count
    // in `queued`, and at most `max_batch` are held here, so the server
    // holds at most `depth + max_batch` waiting jobs.
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            // Ends when the server drops the queue.
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        while waiting.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => break,
            }
        }
        let batch = next_batch(&mut waiting, max_batch, metrics);
        if batch.is_empty() {
            continue;
        }
        metrics.running.store(batch.len(), Ordering::SeqCst);
        metrics.batch(batch.len());
        let t0 = Instant::now();
        let results = if let [job] = batch.as_slice() {
            vec![guarded(metrics, || run(&loaded, job, metrics))]
        } else {
            guarded_batch(metrics, batch.len(), || run_batch(&loaded, &batch, metrics))
        };
        metrics.jobs(batch.len(), t0.elapsed());
        metrics.running.store(0, Ordering::SeqCst);
        for (job, result) in batch.iter().zip(results) {
            if job.cancel.load(Ordering::Relaxed) {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            let _ = job.events.send(Event::Done(result));
        }
    }
}

/// Which text requests can decode together: greedy or sampled ones of the
/// same pipeline. Beam search and image generation run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchKind {
    Chat,
    Complete,
}

fn batch_kind(task: &Task) -> Option<BatchKind> {
    match task {
        Task::Chat { opts, .. } if opts.generation.num_beams == 1 => Some(BatchKind::Chat),
        Task::Complete { opts, .. } if opts.generation.num_beams == 1 => Some(BatchKind::Complete),
        _ => None,
    }
}

/// The oldest waiting job, with the later waiting jobs that can decode with
/// it (oldest first, up to `max_batch` in all). Jobs whose client left while
/// they waited are dropped here.
fn next_batch(waiting: &mut VecDeque<Job>, max_batch: usize, metrics: &Metrics) -> Vec<Job> {
    waiting.retain(|job| {
        let gone = job.cancel.load(Ordering::Relaxed);
        if gone {
            metrics.queued.fetch_sub(1, Ordering::SeqCst);
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        !gone
    });
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    let kind = batch_kind(&first.task);
    let mut batch = vec![first];
    if let Some(kind) = kind {
        let mut i = 0;
        while i < waiting.len() && batch.len() < max_batch {
            if batch_kind(&waiting[i].task) == Some(kind) {
                batch.extend(waiting.remove(i));
            } else {
                i += 1;
            }
        }
    }
    metrics.queued.fetch_sub(batch.len(), Ordering::SeqCst);
    batch
}

/// [`guarded`] for a batch: a panic fails every request of the batch.
fn guarded_batch(
    metrics: &Metrics,
    n: usize,
    f: impl FnOnce() -> Vec<Result<Output, ApiError>>,
) -> Vec<Result<Output, ApiError>> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let e = panic_error(metrics, payload);
        (0..n).map(|_| Err(ApiError::internal(e.message.clone()))).collect()
    })
}

type Cancel<'a> = Box<dyn Fn() -> bool + 'a>;
type TextSink<'a> = Box<dyn FnMut(&str) + 'a>;

/// Runs text jobs of one [`BatchKind`] together; one result per job, in order.
fn run_batch<B: Backend>(m: &Loaded<B>, jobs: &[Job], metrics: &Metrics) -> Vec<Result<Output, ApiError>> {
    let t0 = Instant::now();
    let cancels: Vec<Cancel<'_>> = jobs
        .iter()
        .map(|j| Box::new(move || j.cancel.load(Ordering::Relaxed)) as Cancel<'_>)
        .collect();
    let mut sinks: Vec<TextSink<'_>> = jobs
        .iter()
        .map(|j| {
            Box::new(move |s: &str| {
                let _ = j.events.send(Event::Text(s.to_string()));
            }) as TextSink<'_>
        })
        .collect();
    let kind = jobs.first().and_then(|j| batch_kind(&j.task));
    let answers: Vec<Result<ChatAnswer, ApiError>> = match kind {
        Some(BatchKind::Chat) => match m.chat.as_ref() {
            None => jobs.iter().map(|_| Err(missing("Emu2-Chat"))).collect(),
            Some(pipe) => {
                let mut items = Vec::with_capacity(jobs.len());
                for ((job, sink), cancel) in jobs.iter().zip(sinks.iter_mut()).zip(&cancels) {
                    if let Task::Chat { prompt, opts, stream } = &job.task {
                        items.push(BatchItem {
                            prompt,
                            opts,
                            on_text: if *stream { Some(&mut **sink) } else { None },
                            cancel: &**cancel,
                        });
                    }
                }
                same_length(jobs.len(), pipe.answer_batch(items))
            }
        },
        Some(BatchKind::Complete) => match m.complete.as_ref() {
            None => jobs.iter().map(|_| Err(missing("Emu2 (base)"))).collect(),
            Some(pipe) => {
                let mut items = Vec::with_capacity(jobs.len());
                for ((job, sink), cancel) in jobs.iter().zip(sinks.iter_mut()).zip(&cancels) {
                    if let Task::Complete { prompt, opts, stream } = &job.task {
                        items.push(BatchItem {
                            prompt,
                            opts,
                            on_text: if *stream { Some(&mut **sink) } else { None },
                            cancel: &**cancel,
                        });
                    }
                }
                same_length(jobs.len(), pipe.complete_batch(items))
            }
        },
        None => jobs
            .iter()
            .map(|_| Err(ApiError::internal("a job that cannot be batched was batched")))
            .collect(),
    };
    let tokens: usize = answers.iter().flatten().map(|a| a.ids.len()).sum();
    metrics.tokens(tokens, t0.elapsed());
    answers.into_iter().map(|a| a.map(Output::Text)).collect()
}

/// The pipeline's answers as API results, one per job (`next_batch` only
/// groups jobs of one kind, so the counts agree).
fn same_length(n: usize, answers: Vec<Result<ChatAnswer, PipelineError>>) -> Vec<Result<ChatAnswer, ApiError>> {
    if answers.len() != n {
        return (0..n)
            .map(|_| Err(ApiError::internal("a batch returned the wrong number of answers")))
            .collect();
    }
    answers.into_iter().map(|a| a.map_err(api)).collect()
}

/// Runs one job; a panic inside it fails this request only (a 500). The
/// models are read-only during a request, so nothing is left half-updated.
fn guarded(metrics: &Metrics, f: impl FnOnce() -> Result<Output, ApiError>) -> Result<Output, ApiError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(panic_error(metrics, payload)))
}

/// Counts a panic and turns its message into a 500.
fn panic_error(metrics: &Metrics, payload: Box<dyn std::any::Any + Send>) -> ApiError {
    metrics.panics.fetch_add(1, Ordering::Relaxed);
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into());
    ApiError::internal(format!("the request failed inside the model: {what}"))
}

fn missing(what: &str) -> ApiError {
    ApiError::invalid(format!("this server has no {what} model loaded")).with_code("model_not_found")
}

fn run<B: Backend>(m: &Loaded<B>, job: &Job, metrics: &Metrics) -> Result<Output, ApiError> {
    let cancel = || job.cancel.load(Ordering::Relaxed);
    let mut sink = |s: &str| {
        let _ = job.events.send(Event::Text(s.to_string()));
    };
    let t0 = Instant::now();
    match &job.task {
        Task::Chat { prompt, opts, stream } => {
            let pipe = m.chat.as_ref().ok_or_else(|| missing("Emu2-Chat"))?;
            let on_text: Option<&mut dyn FnMut(&str)> = if *stream { Some(&mut sink) } else { None };
            let answer = pipe.answer_cancellable(prompt, opts, on_text, &cancel).map_err(api)?;
            metrics.tokens(answer.ids.len(), t0.elapsed());
            Ok(Output::Text(answer))
        }
        Task::Complete { prompt, opts, stream } => {
            let pipe = m.complete.as_ref().ok_or_else(|| missing("Emu2 (base)"))?;
            let on_text: Option<&mut dyn FnMut(&str)> = if *stream { Some(&mut sink) } else { None };
            let answer = pipe.complete_cancellable(prompt, opts, on_text, &cancel).map_err(api)?;
            metrics.tokens(answer.ids.len(), t0.elapsed());
            Ok(Output::Text(answer))
        }
        Task::Generate { prompt, runs, progress } => {
            let pipe = m.generate.as_ref().ok_or_else(|| missing("Emu2-Gen"))?;
            let mut images = Vec::with_capacity(runs.len());
            for (i, opts) in runs.iter().enumerate() {
                let t0 = Instant::now();
                let mut steps = 0;
                let mut on_step = |step: usize, total: usize| {
                    steps = step;
                    if *progress {
                        let _ = job.events.send(Event::Step { image: i, step, total });
                    }
                };
                let img = pipe.generate_cancellable(prompt, opts, Some(&mut on_step), &cancel);
                metrics.steps(steps, t0.elapsed());
                let img = img.map_err(api)?;
                images.push(encode_png(img.width, img.height, img.rgb)?);
            }
            Ok(Output::Images(images))
        }
    }
}

fn api(e: PipelineError) -> ApiError {
    match e {
        PipelineError::Cancelled => ApiError::invalid("cancelled: the client went away").with_code("cancelled"),
        other => other.into(),
    }
}

fn encode_png(width: usize, height: usize, rgb: Vec<u8>) -> Result<Png, ApiError> {
    let img = image::RgbImage::from_raw(width as u32, height as u32, rgb)
        .ok_or_else(|| ApiError::internal("the decoded image has the wrong number of pixels"))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ApiError::internal(format!("PNG encoding failed: {e}")))?;
    Ok(Png {
        width,
        height,
        bytes: out.into_inner(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_job_is_a_500() {
        let metrics = Metrics::default();
        let e = guarded(&metrics, || panic!("boom")).unwrap_err();
        assert_eq!(e.status.as_u16(), 500);
        assert!(e.message.contains("boom"), "{}", e.message);
        assert_eq!(metrics.panics.load(Ordering::Relaxed), 1);
        let ok = guarded(&metrics, || Ok(Output::Images(Vec::new())));
        assert!(matches!(ok, Ok(Output::Images(v)) if v.is_empty()));
    }
}
