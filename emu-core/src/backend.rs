//! The op-level interface that every model is written against.
//!
//! See `ARCHITECTURE.md` for why it is shaped this way. In short:
//! * tensors are opaque device handles (`Backend::Tensor`); only
//!   [`Backend::upload`] and [`Backend::download`] move data, so a backend can
//!   keep everything on a GPU or record it into a graph;
//! * the *required* methods are a small set of primitives that every backend
//!   implements (layout, elementwise, reductions, matmul, conv, pooling,
//!   resampling, gather);
//! * the *provided* methods (linear, softmax, norms, rotary embedding,
//!   attention) are composites written here once from the primitives. A backend
//!   may override any of them with a fused kernel; the default is the
//!   reference semantics that the override must reproduce.

use crate::{DType, Error, HostTensor, QuantTensor, Result};
use std::fmt::Debug;

/// Elementwise one-input ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Sqr,
    Recip,
    Tanh,
    Sigmoid,
    Sin,
    Cos,
    Relu,
    /// `x * sigmoid(x)` (LLaMA's SiLU).
    Silu,
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (`nn.GELU()`, EVA-CLIP, GEGLU).
    Gelu,
    /// Tanh approximation of GELU (`nn.GELU(approximate="tanh")`).
    GeluTanh,
}

/// Elementwise two-input ops with NumPy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
}

impl BinaryOp {
    /// Every op, for suites that check each.
    pub const ALL: [BinaryOp; 6] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
    ];
}

/// Reductions over one dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

/// Parameters of a 2-D convolution over NCHW input and OIHW weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

impl Conv2dParams {
    pub fn new(stride: usize, padding: usize) -> Self {
        Self {
            stride: (stride, stride),
            padding: (padding, padding),
            ..Self::default()
        }
    }

    /// Output spatial size for an input of `(h, w)` and a kernel of `(kh, kw)`.
    pub fn output_hw(&self, (h, w): (usize, usize), (kh, kw): (usize, usize)) -> Result<(usize, usize)> {
        let one = |i: usize, k: usize, s: usize, p: usize, d: usize| -> Result<usize> {
            let eff = d * (k - 1) + 1;
            let padded = i + 2 * p;
            if s == 0 || k == 0 || padded < eff {
                return Err(Error::shape(format!(
                    "conv2d: input {h}x{w} with padding {:?} is smaller than the kernel {kh}x{kw} (dilation {:?})",
                    self.padding, self.dilation
                )));
            }
            Ok((padded - eff) / s + 1)
        };
        Ok((
            one(h, kh, self.stride.0, self.padding.0, self.dilation.0)?,
            one(w, kw, self.stride.1, self.padding.1, self.dilation.1)?,
        ))
    }
}

/// Which keys a query may attend to.
///
/// Shapes: `q` is `[B, H, Tq, D]`, `k`/`v` are `[B, Hkv, Tk, D]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnMask<'a, T> {
    /// Causal masking with the queries at absolute positions
    /// `offset .. offset + Tq`: query `i` sees key `j` iff `j <= offset + i`.
    /// With a preallocated KV cache of length `Tk`, this also hides the
    /// not-yet-written slots after the current position.
    pub causal_offset: Option<usize>,
    /// An additive bias broadcastable to `[B, H, Tq, Tk]` (0 to keep, a large
    /// negative number to drop), e.g. the padding mask of left-padded batches.
    pub bias: Option<&'a T>,
}

impl<T> AttnMask<'_, T> {
    pub fn none() -> Self {
        Self {
            causal_offset: None,
            bias: None,
        }
    }
    pub fn causal(offset: usize) -> Self {
        Self {
            causal_offset: Some(offset),
            bias: None,
        }
    }
}

/// Value that masked attention logits are set to. Finite, so that a fully
/// masked row gives a uniform (not NaN) softmax, like PyTorch's `finfo.min`.
pub const MASK_VALUE: f64 = -1e30;

