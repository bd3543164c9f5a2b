//! Scaled dot-product attention in f32, one pass per block of query rows.
//!
//! The default composite materialises the whole `[B, H, Tq, Tk]` score
//! tensor several times (matmul, scale, mask, upcast, softmax, cast), and
//! with a preallocated KV cache it scores every slot of the capacity,
//! written or not. Here each rayon task takes up to `QBLOCK` query rows of
//! one head: scores for the keys those rows may see (causal rows stop at
//! their position, so decode reads only the written part of the cache) with
//! gemm, the mask and softmax in place, then the weighted sum of values with
//! gemm. The scratch is one `QBLOCK x Tk` block per task, so full-resolution
//! attention (the VAE's 4096 x 4096) never allocates a full score matrix.
//!
//! The arithmetic is the composite's: scores `(q . k) * scale`, plus the
//! bias clamped at `MASK_VALUE`, softmax in f32; masked keys get weight 0.

use crate::convert::{from_f32, slice_of, to_f32};
use candle_core::{DType, Tensor as CTensor};
use emu_core::backend::MASK_VALUE;
use rayon::prelude::*;

/// Query rows per task: large enough for gemm to reach its speed, small
/// enough that a head of a few hundred rows still splits over the threads.
const QBLOCK: usize = 64;

/// A bias broadcast to `[B, H, Tq, Tk]` by strides (0 on broadcast axes).
struct Bias<'a> {
    data: &'a [f32],
    strides: [usize; 4],
}

impl Bias<'_> {
    #[inline]
    fn row(&self, b: usize, h: usize, i: usize) -> (usize, usize) {
        let s = self.strides;
        (b * s[0] + h * s[1] + i * s[2], s[3])
    }
}

/// `e^x` to about 1 ulp over f32's range (Cephes' `expf` reduction and
/// polynomial), branch-free so that loops over it vectorise; 0 below -87
/// and infinity above f32's range, as libm.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.3);
    // Round to nearest through the f32 mantissa (|v| < 2^22): SSE2 has no
    // rounding instruction, and `f32::round` would be a libm call per lane.
    const MAGIC: f32 = 12_582_912.0;
    let fx = (xc * LOG2E + MAGIC) - MAGIC;
    let r = xc - fx * C1 - fx * C2;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^fx from the bits of fx + 2^23 + 127, whose low mantissa bits hold
    // the biased exponent (fx is an integer in [-126, 128]): `fx as i32`
    // is a saturating conversion that kept these loops from vectorising.
    let pow2 = f32::from_bits((fx + 8_388_735.0).to_bits() << 23);
    if x < -87.0 {
        0.0
    } else if x > 88.72 {
        f32::INFINITY
    } else {
        y * pow2
    }
}

/// In-place softmax of `row` (scores already scaled and masked). Max and
/// sum run over 16 lanes, so every loop here vectorises (a single running
/// sum is a serial dependency the compiler may not reorder).
#[inline(always)]
pub(crate) fn softmax(row: &mut [f32]) {
    const L: usize = 16;
    let mut mx = [f32::NEG_INFINITY; L];
    let mut it = row.chunks_exact(L);
    for c in &mut it {
        for l in 0..L {
            mx[l] = mx[l].max(c[l]);
        }
    }
    let max = it
        .remainder()
        .iter()
        .chain(&mx)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let mut acc = [0f32; L];
    let mut it = row.chunks_exact(L);
    for c in &mut it {
        for l in 0..L {
            acc[l] += c[l];
        }
    }
    let sum = acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over each `d`-long row of `x` in f32, rows split over rayon
/// (candle's walks them on one thread with libm's `exp`); bf16 is widened
/// row by row and rounded once.
pub(crate) fn softmax_rows(x: &CTensor) -> candle_core::Result<CTensor> {
    use crate::convert::with_slice;
    use crate::norm::{map_rows, Softmax};
    let d = *x.dims().last().unwrap_or(&1);
    let x = x.contiguous()?;
    match x.dtype() {
        DType::F32 => {
            let y = with_slice::<f32, _>(&x, |xs| map_rows(xs, d, &Softmax))?;
            CTensor::from_vec(y, x.dims(), x.device())
        }
        DType::BF16 => {
            let y = with_slice::<half::bf16, _>(&x, |xs| map_rows(xs, d, &Softmax))?;
            CTensor::from_vec(y, x.dims(), x.device())
        }
        _ => {
            let y = with_slice::<f32, _>(&to_f32(&x)?, |xs| map_rows(xs, d, &Softmax))?;
            from_f32(&CTensor::from_vec(y, x.dims(), x.device())?, x.dtype())
        }
    }
}

/// `dst[m x n] = beta * lhs[m x k] rhs[k x n]` with arbitrary strides
/// (`(row, col)` for each operand).
///
/// # Safety
/// Every element addressed by the strides over the given sizes must lie in
/// the operand's slice (the caller's shapes guarantee it).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    (m, n, k): (usize, usize, usize),
    beta: f32,
) {
    debug_assert!(m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len());
    // SAFETY: forwarded from the caller; dst is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Where half-precision attention rounds (to the dtype of q, k, v).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    F32,
    Bf16,
    F16,
}

