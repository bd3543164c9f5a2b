//! The CUDA C++ kernel sources and their NVRTC compilation.
//!
//! Each module is `prelude.cuh` followed by one `.cu` file; the backend
//! compiles a module the first time one of its kernels runs, for the
//! device's own architecture, and keeps it loaded for the life of the
//! backend. The sources need no headers (halves are converted with PTX and
//! bit operations), so NVRTC needs no include path.

use std::sync::OnceLock;

use emu_core::DType;

/// A kernel module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Elementwise,
    Reduce,
    Spatial,
    Attention,
}

impl Module {
    pub const ALL: [Module; 4] = [Module::Elementwise, Module::Reduce, Module::Spatial, Module::Attention];

    pub fn name(self) -> &'static str {
        match self {
            Module::Elementwise => "elementwise.cu",
            Module::Reduce => "reduce.cu",
            Module::Spatial => "spatial.cu",
            Module::Attention => "attention.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Module::Elementwise => include_str!("kernels/elementwise.cu"),
            Module::Reduce => include_str!("kernels/reduce.cu"),
            Module::Spatial => include_str!("kernels/spatial.cu"),
            Module::Attention => include_str!("kernels/attention.cu"),
        }
    }

    /// The complete source NVRTC compiles.
    pub fn source(self) -> &'static str {
        static SRC: OnceLock<Vec<String>> = OnceLock::new();
        let all = SRC.get_or_init(|| {
            Module::ALL
                .iter()
                .map(|m| format!("{}\n{}", include_str!("kernels/prelude.cuh"), m.body()))
                .collect()
        });
        &all[self as usize]
    }
}

/// Compiles a module to PTX for a virtual architecture such as `compute_90`.
/// Errors carry NVRTC's log.
pub fn compile(module: Module, arch: &str) -> Result<String, String> {
    compile_source(module.source(), module.name(), arch)
}

/// Compiles CUDA C++ source to PTX; `name` appears in errors.
pub fn compile_source(src: &str, name: &str, arch: &str) -> Result<String, String> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some(name.to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. }) => Err(format!(
            "NVRTC could not compile {name} for {arch} ({nvrtc:?}):\n{}",
            log.to_string_lossy()
        )),
        Err(e) => Err(format!("NVRTC could not compile {name} for {arch}: {e}")),
    }
}

/// Kernel-name suffix of a dtype.
pub(crate) fn dt_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::U32 => "u32",
        DType::I32 => "i32",
        _ => "unsupported",
    }
}

/// Kernel-name suffix of the copy-like kernels, which move bits by size.
pub(crate) fn size_suffix(dtype: DType) -> &'static str {
    if dtype.size_in_bytes() == 2 {
        "u16"
    } else {
        "u32"
    }
}

/// Every `(module, kernel)` the backend can launch, named as the backend
/// names them, so a test can check each one exists in the compiled PTX.
pub fn launched_kernels() -> Vec<(Module, String)> {
    const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
    const ALL: [DType; 5] = [DType::F32, DType::F16, DType::BF16, DType::U32, DType::I32];
    let mut v = Vec::new();
    for dt in [DType::F16, DType::F32] {
        let s = size_suffix(dt);
        v.push((Module::Elementwise, format!("fill_{s}")));
        v.push((Module::Elementwise, format!("copy_{s}")));
        v.push((Module::Spatial, format!("upsample_{s}")));
        v.push((Module::Spatial, format!("index_select_{s}")));
    }
    for from in ALL {
        for to in ALL {
            if from != to {
                v.push((
                    Module::Elementwise,
                    format!("cast_{}_{}", dt_suffix(from), dt_suffix(to)),
                ));
            }
        }
    }
    for dt in FLOATS {
        let s = dt_suffix(dt);
        for (m, k) in [
            (Module::Elementwise, "unary"),
            (Module::Elementwise, "binary"),
            (Module::Reduce, "reduce"),
            (Module::Reduce, "argmax"),
            (Module::Reduce, "softmax"),
            (Module::Reduce, "norm"),
            (Module::Spatial, "im2col"),
            (Module::Spatial, "avgpool"),
            (Module::Spatial, "rope"),
            (Module::Attention, "attn_combine"),
        ] {
            v.push((m, format!("{k}_{s}")));
        }
        for bias in [dt, DType::F32] {
            v.push((Module::Attention, format!("attn_partial_{s}_{}", dt_suffix(bias))));
        }
    }
    v.sort_by(|a, b| a.1.cmp(&b.1));
    v.dedup();
    v
}

/// Whether an NVRTC library can be opened (after [`crate::loader::preload`]).
pub fn nvrtc_available() -> bool {
    crate::loader::preload();
    // SAFETY: only probes whether the library can be opened.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