/// A compute backend: a set of op implementations over device-resident tensors.
///
/// All ops are pure (they return new tensors); a backend may share storage
/// between a result and its input (views) as long as that is not observable.
/// Operands of a binary op must have the same dtype; ops keep that dtype.
pub trait Backend: Clone + Send + Sync + Debug + 'static {
    /// A handle to a tensor that lives wherever the backend keeps data.
    type Tensor: Clone + Send + Sync + Debug;

    /// Short name used in errors and on the command line (`cpu`, `cuda`, ...).
    fn name(&self) -> &str;

    /// Whether tensors of this dtype can live on this backend.
    fn supports(&self, dtype: DType) -> bool;

    /// Shape of a tensor (metadata; never reads device memory).
    fn dims(&self, t: &Self::Tensor) -> Vec<usize>;

    /// Element type of a tensor (metadata; never reads device memory).
    fn dtype(&self, t: &Self::Tensor) -> DType;

    /// Runs `f`, a model call made of many ops, where this backend's ops
    /// start fastest. Models wrap each whole forward pass in it. The CPU
    /// backend runs `f` on one of its compute threads: an op called from
    /// any other thread hands its parallel work to the pool and sleeps
    /// until it is done, and at decode sizes that wake-up round trip per op
    /// is a tenth of the step. Backends that queue work elsewhere run `f`
    /// where it is called, as this default does.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    // ---- transfers -------------------------------------------------------

    /// Copies a host tensor to the device, keeping its dtype.
    fn upload(&self, host: &HostTensor) -> Result<Self::Tensor>;

    /// Copies a tensor back to the host. The only way a model reads values.
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;

    /// A tensor filled with one value.
    fn full(&self, dims: &[usize], value: f64, dtype: DType) -> Result<Self::Tensor>;

    /// Converts the elements to another dtype (round to nearest even).
    fn cast(&self, t: &Self::Tensor, dtype: DType) -> Result<Self::Tensor>;

    // ---- layout ----------------------------------------------------------

    fn reshape(&self, t: &Self::Tensor, dims: &[usize]) -> Result<Self::Tensor>;

    /// Reorders dimensions: output dim `i` is input dim `perm[i]`.
    fn permute(&self, t: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;

    /// The slice `start .. start + len` of dimension `dim`.
    fn narrow(&self, t: &Self::Tensor, dim: usize, start: usize, len: usize) -> Result<Self::Tensor>;

    /// Joins tensors along `dim`; all other dimensions must agree.
    fn concat(&self, ts: &[&Self::Tensor], dim: usize) -> Result<Self::Tensor>;

    /// `dst` with the slice `start .. start + src.dims[dim]` of `dim`
    /// replaced by `src` (KV-cache writes into a preallocated buffer).
    ///
    /// `dst` is consumed: an eager backend writes into its storage in place
    /// and returns it (no copy of the cache per token), a graph backend
    /// returns a new value. Callers must not use other handles to `dst`'s
    /// storage afterwards.
    fn slice_set(&self, dst: Self::Tensor, src: &Self::Tensor, dim: usize, start: usize) -> Result<Self::Tensor>;

    /// Gathers slices of `dim` by index (`ids`: a 1-D U32 tensor). With `dim = 0`
    /// on an embedding table, this is the embedding lookup.
    fn index_select(&self, t: &Self::Tensor, ids: &Self::Tensor, dim: usize) -> Result<Self::Tensor>;

    /// Expands size-1 dimensions (and prepends new ones) to `dims`.
    fn broadcast_to(&self, t: &Self::Tensor, dims: &[usize]) -> Result<Self::Tensor>;

    // ---- elementwise -----------------------------------------------------

    fn unary(&self, op: UnaryOp, t: &Self::Tensor) -> Result<Self::Tensor>;

    /// `a op b` with NumPy broadcasting.
    fn binary(&self, op: BinaryOp, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `t * mul + add`.
    fn affine(&self, t: &Self::Tensor, mul: f64, add: f64) -> Result<Self::Tensor>;

    // ---- reductions ------------------------------------------------------

    fn reduce(&self, op: ReduceOp, t: &Self::Tensor, dim: usize, keepdim: bool) -> Result<Self::Tensor>;

    /// Index of the largest element along `dim` (first one on ties), as U32,
    /// with `dim` removed.
    fn argmax(&self, t: &Self::Tensor, dim: usize) -> Result<Self::Tensor>;

    // ---- linear algebra and spatial ops ----------------------------------

    /// Batched matrix product `[.., M, K] x [.., K, N] -> [.., M, N]`; the batch
    /// dimensions broadcast.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// 2-D convolution: `x` `[N, C, H, W]`, `w` `[O, C / groups, KH, KW]`, bias `[O]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// Average pooling over NCHW without padding (windows that do not fit are dropped).
    fn avg_pool2d(&self, x: &Self::Tensor, kernel: (usize, usize), stride: (usize, usize)) -> Result<Self::Tensor>;

    /// Nearest-neighbour resize of NCHW to `(h, w)` (PyTorch's `mode="nearest"`).
    fn upsample_nearest2d(&self, x: &Self::Tensor, h: usize, w: usize) -> Result<Self::Tensor>;

    /// Marks the end of one iteration of a model's loop (a sampling step):
    /// the tensor carried into the next iteration. Eager backends have
    /// already computed it, so the default is the identity. A graph backend
    /// computes it here, so that each iteration runs the same cached graph
    /// instead of the whole loop being unrolled into one graph per step count.
    fn materialize(&self, t: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(t.clone())
    }

    // ---- composites: fusable, with reference defaults --------------------
    /// `x @ w^T + b` with `w` `[out, in]` as stored by `nn.Linear`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        default_linear(self, x, w, b)
    }

    /// `x @ W^T + b` where `W` (`[out, in]`) is block-quantized on the host
    /// (see [`crate::quant`]). The reference semantics are those of the
    /// default: dequantize to f32, round to `x`'s dtype, then [`Backend::linear`].
    /// A backend with a kernel that reads the blocks directly overrides it;
    /// the op suite holds it to the default within the dtype's tolerance.
    fn linear_quant(&self, x: &Self::Tensor, w: &QuantTensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        default_linear_quant(self, x, w, b)
    }

    /// Numerically stable softmax over the last dimension, computed in f32
    /// for f16/bf16 inputs (as PyTorch does internally).
    fn softmax_last_dim(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        default_softmax_last_dim(self, x)
    }

    /// LayerNorm over the last dimension (biased variance), statistics in f32.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: Option<&Self::Tensor>,
        b: Option<&Self::Tensor>,
        eps: f64,
    ) -> Result<Self::Tensor> {
        default_layer_norm(self, x, w, b, eps)
    }

    /// RMSNorm over the last dimension as in transformers' `LlamaRMSNorm`:
    /// normalise in f32, cast back, then scale by the weight.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f64) -> Result<Self::Tensor> {
        default_rms_norm(self, x, w, eps)
    }

    /// GroupNorm over NC... input (`nn.GroupNorm`), statistics in f32; weight
    /// and bias are per channel.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        num_groups: usize,
        w: Option<&Self::Tensor>,
        b: Option<&Self::Tensor>,
        eps: f64,
    ) -> Result<Self::Tensor> {
        default_group_norm(self, x, num_groups, w, b, eps)
    }

    /// Rotary position embedding in the LLaMA "rotate half" convention.
    /// `x` is `[B, H, T, D]`; `cos`/`sin` are `[T, D/2]` or `[B, T, D/2]`
    /// (per-sequence positions, e.g. for left-padded batches).
    fn rope(&self, x: &Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor) -> Result<Self::Tensor> {
        default_rope(self, x, cos, sin)
    }

    /// Scaled dot-product attention, `softmax(q k^T * scale + mask) v`.
    /// Grouped-query attention: `H` must be a multiple of `Hkv`; query head `h`
    /// uses key/value head `h / (H / Hkv)`. Output `[B, H, Tq, D]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: &AttnMask<'_, Self::Tensor>,
        scale: f64,
    ) -> Result<Self::Tensor> {
        default_attention(self, q, k, v, mask, scale)
    }
}