impl Round {
    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        match self {
            Round::F32 => x,
            // Bit for bit `half::bf16::from_f32(x).to_f32()`, branch-free.
            Round::Bf16 => f32::from_bits((crate::convert::narrow_bits(x.to_bits()) as u32) << 16),
            Round::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

/// Scores to probabilities for one block of query rows, in place: half
/// precision rounds the product and the scaled score, then the bias, the
/// causal limit and the softmax in f32, then (half) the probabilities are
/// rounded as the composite casts them before the product with v.
struct Probs<'a> {
    kw: usize,
    i0: usize,
    causal_offset: Option<usize>,
    bias: Option<&'a Bias<'a>>,
    bi: usize,
    hi: usize,
    round: Round,
    scale_h: f32,
}

impl Probs<'_> {
    /// Compiled for the widest ISA the CPU has: as a closure handed to
    /// `elementwise::wide` this body was too large to be inlined into the
    /// AVX-512 copy and ran as scalar SSE code.
    fn apply(&self, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { self.avx512(scores) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { self.avx2(scores) };
            }
        }
        self.run(scores)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512(&self, scores: &mut [f32]) {
        self.run(scores)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2(&self, scores: &mut [f32]) {
        self.run(scores)
    }

    #[inline(always)]
    fn run(&self, scores: &mut [f32]) {
        // One monomorphic loop per dtype, so each vectorises.
        match self.round {
            Round::F32 => self.rows(scores, Round::F32),
            Round::Bf16 => self.rows(scores, Round::Bf16),
            Round::F16 => self.rows(scores, Round::F16),
        }
    }

    #[inline(always)]
    fn rows(&self, scores: &mut [f32], round: Round) {
        let kw = self.kw;
        if round != Round::F32 {
            let scale = self.scale_h;
            // Plain loops: `for_each` with a closure may stay an
            // out-of-line call compiled without the wide ISA.
            for s in scores.iter_mut() {
                *s = round.apply(round.apply(*s) * scale);
            }
        }
        for (r, row) in scores.chunks_exact_mut(kw).enumerate() {
            let i = self.i0 + r;
            let lim = self.causal_offset.map_or(kw, |off| kw.min(off + i + 1));
            if let Some(bias) = self.bias {
                let (at, st) = bias.row(self.bi, self.hi, i);
                for (j, s) in row[..lim].iter_mut().enumerate() {
                    *s += bias.data[at + j * st];
                }
            }
            softmax(&mut row[..lim]);
            row[lim..].fill(0.0);
            if round != Round::F32 {
                for p in row[..lim].iter_mut() {
                    *p = round.apply(*p);
                }
            }
        }
    }
}

/// Query rows per head from which bf16 attention takes AMX tiles: below
/// it (decode) packing k and v would cost more than it saves.
#[cfg(target_arch = "x86_64")]
const TILED_MIN_ROWS: usize = 16;

/// bf16 attention on AMX tiles (see `amx`): q read as it is, k and v
/// packed once per kv head, so neither is widened to f32.
#[cfg(target_arch = "x86_64")]
struct Tiled {
    q: Vec<u16>,
    d: usize,
    keys: Vec<crate::amx::Packed>,
    values: Vec<crate::amx::Packed>,
}

#[cfg(target_arch = "x86_64")]
impl Tiled {
    /// `kmax`: how many keys of each head any row may see.
    fn new(q: &CTensor, k: &CTensor, v: &CTensor, kmax: usize) -> candle_core::Result<Self> {
        use crate::amx::Packed;
        use crate::convert::bits;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (b, hkv, tk, d) = k.dims4()?;
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let (ks, vs) = (bits(slice_of(&kg, kl)?), bits(slice_of(&vg, vl)?));
        let keys = (0..b * hkv)
            .map(|i| Packed::from_columns(&ks[i * tk * d..], d, kmax, d))
            .collect();
        let values = (0..b * hkv)
            .map(|i| Packed::from_rows(&vs[i * tk * d..], kmax, d, d))
            .collect();
        let q = crate::convert::with_slice::<half::bf16, _>(&q, |s| bits(s).to_vec())?;
        Ok(Tiled { q, d, keys, values })
    }

