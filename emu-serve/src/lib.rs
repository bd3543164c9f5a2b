//! `emu serve`: an OpenAI-compatible HTTP server for the Emu2 pipelines,
//! with a web page at `/`.
//!
//! * `POST /v1/chat/completions`: Emu2-Chat, OpenAI messages with `text`
//!   and `image_url` parts (data URIs; local paths only under
//!   `--allow-local-files`), streamed over server-sent events on request;
//!   extensions `num_beams`, `length_penalty`, `grounding` (boxes in pixels).
//! * `POST /v1/completions`: Emu2 (base) few-shot prompts in emu markup.
//! * `POST /v1/images/generations`: Emu2-Gen, `b64_json` PNGs, progress
//!   events when `stream` is set.
//! * `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
//!
//! The models are loaded once on a dedicated thread, which runs one request
//! at a time from a bounded queue (beyond it: 429 with `Retry-After`); a
//! request whose client disconnects stops at its next token or step.
//!
//! ```no_run
//! let args = emu_serve::ServeArgs::for_model("tiny");
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let server = emu_serve::spawn(&args, listener)?;
//! println!("http://{}", server.addr());
//! server.wait()?;
//! # Ok::<(), emu_serve::ServeError>(())
//! ```

mod api;
mod deps;
mod engine;
mod error;
mod images;
mod metrics;
mod routes;

pub use error::{ApiError, ServeError};

