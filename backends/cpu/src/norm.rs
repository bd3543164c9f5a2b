//! Normalisations in one kernel each: group norm over NCHW (or any
//! `[N, C, ..]`) data, and layer norm and RMS norm over the last dimension.
//!
//! Layer and RMS norm: candle's kernels walk the rows on one thread; here
//! rows are split over rayon, each row is read twice while it sits in L1
//! (mean, then centred variance) and written once, affine part applied.
//!
//! The default composite takes eight passes over the tensor (mean, centre,
//! square, mean, scale, cast, weight, bias), each a new allocation; the VAE
//! runs it on 256x256 maps before every convolution. Here each (sample,
//! group) block is read twice (mean, then centred variance) and written
//! once with the affine part applied, in f32, blocks split over rayon.

use crate::convert::{f32_values, from_f32, with_f32, with_slice};
use candle_core::{DType, Tensor as CTensor};
use half::bf16;
use rayon::prelude::*;

/// Sum in f32 over short runs (so the compiler vectorises them) and in f64
/// across runs, so million-element groups keep f32 accuracy.
#[inline(always)]
fn sum_by(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const RUN: usize = 512;
    const LANES: usize = 16;
    let mut total = 0f64;
    for run in xs.chunks(RUN) {
        let mut acc = [0f32; LANES];
        let mut it = run.chunks_exact(LANES);
        for c in &mut it {
            for l in 0..LANES {
                acc[l] += f(c[l]);
            }
        }
        for (l, v) in it.remainder().iter().enumerate() {
            acc[l] += f(*v);
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

/// `x` is `n` samples of `c` channels of `rest` elements each, contiguous;
/// `w`/`b` have `c` entries. Returns the normalised tensor in the same layout.
pub(crate) fn group_norm_f32(
    x: &[f32],
    (c, rest): (usize, usize),
    groups: usize,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
) -> Vec<f32> {
    group_norm_t(x, (c, rest), groups, GroupNorm { w, b, eps })
}

/// The affine part and epsilon of a group norm.
#[derive(Clone, Copy)]
struct GroupNorm<'a> {
    w: Option<&'a [f32]>,
    b: Option<&'a [f32]>,
    eps: f64,
}

/// [`group_norm_f32`] for f32 or bf16 data: one task per (sample, group)
/// block, compiled per ISA; a bf16 block is widened into an f32 scratch
/// once, normalised there and rounded once on the way out.
fn group_norm_t<T: RowElem>(x: &[T], (c, rest): (usize, usize), groups: usize, gn: GroupNorm<'_>) -> Vec<T> {
    let cg = c / groups;
    let block = cg * rest;
    let mut out = vec![T::default(); x.len()];
    if block == 0 {
        return out;
    }
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .enumerate()
        .for_each_init(Vec::new, |scratch: &mut Vec<f32>, (i, (o, xs))| {
            let first = (i % groups) * cg;
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { gn_block_avx512(&gn, xs, o, rest, first, scratch) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { gn_block_avx2(&gn, xs, o, rest, first, scratch) };
                }
            }
            gn_block(&gn, xs, o, rest, first, scratch)
        });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn gn_block_avx512<T: RowElem>(gn: &GroupNorm<'_>, xs: &[T], o: &mut [T], rest: usize, first: usize, s: &mut Vec<f32>) {
    gn_block(gn, xs, o, rest, first, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gn_block_avx2<T: RowElem>(gn: &GroupNorm<'_>, xs: &[T], o: &mut [T], rest: usize, first: usize, s: &mut Vec<f32>) {
    gn_block(gn, xs, o, rest, first, s)
}

/// One (sample, group) block: channels `first..` of `rest` elements each.
#[inline(always)]
fn gn_block<T: RowElem>(gn: &GroupNorm<'_>, xs: &[T], o: &mut [T], rest: usize, first: usize, scratch: &mut Vec<f32>) {
    let (xf, of): (&[f32], Option<&mut [f32]>) = match T::as_f32(xs) {
        Some(xf) => (xf, T::as_f32_mut(o)),
        None => {
            scratch.resize(xs.len(), 0.0);
            T::widen(xs, scratch);
            (&scratch[..], None)
        }
    };
    let len = xf.len() as f64;
    let mean = sum_by(xf, |v| v) / len;
    let m32 = mean as f32;
    let var = sum_by(xf, |v| (v - m32) * (v - m32)) / len;
    let rstd = (1.0 / (var + gn.eps).sqrt()) as f32;
    let coef = |cc: usize| {
        let ch = first + cc;
        (rstd * gn.w.map_or(1.0, |w| w[ch]), gn.b.map_or(0.0, |b| b[ch]))
    };
    match of {
        Some(of) => {
            for (cc, (oc, xc)) in of.chunks_exact_mut(rest).zip(xf.chunks_exact(rest)).enumerate() {
                let (scale, shift) = coef(cc);
                for (y, &v) in oc.iter_mut().zip(xc) {
                    *y = (v - m32) * scale + shift;
                }
            }
        }
        None => {
            // Normalised in the scratch, then rounded into `o`.
            let mut row = vec![0f32; rest];
            for (cc, (oc, xc)) in o.chunks_exact_mut(rest).zip(xf.chunks_exact(rest)).enumerate() {
                let (scale, shift) = coef(cc);
                for (y, &v) in row.iter_mut().zip(xc) {
                    *y = (v - m32) * scale + shift;
                }
                T::narrow(&row, oc);
            }
        }
    }
}

/// [`group_norm_f32`] on candle tensors of any float dtype but f64 (which
/// the caller leaves to the default composite); shapes and dtypes are
/// validated by the caller. Half precision is normalised in f32, affine
/// part included, and rounded once.
pub(crate) fn group_norm(
    x: &CTensor,
    groups: usize,
    w: Option<&CTensor>,
    b: Option<&CTensor>,
    eps: f64,
) -> candle_core::Result<CTensor> {
    let dims = x.dims();
    let (n, c) = (dims[0], dims[1]);
    let rest: usize = dims[2..].iter().product();
    let (wv, bv) = (w.map(f32_values).transpose()?, b.map(f32_values).transpose()?);
    if x.dtype() == DType::BF16 {
        let gn = GroupNorm {
            w: wv.as_deref(),
            b: bv.as_deref(),
            eps,
        };
        let y = with_slice::<bf16, _>(&x.contiguous()?, |xs| group_norm_t(xs, (c, rest), groups, gn))?;
        return CTensor::from_vec(y, dims, x.device());
    }
    let y = with_f32(x, |xs| {
        debug_assert_eq!(xs.len(), n * c * rest);
        group_norm_f32(xs, (c, rest), groups, wv.as_deref(), bv.as_deref(), eps)
    })?;
    from_f32(&CTensor::from_vec(y, dims, x.device())?, x.dtype())
}

/// Rows per rayon task: enough elements that the split pays for itself.
fn rows_per_task(rows: usize, d: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (16_384 / d.max(1)).max(rows.div_ceil(threads * 8)).max(1)
}

/// A computation on one row in f32 (`x` in, `y` out, both `d` long).
/// `row` is `#[inline(always)]` in every implementation, so that
/// [`map_rows`] compiles it into its AVX-512 / AVX2 copies.
pub(crate) trait RowOp: Sync {
    fn row(&self, x: &[f32], y: &mut [f32]);
}

/// Element types [`map_rows`] reads and writes: f32 in place, bf16 widened
/// into a scratch row and rounded once from another.
pub(crate) trait RowElem: Copy + Default + Send + Sync {
    fn widen(src: &[Self], dst: &mut [f32]);
    fn narrow(src: &[f32], dst: &mut [Self]);
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl RowElem for f32 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
}

impl RowElem for bf16 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, s) in crate::convert::bits_mut(dst).iter_mut().zip(src) {
            *d = crate::convert::narrow_bits(s.to_bits());
        }
    }
    #[inline(always)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

/// `op` on every `d`-long row of `x` into a new buffer, rows split over
/// rayon, each task compiled for the widest ISA the CPU has. One pass over
/// the input and one over the output, with no full-size f32 copy of a
/// bf16 tensor.
pub(crate) fn map_rows<T: RowElem, R: RowOp>(x: &[T], d: usize, op: &R) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    if d == 0 {
        return out;
    }
    let per = rows_per_task(x.len() / d, d) * d;
    out.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(o, xs)| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { rows_avx512(xs, o, d, op) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { rows_avx2(xs, o, d, op) };
            }
        }
        rows_in(xs, o, d, op)
    });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn rows_avx512<T: RowElem, R: RowOp>(xs: &[T], o: &mut [T], d: usize, op: &R) {
    rows_in(xs, o, d, op)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_avx2<T: RowElem, R: RowOp>(xs: &[T], o: &mut [T], d: usize, op: &R) {
    rows_in(xs, o, d, op)
}

#[inline(always)]
fn rows_in<T: RowElem, R: RowOp>(xs: &[T], o: &mut [T], d: usize, op: &R) {
    if let (Some(x), Some(y)) = (T::as_f32(xs), T::as_f32_mut(o)) {
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            op.row(xr, yr);
        }
        return;
    }
    let (mut a, mut b) = (vec![0f32; d], vec![0f32; d]);
    for (xr, yr) in xs.chunks_exact(d).zip(o.chunks_exact_mut(d)) {
        T::widen(xr, &mut a);
        op.row(&a, &mut b);
        T::narrow(&b, yr);
    }
}

