//! The CPU backend: [`emu_core::Backend`] on candle-core / candle-nn.
//!
//! Matmuls go through candle's `gemm` crate (multi-threaded, SIMD); f16/bf16
//! are stored natively and the numerically sensitive composites (softmax,
//! norms) run in f32 as PyTorch does. Three kernels of this crate replace
//! candle's where those are slow: `linear` with few rows (decode) streams
//! the weights through an f32 row loop (`matvec`), `conv2d` is an NCHW
//! im2col + gemm (`conv`) and `group_norm` is one fused pass (`norm`); all
//! accumulate in f32 and split their work over rayon's global pool.
//!
//! ```
//! use emu_backend_cpu::CpuBackend;
//! use emu_core::Tensor;
//! let cpu = CpuBackend::new();
//! let x = Tensor::from_f32(&cpu, &[2, 2], vec![1.0, 2.0, 3.0, 4.0])?;
//! let y = x.matmul(&x)?;
//! assert_eq!(y.to_f32_vec()?, vec![7.0, 10.0, 15.0, 22.0]);
//! # Ok::<(), emu_core::Error>(())
//! ```

use candle_core::{DType as CDType, Device, Tensor as CTensor};
use emu_core::backend::{AttnMask, Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp};
use emu_core::shape::{self, broadcast_dims};
use emu_core::{DType, Error, HostTensor, QuantTensor, Result};

#[cfg(target_arch = "x86_64")]
mod amx;
mod attention;
#[cfg(target_arch = "x86_64")]
mod batched;
mod conv;
mod convert;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
mod elementwise;
mod heap;
mod matvec;
#[cfg(target_arch = "x86_64")]
mod matvec_x86;
mod norm;
mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_x86;
#[cfg(target_arch = "x86_64")]
mod sgemm;
mod team;

/// The candle CPU backend. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    device: Device,
    int8_activations: bool,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        heap::keep_freed_memory();
        Self {
            device: Device::Cpu,
            int8_activations: false,
        }
    }

    /// With `on`, decode's Q4_K linears (up to 16 input rows) round their
    /// input to 8 bits per 256 values and take integer dot products, as
    /// llama.cpp's Q4_K x Q8_K kernel does, where the CPU has AVX512-VNNI
    /// or AVX2 with FMA (elsewhere nothing changes). About twice the speed of the f32 kernel,
    /// at the cost of that rounding: an input block's values move by at most
    /// `max|x| / 254`, so an output by at most that times the sum of the
    /// block's `|w|` (the tests hold the kernel to this bound). Off by
    /// default: then the result is the dequantized weight's f32 product.
    pub fn with_int8_activations(mut self, on: bool) -> Self {
        self.int8_activations = on;
        self
    }

    /// Whether this backend was asked for 8-bit activations
    /// ([`CpuBackend::with_int8_activations`]).
    pub fn int8_activations(&self) -> bool {
        self.int8_activations
    }

    /// Whether [`CpuBackend::with_int8_activations`] changes anything on this
    /// CPU (AVX512-VNNI, or AVX2 with FMA).
    pub fn int8_activations_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return quant_x86::int8_isa().is_some();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }
}

const NAME: &str = "cpu";

/// Sets how many threads the CPU backend computes with; 0 keeps candle's
/// default (one per physical core, or `RAYON_NUM_THREADS`).
///
/// Call it before the first computation and before starting other threads:
/// candle sizes its gemm parallelism from `RAYON_NUM_THREADS` on every
/// matmul and runs on rayon's global pool, which is built once, so this sets
/// that variable and builds the pool. Setting a different count after the
/// pool exists is an error.
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if n > MAX_THREADS {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        return Err(Error::InvalidArgument(format!(
            "{n} threads are more than the {MAX_THREADS} supported (this machine runs {cores} at once)"
        )));
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    // Fails when the pool already exists; the count check below reports that.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    let running = rayon::current_num_threads();
    if running != n {
        return Err(Error::Backend {
            backend: NAME.to_string(),
            message: format!(
                "cannot use {n} threads: the thread pool already runs {running}; set the count before the first computation"
            ),
        });
    }
    Ok(())
}

/// Most threads [`set_num_threads`] accepts: each thread has its own stack
/// and the pool starts them all, so an absurd count exhausts the process.
pub const MAX_THREADS: usize = 1024;

/// How many threads the CPU backend computes with.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

fn err(e: candle_core::Error) -> Error {
    Error::Backend {
        backend: NAME.to_string(),
        message: e.to_string(),
    }
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported {
        backend: NAME.to_string(),
        what: what.into(),
    }
}

fn to_candle(dtype: DType) -> Result<CDType> {
    Ok(match dtype {
        DType::F64 => CDType::F64,
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
        DType::I64 => CDType::I64,
        DType::I32 => CDType::I32,
        DType::U32 => CDType::U32,
        DType::U8 => CDType::U8,
        DType::Bool => return Err(unsupported("bool tensors (use u8)")),
    })
}

fn from_candle(dtype: CDType) -> DType {
    match dtype {
        CDType::F64 => DType::F64,
        CDType::F32 => DType::F32,
        CDType::F16 => DType::F16,
        CDType::BF16 => DType::BF16,
        CDType::I64 => DType::I64,
        CDType::I32 => DType::I32,
        CDType::U32 => DType::U32,
        CDType::U8 => DType::U8,
        // Never created by this backend: every tensor comes from `upload`/`full`/`cast`.
        other => unreachable!("candle dtype {other:?} is never created by the cpu backend"),
    }
}

fn is_half(t: &CTensor) -> bool {
    matches!(t.dtype(), CDType::F16 | CDType::BF16)
}

