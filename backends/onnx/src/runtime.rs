//! Loading ONNX Runtime and running serialised models, with sessions cached
//! by model bytes so that a graph seen before is not compiled again.

use emu_core::{DType, Error, HostTensor, Result};
use half::{bf16, f16};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub(crate) const NAME: &str = "onnx";

/// A tensor as ONNX Runtime holds it.
pub(crate) type Value = DynValue;

/// Sessions kept at most; beyond this the cache is cleared (graphs whose
/// structure changes every call would otherwise grow it without bound).
const MAX_SESSIONS: usize = 256;

pub(crate) fn backend_err(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: NAME.to_string(),
        message: message.into(),
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: NAME.to_string(),
        reason: reason.into(),
    }
}

static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
/// Intra-op threads of the shared pool (0: ONNX Runtime's default, one per
/// core), fixed when the environment is created.
static GLOBAL_THREADS: OnceLock<usize> = OnceLock::new();

/// Asks for a shared pool of `threads`; true when the shared pool has (or,
/// created later, will have) that size. Only the first request before the
/// environment exists can size it.
fn request_global_threads(threads: usize) -> bool {
    *GLOBAL_THREADS.get_or_init(|| threads) == threads
}

/// The library path: `ORT_DYLIB_PATH`, which `.ci/run` points at the
/// `onnxruntime` wheel's `onnxruntime/capi/libonnxruntime.so.<version>`.
pub(crate) fn library_path() -> Result<PathBuf> {
    let path = std::env::var_os("ORT_DYLIB_PATH").ok_or_else(|| {
        unavailable(
            "ORT_DYLIB_PATH is not set; point it at libonnxruntime (e.g. `pip install onnxruntime==1.32.0` \
             and use onnxruntime/capi/libonnxruntime.so.1.32.0 inside the installed package)",
        )
    })?;
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(unavailable(format!(
            "ORT_DYLIB_PATH points at {}, which is not a file",
            path.display()
        )));
    }
    Ok(path)
}

/// The process-wide ONNX Runtime environment, loaded on first use.
pub(crate) fn environment() -> Result<&'static Environment> {
    let env = ENV.get_or_init(|| {
        let path = library_path().map_err(|e| match e {
            Error::BackendUnavailable { reason, .. } => reason,
            other => other.to_string(),
        })?;
        ort::init_from(&path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?
            .with_name("emu-rs")
            // One shared pool: a thread pool per session would be created
            // for every distinct graph, which dominates small graphs.
            .with_global_thread_pool(global_pool_options()?)
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|reason| unavailable(reason.clone()))
}

fn global_pool_options() -> std::result::Result<ort::environment::GlobalThreadPoolOptions, String> {
    let opts = ort::environment::GlobalThreadPoolOptions::default();
    match *GLOBAL_THREADS.get_or_init(|| 0) {
        0 => Ok(opts),
        n => opts
            .with_intra_threads(n)
            .map_err(|e| format!("cannot size ONNX Runtime's thread pool to {n}: {e}")),
    }
}

/// Where ONNX Runtime runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU provider (every build has it).
    #[default]
    Cpu,
    /// The CUDA provider on this device ordinal; needs a library built with
    /// it (the `onnxruntime-gpu` wheel's, not the CPU wheel's).
    Cuda { device: i32 },
}

impl ExecutionProvider {
    /// `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda { device: 0 }),
            _ => match s.strip_prefix("cuda:").and_then(|d| d.parse().ok()) {
                Some(device) if device >= 0 => Ok(Self::Cuda { device }),
                _ => Err(Error::InvalidArgument(format!(
                    "ONNX Runtime execution provider `{s}`: use cpu, cuda or cuda:N"
                ))),
            },
        }
    }

    /// From `EMU_ONNX_EP` (`cpu`, `cuda`, `cuda:N`); CPU when it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("EMU_ONNX_EP") {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(Self::Cpu),
        }
    }

    /// Checks that the loaded library has this provider.
    pub(crate) fn check_available(self) -> Result<()> {
        use ort::ep::ExecutionProvider as _;
        if let Self::Cuda { .. } = self {
            let has = ort::ep::CUDA::is_available().map_err(|e| backend_err(e.to_string()))?;
            if !has {
                let lib = library_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "ONNX Runtime".into());
                return Err(unavailable(format!(
                    "{lib} has no CUDA execution provider (the CPU-only `onnxruntime` wheel has none; point ORT_DYLIB_PATH at the `onnxruntime-gpu` library, or use EMU_ONNX_EP=cpu)"
                )));
            }
        }
        Ok(())
    }
}

