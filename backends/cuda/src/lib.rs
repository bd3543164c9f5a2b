//! The CUDA backend: [`emu_core::Backend`] on an NVIDIA GPU through
//! [cudarc](https://docs.rs/cudarc), with every library loaded at run time.
//!
//! Design:
//! * nothing CUDA is needed to build: `libcuda` (the driver), `libnvrtc` and
//!   `libcublas` are opened when [`CudaBackend::new`] runs, also from the
//!   NVIDIA pip wheels' folders (see [`loader`]). Where any is missing, or
//!   there is no device, `new` returns [`Error::BackendUnavailable`] with the
//!   reason; it never panics;
//! * a tensor is a buffer from a caching allocator plus metadata (dims,
//!   element strides, offset, dtype); `permute`, `narrow`, `broadcast_to`
//!   and `reshape` of a contiguous tensor are views; f16 and bf16 are stored
//!   as 16-bit values (tensor cores read them directly);
//! * one stream per backend carries every kernel, GEMM and copy, so work runs
//!   in submission order and a dropped buffer is reused at once; the host
//!   waits for the device only in [`Backend::download`] (and `upload`, which
//!   must keep its host slice alive);
//! * matmul, linear and conv2d (im2col) run on cuBLAS
//!   (`gemmStridedBatchedEx`): bf16/f16 on tensor cores with f32
//!   accumulation, f32 in true f32 unless TF32 is asked for
//!   ([`TF32_ENV`], [`CudaBackend::with_options`]); strided and permuted
//!   operands and broadcast batches are passed without copies where cuBLAS
//!   can read them;
//! * the other ops are CUDA C++ kernels (`src/kernels/*.cu`) that NVRTC
//!   compiles on first use for the device's architecture; softmax, the norms,
//!   rope and attention (flash-decoding style, see `kernels/attention.cu`)
//!   are fused kernels; calls they do not cover go through the trait's
//!   composites.
//!
//! ```no_run
//! use emu_backend_cuda::CudaBackend;
//! use emu_core::Tensor;
//! let gpu = CudaBackend::new()?;
//! let x = Tensor::from_f32(&gpu, &[2, 2], vec![1.0, 2.0, 3.0, 4.0])?;
//! assert_eq!(x.matmul(&x)?.to_f32_vec()?, vec![7.0, 10.0, 15.0, 22.0]);
//! # Ok::<(), emu_core::Error>(())
//! ```

mod device;
pub mod gemm;
pub mod kernels;
pub mod loader;
pub mod preflight;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use device::{backend_err, unsupported, Args, Device, Storage};
use emu_core::backend::{
    default_attention, default_group_norm, default_rope, AttnMask, Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp,
};
use emu_core::shape::{self, broadcast_dims, contiguous_strides, View};
use emu_core::{DType, Error, HostTensor, QuantTensor, QuantType, Result};
use kernels::{dt_suffix, size_suffix, Module};

pub use preflight::{Component, MemoryInfo};

pub(crate) const NAME: &str = "cuda";

/// Environment variable that picks the device by ordinal (default 0).
pub const DEVICE_ENV: &str = "EMU_CUDA_DEVICE";

/// Environment variable that, set to `1`, runs f32 GEMMs on TF32 tensor
/// cores (faster, about 3 decimal digits: it changes results).
pub const TF32_ENV: &str = "EMU_CUDA_TF32";

pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: NAME.to_string(),
        reason: reason.into(),
    }
}

/// Largest rank of a strided view after merging dimensions (`MAX_RANK` in
/// `prelude.cuh`).
const MAX_RANK: usize = 8;
/// Threads per block of the elementwise kernels and of the row kernels.
const BLOCK: u32 = 256;
/// Cap on blocks per launch; kernels loop over the rest (grid-stride).
const MAX_GRID: usize = 1 << 20;
/// Threads per block of the attention kernels (`ATT_THREADS`).
const ATT_THREADS: usize = 128;
/// Largest head size of the fused attention kernel (`ATT_MAX_D`).
pub const ATT_MAX_D: usize = 256;
/// Bytes of im2col buffer per conv2d chunk.
const IM2COL_BYTES: usize = 256 << 20;
/// Most input rows the quantized matvec kernels take (`LQ_ROWS` in
/// `quant.cu`); more rows dequantize the weight and use cuBLAS.
const LQ_ROWS: usize = 8;
/// Output features per block of the quantized matvec (`LQ_WARPS`).
const LQ_WARPS: usize = 4;

fn grid_for(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).clamp(1, MAX_GRID) as u32
}

fn elem_size(dtype: DType) -> usize {
    dtype.size_in_bytes()
}

fn i64_of(what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| unsupported(format!("{what} of {v}")))
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| unsupported(format!("{what} of {v} (cuBLAS takes 32-bit sizes)")))
}

/// `Strided` of `prelude.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct StridedP {
    n: i64,
    rank: i64,
    dims: [i64; MAX_RANK],
    off: [i64; 3],
    str_: [[i64; MAX_RANK]; 3],
}

/// `NormParams` of `reduce.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct NormP {
    rows: i64,
    cols: i64,
    chan: i64,
    groups: i64,
    per_group: i64,
    eps: f32,
    rms: i32,
    has_w: i32,
    has_b: i32,
}

/// `ConvParams` of `spatial.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvP {
    c: i64,
    h: i64,
    w: i64,
    kh: i64,
    kw: i64,
    oh: i64,
    ow: i64,
    sh: i64,
    sw: i64,
    ph: i64,
    pw: i64,
    dh: i64,
    dw: i64,
    p0: i64,
    np: i64,
}

/// `AttnParams` of `attention.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnP {
    b: i64,
    h: i64,
    tq: i64,
    tk: i64,
    d: i64,
    rep: i64,
    qs: [i64; 4],
    ks: [i64; 4],
    vs: [i64; 4],
    bs: [i64; 4],
    qo: i64,
    ko: i64,
    vo: i64,
    bo: i64,
    causal: i64,
    offset: i64,
    has_bias: i64,
    chunk: i64,
    nchunks: i64,
    scale: f32,
}

/// The strided walk over `dims` of up to three operands `(offset, strides)`.
fn strided_params(dims: &[usize], ops: &[(usize, &[usize])]) -> Result<StridedP> {
    let strides: Vec<&[usize]> = ops.iter().map(|(_, s)| *s).collect();
    let (cd, cs) = shape::coalesce(dims, &strides);
    if cd.len() > MAX_RANK {
        return Err(unsupported(format!(
            "strided views of rank {} (at most {MAX_RANK} after merging dims)",
            cd.len()
        )));
    }
    let mut p = StridedP {
        n: i64_of("element count", dims.iter().product())?,
        rank: cd.len() as i64,
        ..Default::default()
    };
    for (i, &d) in cd.iter().enumerate() {
        p.dims[i] = d as i64;
    }
    for (k, (off, _)) in ops.iter().enumerate() {
        p.off[k] = i64_of("offset", *off)?;
        for (i, &s) in cs[k].iter().enumerate() {
            p.str_[k][i] = i64_of("stride", s)?;
        }
    }
    Ok(p)
}