use clap::{Args, Parser};
use deps::Residency;
use emu_core::DType;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `emu serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The model: `tiny` (the built-in random models of all three families:
    /// their output is meaningless), a model directory in the Hugging Face
    /// layout, or a repo id already in the local Hugging Face cache.
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// Address to listen on. The default serves this machine only; anything
    /// else exposes the model to the network (use --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Let requests name image files inside DIR (never outside it, symlinks included).
    #[arg(long, value_name = "DIR")]
    pub allow_local_files: Option<PathBuf>,
    /// Where to run every component: cpu, wgpu, onnx or cuda.
    #[arg(long, default_value = "cpu", value_name = "NAME")]
    pub backend: String,
    /// Compute dtype: f32, bf16 or f16. Default: f32 for the tiny model, bf16 otherwise.
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// Compute dtype of the vision encoder only (overrides --dtype).
    #[arg(long, value_name = "DTYPE")]
    pub vision_dtype: Option<String>,
    /// Which components stay in memory: none (all, loaded once) or
    /// sequential (each loaded for its stage of every request and dropped
    /// after it: the peak is the largest component, but every request
    /// reads the weights again).
    #[arg(long, default_value = "none", value_name = "MODE", value_parser = parse_offload)]
    pub offload: Residency,
    /// Requests that may wait behind the running ones; more are refused with
    /// 429. With batching, up to `--max-batch - 1` more that a batch passed
    /// over (other kinds of request) also wait.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub queue_depth: usize,
    /// Most text requests (greedy or sampled, no beams) decoded together,
    /// one forward per token for all of them; 1 turns batching off.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_batch: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 32 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,
    /// Most pixels (width x height) of one input image.
    #[arg(long, default_value_t = 4096 * 4096, value_name = "N")]
    pub max_image_pixels: u64,
    /// Most input images per request.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_images: usize,
    /// Most new tokens per request.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_tokens: usize,
    /// New tokens when a request does not say.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub default_max_tokens: usize,
    /// Widest beam search.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_beams: usize,
    /// Most denoising steps per image.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_steps: usize,
    /// Most pixels of a generated image.
    #[arg(long, default_value_t = 1024 * 1024, value_name = "N")]
    pub max_output_pixels: u64,
    /// Most images per generation request.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub max_n: usize,
}

fn parse_offload(s: &str) -> Result<Residency, String> {
    Residency::parse_offload(s).map_err(|_| format!("expected {}", Residency::choices()))
}

#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    args: ServeArgs,
}

impl ServeArgs {
    /// The defaults of the command line, serving `model`.
    pub fn for_model(model: &str) -> Self {
        Defaults::parse_from(["emu-serve", "--model", model]).args
    }

    fn check(&self) -> Result<(), ServeError> {
        if self.queue_depth == 0 {
            return Err(ServeError::Args("--queue-depth must be at least 1".into()));
        }
        if self.max_batch == 0 {
            return Err(ServeError::Args(
                "--max-batch must be at least 1 (1: no batching)".into(),
            ));
        }
        if self.default_max_tokens == 0 || self.default_max_tokens > self.max_tokens {
            return Err(ServeError::Args(
                "--default-max-tokens must be 1 to --max-tokens".into(),
            ));
        }
        if self.api_key.as_deref() == Some("") {
            return Err(ServeError::Args("--api-key must not be empty".into()));
        }
        Ok(())
    }
}

fn parse_dtype(s: Option<&str>) -> Result<Option<DType>, ServeError> {
    s.map(|s| match DType::parse(s) {
        Some(d @ (DType::F32 | DType::BF16 | DType::F16)) => Ok(d),
        _ => Err(ServeError::Args(format!(
            "`{s}` is not a compute dtype; use f32, bf16 or f16"
        ))),
    })
    .transpose()
}

/// Sets the threads of CPU computation (the cpu backend's pool, ONNX
/// Runtime's intra-op threads; 0: all cores). Call before [`spawn`].
pub fn set_threads(n: usize) -> Result<(), ServeError> {
    Ok(deps::set_threads(n)?)
}

/// A server running on its own threads.
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops.
    pub fn wait(mut self) -> Result<(), ServeError> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => Ok(r?),
            Some(Err(_)) => Err(ServeError::Args("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    /// Stops accepting connections; open ones finish.
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// Loads the model and serves on `listener` (already bound; tests bind
/// 127.0.0.1:0) from background threads. Returns once the model is loaded.
pub fn spawn(args: &ServeArgs, listener: TcpListener) -> Result<RunningServer, ServeError> {
    args.check()?;
    let backend = deps::BackendKind::parse(&args.backend)?;
    let dtype = parse_dtype(args.dtype.as_deref())?;
    let vision_dtype = parse_dtype(args.vision_dtype.as_deref())?;
    let local_root = match &args.allow_local_files {
        Some(d) => {
            let c = d
                .canonicalize()
                .map_err(|e| ServeError::Args(format!("--allow-local-files `{}`: {e}", d.display())))?;
            if !c.is_dir() {
                return Err(ServeError::Args(format!(
                    "--allow-local-files `{}` is not a folder",
                    d.display()
                )));
            }
            Some(c)
        }
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let spec = engine::LoadSpec {
        model: args.model.clone(),
        backend,
        dtype,
        vision_dtype,
        residency: args.offload,
    };
    let (queue, models) = engine::start(spec, args.queue_depth, args.max_batch, metrics.clone())?;
    let state = Arc::new(routes::AppState::new(
        queue,
        models,
        api::Limits {
            max_tokens: args.max_tokens,
            default_max_tokens: args.default_max_tokens,
            max_beams: args.max_beams,
            max_images: args.max_images,
            max_steps: args.max_steps,
            max_output_pixels: args.max_output_pixels,
            max_n: args.max_n,
        },
        images::ImagePolicy {
            local_root,
            max_pixels: args.max_image_pixels,
        },
        metrics,
        args.api_key.clone(),
        args.max_body_bytes,
    ));
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("emu-serve-http")
        .build()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = routes::router(state);
    let thread = std::thread::Builder::new().name("emu-serve".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        })
    })?;
    Ok(RunningServer {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// `emu serve`: binds `--host:--port`, loads the model, serves until killed.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    let ip: std::net::IpAddr = args
        .host
        .parse()
        .map_err(|_| ServeError::Args(format!("--host `{}` is not an IP address", args.host)))?;
    if !ip.is_loopback() {
        eprintln!(
            "warning: listening on {ip}, reachable from other machines{}",
            if args.api_key.is_none() {
                " without an --api-key"
            } else {
                ""
            }
        );
    }
    let listener = TcpListener::bind((ip, args.port))?;
    let server = spawn(&args, listener)?;
    eprintln!("emu serve: listening on http://{}/", server.addr());
    server.wait()
}
