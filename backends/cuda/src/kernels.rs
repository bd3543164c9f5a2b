//! The CUDA C++ kernel sources and their NVRTC compilation.
//!
//! Each module is `prelude.cuh` followed by one `.cu` file; the backend
//! compiles a module the first time one of its kernels runs, for the
//! device's own architecture, and keeps it loaded for the life of the
//! backend. The sources need no headers (halves are converted with PTX and
//! bit operations), so NVRTC needs no include path.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use emu_core::DType;

/// A kernel module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Elementwise,
    Reduce,
    Spatial,
    Attention,
    Quant,
}

impl Module {
    pub const ALL: [Module; 5] = [
        Module::Elementwise,
        Module::Reduce,
        Module::Spatial,
        Module::Attention,
        Module::Quant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Module::Elementwise => "elementwise.cu",
            Module::Reduce => "reduce.cu",
            Module::Spatial => "spatial.cu",
            Module::Attention => "attention.cu",
            Module::Quant => "quant.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Module::Elementwise => include_str!("kernels/elementwise.cu"),
            Module::Reduce => include_str!("kernels/reduce.cu"),
            Module::Spatial => include_str!("kernels/spatial.cu"),
            Module::Attention => include_str!("kernels/attention.cu"),
            Module::Quant => include_str!("kernels/quant.cu"),
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

/// The NVRTC options every kernel is compiled with.
fn compile_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}")]
}

/// Compiles CUDA C++ source to PTX; `name` appears in errors.
pub fn compile_source(src: &str, name: &str, arch: &str) -> Result<String, String> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: compile_options(arch),
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

/// Overrides the folder of emu-rs's disk caches (compiled PTX goes into
/// its `ptx/`); set to an empty string to turn the disk cache off.
pub const CACHE_DIR_ENV: &str = "EMU_CACHE_DIR";

/// Where compiled PTX is cached: `$EMU_CACHE_DIR/ptx`, else
/// `$XDG_CACHE_HOME/emu-rs/ptx`, else `~/.cache/emu-rs/ptx`; `None` when
/// turned off or no home is known.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let root = match std::env::var_os(CACHE_DIR_ENV) {
        Some(v) if v.is_empty() => return None,
        Some(v) => PathBuf::from(v),
        None => var("XDG_CACHE_HOME")
            .filter(|p| p.is_absolute())
            .or_else(|| var("HOME").map(|h| h.join(".cache")))?
            .join("emu-rs"),
    };
    Some(root.join("ptx"))
}

/// The loaded NVRTC's `(major, minor)` version, part of a cache key: PTX
/// from another NVRTC may differ (and an older driver may refuse it).
pub fn nvrtc_version() -> Option<(i32, i32)> {
    // cudarc panics when a function of a missing library is called.
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints into locals; libnvrtc is present (checked above).
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// FNV-1a with 128-bit state: cache keys and entry checksums (not a
/// defence against an attacker who can write the cache folder, who could
/// as well replace the binary; a guard against truncated or stale files).
fn fnv128(parts: &[&[u8]]) -> u128 {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// Where a module's PTX came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtxOrigin {
    Compiled,
    /// Read from the disk cache, its checksum verified.
    Cache,
}

const CACHE_MAGIC: &str = "// emu-rs ptx cache v1";

/// The cache file of `name` for `arch` and its key.
fn cache_entry(dir: &Path, src: &str, name: &str, arch: &str) -> (PathBuf, String) {
    let version = nvrtc_version().map_or("unknown".to_string(), |(a, b)| format!("{a}.{b}"));
    let options = compile_options(arch).join(" ");
    let key = format!(
        "{:032x}",
        fnv128(&[src.as_bytes(), options.as_bytes(), arch.as_bytes(), version.as_bytes()])
    );
    let stem = name.strip_suffix(".cu").unwrap_or(name);
    (dir.join(format!("{stem}-{arch}-{key}.ptx")), key)
}

/// The PTX of a cache entry whose header names `key` and whose body has
/// the recorded length and checksum; `None` for anything else (a missing,
/// truncated, corrupted or foreign file), which is then recompiled.
fn read_entry(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let (header, body) = text.split_once('\n')?;
    let fields: Vec<&str> = header.strip_prefix(CACHE_MAGIC)?.split_whitespace().collect();
    let expect = [
        format!("key={key}"),
        format!("len={}", body.len()),
        format!("sum={:032x}", fnv128(&[body.as_bytes()])),
    ];
    let ok = fields.len() == expect.len() && fields.iter().zip(&expect).all(|(f, e)| f == e);
    (ok && !body.contains('\0') && body.contains(".entry")).then(|| body.to_string())
}

/// Writes a cache entry through a temporary file renamed into place, so a
/// reader never sees half a file. Failures are ignored: the cache only saves time.
fn write_entry(path: &Path, key: &str, ptx: &str) {
    let Some(dir) = path.parent() else {
        return;
    };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".tmp-{}-{seq}", std::process::id()));
    let header = format!(
        "{CACHE_MAGIC} key={key} len={} sum={:032x}\n",
        ptx.len(),
        fnv128(&[ptx.as_bytes()])
    );
    let written = std::fs::write(&tmp, [header.as_bytes(), ptx.as_bytes()].concat());
    if written.is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// [`compile`] through the disk cache in `cache` (no cache: `None`). The
/// key covers the source, the compile options, the architecture and the
/// NVRTC version, so any change compiles afresh.
pub fn compile_cached(module: Module, arch: &str, cache: Option<&Path>) -> Result<(String, PtxOrigin), String> {
    compile_source_cached(module.source(), module.name(), arch, cache)
}

/// [`compile_source`] through the disk cache in `cache`.
pub fn compile_source_cached(
    src: &str,
    name: &str,
    arch: &str,
    cache: Option<&Path>,
) -> Result<(String, PtxOrigin), String> {
    let Some(dir) = cache else {
        return Ok((compile_source(src, name, arch)?, PtxOrigin::Compiled));
    };
    let (path, key) = cache_entry(dir, src, name, arch);
    if let Some(ptx) = read_entry(&path, &key) {
        return Ok((ptx, PtxOrigin::Cache));
    }
    let ptx = compile_source(src, name, arch)?;
    write_entry(&path, &key, &ptx);
    Ok((ptx, PtxOrigin::Compiled))
}

/// Removes the cache entry of `module` for `arch` (after the driver refused
/// to load it), so the next run compiles afresh.
pub fn forget_cached(module: Module, arch: &str, cache: &Path) {
    let (path, _) = cache_entry(cache, module.source(), module.name(), arch);
    let _ = std::fs::remove_file(path);
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
        for q in ["q8_0", "q4_k"] {
            v.push((Module::Quant, format!("lq_{q}_{s}")));
            v.push((Module::Quant, format!("dequant_{q}_{s}")));
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