/// Runs `f` in f32 for f16/bf16 inputs and casts the result back.
fn in_f32(x: &CTensor, f: impl FnOnce(&CTensor) -> candle_core::Result<CTensor>) -> Result<CTensor> {
    if is_half(x) {
        let y = f(&convert::to_f32(x).map_err(err)?).map_err(err)?;
        convert::from_f32(&y, x.dtype()).map_err(err)
    } else {
        f(x).map_err(err)
    }
}

/// The values of `t` as one contiguous f32 vector.
fn f32_vec(t: &CTensor) -> Result<Vec<f32>> {
    convert::f32_values(t).map_err(err)
}

/// Inputs of [`Backend::rope`] up to this many elements (decode's few
/// positions) are rotated on the calling thread: candle's kernel hands every
/// head to rayon, whose wake-ups cost more than the rotation.
const ROPE_SERIAL_MAX: usize = 1 << 15;

/// candle's `rope` (halves `i` and `i + d/2`, `cos`/`sin` `[T, D/2]`) on
/// one thread, in the tensor's own type so every product and sum rounds as
/// candle's (and PyTorch's) do.
fn rope_serial(x: &CTensor, cos: &CTensor, sin: &CTensor) -> Result<CTensor> {
    fn rotate<
        T: candle_core::WithDType + std::ops::Mul<Output = T> + std::ops::Add<Output = T> + std::ops::Sub<Output = T>,
    >(
        x: &CTensor,
        cos: &CTensor,
        sin: &CTensor,
    ) -> candle_core::Result<CTensor> {
        let dims = x.dims().to_vec();
        let (t, d) = (dims[2], dims[3]);
        let half = d / 2;
        let xv = x.flatten_all()?.to_vec1::<T>()?;
        let (c, s) = (cos.flatten_all()?.to_vec1::<T>()?, sin.flatten_all()?.to_vec1::<T>()?);
        let mut out = xv.clone();
        for (head, o) in xv.chunks_exact(t * d).zip(out.chunks_exact_mut(t * d)) {
            for p in 0..t {
                let (xr, or) = (&head[p * d..(p + 1) * d], &mut o[p * d..(p + 1) * d]);
                for i in 0..half {
                    let (x1, x2) = (xr[i], xr[i + half]);
                    let (ci, si) = (c[p * half + i], s[p * half + i]);
                    or[i] = x1 * ci - x2 * si;
                    or[i + half] = x1 * si + x2 * ci;
                }
            }
        }
        CTensor::from_vec(out, dims, x.device())
    }
    match x.dtype() {
        CDType::F32 => rotate::<f32>(x, cos, sin),
        // (`Backend::rope` sends bf16 to `rotate_bf16` at every size.)
        CDType::BF16 => rotate_bf16(x, cos, sin),
        CDType::F16 => rotate::<half::f16>(x, cos, sin),
        CDType::F64 => rotate::<f64>(x, cos, sin),
        other => Err(candle_core::Error::Msg(format!("rope on {other:?}"))),
    }
    .map_err(err)
}

/// Rope in bf16, bit for bit `half::bf16` arithmetic as candle's kernel
/// does it (each product and sum widened, computed in f32 and rounded to
/// nearest-even), on the raw bits so that the loop vectorises: through
/// `half`'s operators the rotation of a decode step's 768 values took 4 us
/// and candle's rope 11% of a bf16 prefill. Heads run on rayon past
/// `ROPE_SERIAL_MAX` values.
fn rotate_bf16(x: &CTensor, cos: &CTensor, sin: &CTensor) -> candle_core::Result<CTensor> {
    use convert::{narrow_bits, slice_of};
    let dims = x.dims().to_vec();
    let (t, d) = (dims[2], dims[3]);
    let half = d / 2;
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (xg, xl) = x.storage_and_layout();
    let (cg, cl) = cos.storage_and_layout();
    let (sg, sl) = sin.storage_and_layout();
    let xv = convert::bits(slice_of::<half::bf16>(&xg, xl)?);
    let (c, s) = (
        convert::bits(slice_of::<half::bf16>(&cg, cl)?),
        convert::bits(slice_of::<half::bf16>(&sg, sl)?),
    );
    let w = |b: u16| f32::from_bits((b as u32) << 16);
    let r = |v: f32| w(narrow_bits(v.to_bits()));
    let rotate_head = |head: &[u16], o: &mut [u16]| {
        for p in 0..t {
            let (xr, or) = (&head[p * d..(p + 1) * d], &mut o[p * d..(p + 1) * d]);
            let (cr, sr) = (&c[p * half..(p + 1) * half], &s[p * half..(p + 1) * half]);
            let (o1, o2) = or.split_at_mut(half);
            for i in 0..half {
                let (x1, x2, ci, si) = (w(xr[i]), w(xr[i + half]), w(cr[i]), w(sr[i]));
                o1[i] = narrow_bits((r(x1 * ci) - r(x2 * si)).to_bits());
                o2[i] = narrow_bits((r(x1 * si) + r(x2 * ci)).to_bits());
            }
        }
    };
    let mut out = vec![half::bf16::ZERO; xv.len()];
    let ob = convert::bits_mut(&mut out);
    if xv.len() <= ROPE_SERIAL_MAX {
        for (head, o) in xv.chunks_exact(t * d).zip(ob.chunks_exact_mut(t * d)) {
            rotate_head(head, o);
        }
    } else {
        use rayon::prelude::*;
        ob.par_chunks_exact_mut(t * d)
            .zip(xv.par_chunks_exact(t * d))
            .for_each(|(o, head)| rotate_head(head, o));
    }
    drop((xg, cg, sg));
    CTensor::from_vec(out, dims, x.device())
}