    /// Scores of query rows `row0..row0 + rows` (over all heads) against
    /// the first `kw` keys of kv head `kvh`, into `scores` (`rows x kw`).
    fn scores(&self, row0: usize, rows: usize, kvh: usize, kw: usize, scores: &mut [f32]) {
        let d = self.d;
        let left = crate::amx::Left {
            data: &self.q[row0 * d..(row0 + rows) * d],
            rows,
            k: d,
            ld: d,
        };
        crate::amx::product_here_f32(left, &self.keys[kvh], kw, scores, kw);
    }

    /// `o = p v` for probabilities `p` (`rows x kw`, already bf16 values;
    /// `bits` is scratch) and the values of kv head `kvh`.
    fn weighted(&self, p: &[f32], bits: &mut Vec<u16>, rows: usize, kvh: usize, kw: usize, o: &mut [f32]) {
        let d = self.d;
        bits.clear();
        bits.extend(p.iter().map(|p| crate::convert::narrow_bits(p.to_bits())));
        let left = crate::amx::Left {
            data: bits,
            rows,
            k: kw,
            ld: kw,
        };
        crate::amx::product_here_f32(left, &self.values[kvh], d, o, d);
    }
}

/// No tiled path off x86-64.
#[cfg(not(target_arch = "x86_64"))]
enum Tiled {}

#[cfg(not(target_arch = "x86_64"))]
impl Tiled {
    fn scores(&self, _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {
        match *self {}
    }
    fn weighted(&self, _: &[f32], _: &mut Vec<u16>, _: usize, _: usize, _: usize, _: &mut [f32]) {
        match *self {}
    }
}

/// The first `kmax` positions of each head of a contiguous bf16 cache `t`
/// (`[B, H, Tk, D]`) widened to f32 (`[B, H, kmax, D]`), one block per
/// head; `None` for other dtypes or layouts. A narrowed view through
/// candle's strided copy cost more than the products it fed at decode.
fn widen_prefix(t: &CTensor, kmax: usize) -> candle_core::Result<Option<CTensor>> {
    if t.dtype() != DType::BF16 || !t.is_contiguous() {
        return Ok(None);
    }
    let (b, h, tk, d) = t.dims4()?;
    if kmax > tk {
        return Ok(None);
    }
    let out = crate::convert::with_slice::<half::bf16, _>(t, |s| {
        // Sequential: a few thousand values a head; no zeroing pass.
        let mut out = Vec::with_capacity(b * h * kmax * d);
        for head in s.chunks_exact(tk * d) {
            out.extend(
                head[..kmax * d]
                    .iter()
                    .map(|x| f32::from_bits((x.to_bits() as u32) << 16)),
            );
        }
        out
    })?;
    Ok(Some(CTensor::from_vec(out, (b, h, kmax, d), t.device())?))
}

/// The bias of [`attention`] in f32, clamped, with the strides that
/// broadcast it to `want` (`[B, H, Tq, Tk]`).
fn prepare_bias(bias: Option<&CTensor>, want: [usize; 4]) -> candle_core::Result<Option<(CTensor, [usize; 4])>> {
    let Some(t) = bias else { return Ok(None) };
    let t = to_f32(t)?;
    let bd = t.dims();
    if bd.len() > 4 {
        candle_core::bail!("attention: bias {bd:?} has more than 4 dimensions");
    }
    let mut full = [1usize; 4];
    full[4 - bd.len()..].copy_from_slice(bd);
    if full.iter().zip(want).any(|(&f, w)| f != 1 && f != w) {
        candle_core::bail!("attention: bias {bd:?} does not broadcast to {want:?}");
    }
    // Clamped as the composite clamps it (an f16 mask holds -inf).
    let t = t.maximum(MASK_VALUE)?.contiguous()?;
    let mut strides = [0usize; 4];
    let mut acc = 1;
    for ax in (0..4).rev() {
        strides[ax] = if full[ax] == 1 { 0 } else { acc };
        acc *= full[ax];
    }
    Ok(Some((t, strides)))
}

/// Most query rows the decode path takes; more go through the gemm path.
const DECODE_ROWS: usize = 4;

/// A cache element the decode path reads in place.
trait KvElem: candle_core::WithDType {
    fn widen(self) -> f32;
}

impl KvElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElem for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Attention for a few query rows (decode) over a cache of `E`: scores and
/// the weighted sum read the cache where it lies, only the keys each row
/// may see, with no widened copy of the cache and no gemm call per head;
/// heads run on the team. Same roundings as the gemm path.
#[allow(clippy::too_many_arguments)]
fn decode<E: KvElem>(
    q: &CTensor,
    k: &CTensor,
    v: &CTensor,
    bias: Option<&CTensor>,
    causal_offset: Option<usize>,
    kmax: usize,
    round: Round,
    scale: f64,
    scale_h: f32,
) -> candle_core::Result<CTensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let rep = h / hkv;
    let is_half = round != Round::F32;
    let bias = prepare_bias(bias, [b, h, tq, tk])?;
    let q32 = to_f32(q)?.contiguous()?;
    let (qg, ql) = q32.storage_and_layout();
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (qs, ks, vs) = (
        slice_of::<f32>(&qg, ql)?,
        slice_of::<E>(&kg, kl)?,
        slice_of::<E>(&vg, vl)?,
    );
    let bias_guard = bias.as_ref().map(|(t, strides)| (t.storage_and_layout(), *strides));
    let bias = match &bias_guard {
        Some(((bg, bl), strides)) => Some(Bias {
            data: slice_of(bg, bl)?,
            strides: *strides,
        }),
        None => None,
    };
    let mut out = vec![0f32; b * h * tq * d];
    let pre_scale = if is_half { 1.0 } else { scale as f32 };
    crate::team::chunks_mut(&mut out, tq * d, |bh, o| {
        let (bi, hi) = (bh / h, bh % h);
        let kvh = bi * hkv + hi / rep;
        let kw = kmax;
        let kc = &ks[kvh * tk * d..(kvh * tk + kw) * d];
        let vc = &vs[kvh * tk * d..(kvh * tk + kw) * d];
        let probs = Probs {
            kw,
            i0: 0,
            causal_offset,
            bias: bias.as_ref(),
            bi,
            hi,
            round,
            scale_h,
        };
        let qrows = &qs[bh * tq * d..(bh + 1) * tq * d];
        let head = Head {
            qrows,
            kc,
            vc,
            d,
            pre_scale,
            probs,
        };
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { head.avx512(o) };
        }
        head.run(o);
    });
    drop((qg, kg, vg, bias_guard));
    from_f32(&CTensor::from_vec(out, (b, h, tq, d), q.device())?, q.dtype())
}