/// Reference implementation of [`Backend::linear`] from the primitives.
pub fn default_linear<B: Backend>(be: &B, x: &B::Tensor, w: &B::Tensor, b: Option<&B::Tensor>) -> Result<B::Tensor> {
    let wd = be.dims(w);
    if wd.len() != 2 {
        return Err(Error::shape(format!("linear: weight must be 2-D, found {wd:?}")));
    }
    let wt = be.permute(w, &[1, 0])?;
    let xd = be.dims(x);
    // Fold the leading dims so the product is one plain 2-D matmul.
    let k = *xd.last().ok_or_else(|| Error::shape("linear: input is a scalar"))?;
    let rows: usize = xd[..xd.len() - 1].iter().product();
    let x2 = be.reshape(x, &[rows, k])?;
    let y = be.matmul(&x2, &wt)?;
    let mut od = xd[..xd.len() - 1].to_vec();
    od.push(wd[0]);
    let y = be.reshape(&y, &od)?;
    match b {
        Some(b) => be.binary(BinaryOp::Add, &y, b),
        None => Ok(y),
    }
}

/// Checks that a quantized `[out, in]` weight fits `x` `[.., in]`; returns `(out, in)`.
pub fn check_linear_quant(
    x_dims: &[usize],
    x_dtype: DType,
    w: &QuantTensor,
    bias: Option<(&[usize], DType)>,
) -> Result<(usize, usize)> {
    let wd = w.dims();
    if wd.len() != 2 {
        return Err(Error::shape(format!(
            "linear_quant: weight `{}` must be 2-D, found {wd:?}",
            w.name()
        )));
    }
    if x_dims.last() != Some(&wd[1]) {
        return Err(Error::shape(format!(
            "linear_quant: input {x_dims:?} does not fit weight `{}` {wd:?}",
            w.name()
        )));
    }
    if let Some((bd, bt)) = bias {
        crate::shape::check_same_dtype("linear_quant bias", x_dtype, bt)?;
        if bd != [wd[0]] {
            return Err(Error::shape(format!(
                "linear_quant: bias {bd:?} for weight `{}` {wd:?}",
                w.name()
            )));
        }
    }
    Ok((wd[0], wd[1]))
}