/// LayerNorm of a row (biased variance), affine part in f32:
/// `(x - mean) * rstd * w + b`.
pub(crate) struct LayerNorm<'a> {
    pub w: Option<&'a [f32]>,
    pub b: Option<&'a [f32]>,
    pub eps: f64,
}

impl RowOp for LayerNorm<'_> {
    #[inline(always)]
    fn row(&self, xr: &[f32], oy: &mut [f32]) {
        let d = xr.len();
        let mean = sum_by(xr, |v| v) / d as f64;
        let m32 = mean as f32;
        let var = sum_by(xr, |v| (v - m32) * (v - m32)) / d as f64;
        let rstd = (1.0 / (var + self.eps).sqrt()) as f32;
        match (self.w, self.b) {
            (Some(w), Some(b)) => {
                for (((y, &v), &w), &b) in oy.iter_mut().zip(xr).zip(w).zip(b) {
                    *y = (v - m32) * rstd * w + b;
                }
            }
            (Some(w), None) => {
                for ((y, &v), &w) in oy.iter_mut().zip(xr).zip(w) {
                    *y = (v - m32) * rstd * w;
                }
            }
            (None, Some(b)) => {
                for ((y, &v), &b) in oy.iter_mut().zip(xr).zip(b) {
                    *y = (v - m32) * rstd + b;
                }
            }
            (None, None) => {
                for (y, &v) in oy.iter_mut().zip(xr) {
                    *y = (v - m32) * rstd;
                }
            }
        }
    }
}

