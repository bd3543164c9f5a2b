//! Group normalisation in one kernel over NCHW (or any `[N, C, ..]`) data.
//!
//! The default composite takes eight passes over the tensor (mean, centre,
//! square, mean, scale, cast, weight, bias), each a new allocation; the VAE
//! runs it on 256x256 maps before every convolution. Here each (sample,
//! group) block is read twice (mean, then centred variance) and written
//! once with the affine part applied, in f32, blocks split over rayon.

use candle_core::{DType, Storage, Tensor as CTensor};
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
    let f32c = |t: &CTensor| t.to_dtype(DType::F32).and_then(|t| t.contiguous());
    let param = |p: Option<&CTensor>| -> candle_core::Result<Option<Vec<f32>>> {
        p.map(|p| f32c(p).and_then(|p| p.to_vec1())).transpose()
    };
    let (wv, bv) = (param(w)?, param(b)?);
    let x32 = f32c(x)?;
    let (xs, xl) = x32.storage_and_layout();
    let (Storage::Cpu(xs), Some((lo, hi))) = (&*xs, xl.contiguous_offsets()) else {
        candle_core::bail!("group_norm: not a contiguous cpu tensor")
    };
    let xs = &xs.as_slice::<f32>()?[lo..hi];
    debug_assert_eq!(xs.len(), n * c * rest);
    let y = group_norm_f32(xs, (c, rest), groups, wv.as_deref(), bv.as_deref(), eps);
    CTensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())
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
}