/// One head of [`decode`]: its query rows, the cache rows it may see.
struct Head<'a, E> {
    qrows: &'a [f32],
    kc: &'a [E],
    vc: &'a [E],
    d: usize,
    pre_scale: f32,
    probs: Probs<'a>,
}

impl<E: KvElem> Head<'_, E> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512(&self, o: &mut [f32]) {
        self.run(o)
    }

    #[inline(always)]
    fn run(&self, o: &mut [f32]) {
        let (d, kw) = (self.d, self.probs.kw);
        let mut scores = vec![0f32; self.qrows.len() / d * kw];
        for (i, (srow, qr)) in scores.chunks_exact_mut(kw).zip(self.qrows.chunks_exact(d)).enumerate() {
            // A causal row sees keys up to offset + i; `Probs` masks the
            // rest, so they need no product.
            let seen = self.probs.causal_offset.map_or(kw, |off| kw.min(off + i + 1));
            for (s, kr) in srow[..seen].iter_mut().zip(self.kc.chunks_exact(d)) {
                *s = dot(qr, kr) * self.pre_scale;
            }
        }
        self.probs.apply(&mut scores);
        for (p, orow) in scores.chunks_exact(kw).zip(o.chunks_exact_mut(d)) {
            weighted(p, self.vc, orow);
        }
    }
}

/// `q · k` in f32, sixteen independent lanes (vectorised).
#[inline(always)]
fn dot<E: KvElem>(q: &[f32], k: &[E]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut qc = q.chunks_exact(L);
    let mut kc = k.chunks_exact(L);
    for (a, b) in (&mut qc).zip(&mut kc) {
        for l in 0..L {
            acc[l] += a[l] * b[l].widen();
        }
    }
    let mut s = 0f32;
    for (a, b) in qc.remainder().iter().zip(kc.remainder()) {
        s += a * b.widen();
    }
    acc.iter().sum::<f32>() + s
}