/// Reference implementation of [`Backend::linear_quant`]: dequantize, upload
/// in `x`'s dtype, [`Backend::linear`].
pub fn default_linear_quant<B: Backend>(
    be: &B,
    x: &B::Tensor,
    w: &QuantTensor,
    b: Option<&B::Tensor>,
) -> Result<B::Tensor> {
    let bias = b.map(|b| (be.dims(b), be.dtype(b)));
    check_linear_quant(
        &be.dims(x),
        be.dtype(x),
        w,
        bias.as_ref().map(|(d, t)| (d.as_slice(), *t)),
    )?;
    let dt = be.dtype(x);
    let wd = w.dequantize()?;
    let wd = if dt.is_float() { wd.to_dtype(dt)? } else { wd };
    be.linear(x, &be.upload(&wd)?, b)
}

/// Reference implementation of [`Backend::softmax_last_dim`] from the primitives.
pub fn default_softmax_last_dim<B: Backend>(be: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let dt = be.dtype(x);
    let xf = upcast(be, x)?;
    let last = be.dims(&xf).len() - 1;
    let m = be.reduce(ReduceOp::Max, &xf, last, true)?;
    let e = be.unary(UnaryOp::Exp, &be.binary(BinaryOp::Sub, &xf, &m)?)?;
    let s = be.reduce(ReduceOp::Sum, &e, last, true)?;
    let y = be.binary(BinaryOp::Div, &e, &s)?;
    be.cast(&y, dt)
}

/// Reference implementation of [`Backend::layer_norm`] from the primitives.
pub fn default_layer_norm<B: Backend>(
    be: &B,
    x: &B::Tensor,
    w: Option<&B::Tensor>,
    b: Option<&B::Tensor>,
    eps: f64,
) -> Result<B::Tensor> {
    let dt = be.dtype(x);
    let xf = upcast(be, x)?;
    let last = be.dims(&xf).len() - 1;
    let mean = be.reduce(ReduceOp::Mean, &xf, last, true)?;
    let xc = be.binary(BinaryOp::Sub, &xf, &mean)?;
    let var = be.reduce(ReduceOp::Mean, &be.unary(UnaryOp::Sqr, &xc)?, last, true)?;
    let rstd = be.unary(UnaryOp::Recip, &be.unary(UnaryOp::Sqrt, &be.affine(&var, 1.0, eps)?)?)?;
    let y = be.cast(&be.binary(BinaryOp::Mul, &xc, &rstd)?, dt)?;
    let y = match w {
        Some(w) => be.binary(BinaryOp::Mul, &y, w)?,
        None => y,
    };
    match b {
        Some(b) => be.binary(BinaryOp::Add, &y, b),
        None => Ok(y),
    }
}