/// Compiled sessions, keyed by the exact model bytes.
#[derive(Default)]
pub(crate) struct SessionCache {
    sessions: Mutex<HashMap<Vec<u8>, Arc<Mutex<Session>>>>,
    threads: usize,
    ep: ExecutionProvider,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.sessions.lock().map(|s| s.len()).unwrap_or(0);
        write!(f, "SessionCache({n} sessions)")
    }
}

fn new_session(
    model: Source<'_>,
    threads: usize,
    ep: ExecutionProvider,
    weights: &[(&str, &HostTensor)],
) -> Result<Session> {
    let env = environment()?;
    let mut builder = Session::builder(env).map_err(|e| backend_err(e.to_string()))?;
    // Initializers whose data lives outside the model bytes: ONNX Runtime
    // copies each into the graph before optimising it.
    for (name, h) in weights {
        builder = builder
            .with_external_initializer(name, to_value(h)?)
            .map_err(|e| backend_err(format!("initializer {name}: {e}")))?;
    }
    if let ExecutionProvider::Cuda { device } = ep {
        // Fail rather than fall back to the CPU silently.
        let cuda = ort::ep::CUDA::default()
            .with_device_id(device)
            .build()
            .error_on_failure();
        builder = builder
            .with_execution_providers([cuda])
            .map_err(|e| unavailable(format!("cannot use the CUDA execution provider: {e}")))?;
    }
    if threads > 0 {
        builder = builder
            .with_independent_thread_pool()
            .map_err(|e| backend_err(e.to_string()))?
            .with_intra_threads(threads)
            .map_err(|e| backend_err(e.to_string()))?;
    }
    match model {
        Source::Bytes(b) => builder.commit_from_memory(b),
        Source::File(p) => builder.commit_from_file(p),
    }
    .map_err(|e| backend_err(format!("ONNX Runtime rejected the graph: {e}")))
}

enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

impl SessionCache {
    /// `threads` > 0 sizes the shared pool when this is the first request;
    /// a different size asked for later gets a pool per session (correct,
    /// but each distinct graph then starts its own threads).
    pub(crate) fn new(threads: usize, ep: ExecutionProvider) -> Self {
        let own_pool = threads > 0 && !request_global_threads(threads);
        Self {
            sessions: Mutex::new(HashMap::new()),
            threads: if own_pool { threads } else { 0 },
            ep,
        }
    }

    pub(crate) fn execution_provider(&self) -> ExecutionProvider {
        self.ep
    }

    pub(crate) fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Runs `model` (compiling it once per distinct byte string, with the
    /// data of its held-out `weights`) and returns
    /// its outputs, each on the host and as ONNX Runtime's value (which a
    /// later run can take as an input without another copy).
    pub(crate) fn run(
        &self,
        model: Vec<u8>,
        feeds: &[(&str, &Value)],
        weights: &[(&str, &HostTensor)],
    ) -> Result<Vec<(HostTensor, Value)>> {
        let session = {
            let mut map = self
                .sessions
                .lock()
                .map_err(|_| backend_err("session cache poisoned"))?;
            match map.get(&model) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(Mutex::new(new_session(
                        Source::Bytes(&model),
                        self.threads,
                        self.ep,
                        weights,
                    )?));
                    if map.len() >= MAX_SESSIONS {
                        map.clear();
                    }
                    map.insert(model, s.clone());
                    s
                }
            }
        };
        let mut session = session.lock().map_err(|_| backend_err("session poisoned"))?;
        let inputs: Vec<(&str, &Value)> = feeds.to_vec();
        let outputs = session
            .run(inputs)
            .map_err(|e| backend_err(format!("ONNX Runtime run failed: {e}")))?;
        let mut result = Vec::with_capacity(outputs.len());
        for (_, v) in outputs {
            result.push((from_value(&v)?, v));
        }
        Ok(result)
    }
}