/// `o = sum_j p[j] v[j]` over the rows of `v` (each `o.len()` long).
/// Sixty-four outputs at a time stay in registers over all the rows:
/// accumulating into `o` itself made every row wait for the previous
/// row's stores (store-to-load forwarding), a third of decode attention.
/// The sums are the same, row by row in order.
#[inline(always)]
fn weighted<E: KvElem>(p: &[f32], v: &[E], o: &mut [f32]) {
    const C: usize = 64;
    let d = o.len();
    let mut c0 = 0;
    while c0 + C <= d {
        let mut acc = [0f32; C];
        for (pj, vr) in p.iter().zip(v.chunks_exact(d)) {
            let vr = &vr[c0..c0 + C];
            for l in 0..C {
                acc[l] += pj * vr[l].widen();
            }
        }
        o[c0..c0 + C].copy_from_slice(&acc);
        c0 += C;
    }
    if c0 < d {
        let o = &mut o[c0..];
        o.fill(0.0);
        for (pj, vr) in p.iter().zip(v.chunks_exact(d)) {
            for (x, y) in o.iter_mut().zip(&vr[c0..]) {
                *x += pj * y.widen();
            }
        }
    }
}

/// Attention of `q [B, H, Tq, D]`, `k`/`v [B, Hkv, Tk, D]`
/// (shapes validated by the caller, `Tk > 0`, `H` a multiple of `Hkv`), with
/// an optional bias broadcastable to `[B, H, Tq, Tk]` and causal offset.
/// Returns `[B, H, Tq, D]`.
pub(crate) fn attention(
    q: &CTensor,
    k: &CTensor,
    v: &CTensor,
    bias: Option<&CTensor>,
    causal_offset: Option<usize>,
    scale: f64,
) -> candle_core::Result<CTensor> {
    attention_with(q, k, v, bias, causal_offset, scale, true, true)
}