/// A tensor on the device: shared storage plus a strided view of it.
#[derive(Clone)]
pub struct CudaTensor {
    storage: Arc<Storage>,
    dims: Vec<usize>,
    /// In elements.
    strides: Vec<usize>,
    /// In elements.
    offset: usize,
    dtype: DType,
    /// The values of integer tensors uploaded from the host, kept so that
    /// `index_select` can validate ids without reading the device.
    host_ids: Option<Arc<[u32]>>,
}

impl fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaTensor({:?}, {})", self.dims, self.dtype)
    }
}

impl CudaTensor {
    fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    fn is_contiguous(&self) -> bool {
        shape::is_contiguous(&self.dims, &self.strides)
    }

    fn view(&self) -> View {
        View {
            dims: self.dims.clone(),
            strides: self.strides.clone(),
            offset: self.offset,
        }
    }

    /// This tensor's storage seen through `v`.
    fn with_view(&self, v: View) -> Self {
        CudaTensor {
            dims: v.dims,
            strides: v.strides,
            offset: v.offset,
            ..self.clone()
        }
    }

    /// Device address of the view's first element.
    fn ptr(&self) -> u64 {
        self.storage.ptr + (self.offset * elem_size(self.dtype)) as u64
    }

    /// Device address of the storage (kernels add the view's offset).
    fn base(&self) -> u64 {
        self.storage.ptr
    }
}

/// Options of [`CudaBackend::with_options`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Run f32 GEMMs on TF32 tensor cores (changes results).
    pub tf32: bool,
}

impl CudaOptions {
    /// [`DEVICE_ENV`] and [`TF32_ENV`], with a clear error for a malformed value.
    pub fn from_env() -> Result<Self> {
        let var = |k| std::env::var(k).ok();
        Self::parse(var(DEVICE_ENV).as_deref(), var(TF32_ENV).as_deref())
    }

    /// The options from the values of [`DEVICE_ENV`] and [`TF32_ENV`] (unset: `None`).
    pub fn parse(device: Option<&str>, tf32: Option<&str>) -> Result<Self> {
        let device = match device.map(str::trim) {
            Some(v) if !v.is_empty() => v.parse::<usize>().map_err(|_| {
                Error::InvalidArgument(format!("{DEVICE_ENV}=`{v}` is not a device number (0, 1, ...)"))
            })?,
            _ => 0,
        };
        let tf32 = match tf32.map(str::trim) {
            Some("1") | Some("true") | Some("on") => true,
            None | Some("") | Some("0") | Some("false") | Some("off") => false,
            Some(v) => return Err(Error::InvalidArgument(format!("{TF32_ENV}=`{v}`: use 1 or 0"))),
        };
        Ok(Self { device, tf32 })
    }
}

/// The CUDA backend. Cheap to clone (clones share the device, stream,
/// kernels and memory pool).
#[derive(Clone)]
pub struct CudaBackend {
    dev: Arc<Device>,
    /// Device copies of quantized weights' block bytes, keyed by the address
    /// of the host bytes they were uploaded from; the `Weak` tells a live
    /// tensor from a freed one whose address was reused. Kept here, not in
    /// `Device`: a `Storage` holds the device, so the device holding storages
    /// would never be dropped.
    quant: Arc<Mutex<QuantCache>>,
}

type QuantCache = HashMap<usize, (Weak<Vec<u8>>, Arc<Storage>)>;

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBackend(device {}: {}, sm_{}{})",
            self.dev.ordinal, self.dev.name, self.dev.arch.0, self.dev.arch.1
        )
    }
}

/// Why the CUDA libraries cannot be used here, or `None` when they can.
/// Never panics (cudarc panics when asked for a library it cannot open, so
/// every library is probed first).
pub fn probe() -> Option<String> {
    let notes = loader::preload();
    let searched = || {
        let dirs: Vec<String> = loader::candidate_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let mut s = format!(
            "searched the dynamic linker's path (LD_LIBRARY_PATH) and {}=[{}]",
            loader::LIB_DIRS_ENV,
            dirs.join(", ")
        );
        if !notes.is_empty() {
            s.push_str(&format!(" ({})", notes.join("; ")));
        }
        s
    };
    // SAFETY: the probes only try to open the libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some(
            "no NVIDIA driver: libcuda.so could not be opened (is this a machine with an NVIDIA GPU and its driver?)"
                .into(),
        );
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Some(format!(
            "libnvrtc (the CUDA runtime compiler) could not be opened; install it (e.g. `pip install nvidia-cuda-nvrtc`) \
             and point {} at its lib folder; {}",
            loader::LIB_DIRS_ENV,
            searched()
        ));
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Some(format!(
            "libcublas could not be opened; install it (e.g. `pip install nvidia-cublas`) and point {} at its lib folder; {}",
            loader::LIB_DIRS_ENV,
            searched()
        ));
    }
    None
}

/// Runs `f`, turning a panic inside cudarc into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(unavailable(format!("{what}: {msg}")))
        }
    }
}

impl CudaBackend {
    /// The device named by [`DEVICE_ENV`] (default 0), TF32 per [`TF32_ENV`].
    pub fn new() -> Result<Self> {
        Self::with_options(CudaOptions::from_env()?)
    }

    /// Device `ordinal`, TF32 per [`TF32_ENV`].
    pub fn with_device(ordinal: usize) -> Result<Self> {
        Self::with_options(CudaOptions {
            device: ordinal,
            ..CudaOptions::from_env()?
        })
    }

    pub fn with_options(opts: CudaOptions) -> Result<Self> {
        if let Some(reason) = probe() {
            return Err(unavailable(reason));
        }
        guarded("starting CUDA", || {
            cudarc::driver::result::init().map_err(|e| unavailable(format!("the driver failed to start: {e:?}")))?;
            let count = cudarc::driver::result::device::get_count()
                .map_err(|e| unavailable(format!("cannot count devices: {e:?}")))?;
            if count <= 0 {
                return Err(unavailable("the driver reports no CUDA device"));
            }
            if opts.device >= count as usize {
                return Err(unavailable(format!(
                    "device {} requested ({DEVICE_ENV}), but this machine has {count} (0..{})",
                    opts.device,
                    count - 1
                )));
            }
            let dev = Device::open(opts.device, opts.tf32)?;
            if dev.arch.0 < 7 {
                return Err(unavailable(format!(
                    "{} has compute capability {}.{}; the kernels need 7.0 or newer",
                    dev.name, dev.arch.0, dev.arch.1
                )));
            }
            Ok(Self {
                dev,
                quant: Arc::default(),
            })
        })
    }

    /// `NAME (sm_XY)` of the device.
    pub fn device_name(&self) -> String {
        format!("{} (sm_{}{})", self.dev.name, self.dev.arch.0, self.dev.arch.1)
    }

    pub fn ordinal(&self) -> usize {
        self.dev.ordinal
    }