/// Softmax of a row in f32.
pub(crate) struct Softmax;

impl RowOp for Softmax {
    #[inline(always)]
    fn row(&self, x: &[f32], y: &mut [f32]) {
        y.copy_from_slice(x);
        crate::attention::softmax(y);
    }
}

/// LayerNorm of each `d`-long row of `x` in f32 (see [`LayerNorm`]).
pub(crate) fn layer_norm_f32(x: &[f32], d: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f64) -> Vec<f32> {
    map_rows(x, d, &LayerNorm { w, b, eps })
}

/// `x * rsqrt(mean(x^2) + eps)` of each `d`-long row, then `* w` where given
/// (f32 `LlamaRMSNorm`; half precision scales after rounding, see
/// [`rms_norm`]).
pub(crate) fn rms_norm_f32(x: &[f32], d: usize, w: Option<&[f32]>, eps: f64) -> Vec<f32> {
    map_rows(x, d, &RmsNorm { w, eps, bf16: false })
}

/// RMS norm of a row; with `bf16`, `LlamaRMSNorm`'s half-precision order:
/// the normalised row rounded to bf16, then scaled and rounded again
/// (`weight * hidden.to(input_dtype)`).
struct RmsNorm<'a> {
    w: Option<&'a [f32]>,
    eps: f64,
    bf16: bool,
}

impl RowOp for RmsNorm<'_> {
    #[inline(always)]
    fn row(&self, xr: &[f32], oy: &mut [f32]) {
        let ms = sum_by(xr, |v| v * v) / xr.len() as f64;
        let r = (1.0 / (ms + self.eps).sqrt()) as f32;
        let round = |v: f32| f32::from_bits((crate::convert::narrow_bits(v.to_bits()) as u32) << 16);
        match (self.w, self.bf16) {
            (Some(w), true) => {
                for ((y, &v), &w) in oy.iter_mut().zip(xr).zip(w) {
                    *y = round(round(v * r) * w);
                }
            }
            (Some(w), false) => {
                for ((y, &v), &w) in oy.iter_mut().zip(xr).zip(w) {
                    *y = v * r * w;
                }
            }
            (None, _) => {
                for (y, &v) in oy.iter_mut().zip(xr) {
                    *y = v * r;
                }
            }
        }
    }
}