impl CpuBackend {
    /// f32/bf16 `a op b` where one operand has the output's shape and the other
    /// repeats along it (same shape, or a trailing block such as a bias);
    /// `None` for the layouts candle's broadcasting handles.
    fn binary_f32(&self, op: BinaryOp, a: &CTensor, b: &CTensor, out: &[usize]) -> Result<Option<CTensor>> {
        // bf16 too: widened, computed in f32 and rounded once, which is what
        // candle's and PyTorch's bf16 arithmetic give element by element.
        if !matches!(a.dtype(), CDType::F32 | CDType::BF16) || b.dtype() != a.dtype() {
            return Ok(None);
        }
        // The trailing dims of `small` (leading 1s dropped) end `out`.
        let repeats = |small: &CTensor| {
            let d = small.dims();
            let lead = d.iter().take_while(|&&x| x == 1).count();
            let tail = &d[lead..];
            tail.len() <= out.len() && out[out.len() - tail.len()..] == *tail
        };
        let commutes = matches!(
            op,
            BinaryOp::Add | BinaryOp::Mul | BinaryOp::Maximum | BinaryOp::Minimum
        );
        let (full, small) = if a.dims() == out && repeats(b) {
            (a, b)
        } else if commutes && b.dims() == out && repeats(a) {
            (b, a)
        } else {
            return Ok(None);
        };
        if full.dtype() == CDType::BF16 && full.is_contiguous() && small.is_contiguous() {
            let y = convert::with_slice::<half::bf16, _>(full, |f| {
                convert::with_slice::<half::bf16, _>(small, |s| elementwise::binary_bf16(op, f, s))
            })
            .and_then(|r| r)
            .map_err(err)?;
            return CTensor::from_vec(y, out, &self.device).map(Some).map_err(err);
        }
        let s = f32_vec(small)?;
        let v = if full.dtype() == CDType::F32 && full.is_contiguous() {
            // Straight from the input: no full-size copy first.
            convert::with_slice::<f32, _>(full, |f| elementwise::binary_repeat_new(op, f, &s)).map_err(err)?
        } else {
            let mut v = f32_vec(full)?;
            elementwise::binary_repeat(op, &mut v, &s);
            v
        };
        CTensor::from_vec(v, out, &self.device)
            .and_then(|y| convert::from_f32(&y, a.dtype()))
            .map(Some)
            .map_err(err)
    }
}

fn check_dim(op: &str, t: &CTensor, dim: usize) -> Result<()> {
    shape::check_dim(op, t.dims(), dim)
}

fn same_dtype(op: &str, a: &CTensor, b: &CTensor) -> Result<()> {
    shape::check_same_dtype(op, from_candle(a.dtype()), from_candle(b.dtype()))
}