/// [`attention`]; `tiles: false` keeps bf16 off the AMX path, `direct:
/// false` keeps a few rows off the decode path (the tests compare them).
#[allow(clippy::too_many_arguments)]
fn attention_with(
    q: &CTensor,
    k: &CTensor,
    v: &CTensor,
    bias: Option<&CTensor>,
    causal_offset: Option<usize>,
    scale: f64,
    tiles: bool,
    direct: bool,
) -> candle_core::Result<CTensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let rep = h / hkv;
    let dtype = q.dtype();
    // Half precision follows the composite's (eager PyTorch's) roundings:
    // scores rounded to the dtype after the product and again after the
    // scale, probabilities rounded before the product with v, the output
    // rounded once; everything else in f32.
    let round = match dtype {
        DType::BF16 => Round::Bf16,
        DType::F16 => Round::F16,
        _ => Round::F32,
    };
    let is_half = round != Round::F32;
    let scale_h = round.apply(scale as f32);
    // Keys any query row may see (a causal cache is written up to here).
    let kmax = causal_offset.map_or(tk, |off| tk.min(off + tq));
    #[cfg(target_arch = "x86_64")]
    let tiled = if tiles && dtype == DType::BF16 && tq >= TILED_MIN_ROWS && crate::amx::available() {
        Some(Tiled::new(q, k, v, kmax)?)
    } else {
        None
    };
    #[cfg(not(target_arch = "x86_64"))]
    let tiled: Option<Tiled> = {
        let _ = tiles;
        None
    };
    if direct && tiled.is_none() && tq <= DECODE_ROWS {
        let same = k.dtype() == dtype && v.dtype() == dtype && k.is_contiguous() && v.is_contiguous();
        match dtype {
            DType::BF16 if same => {
                return decode::<half::bf16>(q, k, v, bias, causal_offset, kmax, round, scale, scale_h);
            }
            DType::F32 if same => return decode::<f32>(q, k, v, bias, causal_offset, kmax, round, scale, scale_h),
            _ => {}
        }
    }
    // Half precision on the gemm path widens k and v to f32: only the keys
    // a row may see, not a whole preallocated cache (at decode that was
    // every layer converting its cache's full capacity for each token).
    let (k, v, bias, tk) = if is_half && tiled.is_none() && kmax < tk {
        let bias = match bias {
            Some(t) if t.rank() >= 1 && t.dim(t.rank() - 1)? == tk => Some(t.narrow(t.rank() - 1, 0, kmax)?),
            other => other.cloned(),
        };
        let cut = |t: &CTensor| match widen_prefix(t, kmax)? {
            Some(w) => Ok::<_, candle_core::Error>(w),
            None => t.narrow(2, 0, kmax),
        };
        (cut(k)?, cut(v)?, bias, kmax)
    } else {
        (k.clone(), v.clone(), bias.cloned(), tk)
    };
    let (k, v, bias) = (&k, &v, bias.as_ref());
    // The tiled path reads q, k, v as bf16; the gemm path in f32.
    let (q, k, v) = if tiled.is_some() {
        let empty = || CTensor::zeros(0, DType::F32, q.device());
        (empty()?, empty()?, empty()?)
    } else {
        (
            to_f32(q)?.contiguous()?,
            to_f32(k)?.contiguous()?,
            to_f32(v)?.contiguous()?,
        )
    };
    let bias = prepare_bias(bias, [b, h, tq, tk])?;
    let mut out = vec![0f32; b * h * tq * d];
    let run = |qs: &[f32], ks: &[f32], vs: &[f32], bias: Option<Bias<'_>>, out: &mut [f32]| {
        let mut jobs = Vec::new();
        for (bh, head) in out.chunks_mut(tq * d).enumerate() {
            for (c, o) in head.chunks_mut(QBLOCK * d).enumerate() {
                jobs.push((bh, c * QBLOCK, o));
            }
        }
        jobs.into_par_iter().for_each_init(
            Default::default,
            |(scores, probs): &mut (Vec<f32>, Vec<u16>), (bh, i0, o)| {
                let (bi, hi) = (bh / h, bh % h);
                let kvh = bi * hkv + hi / rep;
                let rows = o.len() / d;
                // Keys the block may see: causal rows stop at offset + i.
                let kw = match causal_offset {
                    Some(off) => tk.min(off + i0 + rows),
                    None => tk,
                };
                scores.clear();
                scores.resize(rows * kw, 0f32);
                match &tiled {
                    Some(t) => t.scores(bh * tq + i0, rows, kvh, kw, scores),
                    None => {
                        let qb = &qs[(bh * tq + i0) * d..(bh * tq + i0 + rows) * d];
                        let kb = &ks[kvh * tk * d..(kvh * tk + kw) * d];
                        // SAFETY: qb is rows x d, kb is kw x d, row-major;
                        // the strides below address exactly those elements.
                        unsafe {
                            gemm_into(
                                scores,
                                kw,
                                qb.as_ptr(),
                                (d, 1),
                                kb.as_ptr(),
                                (1, d),
                                (rows, kw, d),
                                if is_half { 1.0 } else { scale as f32 },
                            )
                        };
                    }
                }
                let probs_of = Probs {
                    kw,
                    i0,
                    causal_offset,
                    bias: bias.as_ref(),
                    bi,
                    hi,
                    round,
                    scale_h,
                };
                probs_of.apply(scores);
                match &tiled {
                    Some(t) => t.weighted(scores, probs, rows, kvh, kw, o),
                    None => {
                        let vb = &vs[kvh * tk * d..(kvh * tk + kw) * d];
                        // SAFETY: scores is rows x kw, vb is kw x d, o is rows x d.
                        unsafe { gemm_into(o, d, scores.as_ptr(), (kw, 1), vb.as_ptr(), (d, 1), (rows, d, kw), 1.0) };
                    }
                }
            },
        );
    };
    let (qg, ql) = q.storage_and_layout();
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (qs, ks, vs) = (slice_of(&qg, ql)?, slice_of(&kg, kl)?, slice_of(&vg, vl)?);
    match &bias {
        Some((t, strides)) => {
            let (bg, bl) = t.storage_and_layout();
            let bias = Bias {
                data: slice_of(&bg, bl)?,
                strides: *strides,
            };
            run(qs, ks, vs, Some(bias), &mut out);
        }
        None => run(qs, ks, vs, None, &mut out),
    }
    drop((qg, kg, vg));
    from_f32(&CTensor::from_vec(out, (b, h, tq, d), q.device())?, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
    }

    type BiasAt = dyn Fn(usize, usize, usize, usize) -> f64;

    /// A tensor's values as f32, flattened.
    fn f32s(t: &CTensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// softmax(q k^T scale + bias + causal) v in f64, bias given per
    /// (b, h, i, j) by a closure.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, h, hkv, tq, tk, d): (usize, usize, usize, usize, usize, usize),
        bias: &dyn Fn(usize, usize, usize, usize) -> f64,
        causal: Option<usize>,
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0f64; b * h * tq * d];
        for bi in 0..b {
            for hi in 0..h {
                let kh = bi * hkv + hi / (h / hkv);
                for i in 0..tq {
                    let qr = &q[((bi * h + hi) * tq + i) * d..][..d];
                    let mut s: Vec<f64> = (0..tk)
                        .map(|j| {
                            let kr = &k[(kh * tk + j) * d..][..d];
                            let dot: f64 = qr.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let masked = causal.is_some_and(|o| j > o + i);
                            dot * scale + bias(bi, hi, i, j).max(MASK_VALUE) + if masked { MASK_VALUE } else { 0.0 }
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|x| *x = (*x - max).exp());
                    let sum: f64 = s.iter().sum();
                    for (j, p) in s.iter().enumerate() {
                        for dd in 0..d {
                            out[((bi * h + hi) * tq + i) * d + dd] += p / sum * v[(kh * tk + j) * d + dd] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// Blocks of query rows (Tq over QBLOCK), causal offsets into a larger
    /// cache, grouped-query heads and broadcast biases, against f64.
    /// Half-precision decode over a preallocated cache widens only the
    /// keys the rows see: the same bits as attention over the cache cut to
    /// them, with a padding mask cut alike, and the unwritten rest (NaN
    /// here) never read.
    #[test]
    fn half_decode_reads_only_the_written_cache() {
        let dev = Device::Cpu;
        let (b, h, hkv, tq, tk, d, off) = (2, 4, 2, 1, 48, 16, 20);
        let kmax = off + tq;
        let fill = |seed| {
            let mut v = values(b * hkv * tk * d, seed);
            for (i, x) in v.iter_mut().enumerate() {
                if (i / d) % tk >= kmax {
                    *x = f32::NAN;
                }
            }
            CTensor::from_vec(v, (b, hkv, tk, d), &dev).unwrap()
        };
        let q = CTensor::from_vec(values(b * h * tq * d, 1), (b, h, tq, d), &dev).unwrap();
        let (k, v) = (fill(2), fill(3));
        let mask: Vec<f32> = (0..b * tk)
            .map(|x| {
                if x / tk == 1 && x % tk < 3 {
                    MASK_VALUE as f32
                } else {
                    0.0
                }
            })
            .collect();
        let mask = CTensor::from_vec(mask, (b, 1, 1, tk), &dev).unwrap();
        for dt in [DType::BF16, DType::F16] {
            for direct in [true, false] {
                let c = |t: &CTensor| t.to_dtype(dt).unwrap();
                let full =
                    attention_with(&c(&q), &c(&k), &c(&v), Some(&c(&mask)), Some(off), 0.25, false, direct).unwrap();
                let cut = |t: &CTensor| c(t).narrow(2, 0, kmax).unwrap().contiguous().unwrap();
                let mask_cut = c(&mask).narrow(3, 0, kmax).unwrap();
                let want = attention_with(
                    &c(&q),
                    &cut(&k),
                    &cut(&v),
                    Some(&mask_cut),
                    Some(off),
                    0.25,
                    false,
                    direct,
                )
                .unwrap();
                let (g, w) = (f32s(&full), f32s(&want));
                assert!(g.iter().all(|x| x.is_finite()), "{dt:?}: the unwritten cache was read");
                assert!(g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()), "{dt:?}");
            }
        }
    }

    #[test]
    fn matches_f64_across_blocks_masks_and_heads() {
        let dev = Device::Cpu;
        // b, h, hkv, tq, tk, d, causal offset, bias kind
        for &(b, h, hkv, tq, tk, d, causal, bias_kind) in &[
            (1, 2, 2, 150, 150, 16, Some(0), 0),
            (2, 4, 2, 70, 90, 8, None, 1),
            (2, 3, 1, 1, 40, 32, Some(20), 1),
            (1, 2, 2, 100, 100, 4, None, 2),
            (2, 2, 2, 65, 80, 8, Some(10), 1),
            (1, 4, 2, 3, 50, 20, Some(30), 2),
            (2, 2, 1, 4, 33, 64, None, 1),
        ] {
            let qv = values(b * h * tq * d, 1);
            let kv = values(b * hkv * tk * d, 2);
            let vv = values(b * hkv * tk * d, 3);
            let q = CTensor::from_vec(qv.clone(), (b, h, tq, d), &dev).unwrap();
            let k = CTensor::from_vec(kv.clone(), (b, hkv, tk, d), &dev).unwrap();
            let v = CTensor::from_vec(vv.clone(), (b, hkv, tk, d), &dev).unwrap();
            // 1: a padding mask [B, 1, 1, Tk] hiding the first 3 keys of
            // sequence 1 (all of them at decode would be a fully masked row);
            // 2: an arbitrary [Tq, Tk] bias.
            let (bias_t, bias_f): (Option<CTensor>, Box<BiasAt>) = match bias_kind {
                1 => {
                    let m: Vec<f32> = (0..b * tk)
                        .map(|x| {
                            if x / tk == 1 && x % tk < 3 {
                                MASK_VALUE as f32
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mf = m.clone();
                    (
                        Some(CTensor::from_vec(m, (b, 1, 1, tk), &dev).unwrap()),
                        Box::new(move |bi, _, _, j| mf[bi * tk + j] as f64),
                    )
                }
                2 => {
                    let m = values(tq * tk, 4);
                    let mf = m.clone();
                    (
                        Some(CTensor::from_vec(m, (tq, tk), &dev).unwrap()),
                        Box::new(move |_, _, i, j| mf[i * tk + j] as f64),
                    )
                }
                _ => (None, Box::new(|_, _, _, _| 0.0)),
            };
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention(&q, &k, &v, bias_t.as_ref(), causal, scale)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = reference(&qv, &kv, &vv, (b, h, hkv, tq, tk, d), &*bias_f, causal, scale);
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(
                worst <= 1e-5,
                "{b}x{h}/{hkv}x{tq}x{tk}x{d} {causal:?} bias {bias_kind}: {worst:e}"
            );
        }
    }

    /// The decode path (a few query rows, the cache read in place) against
    /// the gemm path, in f32 and bf16, with grouped heads, causal offsets,
    /// padding masks and ragged head widths (the weighted sum keeps 64
    /// outputs in registers: 80 and 128 wide heads cross that): the same roundings, so they
    /// differ by summation order only.
    #[test]
    fn decode_rows_match_the_gemm_path() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            for &(b, h, hkv, tq, tk, d, causal, masked) in &[
                (1, 4, 2, 1, 64, 64, Some(40), false),
                (2, 3, 1, 2, 37, 20, Some(30), true),
                (2, 2, 2, 4, 50, 16, None, true),
                (1, 2, 1, 3, 9, 7, Some(0), false),
                // Widths past one 64-output register block, with and without a tail.
                (1, 2, 2, 1, 33, 80, Some(20), false),
                (1, 2, 1, 2, 40, 128, Some(30), true),
            ] {
                let t = |v: Vec<f32>, n: usize, t: usize| {
                    CTensor::from_vec(v, (b, n, t, d), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let q = t(values(b * h * tq * d, 11), h, tq);
                let k = t(values(b * hkv * tk * d, 12), hkv, tk);
                let v = t(values(b * hkv * tk * d, 13), hkv, tk);
                let mask: Vec<f32> = (0..b * tk)
                    .map(|x| {
                        if x / tk == b - 1 && x % tk < 2 {
                            MASK_VALUE as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = CTensor::from_vec(mask, (b, 1, 1, tk), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let bias = masked.then_some(&mask);
                let scale = 1.0 / (d as f64).sqrt();
                let run = |direct| f32s(&attention_with(&q, &k, &v, bias, causal, scale, false, direct).unwrap());
                let (direct, gemm) = (run(true), run(false));
                let apart = direct.iter().zip(&gemm).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                // f32: summation order; bf16: that, moving a rounded score,
                // probability or output by one bf16 step at most.
                let tol = if dtype == DType::F32 { 1e-6 } else { 1.6e-2 };
                assert!(apart <= tol, "{dtype:?} {b}x{h}/{hkv}x{tq}x{tk}x{d}: {apart:e}");
            }
        }
    }

    /// bf16 with and without AMX tiles (where the CPU has them), both
    /// against the f64 result of the same bf16 inputs: they differ in
    /// summation order only, which moves an output by a bf16 rounding step
    /// at most. Ragged tiles: d 40, 70 keys; causal and padding masks.
    #[test]
    fn bf16_tiles_match_the_gemm_path() {
        let dev = Device::Cpu;
        for &(b, h, hkv, tq, tk, d, causal) in &[(1, 2, 1, 70, 70, 40, Some(0)), (2, 2, 2, 33, 90, 64, None)] {
            let bf = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect() };
            let (qv, kv, vv) = (
                bf(values(b * h * tq * d, 5)),
                bf(values(b * hkv * tk * d, 6)),
                bf(values(b * hkv * tk * d, 7)),
            );
            let t = |v: &[f32], n: usize, t: usize| {
                CTensor::from_vec(v.to_vec(), (b, n, t, d), &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            };
            let (q, k, v) = (t(&qv, h, tq), t(&kv, hkv, tk), t(&vv, hkv, tk));
            let scale = 1.0 / (d as f64).sqrt();
            let want = reference(&qv, &kv, &vv, (b, h, hkv, tq, tk, d), &|_, _, _, _| 0.0, causal, scale);
            let run = |tiles| f32s(&attention_with(&q, &k, &v, None, causal, scale, tiles, true).unwrap());
            let (tiled, plain) = (run(true), run(false));
            let err = |g: &[f32]| g.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(
                err(&tiled) < 2e-2 && err(&plain) < 2e-2,
                "{} {}",
                err(&tiled),
                err(&plain)
            );
            let apart = tiled.iter().zip(&plain).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(apart <= 1.6e-2, "tiled and gemm paths {apart} apart");
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 2.5e-7 * want, "exp({x}) = {got}, libm {want}");
            x += 0.0137;
        }
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }
}