/// Reference implementation of [`Backend::rms_norm`] from the primitives.
pub fn default_rms_norm<B: Backend>(be: &B, x: &B::Tensor, w: &B::Tensor, eps: f64) -> Result<B::Tensor> {
    let dt = be.dtype(x);
    let xf = upcast(be, x)?;
    let last = be.dims(&xf).len() - 1;
    let ms = be.reduce(ReduceOp::Mean, &be.unary(UnaryOp::Sqr, &xf)?, last, true)?;
    let rstd = be.unary(UnaryOp::Recip, &be.unary(UnaryOp::Sqrt, &be.affine(&ms, 1.0, eps)?)?)?;
    let y = be.cast(&be.binary(BinaryOp::Mul, &xf, &rstd)?, dt)?;
    be.binary(BinaryOp::Mul, &y, w)
}

/// Reference implementation of [`Backend::group_norm`] from the primitives.
pub fn default_group_norm<B: Backend>(
    be: &B,
    x: &B::Tensor,
    num_groups: usize,
    w: Option<&B::Tensor>,
    b: Option<&B::Tensor>,
    eps: f64,
) -> Result<B::Tensor> {
    let dims = be.dims(x);
    if dims.len() < 2 || num_groups == 0 || dims[1] % num_groups != 0 {
        return Err(Error::shape(format!(
            "group_norm: {num_groups} groups do not divide the channels of {dims:?}"
        )));
    }
    let dt = be.dtype(x);
    let (n, c) = (dims[0], dims[1]);
    let rest: usize = dims[2..].iter().product();
    let xf = upcast(be, x)?;
    let g = be.reshape(&xf, &[n, num_groups, (c / num_groups) * rest])?;
    let mean = be.reduce(ReduceOp::Mean, &g, 2, true)?;
    let gc = be.binary(BinaryOp::Sub, &g, &mean)?;
    let var = be.reduce(ReduceOp::Mean, &be.unary(UnaryOp::Sqr, &gc)?, 2, true)?;
    let rstd = be.unary(UnaryOp::Recip, &be.unary(UnaryOp::Sqrt, &be.affine(&var, 1.0, eps)?)?)?;
    let y = be.reshape(&be.binary(BinaryOp::Mul, &gc, &rstd)?, &dims)?;
    let y = be.cast(&y, dt)?;
    let mut cdims = vec![1usize; dims.len()];
    cdims[1] = c;
    let y = match w {
        Some(w) => be.binary(BinaryOp::Mul, &y, &be.reshape(w, &cdims)?)?,
        None => y,
    };
    match b {
        Some(b) => be.binary(BinaryOp::Add, &y, &be.reshape(b, &cdims)?),
        None => Ok(y),
    }
}

/// Reference implementation of [`Backend::rope`] from the primitives.
pub fn default_rope<B: Backend>(be: &B, x: &B::Tensor, cos: &B::Tensor, sin: &B::Tensor) -> Result<B::Tensor> {
    let xd = be.dims(x);
    if xd.len() != 4 || xd[3] % 2 != 0 {
        return Err(Error::shape(format!(
            "rope: expected [B, H, T, D] with even D, found {xd:?}"
        )));
    }
    let (b, t, half) = (xd[0], xd[2], xd[3] / 2);
    let cd = be.dims(cos);
    let (cos, sin) = match cd.as_slice() {
        [ct, ch] if *ct == t && *ch == half => (cos.clone(), sin.clone()),
        [cb, ct, ch] if *cb == b && *ct == t && *ch == half => {
            (be.reshape(cos, &[b, 1, t, half])?, be.reshape(sin, &[b, 1, t, half])?)
        }
        _ => return Err(Error::shape(format!("rope: cos/sin {cd:?} do not match x {xd:?}"))),
    };
    let x1 = be.narrow(x, 3, 0, half)?;
    let x2 = be.narrow(x, 3, half, half)?;
    let mul = |a: &B::Tensor, c: &B::Tensor| be.binary(BinaryOp::Mul, a, c);
    let lo = be.binary(BinaryOp::Sub, &mul(&x1, &cos)?, &mul(&x2, &sin)?)?;
    let hi = be.binary(BinaryOp::Add, &mul(&x2, &cos)?, &mul(&x1, &sin)?)?;
    be.concat(&[&lo, &hi], 3)
}

