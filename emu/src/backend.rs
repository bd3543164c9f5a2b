//! Backends chosen by name at run time: what `--backend NAME` (and a server's
//! configuration) turns into a concrete [`emu_core::Backend`].
//!
//! Each backend is a cargo feature of this crate (`cpu`, the default; `wgpu`;
//! `onnx`; `cuda`). Every [`BackendKind`] exists whatever the features, so names
//! always parse the same way; asking for one that is not compiled in is
//! [`PipelineError::BackendNotCompiled`], which names the feature to enable.
//! [`AnyBackend`] likewise has a variant per kind; a kind that is not
//! compiled in holds [`NotCompiled`], a type with no values, so that variant
//! can never be built and [`with_backend!`] never runs code for it.
//!
//! Adding a backend: a feature and optional dependency in `Cargo.toml`, then
//! here a `BackendKind` variant (and its name in `BackendKind::ALL`/`name`/
//! `feature`), an `AnyBackend` variant with its payload alias, a `Backends`
//! field and `open` arm, and its `__emu_if_<name>` macro pair below.

use crate::pipeline::{PipelineError, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(feature = "cpu")]
pub use emu_backend_cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use emu_backend_cuda::CudaBackend;
#[cfg(feature = "onnx")]
pub use emu_backend_onnx::OnnxBackend;
#[cfg(feature = "wgpu")]
pub use emu_backend_wgpu::WgpuBackend;

/// The payload of an [`AnyBackend`] variant whose backend is not compiled
/// in. It has no values, so such a variant is never constructed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCompiled {}

impl NotCompiled {
    /// Any type from a value that cannot exist (what [`with_backend!`]
    /// expands to for backends not compiled in).
    pub fn absurd<T>(&self) -> T {
        match *self {}
    }
}

#[cfg(feature = "cpu")]
type CpuSlot = CpuBackend;
#[cfg(not(feature = "cpu"))]
type CpuSlot = NotCompiled;
#[cfg(feature = "wgpu")]
type WgpuSlot = WgpuBackend;
#[cfg(not(feature = "wgpu"))]
type WgpuSlot = NotCompiled;
#[cfg(feature = "onnx")]
type OnnxSlot = OnnxBackend;
#[cfg(not(feature = "onnx"))]
type OnnxSlot = NotCompiled;
#[cfg(feature = "cuda")]
type CudaSlot = CudaBackend;
#[cfg(not(feature = "cuda"))]
type CudaSlot = NotCompiled;

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the threads of CPU computation for this process: the cpu backend's
/// pool and ONNX Runtime's intra-op threads of backends opened afterwards
/// (0: each library's default). Call it before any computation.
pub fn set_threads(n: usize) -> Result<()> {
    #[cfg(feature = "cpu")]
    emu_backend_cpu::set_num_threads(n).map_err(|e| PipelineError::Input(format!("--threads {n}: {e}")))?;
    THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// The thread count given to [`set_threads`] (0: each library's default).
pub fn threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// How many threads the cpu backend computes with.
#[cfg(feature = "cpu")]
pub fn cpu_threads() -> usize {
    emu_backend_cpu::num_threads()
}

/// A backend chosen by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Wgpu,
    Onnx,
    Cuda,
}

impl BackendKind {
    /// Every backend emu-rs has, compiled in or not.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Cpu,
        BackendKind::Wgpu,
        BackendKind::Onnx,
        BackendKind::Cuda,
    ];

    /// The name used on the command line (`cpu`, `wgpu`, `onnx`, `cuda`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Onnx => "onnx",
            BackendKind::Cuda => "cuda",
        }
    }

    /// The cargo feature of this crate that compiles the backend in.
    pub fn feature(self) -> &'static str {
        self.name()
    }

    /// Whether this build has the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Cpu => cfg!(feature = "cpu"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Onnx => cfg!(feature = "onnx"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends compiled into this build.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|k| k.is_compiled()).collect()
    }

    /// The backend called `name` (any case). An unknown name, or one not
    /// compiled into this build, is an error that lists what is available.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let kind = Self::ALL
            .into_iter()
            .find(|k| k.name() == lower)
            .ok_or_else(|| PipelineError::UnknownBackend {
                name: name.to_string(),
                available: available(),
            })?;
        if !kind.is_compiled() {
            return Err(PipelineError::BackendNotCompiled {
                name: kind.name(),
                feature: kind.feature(),
                available: available(),
            });
        }
        Ok(kind)
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn available() -> String {
    let names: Vec<&str> = BackendKind::compiled().into_iter().map(BackendKind::name).collect();
    if names.is_empty() {
        "none (enable a backend feature of the `emu` crate)".to_string()
    } else {
        names.join(", ")
    }
}