/// [`layer_norm_f32`] on candle tensors of f32/f16/bf16 (validated by the
/// caller). Half precision is normalised and scaled in f32 and rounded
/// once, as PyTorch's CPU kernel does.
pub(crate) fn layer_norm(
    x: &CTensor,
    w: Option<&CTensor>,
    b: Option<&CTensor>,
    eps: f64,
) -> candle_core::Result<CTensor> {
    let d = *x.dims().last().unwrap_or(&1);
    let wv = w.map(f32_values).transpose()?;
    let bv = b.map(f32_values).transpose()?;
    if x.dtype() == DType::BF16 {
        let op = LayerNorm {
            w: wv.as_deref(),
            b: bv.as_deref(),
            eps,
        };
        let y = with_slice::<bf16, _>(&x.contiguous()?, |xs| map_rows(xs, d, &op))?;
        return CTensor::from_vec(y, x.dims(), x.device());
    }
    let y = with_f32(x, |xs| layer_norm_f32(xs, d, wv.as_deref(), bv.as_deref(), eps))?;
    from_f32(&CTensor::from_vec(y, x.dims(), x.device())?, x.dtype())
}

/// [`rms_norm_f32`] on candle tensors (validated by the caller). f32 scales
/// in the same pass; half precision normalises in f32, rounds, then scales
/// in its own precision, as `LlamaRMSNorm` does
/// (`weight * hidden.to(input_dtype)`).
pub(crate) fn rms_norm(x: &CTensor, w: &CTensor, eps: f64) -> candle_core::Result<CTensor> {
    let d = *x.dims().last().unwrap_or(&1);
    if x.dtype() == DType::F32 {
        let wv = f32_values(w)?;
        let y = with_f32(x, |xs| rms_norm_f32(xs, d, Some(&wv), eps))?;
        return CTensor::from_vec(y, x.dims(), x.device());
    }
    if x.dtype() == DType::BF16 {
        let wv = f32_values(w)?;
        let op = RmsNorm {
            w: Some(&wv),
            eps,
            bf16: true,
        };
        let y = with_slice::<bf16, _>(&x.contiguous()?, |xs| map_rows(xs, d, &op))?;
        return CTensor::from_vec(y, x.dims(), x.device());
    }
    let n = with_f32(x, |xs| rms_norm_f32(xs, d, None, eps))?;
    from_f32(&CTensor::from_vec(n, x.dims(), x.device())?, x.dtype())?.broadcast_mul(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64, offset: f32) -> Vec<f32> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32 + offset).collect()
    }

    /// bf16 in, bf16 out without a full-size f32 copy is still "widen,
    /// compute in f32, round once": bit for bit the f32 kernels on the
    /// widened values, rounded.
    #[test]
    fn bf16_rows_and_groups_are_the_f32_kernels_rounded_once() {
        let (rows, d) = (37, 70);
        let x: Vec<bf16> = values(rows * d, 11, 0.5).into_iter().map(bf16::from_f32).collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let (w, b) = (values(d, 12, 1.0), values(d, 13, 0.0));
        let narrow = |v: Vec<f32>| -> Vec<u16> { v.into_iter().map(|f| bf16::from_f32(f).to_bits()).collect() };
        let bits = |v: Vec<bf16>| -> Vec<u16> { v.into_iter().map(|f| f.to_bits()).collect() };
        let ln = LayerNorm {
            w: Some(&w),
            b: Some(&b),
            eps: 1e-5,
        };
        assert_eq!(bits(map_rows(&x, d, &ln)), narrow(map_rows(&xf, d, &ln)));
        assert_eq!(bits(map_rows(&x, d, &Softmax)), narrow(map_rows(&xf, d, &Softmax)));
        // RMS norm: the half-precision order, normalised row rounded then
        // scaled by the (bf16) weight and rounded again.
        let wb: Vec<f32> = w.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
        let rms = RmsNorm {
            w: Some(&wb),
            eps: 1e-6,
            bf16: true,
        };
        let n = rms_norm_f32(&xf, d, None, 1e-6);
        let want: Vec<u16> = n
            .iter()
            .enumerate()
            .map(|(i, v)| bf16::from_f32(bf16::from_f32(*v).to_f32() * wb[i % d]).to_bits())
            .collect();
        assert_eq!(bits(map_rows(&x, d, &rms)), want);
        // Group norm: 2 samples, 6 channels in 3 groups, 35 elements each.
        let (c, rest, groups) = (6, 35, 3);
        let g: Vec<bf16> = values(2 * c * rest, 14, -0.3).into_iter().map(bf16::from_f32).collect();
        let gf: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
        let (gw, gb) = (values(c, 15, 1.0), values(c, 16, 0.0));
        let gn = GroupNorm {
            w: Some(&gw),
            b: Some(&gb),
            eps: 1e-6,
        };
        assert_eq!(
            bits(group_norm_t(&g, (c, rest), groups, gn)),
            narrow(group_norm_t(&gf, (c, rest), groups, gn))
        );
    }

    fn reference(
        x: &[f32],
        (n, c, rest): (usize, usize, usize),
        groups: usize,
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        eps: f64,
    ) -> Vec<f64> {
        let cg = c / groups;
        let mut y = vec![0f64; x.len()];
        for s in 0..n {
            for g in 0..groups {
                let at = (s * c + g * cg) * rest;
                let xs = &x[at..at + cg * rest];
                let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / xs.len() as f64;
                let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / xs.len() as f64;
                for (j, &v) in xs.iter().enumerate() {
                    let ch = g * cg + j / rest;
                    y[at + j] = (v as f64 - mean) / (var + eps).sqrt() * w.map_or(1.0, |w| w[ch] as f64)
                        + b.map_or(0.0, |b| b[ch] as f64);
                }
            }
        }
        y
    }

    #[test]
    fn matches_f64_on_odd_shapes() {
        // samples, channels, elements per channel, groups, mean offset
        for &(n, c, rest, groups, offset) in &[
            (1, 6, 7, 3, 0.0),
            (2, 9, 13, 3, 5.0),
            (3, 4, 1, 2, -1.0),
            (1, 32, 1025, 8, 30.0),
            (2, 5, 3, 5, 0.5),
        ] {
            let x = values(n * c * rest, 1, offset);
            let w = values(c, 2, 0.0);
            let b = values(c, 3, 0.0);
            for affine in [false, true] {
                let (wo, bo) = if affine {
                    (Some(&w[..]), Some(&b[..]))
                } else {
                    (None, None)
                };
                let got = group_norm_f32(&x, (c, rest), groups, wo, bo, 1e-5);
                let want = reference(&x, (n, c, rest), groups, wo, bo, 1e-5);
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                let worst = got
                    .iter()
                    .zip(&want)
                    .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                assert!(worst / scale <= 1e-5, "{n}x{c}x{rest}/{groups}: {:e}", worst / scale);
            }
        }
    }

    /// Layer and RMS norm rows against f64, over rows that split across
    /// tasks unevenly and a large mean offset (the two-pass variance).
    #[test]
    fn row_norms_match_f64() {
        for &(rows, d, offset) in &[(1, 7, 0.0), (33, 2048, 30.0), (1000, 24, -3.0)] {
            let x = values(rows * d, 1, offset);
            let w = values(d, 2, 0.0);
            let b = values(d, 3, 0.0);
            let ln = layer_norm_f32(&x, d, Some(&w), Some(&b), 1e-5);
            let rn = rms_norm_f32(&x, d, Some(&w), 1e-6);
            let mut worst = (0f64, 0f64);
            for r in 0..rows {
                let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                let mean = xr.iter().sum::<f64>() / d as f64;
                let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                let ms = xr.iter().map(|v| v * v).sum::<f64>() / d as f64;
                for j in 0..d {
                    let want_ln = (xr[j] - mean) / (var + 1e-5).sqrt() * w[j] as f64 + b[j] as f64;
                    let want_rn = xr[j] / (ms + 1e-6).sqrt() * w[j] as f64;
                    worst.0 = worst.0.max((ln[r * d + j] as f64 - want_ln).abs());
                    worst.1 = worst.1.max((rn[r * d + j] as f64 - want_rn).abs());
                }
            }
            assert!(worst.0 <= 1e-5 && worst.1 <= 1e-5, "{rows}x{d}: {worst:?}");
        }
    }
}