    /// Free and total device memory.
    pub fn memory_info(&self) -> Result<MemoryInfo> {
        let (free, total) = self.dev.mem_info()?;
        Ok(MemoryInfo { free, total })
    }

    /// [`preflight::check_fits`] against this device's free memory (the
    /// caching pool's idle blocks are returned to the driver first).
    pub fn preflight(&self, components: &[Component]) -> Result<()> {
        self.prune_quant_cache()?;
        self.dev.trim(0)?;
        let mem = self.memory_info()?;
        let what = format!("CUDA device {} ({})", self.dev.ordinal, self.device_name());
        preflight::check_fits(&what, components, mem)
    }

    /// Blocks until every queued kernel has finished (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.dev.bind()?;
        self.dev.synchronize()
    }

    fn alloc(&self, dims: &[usize], dtype: DType) -> Result<CudaTensor> {
        let n = emu_core::host::checked_numel(dims)?;
        let bytes = n
            .checked_mul(elem_size(dtype))
            .ok_or_else(|| Error::shape(format!("shape {dims:?} overflows")))?;
        let storage = match self.dev.alloc(bytes) {
            Ok(s) => s,
            // Device copies of freed quantized weights are only dropped when
            // the cache is next pruned; an allocation that fails prunes it.
            Err(e) => match self.prune_quant_cache() {
                Ok(true) => self.dev.alloc(bytes)?,
                _ => return Err(e),
            },
        };
        Ok(CudaTensor {
            storage: Arc::new(storage),
            dims: dims.to_vec(),
            strides: contiguous_strides(dims),
            offset: 0,
            dtype,
            host_ids: None,
        })
    }

    fn check_dtype(&self, dtype: DType) -> Result<()> {
        if self.supports(dtype) {
            Ok(())
        } else {
            Err(unsupported(format!("{dtype} tensors (f32, f16, bf16, u32, i32 only)")))
        }
    }

    fn float_only(&self, op: &str, t: &CudaTensor) -> Result<()> {
        if t.dtype.is_float() {
            Ok(())
        } else {
            Err(Error::DType(format!("{op} needs a float tensor, found {}", t.dtype)))
        }
    }

    fn launch(&self, module: Module, name: &str, grid: u32, block: u32, args: &mut Args) -> Result<()> {
        self.dev.launch(module, name, grid, block, args)
    }

    /// Copies `src`'s values into the (same-shaped, same-dtype) view `dst`.
    fn copy_into(&self, src: &CudaTensor, dst: &CudaTensor) -> Result<()> {
        let n = src.numel();
        if n == 0 {
            return Ok(());
        }
        let p = strided_params(&src.dims, &[(src.offset, &src.strides), (dst.offset, &dst.strides)])?;
        let mut a = Args::default();
        a.push(p).push(src.base()).push(dst.base());
        let name = format!("copy_{}", size_suffix(src.dtype));
        self.launch(Module::Elementwise, &name, grid_for(n, BLOCK as usize), BLOCK, &mut a)
    }

    /// A contiguous tensor with the same values (the input itself if it is one).
    fn contiguous(&self, t: &CudaTensor) -> Result<CudaTensor> {
        if t.is_contiguous() {
            return Ok(t.clone());
        }
        let out = self.alloc(&t.dims, t.dtype)?;
        self.copy_into(t, &out)?;
        Ok(out)
    }

    /// A one-input kernel over a strided input producing a contiguous output:
    /// `NAME(Strided, extra..., in, out)`.
    fn map1(&self, name: &str, t: &CudaTensor, out_dtype: DType, extra: impl FnOnce(&mut Args)) -> Result<CudaTensor> {
        let out = self.alloc(&t.dims, out_dtype)?;
        let n = t.numel();
        if n == 0 {
            return Ok(out);
        }
        let p = strided_params(&t.dims, &[(t.offset, &t.strides)])?;
        let mut a = Args::default();
        a.push(p);
        extra(&mut a);
        a.push(t.base()).push(out.base());
        self.launch(Module::Elementwise, name, grid_for(n, BLOCK as usize), BLOCK, &mut a)?;
        Ok(out)
    }

    /// One block per output element folding dimension `dim` (reduce, argmax).
    #[allow(clippy::too_many_arguments)]
    fn along_dim(
        &self,
        op: &str,
        t: &CudaTensor,
        dim: usize,
        keepdim: bool,
        out_dtype: DType,
        name: &str,
        code: Option<i32>,
    ) -> Result<CudaTensor> {
        let dims = shape::reduce_dims(op, &t.dims, dim, keepdim)?;
        self.float_only(op, t)?;
        let tc = self.contiguous(t)?;
        let (outer, r, inner) = shape::split_at_dim(&tc.dims, dim);
        let out = self.alloc(&dims, out_dtype)?;
        let nout = outer * inner;
        if nout > 0 {
            let mut a = Args::default();
            a.push(nout as i64).push(r as i64).push(inner as i64);
            if let Some(c) = code {
                a.push(c);
            }
            a.push(tc.ptr()).push(out.base());
            self.launch(Module::Reduce, name, grid_for(nout, 1), BLOCK, &mut a)?;
        }
        Ok(out)
    }

    /// A per-channel vector (norm weight/bias) as a contiguous tensor of `n` elements.
    fn vector_arg(&self, op: &str, v: Option<&CudaTensor>, n: usize, dtype: DType) -> Result<Option<CudaTensor>> {
        match v {
            None => Ok(None),
            Some(v) => {
                shape::check_channel_vector(op, &v.dims, v.dtype, n, dtype)?;
                Ok(Some(self.contiguous(v)?))
            }
        }
    }

    /// The norm kernel over rows of the last `cols` elements.
    #[allow(clippy::too_many_arguments)]
    fn norm_rows(
        &self,
        x: &CudaTensor,
        cols: usize,
        w: Option<&CudaTensor>,
        b: Option<&CudaTensor>,
        eps: f64,
        rms: bool,
        group: Option<(usize, usize, usize)>,
    ) -> Result<CudaTensor> {
        let xc = self.contiguous(x)?;
        let out = self.alloc(&x.dims, x.dtype)?;
        let rows = xc.numel().checked_div(cols).unwrap_or(0);
        if rows == 0 {
            return Ok(out);
        }
        let (chan, groups, per_group) = group.unwrap_or((0, 1, 0));
        let p = NormP {
            rows: rows as i64,
            cols: cols as i64,
            chan: chan as i64,
            groups: groups as i64,
            per_group: per_group as i64,
            eps: eps as f32,
            rms: rms as i32,
            has_w: w.is_some() as i32,
            has_b: b.is_some() as i32,
        };
        let mut a = Args::default();
        a.push(p)
            .push(xc.ptr())
            .push(w.map_or(xc.ptr(), |t| t.ptr()))
            .push(b.map_or(xc.ptr(), |t| t.ptr()))
            .push(out.base());
        let name = format!("norm_{}", dt_suffix(x.dtype));
        self.launch(Module::Reduce, &name, grid_for(rows, 1), BLOCK, &mut a)?;
        Ok(out)
    }

    /// [`Backend::attention`] as the fused kernel pair; `None` when the
    /// kernel does not cover the call (malformed or mixed-dtype operands, no
    /// keys, head sizes above [`ATT_MAX_D`], a bias that does not broadcast
    /// to the `[B, H, Tq, Tk]` scores).
    pub fn fused_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: &AttnMask<'_, CudaTensor>,
        scale: f64,
    ) -> Result<Option<CudaTensor>> {
        let (qd, kd, vd) = (&q.dims, &k.dims, &v.dims);
        let fits = qd.len() == 4
            && kd.len() == 4
            && kd == vd
            && qd[0] == kd[0]
            && qd[3] == kd[3]
            && kd[1] != 0
            && qd[1] % kd[1] == 0;
        if !fits || q.dtype != k.dtype || q.dtype != v.dtype || !q.dtype.is_float() {
            return Ok(None);
        }
        let (b, h, tq, d) = (qd[0], qd[1], qd[2], qd[3]);
        let (hkv, tk) = (kd[1], kd[2]);
        if tk == 0 || d == 0 || d > ATT_MAX_D {
            return Ok(None);
        }
        let sdims = [b, h, tq, tk];
        let bias = match mask.bias {
            Some(bias) => {
                let covered = (bias.dtype == q.dtype || bias.dtype == DType::F32)
                    && bias.dims.len() <= 4
                    && broadcast_dims("attention bias", &sdims, &bias.dims).is_ok_and(|bd| bd == sdims);
                if !covered {
                    return Ok(None);
                }
                Some(bias)
            }
            None => None,
        };
        let out = self.alloc(&[b, h, tq, d], q.dtype)?;
        let rows = b * h * tq;
        if rows == 0 {
            return Ok(Some(out));
        }
        // Enough blocks to fill the device: split the keys of each row into
        // chunks when there are few rows (decode), none when there are many.
        let max_chunks = tk.div_ceil(ATT_THREADS);
        let target = self.dev.sms as usize * 8;
        let want = target.div_ceil(rows).clamp(1, max_chunks);
        let chunk = tk.div_ceil(want).div_ceil(ATT_THREADS) * ATT_THREADS;
        let nchunks = tk.div_ceil(chunk);
        let ws = self.alloc(&[rows * nchunks * (d + 2)], DType::F32)?;
        let s4 = |t: &CudaTensor| -> Result<[i64; 4]> {
            let mut s = [0i64; 4];
            for (i, &x) in t.strides.iter().enumerate() {
                s[i] = i64_of("stride", x)?;
            }
            Ok(s)
        };
        let bs = match bias {
            Some(bt) => {
                let v = shape::broadcast_strides(&bt.dims, &bt.strides, &sdims);
                [v[0] as i64, v[1] as i64, v[2] as i64, v[3] as i64]
            }
            None => [0; 4],
        };
        let p = AttnP {
            b: b as i64,
            h: h as i64,
            tq: tq as i64,
            tk: tk as i64,
            d: d as i64,
            rep: (h / hkv) as i64,
            qs: s4(q)?,
            ks: s4(k)?,
            vs: s4(v)?,
            bs,
            qo: q.offset as i64,
            ko: k.offset as i64,
            vo: v.offset as i64,
            bo: bias.map_or(0, |t| t.offset as i64),
            causal: mask.causal_offset.is_some() as i64,
            offset: i64_of("causal offset", mask.causal_offset.unwrap_or(0))?,
            has_bias: bias.is_some() as i64,
            chunk: chunk as i64,
            nchunks: nchunks as i64,
            scale: scale as f32,
        };
        let bias_dt = bias.map_or(q.dtype, |t| t.dtype);
        let name = format!("attn_partial_{}_{}", dt_suffix(q.dtype), dt_suffix(bias_dt));
        let mut a = Args::default();
        a.push(p)
            .push(q.base())
            .push(k.base())
            .push(v.base())
            .push(bias.map_or(q.base(), |t| t.base()))
            .push(ws.base());
        self.launch(
            Module::Attention,
            &name,
            grid_for(rows * nchunks, 1),
            ATT_THREADS as u32,
            &mut a,
        )?;
        let mut a = Args::default();
        a.push(rows as i64)
            .push(d as i64)
            .push(nchunks as i64)
            .push(ws.base())
            .push(out.base());
        let name = format!("attn_combine_{}", dt_suffix(q.dtype));
        self.launch(Module::Attention, &name, grid_for(rows, 1), ATT_THREADS as u32, &mut a)?;
        Ok(Some(out))
    }

    /// Drops the device copies of quantized weights whose tensors are gone;
    /// whether any was dropped.
    fn prune_quant_cache(&self) -> Result<bool> {
        let mut cache = self
            .quant
            .lock()
            .map_err(|_| backend_err("quantized weight cache lock poisoned"))?;
        let before = cache.len();
        cache.retain(|_, (weak, _)| weak.strong_count() > 0);
        Ok(cache.len() < before)
    }

    /// The device copy of `w`'s block bytes, uploaded on first use and kept
    /// while the tensor lives.
    fn quant_buffer(&self, w: &QuantTensor) -> Result<Arc<Storage>> {
        let shared = w.shared_bytes();
        let key = Arc::as_ptr(shared) as usize;
        {
            let cache = self
                .quant
                .lock()
                .map_err(|_| backend_err("quantized weight cache lock poisoned"))?;
            if let Some((weak, storage)) = cache.get(&key) {
                if weak.upgrade().is_some_and(|a| Arc::ptr_eq(&a, shared)) {
                    return Ok(storage.clone());
                }
            }
        }
        self.prune_quant_cache()?;
        let bytes = w.bytes();
        let storage = Arc::new(self.dev.alloc(bytes.len().max(1))?);
        self.dev.upload(storage.ptr, bytes)?;
        let mut cache = self
            .quant
            .lock()
            .map_err(|_| backend_err("quantized weight cache lock poisoned"))?;
        cache.insert(key, (Arc::downgrade(shared), storage.clone()));
        Ok(storage)
    }

    /// Number of device copies of quantized weights held (for tests).
    pub fn quantized_weights_resident(&self) -> usize {
        self.quant
            .lock()
            .map_or(0, |c| c.values().filter(|(w, _)| w.strong_count() > 0).count())
    }

    /// [`Backend::linear_quant`] on the device: the matvec kernels read the
    /// blocks in place for up to [`LQ_ROWS`] rows; more rows dequantize the
    /// weight into a dense matrix of `x`'s dtype (as the trait's default
    /// does, without the host round trip) and run [`Backend::linear`].
    fn linear_quant_device(&self, x: &CudaTensor, w: &QuantTensor, b: Option<&CudaTensor>) -> Result<CudaTensor> {
        let bias = b.map(|b| (b.dims.as_slice(), b.dtype));
        let (n, k) = emu_core::backend::check_linear_quant(&x.dims, x.dtype, w, bias)?;
        self.float_only("linear_quant", x)?;
        let m: usize = x.dims[..x.dims.len() - 1].iter().product();
        if m == 0 || n == 0 || k == 0 {
            return emu_core::backend::default_linear_quant(self, x, w, b);
        }
        let q = match w.qtype() {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4K => "q4_k",
        };
        let s = dt_suffix(x.dtype);
        let wbuf = self.quant_buffer(w)?;
        if m > LQ_ROWS {
            let dense = self.alloc(&[n, k], x.dtype)?;
            let count = n * k;
            let mut a = Args::default();
            a.push(i64_of("weight size", count)?).push(wbuf.ptr).push(dense.base());
            let name = format!("dequant_{q}_{s}");
            self.launch(Module::Quant, &name, grid_for(count, BLOCK as usize), BLOCK, &mut a)?;
            return self.linear(x, &dense, b);
        }
        let x = self.contiguous(x)?;
        let b = b.map(|b| self.contiguous(b)).transpose()?;
        let mut od = x.dims[..x.dims.len() - 1].to_vec();
        od.push(n);
        let out = self.alloc(&od, x.dtype)?;
        let mut a = Args::default();
        a.push(m as i64)
            .push(i64_of("output features", n)?)
            .push(i64_of("input features", k)?)
            .push(x.ptr())
            .push(wbuf.ptr)
            .push(b.as_ref().map_or(x.ptr(), |b| b.ptr()))
            .push(b.is_some() as i32)
            .push(out.base());
        let name = format!("lq_{q}_{s}");
        let threads = (LQ_WARPS * 32) as u32;
        self.launch(Module::Quant, &name, grid_for(n, LQ_WARPS), threads, &mut a)?;
        Ok(out)
    }

    /// `out[m, n] = x[m, k] y[k, n]` for each matrix of a batch, where the
    /// three row-major operands are `(address of matrix 0, row stride,
    /// column stride)` in elements and the batch is `(count, stride of x,
    /// stride of y, stride of out)`. `None` when an operand's strides are
    /// not a cuBLAS layout.
    #[allow(clippy::too_many_arguments)]
    fn plan_gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        x: (u64, usize, usize),
        y: (u64, usize, usize),
        out: (u64, usize),
        batch: (usize, usize, usize, usize),
    ) -> Result<Option<gemm::Gemm>> {
        let (Some(lx), Some(ly)) = (gemm::layout(m, k, x.1, x.2), gemm::layout(k, n, y.1, y.2)) else {
            return Ok(None);
        };
        i32_of("matrix size", m.max(n).max(k))?;
        for ld in [lx.1, ly.1, out.1 as i64] {
            i32::try_from(ld).map_err(|_| unsupported(format!("leading dimension {ld}")))?;
        }
        Ok(Some(gemm::Gemm {
            m: n as i64,
            n: m as i64,
            k: k as i64,
            first: gemm::Operand {
                ptr: y.0,
                trans: ly.0,
                ld: ly.1,
                batch_stride: batch.2 as i64,
            },
            second: gemm::Operand {
                ptr: x.0,
                trans: lx.0,
                ld: lx.1,
                batch_stride: batch.1 as i64,
            },
            out: gemm::Operand {
                ptr: out.0,
                trans: false,
                ld: (out.1 as i64).max(1),
                batch_stride: batch.3 as i64,
            },
            batch: i64::from(i32_of("batch count", batch.0)?),
        }))
    }
}