/// An opened backend of any kind; [`with_backend!`] turns it back into its
/// concrete type. Variants of backends not compiled in hold [`NotCompiled`]
/// and cannot be built.
#[derive(Debug, Clone)]
pub enum AnyBackend {
    Cpu(CpuSlot),
    Wgpu(WgpuSlot),
    Onnx(OnnxSlot),
    Cuda(CudaSlot),
}

impl AnyBackend {
    pub fn kind(&self) -> BackendKind {
        match self {
            AnyBackend::Cpu(_) => BackendKind::Cpu,
            AnyBackend::Wgpu(_) => BackendKind::Wgpu,
            AnyBackend::Onnx(_) => BackendKind::Onnx,
            AnyBackend::Cuda(_) => BackendKind::Cuda,
        }
    }
}

/// Opens each kind of backend at most once, so components placed on the
/// same kind share one device (and one ONNX Runtime environment).
#[derive(Debug, Default)]
pub struct Backends {
    #[cfg(feature = "cpu")]
    cpu: Option<CpuBackend>,
    #[cfg(feature = "wgpu")]
    wgpu: Option<WgpuBackend>,
    #[cfg(feature = "onnx")]
    onnx: Option<OnnxBackend>,
    #[cfg(feature = "cuda")]
    cuda: Option<CudaBackend>,
    /// [`Backends::cpu_int8_activations`].
    cpu_int8_activations: bool,
}

impl Backends {
    /// Opens the CPU backend with 8-bit activations for its Q4_K linears
    /// ([`CpuBackend::with_int8_activations`]: llama.cpp's rule, faster,
    /// not the dequantized weight's f32 product). Set before the first
    /// [`Backends::open`] of the CPU.
    pub fn cpu_int8_activations(mut self, on: bool) -> Self {
        self.cpu_int8_activations = on;
        self
    }

    /// The backend of `kind`, opened on first use. A backend that cannot
    /// start here (no GPU adapter, no ONNX Runtime library) or is not
    /// compiled in is an error that says why.
    pub fn open(&mut self, kind: BackendKind) -> Result<AnyBackend> {
        match kind {
            #[cfg(feature = "cpu")]
            BackendKind::Cpu => {
                let int8 = self.cpu_int8_activations;
                Ok(AnyBackend::Cpu(
                    self.cpu
                        .get_or_insert_with(|| CpuBackend::new().with_int8_activations(int8))
                        .clone(),
                ))
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(AnyBackend::Wgpu(match &self.wgpu {
                Some(b) => b.clone(),
                None => self.wgpu.insert(WgpuBackend::new()?).clone(),
            })),
            #[cfg(feature = "onnx")]
            BackendKind::Onnx => Ok(AnyBackend::Onnx(match &self.onnx {
                Some(b) => b.clone(),
                None => self.onnx.insert(OnnxBackend::with_threads(threads())?).clone(),
            })),
            // The device is `EMU_CUDA_DEVICE` (default 0); a machine without
            // a driver or GPU gets an error with the reason, never a panic.
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(AnyBackend::Cuda(match &self.cuda {
                Some(b) => b.clone(),
                None => self.cuda.insert(CudaBackend::new()?).clone(),
            })),
            #[allow(unreachable_patterns)]
            other => Err(PipelineError::BackendNotCompiled {
                name: other.name(),
                feature: other.feature(),
                available: available(),
            }),
        }
    }
}

/// Where the vision encoder and the language model run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub vision: BackendKind,
    pub llm: BackendKind,
}