/// Loads an `.onnx` file with ONNX Runtime and runs it once on named inputs.
pub fn run_model_file(path: &Path, feeds: &[(&str, &HostTensor)]) -> Result<Vec<HostTensor>> {
    let mut session = new_session(Source::File(path), 0, ExecutionProvider::Cpu, &[])?;
    let feeds: Vec<(String, &HostTensor)> = feeds.iter().map(|(n, t)| (n.to_string(), *t)).collect();
    run_session(&mut session, &feeds)
}

fn run_session(session: &mut Session, feeds: &[(String, &HostTensor)]) -> Result<Vec<HostTensor>> {
    let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(feeds.len());
    for (name, t) in feeds {
        inputs.push((name.clone(), to_value(t)?));
    }
    let outputs = session
        .run(inputs)
        .map_err(|e| backend_err(format!("ONNX Runtime run failed: {e}")))?;
    let mut result = Vec::with_capacity(outputs.len());
    for (_, v) in outputs.iter() {
        result.push(from_value(&v)?);
    }
    Ok(result)
}

pub(crate) fn to_value(t: &HostTensor) -> Result<DynValue> {
    let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    let b = t.as_bytes();
    macro_rules! val {
        ($ty:ty, $n:literal, $conv:expr) => {{
            let v: Vec<$ty> = b
                .chunks_exact($n)
                .map(|c| $conv(c.try_into().expect("chunk size")))
                .collect();
            Tensor::from_array((shape, v))
                .map_err(|e| backend_err(e.to_string()))?
                .into_dyn()
        }};
    }
    Ok(match t.dtype() {
        DType::F64 => val!(f64, 8, f64::from_le_bytes),
        DType::F32 => val!(f32, 4, f32::from_le_bytes),
        DType::F16 => val!(f16, 2, |c| f16::from_bits(u16::from_le_bytes(c))),
        DType::BF16 => val!(bf16, 2, |c| bf16::from_bits(u16::from_le_bytes(c))),
        DType::I64 => val!(i64, 8, i64::from_le_bytes),
        DType::I32 => val!(i32, 4, i32::from_le_bytes),
        DType::U32 => val!(u32, 4, u32::from_le_bytes),
        DType::U8 => val!(u8, 1, u8::from_le_bytes),
        DType::Bool => {
            return Err(Error::Unsupported {
                backend: NAME.to_string(),
                what: "bool tensors (use u8)".into(),
            })
        }
    })
}

fn from_value(v: &DynValue) -> Result<HostTensor> {
    use ort::value::TensorElementType as E;
    let ty = v
        .dtype()
        .tensor_type()
        .ok_or_else(|| backend_err("a graph output is not a tensor"))?;
    macro_rules! out {
        ($ty:ty, $dt:expr, $bytes:expr) => {{
            let (shape, data) = v.try_extract_tensor::<$ty>().map_err(|e| backend_err(e.to_string()))?;
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            HostTensor::from_bytes(&dims, $dt, data.iter().flat_map($bytes).collect())?
        }};
    }
    Ok(match ty {
        E::Float64 => out!(f64, DType::F64, |x: &f64| x.to_le_bytes()),
        E::Float32 => out!(f32, DType::F32, |x: &f32| x.to_le_bytes()),
        E::Float16 => out!(f16, DType::F16, |x: &f16| x.to_le_bytes()),
        E::Bfloat16 => out!(bf16, DType::BF16, |x: &bf16| x.to_le_bytes()),
        E::Int64 => out!(i64, DType::I64, |x: &i64| x.to_le_bytes()),
        E::Int32 => out!(i32, DType::I32, |x: &i32| x.to_le_bytes()),
        E::Uint32 => out!(u32, DType::U32, |x: &u32| x.to_le_bytes()),
        E::Uint8 => out!(u8, DType::U8, |x: &u8| x.to_le_bytes()),
        other => return Err(backend_err(format!("unexpected output element type {other:?}"))),
    })
}
