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

use crate::convert::{f32_values, from_f32, with_f32};
use candle_core::{DType, Tensor as CTensor};
use rayon::prelude::*;

/// Sum in f32 over short runs (so the compiler vectorises them) and in f64
/// across runs, so million-element groups keep f32 accuracy.
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
    let cg = c / groups;
    let block = cg * rest;
    let mut out = vec![0f32; x.len()];
    if block == 0 {
        return out;
    }
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .enumerate()
        .for_each(|(i, (o, xs))| {
            let len = xs.len() as f64;
            let mean = sum_by(xs, |v| v) / len;
            let m32 = mean as f32;
            let var = sum_by(xs, |v| (v - m32) * (v - m32)) / len;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            let g = i % groups;
            for (cc, (oc, xc)) in o.chunks_exact_mut(rest).zip(xs.chunks_exact(rest)).enumerate() {
                let ch = g * cg + cc;
                let scale = rstd * w.map_or(1.0, |w| w[ch]);
                let shift = b.map_or(0.0, |b| b[ch]);
                for (y, &v) in oc.iter_mut().zip(xc) {
                    *y = (v - m32) * scale + shift;
                }
            }
        });
    out
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

/// LayerNorm of each `d`-long row of `x` (biased variance), affine part in
/// f32: `(x - mean) * rstd * w + b`.
pub(crate) fn layer_norm_f32(x: &[f32], d: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if d == 0 {
        return out;
    }
    let per = rows_per_task(x.len() / d, d) * d;
    out.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(o, xs)| {
        for (oy, xr) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
            let mean = sum_by(xr, |v| v) / d as f64;
            let m32 = mean as f32;
            let var = sum_by(xr, |v| (v - m32) * (v - m32)) / d as f64;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            match (w, b) {
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
    });
    out
}

/// `x * rsqrt(mean(x^2) + eps)` of each `d`-long row, then `* w` where given
/// (f32 `LlamaRMSNorm`; half precision scales after rounding, see
/// [`rms_norm`]).
pub(crate) fn rms_norm_f32(x: &[f32], d: usize, w: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if d == 0 {
        return out;
    }
    let per = rows_per_task(x.len() / d, d) * d;
    out.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(o, xs)| {
        for (oy, xr) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
            let ms = sum_by(xr, |v| v * v) / d as f64;
            let r = (1.0 / (ms + eps).sqrt()) as f32;
            match w {
                Some(w) => {
                    for ((y, &v), &w) in oy.iter_mut().zip(xr).zip(w) {
                        *y = v * r * w;
                    }
                }
                None => {
                    for (y, &v) in oy.iter_mut().zip(xr) {
                        *y = v * r;
                    }
                }
            }
        }
    });
    out
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