impl Backend for CpuBackend {
    type Tensor = CTensor;

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // `join` called from outside the pool queues both halves on it and
        // runs the first on a compute thread; called from inside, it runs
        // `f` right here.
        rayon::join(f, || ()).0
    }

    fn name(&self) -> &str {
        NAME
    }

    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::Bool
    }

    fn dims(&self, t: &CTensor) -> Vec<usize> {
        t.dims().to_vec()
    }

    fn dtype(&self, t: &CTensor) -> DType {
        from_candle(t.dtype())
    }

    fn upload(&self, host: &HostTensor) -> Result<CTensor> {
        let dt = to_candle(host.dtype())?;
        let bytes = host.as_bytes();
        // Weights (the large uploads) go onto huge pages: decode streams them.
        if bytes.len() >= emu_core::memory::HUGE_PAGE_MIN {
            fn on_huge<T: candle_core::WithDType>(
                bytes: &[u8],
                dims: &[usize],
                dev: &Device,
            ) -> candle_core::Result<CTensor> {
                let n = bytes.len() / std::mem::size_of::<T>();
                let mut v: Vec<T> = emu_core::memory::huge_vec(n);
                // SAFETY: `v` has room for n values; `bytes` holds exactly
                // n values of T (its length comes from the same shape and
                // dtype), and every bit pattern is a valid float of T.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        v.as_mut_ptr().cast::<u8>(),
                        n * std::mem::size_of::<T>(),
                    );
                    v.set_len(n);
                }
                emu_core::memory::settle_on_huge_pages(&v);
                CTensor::from_vec(v, dims, dev)
            }
            let t = match dt {
                CDType::F32 => Some(on_huge::<f32>(bytes, host.dims(), &self.device)),
                CDType::BF16 => Some(on_huge::<half::bf16>(bytes, host.dims(), &self.device)),
                CDType::F16 => Some(on_huge::<half::f16>(bytes, host.dims(), &self.device)),
                _ => None,
            };
            if let Some(t) = t {
                return t.map_err(err);
            }
        }
        CTensor::from_raw_buffer(bytes, dt, host.dims(), &self.device).map_err(err)
    }

    fn download(&self, t: &CTensor) -> Result<HostTensor> {
        let flat = t.flatten_all().map_err(err)?;
        let dims = t.dims();
        // On a little-endian host the storage already is the host layout:
        // one copy of its bytes (the element-wise route took a copy, a
        // byte-by-byte collect and a third of a large op's time).
        macro_rules! bytes {
            ($ty:ty) => {{
                let contiguous = flat.is_contiguous().then_some(&flat);
                match (cfg!(target_endian = "little"), contiguous) {
                    (true, Some(c)) => convert::with_slice::<$ty, _>(c, |s| {
                        // SAFETY: any initialised memory is valid as bytes;
                        // the length is the slice's size in bytes.
                        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
                            .to_vec()
                    })
                    .map_err(err)?,
                    _ => flat
                        .to_vec1::<$ty>()
                        .map_err(err)?
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect::<Vec<u8>>(),
                }
            }};
        }
        let data = match t.dtype() {
            CDType::F64 => bytes!(f64),
            CDType::F32 => bytes!(f32),
            CDType::F16 => bytes!(half::f16),
            CDType::BF16 => bytes!(half::bf16),
            CDType::I64 => bytes!(i64),
            CDType::I32 => bytes!(i32),
            CDType::U32 => bytes!(u32),
            CDType::U8 => flat.to_vec1::<u8>().map_err(err)?,
            other => return Err(unsupported(format!("downloading {other:?}"))),
        };
        HostTensor::from_bytes(dims, from_candle(t.dtype()), data)
    }

    fn full(&self, dims: &[usize], value: f64, dtype: DType) -> Result<CTensor> {
        emu_core::host::checked_numel(dims)?;
        let dt = to_candle(dtype)?;
        let z = CTensor::zeros(dims, dt, &self.device).map_err(err)?;
        if value == 0.0 {
            return Ok(z);
        }
        if dtype.is_float() {
            // affine in f64 then round once, so `full` is exact for every dtype.
            return CTensor::full(value, dims, &self.device)
                .and_then(|t| t.to_dtype(dt))
                .map_err(err);
        }
        let host = HostTensor::from_f64(&[1], vec![value])?.to_dtype(DType::I64)?;
        let one = self.upload(&host)?.to_dtype(dt).map_err(err)?;
        one.reshape(vec![1; dims.len()])
            .and_then(|t| t.broadcast_as(dims))
            .and_then(|t| t.contiguous())
            .map_err(err)
    }

    fn cast(&self, t: &CTensor, dtype: DType) -> Result<CTensor> {
        let to = to_candle(dtype)?;
        match (t.dtype(), to) {
            (CDType::BF16, CDType::F32) => convert::to_f32(t).map_err(err),
            (CDType::F32, CDType::BF16) => convert::from_f32(t, to).map_err(err),
            _ => t.to_dtype(to).map_err(err),
        }
    }

    fn reshape(&self, t: &CTensor, dims: &[usize]) -> Result<CTensor> {
        if emu_core::host::checked_numel(dims)? != t.elem_count() {
            return Err(Error::shape(format!("reshape: cannot view {:?} as {dims:?}", t.dims())));
        }
        t.reshape(dims).map_err(err)
    }

    fn permute(&self, t: &CTensor, perm: &[usize]) -> Result<CTensor> {
        let mut seen = vec![false; t.rank()];
        if perm.len() != t.rank()
            || perm
                .iter()
                .any(|&p| p >= t.rank() || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::shape(format!(
                "permute: {perm:?} is not a permutation of the dims of {:?}",
                t.dims()
            )));
        }
        t.permute(perm).map_err(err)
    }

    fn narrow(&self, t: &CTensor, dim: usize, start: usize, len: usize) -> Result<CTensor> {
        check_dim("narrow", t, dim)?;
        if start.checked_add(len).is_none_or(|end| end > t.dims()[dim]) {
            return Err(Error::shape(format!(
                "narrow: {start}..{start}+{len} out of range for dim {dim} of {:?}",
                t.dims()
            )));
        }
        t.narrow(dim, start, len).map_err(err)
    }

    fn concat(&self, ts: &[&CTensor], dim: usize) -> Result<CTensor> {
        let first = ts.first().ok_or_else(|| Error::shape("concat of no tensors"))?;
        check_dim("concat", first, dim)?;
        for t in ts {
            same_dtype("concat", first, t)?;
            let ok = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b);
            if !ok {
                return Err(Error::shape(format!(
                    "concat along {dim}: {:?} does not fit {:?}",
                    t.dims(),
                    first.dims()
                )));
            }
        }
        CTensor::cat(ts, dim).map_err(err)
    }

    fn slice_set(&self, dst: CTensor, src: &CTensor, dim: usize, start: usize) -> Result<CTensor> {
        check_dim("slice_set", &dst, dim)?;
        same_dtype("slice_set", &dst, src)?;
        let fits = src.rank() == dst.rank()
            && src
                .dims()
                .iter()
                .zip(dst.dims())
                .enumerate()
                .all(|(i, (s, d))| if i == dim { start + s <= *d } else { s == d });
        if !fits {
            return Err(Error::shape(format!(
                "slice_set: {:?} at {start} along {dim} does not fit into {:?}",
                src.dims(),
                dst.dims()
            )));
        }
        // candle writes in place only into contiguous storage that nothing else views.
        let dst = if dst.is_contiguous() {
            dst
        } else {
            dst.copy().map_err(err)?
        };
        let src = src.contiguous().map_err(err)?;
        dst.slice_set(&src, dim, start).map_err(err)?;
        Ok(dst)
    }

    fn index_select(&self, t: &CTensor, ids: &CTensor, dim: usize) -> Result<CTensor> {
        check_dim("index_select", t, dim)?;
        if ids.rank() != 1 || !matches!(ids.dtype(), CDType::U32 | CDType::I64 | CDType::U8) {
            return Err(Error::shape(format!(
                "index_select: ids must be a 1-D integer tensor, found {:?} {}",
                ids.dims(),
                from_candle(ids.dtype())
            )));
        }
        let max = ids
            .to_dtype(CDType::I64)
            .and_then(|i| i.to_vec1::<i64>())
            .map_err(err)?;
        let size = t.dims()[dim] as i64;
        if let Some(bad) = max.iter().find(|&&i| i < 0 || i >= size) {
            return Err(Error::shape(format!(
                "index_select: index {bad} out of range for dim {dim} of {:?}",
                t.dims()
            )));
        }
        t.index_select(ids, dim).map_err(err)
    }

    fn broadcast_to(&self, t: &CTensor, dims: &[usize]) -> Result<CTensor> {
        let out = broadcast_dims("broadcast_to", t.dims(), dims)?;
        if out != dims {
            return Err(Error::shape(format!(
                "broadcast_to: {:?} cannot expand to {dims:?}",
                t.dims()
            )));
        }
        t.broadcast_as(dims).map_err(err)
    }

    fn unary(&self, op: UnaryOp, t: &CTensor) -> Result<CTensor> {
        if !t.dtype().is_float() {
            return Err(Error::DType(format!(
                "{op:?} needs a float tensor, found {}",
                from_candle(t.dtype())
            )));
        }
        if elementwise::has_unary(op) && t.dtype() == CDType::BF16 {
            let t = t.contiguous().map_err(err)?;
            let y = convert::with_slice::<half::bf16, _>(&t, |x| elementwise::unary_bf16(op, x)).map_err(err)?;
            return CTensor::from_vec(y, t.dims(), &self.device).map_err(err);
        }
        if elementwise::has_unary(op) && t.dtype() == CDType::F32 && t.is_contiguous() {
            let v = convert::with_slice::<f32, _>(t, |x| elementwise::unary_new(op, x)).map_err(err)?;
            return CTensor::from_vec(v, t.dims(), &self.device).map_err(err);
        }
        if elementwise::has_unary(op) && matches!(t.dtype(), CDType::F32 | CDType::F16) {
            let mut v = f32_vec(t)?;
            elementwise::unary(op, &mut v);
            return CTensor::from_vec(v, t.dims(), &self.device)
                .and_then(|y| convert::from_f32(&y, t.dtype()))
                .map_err(err);
        }
        // Half-precision inputs are computed in f32 and rounded once, as
        // PyTorch's CPU kernels do; candle's native bf16 silu/exp round twice.
        in_f32(t, |t| match op {
            UnaryOp::Neg => t.neg(),
            UnaryOp::Abs => t.abs(),
            UnaryOp::Exp => t.exp(),
            UnaryOp::Log => t.log(),
            UnaryOp::Sqrt => t.sqrt(),
            UnaryOp::Sqr => t.sqr(),
            UnaryOp::Recip => t.recip(),
            UnaryOp::Tanh => t.tanh(),
            UnaryOp::Sigmoid => candle_nn::ops::sigmoid(t),
            UnaryOp::Sin => t.sin(),
            UnaryOp::Cos => t.cos(),
            UnaryOp::Relu => t.relu(),
            UnaryOp::Silu => t.silu(),
            UnaryOp::Gelu => t.gelu_erf(),
            UnaryOp::GeluTanh => t.gelu(),
        })
    }

    fn binary(&self, op: BinaryOp, a: &CTensor, b: &CTensor) -> Result<CTensor> {
        same_dtype("binary op", a, b)?;
        let out = broadcast_dims(&format!("{op:?}"), a.dims(), b.dims())?;
        if let Some(y) = self.binary_f32(op, a, b, &out)? {
            return Ok(y);
        }
        let r = match op {
            BinaryOp::Add => a.broadcast_add(b),
            BinaryOp::Sub => a.broadcast_sub(b),
            BinaryOp::Mul => a.broadcast_mul(b),
            BinaryOp::Div => a.broadcast_div(b),
            BinaryOp::Maximum => a.broadcast_maximum(b),
            BinaryOp::Minimum => a.broadcast_minimum(b),
        };
        r.map_err(err)
    }

    fn affine(&self, t: &CTensor, mul: f64, add: f64) -> Result<CTensor> {
        t.affine(mul, add).map_err(err)
    }

    fn reduce(&self, op: ReduceOp, t: &CTensor, dim: usize, keepdim: bool) -> Result<CTensor> {
        check_dim("reduce", t, dim)?;
        if t.dims()[dim] == 0 {
            return Err(Error::shape(format!(
                "reduce: dimension {dim} of {:?} is empty",
                t.dims()
            )));
        }
        let r = match op {
            // Accumulate half-precision sums in f32, like PyTorch.
            ReduceOp::Sum => in_f32(t, |x| x.sum_keepdim(dim))?,
            ReduceOp::Mean => in_f32(t, |x| x.mean_keepdim(dim))?,
            ReduceOp::Max => t.max_keepdim(dim).map_err(err)?,
            ReduceOp::Min => t.min_keepdim(dim).map_err(err)?,
        };
        if keepdim {
            Ok(r)
        } else {
            r.squeeze(dim).map_err(err)
        }
    }

    fn argmax(&self, t: &CTensor, dim: usize) -> Result<CTensor> {
        check_dim("argmax", t, dim)?;
        if t.dims()[dim] == 0 {
            return Err(Error::shape(format!(
                "argmax: dimension {dim} of {:?} is empty",
                t.dims()
            )));
        }
        t.argmax_keepdim(dim).and_then(|r| r.squeeze(dim)).map_err(err)
    }

    fn matmul(&self, a: &CTensor, b: &CTensor) -> Result<CTensor> {
        same_dtype("matmul", a, b)?;
        let (ad, bd) = (a.dims(), b.dims());
        if ad.len() < 2 || bd.len() < 2 || ad[ad.len() - 1] != bd[bd.len() - 2] {
            return Err(Error::shape(format!("matmul: {ad:?} x {bd:?}")));
        }
        broadcast_dims("matmul batch", &ad[..ad.len() - 2], &bd[..bd.len() - 2])?;
        // gemm takes row- or column-major operands; anything else is copied once.
        let prep = |t: &CTensor| -> Result<CTensor> {
            let tt = t.t().map_err(err)?;
            if t.is_contiguous() || tt.is_contiguous() {
                Ok(t.clone())
            } else {
                t.contiguous().map_err(err)
            }
        };
        let (a, b) = (prep(a)?, prep(b)?);
        #[cfg(target_arch = "x86_64")]
        if let Some(y) = amx::matmul_tensor(&a, &b).map_err(err)? {
            return Ok(y);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(y) = sgemm::matmul_tensor(&a, &b).map_err(err)? {
            return Ok(y);
        }
        if a.dtype() == CDType::BF16 {
            // candle widens bf16 operands element by element; the product is
            // f32 gemm either way, rounded once (as PyTorch's CPU bf16 gemm).
            let (a32, b32) = (convert::to_f32(&a).map_err(err)?, convert::to_f32(&b).map_err(err)?);
            #[cfg(target_arch = "x86_64")]
            if let Some(y) = sgemm::matmul_tensor(&a32, &b32).map_err(err)? {
                return convert::from_f32(&y, CDType::BF16).map_err(err);
            }
            let y = a32.broadcast_matmul(&b32).map_err(err)?;
            return convert::from_f32(&y, CDType::BF16).map_err(err);
        }
        a.broadcast_matmul(&b).map_err(err)
    }

    fn conv2d(&self, x: &CTensor, w: &CTensor, bias: Option<&CTensor>, p: Conv2dParams) -> Result<CTensor> {
        same_dtype("conv2d", x, w)?;
        let (xd, wd) = (x.dims(), w.dims());
        if xd.len() != 4 || wd.len() != 4 || p.groups == 0 || xd[1] != wd[1] * p.groups || wd[0] % p.groups != 0 {
            return Err(Error::shape(format!(
                "conv2d: input {xd:?}, weight {wd:?}, groups {}",
                p.groups
            )));
        }
        p.output_hw((xd[2], xd[3]), (wd[2], wd[3]))?;
        if p.stride.0 != p.stride.1 || p.dilation.0 != p.dilation.1 {
            return Err(unsupported(format!(
                "conv2d with unequal stride {:?} or dilation {:?}",
                p.stride, p.dilation
            )));
        }
        if let Some(b) = bias {
            same_dtype("conv2d", x, b)?;
            if b.dims() != [wd[0]] {
                return Err(Error::shape(format!(
                    "conv2d: bias {:?} for {} output channels",
                    b.dims(),
                    wd[0]
                )));
            }
        }
        // Empty operands stay on candle's path, which handles them.
        if p.groups == 1 && x.dtype() != CDType::F64 && xd.iter().chain(wd).all(|&d| d > 0) {
            // f32 and half precision: the NCHW im2col kernel, accumulating in
            // f32. f32 starts from the bias; half precision rounds the
            // product once and adds the bias in its own dtype, as this
            // backend always has (the bf16 component fixtures are held to
            // that rounding).
            let f32c = |t: &CTensor| convert::to_f32(t).and_then(|t| t.contiguous()).map_err(err);
            let g = conv::Geometry {
                padding: p.padding,
                stride: p.stride.0,
                dilation: p.dilation.0,
            };
            if x.dtype() == CDType::F32 {
                return conv::conv2d_f32(&f32c(x)?, &f32c(w)?, bias, g).map_err(err);
            }
            #[cfg(target_arch = "x86_64")]
            if x.dtype() == CDType::BF16 && amx::available() {
                let c = |t: &CTensor| t.contiguous().map_err(err);
                return conv::conv2d_bf16(&c(x)?, &c(w)?, bias, g).map_err(err);
            }
            let y = conv::conv2d_f32(&f32c(x)?, &f32c(w)?, None, g)
                .and_then(|y| y.to_dtype(x.dtype()))
                .map_err(err)?;
            return match bias {
                Some(b) => y.broadcast_add(&b.reshape((1, wd[0], 1, 1)).map_err(err)?).map_err(err),
                None => Ok(y),
            };
        }
        let mut x = x.clone();
        let pad = if p.padding.0 == p.padding.1 {
            p.padding.0
        } else {
            x = x
                .pad_with_zeros(2, p.padding.0, p.padding.0)
                .and_then(|x| x.pad_with_zeros(3, p.padding.1, p.padding.1))
                .map_err(err)?;
            0
        };
        // Grouped convolutions (and f64) stay on candle's kernel, which has
        // no bf16 version: half precision goes through f32 and rounds once.
        let dt = if is_half(&x) { CDType::F32 } else { x.dtype() };
        let conv = || -> candle_core::Result<CTensor> {
            let y = x.to_dtype(dt)?.contiguous()?.conv2d(
                &w.to_dtype(dt)?.contiguous()?,
                pad,
                p.stride.0,
                p.dilation.0,
                p.groups,
            )?;
            let y = match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(dt)?.reshape((1, wd[0], 1, 1))?)?,
                None => y,
            };
            y.to_dtype(x.dtype())
        };
        conv().map_err(err)
    }

    fn avg_pool2d(&self, x: &CTensor, kernel: (usize, usize), stride: (usize, usize)) -> Result<CTensor> {
        let d = x.dims();
        if d.len() != 4
            || kernel.0 == 0
            || kernel.1 == 0
            || stride.0 == 0
            || stride.1 == 0
            || d[2] < kernel.0
            || d[3] < kernel.1
        {
            return Err(Error::shape(format!(
                "avg_pool2d: input {d:?}, kernel {kernel:?}, stride {stride:?}"
            )));
        }
        in_f32(x, |x| x.avg_pool2d_with_stride(kernel, stride))
    }

    fn upsample_nearest2d(&self, x: &CTensor, h: usize, w: usize) -> Result<CTensor> {
        let d = x.dims();
        if d.len() != 4 || h == 0 || w == 0 {
            return Err(Error::shape(format!("upsample_nearest2d: input {d:?} to {h}x{w}")));
        }
        x.upsample_nearest2d(h, w).map_err(err)
    }

    // ---- fused overrides -------------------------------------------------

    fn linear(&self, x: &CTensor, w: &CTensor, b: Option<&CTensor>) -> Result<CTensor> {
        same_dtype("linear", x, w)?;
        let (xd, wd) = (x.dims(), w.dims());
        if wd.len() != 2 || xd.is_empty() || xd[xd.len() - 1] != wd[1] {
            return Err(Error::shape(format!("linear: input {xd:?}, weight {wd:?}")));
        }
        if let Some(b) = b {
            if b.dims() == [wd[0]] && b.dtype() == x.dtype() {
                if let Some(y) = matvec::linear(x, w, Some(b)).map_err(err)? {
                    return Ok(y);
                }
            }
        } else if let Some(y) = matvec::linear(x, w, None).map_err(err)? {
            return Ok(y);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(y) = amx::linear_tensor(x, w, b).map_err(err)? {
            return Ok(y);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(y) = sgemm::linear_tensor(x, w, b).map_err(err)? {
            return Ok(y);
        }
        // `w.t()` is a column-major view that gemm consumes without a copy.
        let rows: usize = xd[..xd.len() - 1].iter().product();
        let x2 = x.reshape((rows, wd[1])).map_err(err)?;
        let y = if x.dtype() == CDType::BF16 {
            // Without AVX512-BF16: both widened (exactly), the f32 product
            // on our kernels where they run (candle's gemm took twice as
            // long on an AVX2-only VM), rounded once.
            let (x32, w32) = (convert::to_f32(&x2).map_err(err)?, convert::to_f32(w).map_err(err)?);
            #[cfg(target_arch = "x86_64")]
            let fast = sgemm::linear_tensor(&x32, &w32, None).map_err(err)?;
            #[cfg(not(target_arch = "x86_64"))]
            let fast = None;
            let y = match fast {
                Some(y) => y,
                None => x32.matmul(&w32.t().map_err(err)?).map_err(err)?,
            };
            convert::from_f32(&y, CDType::BF16).map_err(err)?
        } else {
            x2.matmul(&w.t().map_err(err)?).map_err(err)?
        };
        let mut od = xd[..xd.len() - 1].to_vec();
        od.push(wd[0]);
        let y = y.reshape(od).map_err(err)?;
        match b {
            Some(b) => self.binary(BinaryOp::Add, &y, b),
            None => Ok(y),
        }
    }

    fn linear_quant(&self, x: &CTensor, w: &QuantTensor, b: Option<&CTensor>) -> Result<CTensor> {
        let dt = x.dtype();
        let bias = b.map(|b| (b.dims(), from_candle(b.dtype())));
        let (n, k) = emu_core::backend::check_linear_quant(x.dims(), from_candle(dt), w, bias)?;
        if !matches!(dt, CDType::F32 | CDType::F16 | CDType::BF16) {
            return emu_core::backend::default_linear_quant(self, x, w, b);
        }
        let xd = x.dims();
        let m: usize = xd[..xd.len() - 1].iter().product();
        let mut od = xd[..xd.len() - 1].to_vec();
        od.push(n);
        if m == 0 {
            return self.full(&od, 0.0, from_candle(dt));
        }
        if m <= quant::MAX_ROWS {
            let xf = f32_vec(x)?;
            let bf = b.map(f32_vec).transpose()?;
            // The bias is added in f32 and the output rounded once, as the
            // half-precision `linear` kernel does.
            let y = quant::linear_rows(&xf, m, w, bf.as_deref(), self.int8_activations, dt == CDType::BF16);
            return CTensor::from_vec(y, od, &self.device)
                .and_then(|y| convert::from_f32(&y, dt))
                .map_err(err);
        }
        // Prefill: gemm on slabs of dequantized output features.
        let slab = (quant::SLAB_ELEMS / k.max(1)).clamp(1, n);
        let x2 = x.reshape((m, k)).map_err(err)?;
        let mut parts = Vec::with_capacity(n.div_ceil(slab));
        let mut first = 0;
        while first < n {
            let rows = slab.min(n - first);
            let wf = CTensor::from_vec(quant::dequantize_rows(w, first, rows), (rows, k), &self.device)
                .and_then(|t| convert::from_f32(&t, dt))
                .map_err(err)?;
            parts.push(self.linear(&x2, &wf, None)?);
            first += rows;
        }
        let y = if parts.len() == 1 {
            parts.pop().ok_or_else(|| Error::shape("linear_quant: no output"))?
        } else {
            CTensor::cat(&parts, 1).map_err(err)?
        };
        let y = y.reshape(od).map_err(err)?;
        match b {
            Some(b) => self.binary(BinaryOp::Add, &y, b),
            None => Ok(y),
        }
    }

    fn softmax_last_dim(&self, x: &CTensor) -> Result<CTensor> {
        if x.rank() == 0 {
            return Err(Error::shape("softmax of a scalar"));
        }
        if !matches!(x.dtype(), CDType::F32 | CDType::F16 | CDType::BF16) {
            return in_f32(x, |x| candle_nn::ops::softmax_last_dim(&x.contiguous()?));
        }
        // Half precision: f32 inside, rounded once, as PyTorch does.
        attention::softmax_rows(x).map_err(err)
    }

    fn rms_norm(&self, x: &CTensor, w: &CTensor, eps: f64) -> Result<CTensor> {
        same_dtype("rms_norm", x, w)?;
        let last = *x.dims().last().ok_or_else(|| Error::shape("rms_norm of a scalar"))?;
        if w.dims() != [last] {
            return Err(Error::shape(format!(
                "rms_norm: weight {:?} for input {:?}",
                w.dims(),
                x.dims()
            )));
        }
        if !matches!(x.dtype(), CDType::F32 | CDType::F16 | CDType::BF16) {
            return emu_core::backend::default_rms_norm(self, x, w, eps);
        }
        norm::rms_norm(x, w, eps).map_err(err)
    }

    fn layer_norm(&self, x: &CTensor, w: Option<&CTensor>, b: Option<&CTensor>, eps: f64) -> Result<CTensor> {
        let last = *x.dims().last().ok_or_else(|| Error::shape("layer_norm of a scalar"))?;
        for p in [w, b].into_iter().flatten() {
            same_dtype("layer_norm", x, p)?;
            if p.dims() != [last] {
                return Err(Error::shape(format!(
                    "layer_norm: parameter {:?} for input {:?}",
                    p.dims(),
                    x.dims()
                )));
            }
        }
        if !matches!(x.dtype(), CDType::F32 | CDType::F16 | CDType::BF16) {
            return emu_core::backend::default_layer_norm(self, x, w, b, eps);
        }
        norm::layer_norm(x, w, b, eps).map_err(err)
    }

    fn group_norm(
        &self,
        x: &CTensor,
        num_groups: usize,
        w: Option<&CTensor>,
        b: Option<&CTensor>,
        eps: f64,
    ) -> Result<CTensor> {
        let d = x.dims();
        let fused = d.len() >= 2
            && num_groups > 0
            && d[1].is_multiple_of(num_groups)
            && matches!(x.dtype(), CDType::F32 | CDType::F16 | CDType::BF16)
            && [w, b]
                .into_iter()
                .flatten()
                .all(|p| p.dims() == [d[1]] && p.dtype() == x.dtype());
        if !fused {
            // f64 and malformed calls: the composite computes or reports them.
            return emu_core::backend::default_group_norm(self, x, num_groups, w, b, eps);
        }
        norm::group_norm(x, num_groups, w, b, eps).map_err(err)
    }

    fn rope(&self, x: &CTensor, cos: &CTensor, sin: &CTensor) -> Result<CTensor> {
        let xd = x.dims();
        let fused = xd.len() == 4
            && xd[3].is_multiple_of(2)
            && cos.dims() == [xd[2], xd[3] / 2]
            && sin.dims() == cos.dims()
            && cos.dtype() == x.dtype()
            && sin.dtype() == x.dtype();
        if !fused {
            return emu_core::backend::default_rope(self, x, cos, sin);
        }
        if x.dtype() == CDType::BF16 {
            return rotate_bf16(x, cos, sin).map_err(err);
        }
        if x.elem_count() <= ROPE_SERIAL_MAX {
            return rope_serial(x, cos, sin);
        }
        candle_nn::rotary_emb::rope(
            &x.contiguous().map_err(err)?,
            &cos.contiguous().map_err(err)?,
            &sin.contiguous().map_err(err)?,
        )
        .map_err(err)
    }

    fn attention(
        &self,
        q: &CTensor,
        k: &CTensor,
        v: &CTensor,
        mask: &AttnMask<'_, CTensor>,
        scale: f64,
    ) -> Result<CTensor> {
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        let fits = qd.len() == 4
            && kd.len() == 4
            && kd == vd
            && qd[0] == kd[0]
            && qd[3] == kd[3]
            && kd[1] > 0
            && qd[1].is_multiple_of(kd[1])
            && kd[2] > 0;
        let floats = matches!(q.dtype(), CDType::F32 | CDType::F16 | CDType::BF16)
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype();
        let bias_fits = mask.bias.is_none_or(|bias| {
            let bd = bias.dims();
            let want = [qd[0], qd[1], qd[2], kd[2]];
            bias.dtype().is_float()
                && bd.len() <= 4
                && bd.iter().rev().zip(want.iter().rev()).all(|(&a, &w)| a == 1 || a == w)
        });
        if !(fits && floats && bias_fits) {
            // f64 and malformed calls: the composite computes or reports them.
            return emu_core::backend::default_attention(self, q, k, v, mask, scale);
        }
        attention::attention(q, k, v, mask.bias, mask.causal_offset, scale).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend's rope is candle's, bit for bit, in every float type, on
    /// decode-sized inputs (the serial path) and, in bf16, on a prefill-sized
    /// one (heads on rayon).
    #[test]
    fn serial_rope_is_candles_bit_for_bit() {
        let dev = Device::Cpu;
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let small = (2, 3, 5, 8);
        let large = (1, 8, 64, 80);
        const { assert!(8 * 64 * 80 > ROPE_SERIAL_MAX) };
        for (dt, (b, h, t, d)) in [
            (CDType::F32, small),
            (CDType::BF16, small),
            (CDType::F16, small),
            (CDType::BF16, large),
        ] {
            let x = CTensor::from_vec(vals(b * h * t * d, 1), (b, h, t, d), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let cos = CTensor::from_vec(vals(t * d / 2, 2), (t, d / 2), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let sin = CTensor::from_vec(vals(t * d / 2, 3), (t, d / 2), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let ours = CpuBackend::new()
                .rope(&x, &cos, &sin)
                .unwrap()
                .to_dtype(CDType::F32)
                .unwrap();
            let theirs = candle_nn::rotary_emb::rope(&x, &cos, &sin)
                .unwrap()
                .to_dtype(CDType::F32)
                .unwrap();
            let (o, t2) = (
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(o.len(), t2.len());
            assert!(
                o.iter().zip(&t2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dt:?} {t}x{d}"
            );
        }
    }
}