/// Unary op codes of `elementwise.cu` (`unary_op`); 15 is affine.
fn unary_code(op: UnaryOp) -> i32 {
    match op {
        UnaryOp::Neg => 0,
        UnaryOp::Abs => 1,
        UnaryOp::Exp => 2,
        UnaryOp::Log => 3,
        UnaryOp::Sqrt => 4,
        UnaryOp::Sqr => 5,
        UnaryOp::Recip => 6,
        UnaryOp::Tanh => 7,
        UnaryOp::Sigmoid => 8,
        UnaryOp::Sin => 9,
        UnaryOp::Cos => 10,
        UnaryOp::Relu => 11,
        UnaryOp::Silu => 12,
        UnaryOp::Gelu => 13,
        UnaryOp::GeluTanh => 14,
    }
}
const AFFINE_CODE: i32 = 15;

fn binary_code(op: BinaryOp) -> i32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
        BinaryOp::Maximum => 4,
        BinaryOp::Minimum => 5,
    }
}

fn reduce_code(op: ReduceOp) -> i32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;

    fn name(&self) -> &str {
        NAME
    }

    fn supports(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::U32 | DType::I32)
    }

    fn dims(&self, t: &CudaTensor) -> Vec<usize> {
        t.dims.clone()
    }

    fn dtype(&self, t: &CudaTensor) -> DType {
        t.dtype
    }

    fn upload(&self, host: &HostTensor) -> Result<CudaTensor> {
        self.check_dtype(host.dtype())?;
        let mut out = self.alloc(host.dims(), host.dtype())?;
        let raw = host.as_bytes();
        self.dev.upload(out.base(), raw)?;
        if matches!(host.dtype(), DType::U32 | DType::I32) {
            out.host_ids = Some(
                raw.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        Ok(out)
    }

    fn download(&self, t: &CudaTensor) -> Result<HostTensor> {
        let t = self.contiguous(t)?;
        let mut data = vec![0u8; t.numel() * elem_size(t.dtype)];
        self.dev.download(t.ptr(), &mut data)?;
        HostTensor::from_bytes(&t.dims, t.dtype, data)
    }

    fn full(&self, dims: &[usize], value: f64, dtype: DType) -> Result<CudaTensor> {
        use emu_core::host::HostTensor as H;
        self.check_dtype(dtype)?;
        let out = self.alloc(dims, dtype)?;
        let n = out.numel();
        if n == 0 {
            return Ok(out);
        }
        // The host's conversion gives the exact bits (rounding, saturation).
        let one = H::from_f64(&[1], vec![value])?.to_dtype(dtype)?;
        let b = one.as_bytes();
        let mut a = Args::default();
        a.push(n as i64);
        let name = if b.len() == 2 {
            a.push(u16::from_le_bytes([b[0], b[1]]));
            "fill_u16"
        } else {
            a.push(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            "fill_u32"
        };
        a.push(out.base());
        self.launch(Module::Elementwise, name, grid_for(n, BLOCK as usize), BLOCK, &mut a)?;
        Ok(out)
    }

    fn cast(&self, t: &CudaTensor, dtype: DType) -> Result<CudaTensor> {
        self.check_dtype(dtype)?;
        if dtype == t.dtype {
            return Ok(t.clone());
        }
        let name = format!("cast_{}_{}", dt_suffix(t.dtype), dt_suffix(dtype));
        self.map1(&name, t, dtype, |_| {})
    }

    fn reshape(&self, t: &CudaTensor, dims: &[usize]) -> Result<CudaTensor> {
        t.view().check_reshape(dims)?;
        let c = self.contiguous(t)?;
        Ok(CudaTensor {
            dims: dims.to_vec(),
            strides: contiguous_strides(dims),
            ..c
        })
    }

    fn permute(&self, t: &CudaTensor, perm: &[usize]) -> Result<CudaTensor> {
        Ok(t.with_view(t.view().permute(perm)?))
    }

    fn narrow(&self, t: &CudaTensor, dim: usize, start: usize, len: usize) -> Result<CudaTensor> {
        Ok(t.with_view(t.view().narrow(dim, start, len)?))
    }

    fn concat(&self, ts: &[&CudaTensor], dim: usize) -> Result<CudaTensor> {
        let shapes: Vec<&[usize]> = ts.iter().map(|t| t.dims.as_slice()).collect();
        let dims = shape::concat_dims(&shapes, dim)?;
        let first = ts[0];
        for t in ts {
            shape::check_same_dtype("concat", first.dtype, t.dtype)?;
        }
        let out = self.alloc(&dims, first.dtype)?;
        let mut at = 0;
        for t in ts {
            let view = self.narrow(&out, dim, at, t.dims[dim])?;
            self.copy_into(t, &view)?;
            at += t.dims[dim];
        }
        Ok(out)
    }

    fn slice_set(&self, dst: CudaTensor, src: &CudaTensor, dim: usize, start: usize) -> Result<CudaTensor> {
        shape::check_slice_set(&dst.dims, &src.dims, dim, start)?;
        shape::check_same_dtype("slice_set", dst.dtype, src.dtype)?;
        // A broadcast view aliases elements: write into a private copy instead.
        let dst = if dst.view().aliases() {
            let out = self.alloc(&dst.dims, dst.dtype)?;
            self.copy_into(&dst, &out)?;
            out
        } else {
            dst
        };
        let view = self.narrow(&dst, dim, start, src.dims[dim])?;
        self.copy_into(src, &view)?;
        Ok(CudaTensor { host_ids: None, ..dst })
    }

    fn index_select(&self, t: &CudaTensor, ids: &CudaTensor, dim: usize) -> Result<CudaTensor> {
        let host = ids
            .host_ids
            .as_deref()
            .map(|h| (h, ids.offset, ids.strides.first().copied().unwrap_or(0)));
        let dims = shape::index_select_dims(&t.dims, dim, &ids.dims, ids.dtype, host)?;
        let tc = self.contiguous(t)?;
        let idc = self.contiguous(ids)?;
        let (_, d, inner) = shape::split_at_dim(&tc.dims, dim);
        let nids = ids.dims[0];
        let out = self.alloc(&dims, t.dtype)?;
        let n = out.numel();
        if n > 0 {
            let mut a = Args::default();
            a.push(n as i64)
                .push(d as i64)
                .push(inner as i64)
                .push(nids as i64)
                .push(tc.ptr())
                .push(idc.ptr())
                .push(out.base());
            let name = format!("index_select_{}", size_suffix(t.dtype));
            self.launch(Module::Spatial, &name, grid_for(n, BLOCK as usize), BLOCK, &mut a)?;
        }
        Ok(out)
    }

    fn broadcast_to(&self, t: &CudaTensor, dims: &[usize]) -> Result<CudaTensor> {
        Ok(t.with_view(t.view().broadcast_to(dims)?))
    }

    fn unary(&self, op: UnaryOp, t: &CudaTensor) -> Result<CudaTensor> {
        self.float_only(&format!("{op:?}"), t)?;
        let name = format!("unary_{}", dt_suffix(t.dtype));
        self.map1(&name, t, t.dtype, |a| {
            a.push(unary_code(op)).push(1f32).push(0f32);
        })
    }

    fn binary(&self, op: BinaryOp, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        shape::check_same_dtype("binary op", a.dtype, b.dtype)?;
        self.float_only(&format!("{op:?}"), a)?;
        let dims = broadcast_dims(&format!("{op:?}"), &a.dims, &b.dims)?;
        let out = self.alloc(&dims, a.dtype)?;
        let n = out.numel();
        if n == 0 {
            return Ok(out);
        }
        let (sa, sb) = (
            shape::broadcast_strides(&a.dims, &a.strides, &dims),
            shape::broadcast_strides(&b.dims, &b.strides, &dims),
        );
        let p = strided_params(&dims, &[(a.offset, &sa), (b.offset, &sb)])?;
        let mut args = Args::default();
        args.push(p)
            .push(binary_code(op))
            .push(a.base())
            .push(b.base())
            .push(out.base());
        let name = format!("binary_{}", dt_suffix(a.dtype));
        self.launch(
            Module::Elementwise,
            &name,
            grid_for(n, BLOCK as usize),
            BLOCK,
            &mut args,
        )?;
        Ok(out)
    }

    fn affine(&self, t: &CudaTensor, mul: f64, add: f64) -> Result<CudaTensor> {
        self.float_only("affine", t)?;
        let name = format!("unary_{}", dt_suffix(t.dtype));
        self.map1(&name, t, t.dtype, |a| {
            a.push(AFFINE_CODE).push(mul as f32).push(add as f32);
        })
    }

    fn reduce(&self, op: ReduceOp, t: &CudaTensor, dim: usize, keepdim: bool) -> Result<CudaTensor> {
        let name = format!("reduce_{}", dt_suffix(t.dtype));
        self.along_dim("reduce", t, dim, keepdim, t.dtype, &name, Some(reduce_code(op)))
    }

    fn argmax(&self, t: &CudaTensor, dim: usize) -> Result<CudaTensor> {
        let name = format!("argmax_{}", dt_suffix(t.dtype));
        self.along_dim("argmax", t, dim, false, DType::U32, &name, None)
    }

    fn linear_quant(&self, x: &CudaTensor, w: &QuantTensor, b: Option<&CudaTensor>) -> Result<CudaTensor> {
        self.linear_quant_device(x, w, b)
    }

    fn matmul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        shape::check_same_dtype("matmul", a.dtype, b.dtype)?;
        self.float_only("matmul", a)?;
        let (ad, bd) = (&a.dims, &b.dims);
        if ad.len() < 2 || bd.len() < 2 || ad[ad.len() - 1] != bd[bd.len() - 2] {
            return Err(Error::shape(format!("matmul: {ad:?} x {bd:?}")));
        }
        let (ar, br) = (ad.len(), bd.len());
        let batch = broadcast_dims("matmul batch", &ad[..ar - 2], &bd[..br - 2])?;
        let (m, k, n) = (ad[ar - 2], ad[ar - 1], bd[br - 1]);
        let mut dims = batch.clone();
        dims.extend([m, n]);
        if k == 0 {
            return self.full(&dims, 0.0, a.dtype);
        }
        let out = self.alloc(&dims, a.dtype)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        // Batch strides of each operand seen through the broadcast batch shape.
        let bstr = |t: &CudaTensor| -> Vec<usize> {
            let r = t.dims.len() - 2;
            let off = batch.len() - r;
            (0..batch.len())
                .map(|i| {
                    if i < off || t.dims[i - off] == 1 {
                        0
                    } else {
                        t.strides[i - off]
                    }
                })
                .collect()
        };
        let mut a = a.clone();
        let mut b = b.clone();
        let es = elem_size(a.dtype) as u64;
        for attempt in 0..2 {
            let (sa, sb, so) = (bstr(&a), bstr(&b), out.strides[..batch.len()].to_vec());
            let (cd, cs) = shape::coalesce(&batch, &[&sa, &sb, &so]);
            let inner = cd.last().copied().unwrap_or(1);
            let st = |k: usize| cs[k].last().copied().unwrap_or(0);
            let outer_dims = &cd[..cd.len().saturating_sub(1)];
            let n_outer: usize = outer_dims.iter().product();
            let probe = self.plan_gemm(
                (m, n, k),
                (a.ptr(), a.strides[ar - 2], a.strides[ar - 1]),
                (b.ptr(), b.strides[br - 2], b.strides[br - 1]),
                (out.ptr(), n),
                (inner, st(0), st(1), st(2)),
            )?;
            if probe.is_none() {
                if attempt == 1 {
                    return Err(backend_err("matmul: contiguous operands have no cuBLAS layout"));
                }
                // Neither stride of a matrix is unit: copy the odd operand.
                if gemm::layout(m, k, a.strides[ar - 2], a.strides[ar - 1]).is_none() {
                    a = self.contiguous(&a)?;
                }
                if gemm::layout(k, n, b.strides[br - 2], b.strides[br - 1]).is_none() {
                    b = self.contiguous(&b)?;
                }
                continue;
            }
            for o in 0..n_outer {
                // Offsets of the outer batch index `o` in each operand.
                let (mut rem, mut offs) = (o, [0usize; 3]);
                for d in (0..outer_dims.len()).rev() {
                    let c = rem % outer_dims[d];
                    rem /= outer_dims[d];
                    for (x, off) in offs.iter_mut().enumerate() {
                        *off += c * cs[x][d];
                    }
                }
                let g = self
                    .plan_gemm(
                        (m, n, k),
                        (a.ptr() + offs[0] as u64 * es, a.strides[ar - 2], a.strides[ar - 1]),
                        (b.ptr() + offs[1] as u64 * es, b.strides[br - 2], b.strides[br - 1]),
                        (out.ptr() + offs[2] as u64 * es, n),
                        (inner, st(0), st(1), st(2)),
                    )?
                    .expect("same layout as the probe");
                self.dev.gemm(a.dtype, &g)?;
            }
            return Ok(out);
        }
        unreachable!("the second attempt returns")
    }

    fn conv2d(&self, x: &CudaTensor, w: &CudaTensor, bias: Option<&CudaTensor>, p: Conv2dParams) -> Result<CudaTensor> {
        shape::check_same_dtype("conv2d", x.dtype, w.dtype)?;
        self.float_only("conv2d", x)?;
        if x.dims.len() != 4 || w.dims.len() != 4 {
            return Err(Error::shape(format!(
                "conv2d: input {:?} and weight {:?} must be 4-D",
                x.dims, w.dims
            )));
        }
        let (n, c, h, wi) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        let (o, cg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        let g = p.groups;
        if g == 0 || c % g != 0 || o % g != 0 || cg * g != c {
            return Err(Error::shape(format!(
                "conv2d: input {:?} and weight {:?} do not fit {g} groups",
                x.dims, w.dims
            )));
        }
        if p.dilation.0 == 0 || p.dilation.1 == 0 {
            return Err(Error::shape("conv2d: dilation must be positive"));
        }
        let (oh, ow) = p.output_hw((h, wi), (kh, kw))?;
        if let Some(b) = bias {
            shape::check_same_dtype("conv2d bias", x.dtype, b.dtype)?;
            if b.dims != [o] {
                return Err(Error::shape(format!(
                    "conv2d: bias {:?} for {o} output channels",
                    b.dims
                )));
            }
        }
        let xc = self.contiguous(x)?;
        let wc = self.contiguous(w)?;
        let out = self.alloc(&[n, o, oh, ow], x.dtype)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let dt = x.dtype;
        let es = elem_size(dt) as u64;
        let (og, kk, pix) = (o / g, cg * kh * kw, oh * ow);
        // A 1x1, stride-1, unpadded conv reads the input as its own columns.
        let direct = kh == 1 && kw == 1 && p.stride == (1, 1) && p.padding == (0, 0);
        let chunk = if direct {
            pix
        } else {
            (IM2COL_BYTES / (c * kh * kw * elem_size(dt)).max(1)).clamp(1, pix)
        };
        let col = if direct {
            None
        } else {
            Some(self.alloc(&[c * kh * kw * chunk], dt)?)
        };
        for s in 0..n {
            let xs = xc.ptr() + (s * c * h * wi) as u64 * es;
            let mut p0 = 0;
            while p0 < pix {
                let np = chunk.min(pix - p0);
                let (cols, ld) = match &col {
                    None => (xs, pix),
                    Some(buf) => {
                        let cp = ConvP {
                            c: c as i64,
                            h: h as i64,
                            w: wi as i64,
                            kh: kh as i64,
                            kw: kw as i64,
                            oh: oh as i64,
                            ow: ow as i64,
                            sh: p.stride.0 as i64,
                            sw: p.stride.1 as i64,
                            ph: p.padding.0 as i64,
                            pw: p.padding.1 as i64,
                            dh: p.dilation.0 as i64,
                            dw: p.dilation.1 as i64,
                            p0: p0 as i64,
                            np: np as i64,
                        };
                        let mut a = Args::default();
                        a.push(cp).push(xs).push(buf.base());
                        let name = format!("im2col_{}", dt_suffix(dt));
                        self.launch(
                            Module::Spatial,
                            &name,
                            grid_for(c * kh * kw * np, BLOCK as usize),
                            BLOCK,
                            &mut a,
                        )?;
                        (buf.base(), np)
                    }
                };
                // Per group: out[og, np] (row stride pix) = w_g[og, kk] x cols_g[kk, np].
                let gm = self
                    .plan_gemm(
                        (og, np, kk),
                        (wc.ptr(), kk, 1),
                        (cols, ld, 1),
                        (out.ptr() + ((s * o * pix) + p0) as u64 * es, pix),
                        (g, og * kk, kk * ld, og * pix),
                    )?
                    .ok_or_else(|| backend_err("conv2d: im2col columns have no cuBLAS layout"))?;
                self.dev.gemm(dt, &gm)?;
                p0 += np;
            }
        }
        match bias {
            Some(b) => self.binary(BinaryOp::Add, &out, &self.reshape(b, &[1, o, 1, 1])?),
            None => Ok(out),
        }
    }

    fn avg_pool2d(&self, x: &CudaTensor, kernel: (usize, usize), stride: (usize, usize)) -> Result<CudaTensor> {
        self.float_only("avg_pool2d", x)?;
        if x.dims.len() != 4 {
            return Err(Error::shape(format!("avg_pool2d: input {:?} must be NCHW", x.dims)));
        }
        let (n, c, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 || kernel.0 > h || kernel.1 > w {
            return Err(Error::shape(format!(
                "avg_pool2d: kernel {kernel:?} / stride {stride:?} do not fit {:?}",
                x.dims
            )));
        }
        let (oh, ow) = ((h - kernel.0) / stride.0 + 1, (w - kernel.1) / stride.1 + 1);
        let xc = self.contiguous(x)?;
        let out = self.alloc(&[n, c, oh, ow], x.dtype)?;
        let total = out.numel();
        if total > 0 {
            let mut a = Args::default();
            for v in [total, h, w, oh, ow, kernel.0, kernel.1, stride.0, stride.1] {
                a.push(v as i64);
            }
            a.push(xc.ptr()).push(out.base());
            let name = format!("avgpool_{}", dt_suffix(x.dtype));
            self.launch(Module::Spatial, &name, grid_for(total, BLOCK as usize), BLOCK, &mut a)?;
        }
        Ok(out)
    }

    fn upsample_nearest2d(&self, x: &CudaTensor, h: usize, w: usize) -> Result<CudaTensor> {
        if x.dims.len() != 4 {
            return Err(Error::shape(format!(
                "upsample_nearest2d: input {:?} must be NCHW",
                x.dims
            )));
        }
        let (n, c, ih, iw) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        if h == 0 || w == 0 || ih == 0 || iw == 0 {
            return Err(Error::shape(format!("upsample_nearest2d: {:?} to {h}x{w}", x.dims)));
        }
        let xc = self.contiguous(x)?;
        let out = self.alloc(&[n, c, h, w], x.dtype)?;
        let total = out.numel();
        if total > 0 {
            let mut a = Args::default();
            for v in [total, ih, iw, h, w] {
                a.push(v as i64);
            }
            // PyTorch computes the scale in f32 too.
            a.push(ih as f32 / h as f32).push(iw as f32 / w as f32);
            a.push(xc.ptr()).push(out.base());
            let name = format!("upsample_{}", size_suffix(x.dtype));
            self.launch(Module::Spatial, &name, grid_for(total, BLOCK as usize), BLOCK, &mut a)?;
        }
        Ok(out)
    }

    fn softmax_last_dim(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.float_only("softmax", x)?;
        let cols = *x
            .dims
            .last()
            .ok_or_else(|| Error::shape("softmax: input is a scalar"))?;
        let xc = self.contiguous(x)?;
        let out = self.alloc(&x.dims, x.dtype)?;
        let rows = xc.numel().checked_div(cols).unwrap_or(0);
        if rows > 0 {
            let mut a = Args::default();
            a.push(rows as i64).push(cols as i64).push(xc.ptr()).push(out.base());
            let name = format!("softmax_{}", dt_suffix(x.dtype));
            self.launch(Module::Reduce, &name, grid_for(rows, 1), BLOCK, &mut a)?;
        }
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: Option<&CudaTensor>,
        b: Option<&CudaTensor>,
        eps: f64,
    ) -> Result<CudaTensor> {
        self.float_only("layer_norm", x)?;
        let cols = *x
            .dims
            .last()
            .ok_or_else(|| Error::shape("layer_norm: input is a scalar"))?;
        let w = self.vector_arg("layer_norm", w, cols, x.dtype)?;
        let b = self.vector_arg("layer_norm", b, cols, x.dtype)?;
        self.norm_rows(x, cols, w.as_ref(), b.as_ref(), eps, false, None)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f64) -> Result<CudaTensor> {
        self.float_only("rms_norm", x)?;
        let cols = *x
            .dims
            .last()
            .ok_or_else(|| Error::shape("rms_norm: input is a scalar"))?;
        let w = self.vector_arg("rms_norm", Some(w), cols, x.dtype)?;
        self.norm_rows(x, cols, w.as_ref(), None, eps, true, None)
    }

    /// The norm kernel over (sample, group) rows with the per-channel weight
    /// and bias applied in the same pass; calls it does not cover (malformed
    /// ones included) go through the composite.
    fn group_norm(
        &self,
        x: &CudaTensor,
        num_groups: usize,
        w: Option<&CudaTensor>,
        b: Option<&CudaTensor>,
        eps: f64,
    ) -> Result<CudaTensor> {
        let dims = &x.dims;
        let fits = dims.len() >= 2
            && num_groups != 0
            && dims[1].is_multiple_of(num_groups)
            && x.dtype.is_float()
            && [w, b]
                .iter()
                .all(|t| t.is_none_or(|t| t.dtype == x.dtype && t.dims == [dims[1]]));
        if !fits {
            return default_group_norm(self, x, num_groups, w, b, eps);
        }
        let c = dims[1];
        let rest: usize = dims[2..].iter().product();
        let per_group = c / num_groups;
        let w = w.map(|t| self.contiguous(t)).transpose()?;
        let b = b.map(|t| self.contiguous(t)).transpose()?;
        let cols = per_group * rest;
        if rest == 0 {
            return self.contiguous(x);
        }
        self.norm_rows(
            x,
            cols,
            w.as_ref(),
            b.as_ref(),
            eps,
            false,
            Some((rest, num_groups, per_group)),
        )
    }

    // `is_multiple_of` is newer than the workspace's rust-version (1.85).
    #[allow(clippy::manual_is_multiple_of)]
    fn rope(&self, x: &CudaTensor, cos: &CudaTensor, sin: &CudaTensor) -> Result<CudaTensor> {
        let xd = &x.dims;
        let same = x.dtype == cos.dtype && x.dtype == sin.dtype && x.dtype.is_float() && cos.dims == sin.dims;
        if xd.len() != 4 || xd[3] % 2 != 0 || !same {
            return default_rope(self, x, cos, sin);
        }
        let (b, h, t, d) = (xd[0], xd[1], xd[2], xd[3]);
        let half = d / 2;
        let batched = match cos.dims.as_slice() {
            [ct, ch] if *ct == t && *ch == half => false,
            [cb, ct, ch] if *cb == b && *ct == t && *ch == half => true,
            _ => return default_rope(self, x, cos, sin),
        };
        let (xc, cc, sc) = (self.contiguous(x)?, self.contiguous(cos)?, self.contiguous(sin)?);
        let out = self.alloc(xd, x.dtype)?;
        let n = out.numel();
        if n > 0 {
            let mut a = Args::default();
            a.push(b as i64)
                .push(h as i64)
                .push(t as i64)
                .push(d as i64)
                .push(batched as i32);
            a.push(xc.ptr()).push(cc.ptr()).push(sc.ptr()).push(out.base());
            let name = format!("rope_{}", dt_suffix(x.dtype));
            self.launch(Module::Spatial, &name, grid_for(n, BLOCK as usize), BLOCK, &mut a)?;
        }
        Ok(out)
    }

    /// The fused kernel for every call it covers (decode and prefill); the
    /// composite otherwise.
    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: &AttnMask<'_, CudaTensor>,
        scale: f64,
    ) -> Result<CudaTensor> {
        if let Some(y) = self.fused_attention(q, k, v, mask, scale)? {
            return Ok(y);
        }
        default_attention(self, q, k, v, mask, scale)
    }
}