/// Runs `$body` with `$b` bound to the concrete backend inside an
/// [`AnyBackend`] (taken by value), so each pipeline is written once,
/// generically, and monomorphised per compiled-in backend. Nest it to place
/// components on different backends:
///
/// ```
/// use emu::{with_backend, BackendKind, Backends};
/// fn name<B: emu::emu_core::Backend>(_: B) -> &'static str {
///     std::any::type_name::<B>()
/// }
/// let any = Backends::default().open(BackendKind::Cpu)?;
/// assert!(with_backend!(any, |b| name(b)).contains("Cpu"));
/// # Ok::<(), emu::pipeline::PipelineError>(())
/// ```
#[macro_export]
macro_rules! with_backend {
    ($any:expr, |$b:ident| $body:expr) => {
        match $any {
            $crate::backend::AnyBackend::Cpu($b) => $crate::__emu_if_cpu!($b, $body),
            $crate::backend::AnyBackend::Wgpu($b) => $crate::__emu_if_wgpu!($b, $body),
            $crate::backend::AnyBackend::Onnx($b) => $crate::__emu_if_onnx!($b, $body),
            $crate::backend::AnyBackend::Cuda($b) => $crate::__emu_if_cuda!($b, $body),
        }
    };
}

// One arm of `with_backend!` per backend: the body where the backend is
// compiled in, nothing reachable where it is not. These are chosen here, by
// this crate's features; a `#[cfg]` inside `with_backend!` itself would test
// the features of the crate that calls it.
#[cfg(feature = "cpu")]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_cpu {
    ($b:ident, $body:expr) => {
        $body
    };
}
#[cfg(not(feature = "cpu"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_cpu {
    ($b:ident, $body:expr) => {
        $b.absurd()
    };
}
#[cfg(feature = "wgpu")]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_wgpu {
    ($b:ident, $body:expr) => {
        $body
    };
}
#[cfg(not(feature = "wgpu"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_wgpu {
    ($b:ident, $body:expr) => {
        $b.absurd()
    };
}
#[cfg(feature = "onnx")]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_onnx {
    ($b:ident, $body:expr) => {
        $body
    };
}
#[cfg(not(feature = "onnx"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_onnx {
    ($b:ident, $body:expr) => {
        $b.absurd()
    };
}

#[cfg(feature = "cuda")]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_cuda {
    ($b:ident, $body:expr) => {
        $body
    };
}
#[cfg(not(feature = "cuda"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __emu_if_cuda {
    ($b:ident, $body:expr) => {
        $b.absurd()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "cpu")]
    fn the_cpu_opens_with_the_activations_asked_for() {
        for on in [false, true] {
            let mut backends = Backends::default().cpu_int8_activations(on);
            match backends.open(BackendKind::Cpu).unwrap() {
                AnyBackend::Cpu(be) => assert_eq!(be.int8_activations(), on),
                _ => panic!("not the cpu backend"),
            }
        }
    }

    #[test]
    fn names_parse_in_any_case_and_unknown_ones_list_what_is_compiled() {
        assert_eq!(
            BackendKind::parse("CPU").ok(),
            cfg!(feature = "cpu").then_some(BackendKind::Cpu)
        );
        for k in BackendKind::ALL {
            assert_eq!(BackendKind::parse(k.name()).is_ok(), k.is_compiled());
        }
        let e = BackendKind::parse("tpu").unwrap_err().to_string();
        assert!(e.starts_with("unknown backend `tpu`; available backends: "), "{e}");
        for k in BackendKind::compiled() {
            assert!(e.contains(k.name()), "{e}");
        }
    }

    #[test]
    fn a_backend_not_compiled_in_names_its_feature() {
        for k in BackendKind::ALL.into_iter().filter(|k| !k.is_compiled()) {
            let e = BackendKind::parse(k.name()).unwrap_err().to_string();
            assert!(e.contains(&format!("`{}` feature", k.feature())), "{e}");
            let e = Backends::default().open(k).unwrap_err().to_string();
            assert!(e.contains(&format!("`{}` feature", k.feature())), "{e}");
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn with_backend_reaches_the_concrete_backend() {
        fn name<B: emu_core::Backend>(_: B) -> &'static str {
            std::any::type_name::<B>()
        }
        let mut backends = Backends::default();
        let any = backends.open(BackendKind::Cpu).unwrap();
        assert_eq!(any.kind(), BackendKind::Cpu);
        assert!(crate::with_backend!(any, |b| name(b)).ends_with("CpuBackend"));
    }
}