/// Reference implementation of [`Backend::attention`] from the primitives.
pub fn default_attention<B: Backend>(
    be: &B,
    q: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    mask: &AttnMask<'_, B::Tensor>,
    scale: f64,
) -> Result<B::Tensor> {
    let (qd, kd, vd) = (be.dims(q), be.dims(k), be.dims(v));
    if qd.len() != 4 || kd.len() != 4 || vd.len() != 4 || kd != vd || qd[0] != kd[0] || qd[3] != kd[3] {
        return Err(Error::shape(format!(
            "attention: q {qd:?}, k {kd:?}, v {vd:?} do not fit"
        )));
    }
    let (b, h, tq, d) = (qd[0], qd[1], qd[2], qd[3]);
    let (hkv, tk) = (kd[1], kd[2]);
    if hkv == 0 || h % hkv != 0 {
        return Err(Error::shape(format!(
            "attention: {h} query heads are not a multiple of {hkv} kv heads"
        )));
    }
    let (k, v) = if hkv == h {
        (k.clone(), v.clone())
    } else {
        let rep = h / hkv;
        let expand = |t: &B::Tensor| -> Result<B::Tensor> {
            let t = be.reshape(t, &[b, hkv, 1, tk, d])?;
            let t = be.broadcast_to(&t, &[b, hkv, rep, tk, d])?;
            be.reshape(&t, &[b, h, tk, d])
        };
        (expand(k)?, expand(v)?)
    };
    let kt = be.permute(&k, &[0, 1, 3, 2])?;
    let scores = be.affine(&be.matmul(q, &kt)?, scale, 0.0)?;
    let dt = be.dtype(&scores);
    let mut scores = upcast(be, &scores)?;
    if let Some(bias) = mask.bias {
        // f16 cannot hold MASK_VALUE: a mask stored in f16 carries -inf,
        // which would turn a fully masked row into NaN. Clamped back to
        // MASK_VALUE, that row stays uniform (invariant 5) in every dtype.
        let bias = upcast(be, bias)?;
        let floor = be.full(&[1], MASK_VALUE, be.dtype(&bias))?;
        let bias = be.binary(BinaryOp::Maximum, &bias, &floor)?;
        scores = be.binary(BinaryOp::Add, &scores, &bias)?;
    }
    if let Some(offset) = mask.causal_offset {
        let host = causal_bias(tq, tk, offset)?;
        let cm = be.upload(&host)?;
        scores = be.binary(BinaryOp::Add, &scores, &cm)?;
    }
    let p = be.cast(&be.softmax_last_dim(&scores)?, dt)?;
    be.matmul(&p, &v)
}

/// The additive causal mask `[Tq, Tk]` for queries at `offset .. offset + Tq`.
pub fn causal_bias(tq: usize, tk: usize, offset: usize) -> Result<HostTensor> {
    let mut m = vec![0f32; tq * tk];
    for i in 0..tq {
        for j in 0..tk {
            if j > offset + i {
                m[i * tk + j] = MASK_VALUE as f32;
            }
        }
    }
    HostTensor::from_f32(&[tq, tk], m)
}

fn upcast<B: Backend>(b: &B, x: &B::Tensor) -> Result<B::Tensor> {
    match b.dtype(x) {
        DType::F16 | DType::BF16 => b.cast(x, DType::F32),
        _ => Ok(x.clone()),
    }
}
