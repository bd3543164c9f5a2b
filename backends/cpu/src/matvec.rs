//! Small-batch `linear` (decode), mainly for half-precision weights.
//!
//! Decoding one token multiplies a handful of rows by every weight matrix,
//! so it is bound by how fast the weights stream from memory. candle's bf16
//! gemm is tuned for large products and reaches a quarter of the f32 speed
//! there, although bf16 weights are half the bytes. This kernel reads each
//! weight row once, widens it to f32 (a 16-bit shift for bf16), takes its dot
//! product with every input row in f32 and rounds each output once, as
//! PyTorch's CPU half-precision linear does. Output features are split over
//! rayon's global pool, the one [`crate::set_num_threads`] sizes. f32
//! weights take the same loop without the widening: for a few rows it also
//! streams the weights faster than gemm's packing.

use candle_core::{DType as CDType, Storage, Tensor as CTensor};
use half::{bf16, f16};

/// Inputs with at most this many rows take the kernel; more rows go to
/// candle's gemm, which reuses each loaded weight across rows. Measured
/// with `examples/bench_linear.rs` (768 -> 2048, 2 threads): the kernel
/// takes 0.15x (1 row) to 0.6x (32 rows) of gemm's time, and about the
/// same at 64 rows.
pub(crate) const MAX_ROWS: usize = 32;

/// The same for f32 weights, where candle's gemm is faster and catches
/// up by 32 rows (0.25x its time at 1 row, 0.65x at 16).
pub(crate) const MAX_ROWS_F32: usize = 16;

/// Lanes of independent partial sums: enough for the compiler to fill two
/// 256-bit registers, and the order of summation the tests check against.
const LANES: usize = 16;

/// Weight element types: rows widen to f32 (f32 rows are used as they are).
pub(crate) trait Weight: Copy + Send + Sync + 'static {
    /// How the AVX-512 kernel widens this type.
    #[cfg(target_arch = "x86_64")]
    const ELEM: crate::matvec_x86::Elem;
    fn widen(src: &[Self], dst: &mut [f32]);
    fn widen_one(self) -> f32;
    fn round(x: f32) -> Self;
    /// The row itself where it already is f32 (no widening copy).
    #[inline(always)]
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Weight for f32 {
    #[cfg(target_arch = "x86_64")]
    const ELEM: crate::matvec_x86::Elem = crate::matvec_x86::Elem::F32;
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn widen_one(self) -> f32 {
        self
    }
    fn round(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
}

impl Weight for bf16 {
    #[cfg(target_arch = "x86_64")]
    const ELEM: crate::matvec_x86::Elem = crate::matvec_x86::Elem::Bf16;
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift the compiler vectorises.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn widen_one(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn round(x: f32) -> Self {
        // `bf16::from_f32`'s bits, branch-free so the output loop vectorises.
        bf16::from_bits(crate::convert::narrow_bits(x.to_bits()))
    }
}

impl Weight for f16 {
    #[cfg(target_arch = "x86_64")]
    const ELEM: crate::matvec_x86::Elem = crate::matvec_x86::Elem::F16;
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // Branch-free (selects only), so it vectorises; `half`'s slice
        // conversion checks the CPU per call and its scalar path per element.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16_bits_to_f32(s.to_bits());
        }
    }
    fn widen_one(self) -> f32 {
        self.to_f32()
    }
    fn round(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Exact f16 -> f32 by bit manipulation (F. Giesen's `half_to_float`):
/// rebias the exponent; infinities and NaNs get the f32 maximum exponent;
/// zeros and subnormals are renormalised with one exact f32 subtraction.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    const MAGIC: f32 = f32::from_bits(113 << 23);
    let h = h as u32;
    let shifted = (h & 0x7fff) << 13;
    let exp = shifted & 0x0f80_0000;
    let o = shifted + ((127 - 15) << 23);
    let o = if exp == 0x0f80_0000 {
        o + ((128 - 16) << 23)
    } else if exp == 0 {
        (f32::from_bits(o + (1 << 23)) - MAGIC).to_bits()
    } else {
        o
    };
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// `sum(a[i] * b[i])` in f32 over `LANES` independent accumulators, so the
/// loop vectorises without reassociation flags.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    // Pairwise, so the rounding error grows with log(LANES) here.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// `y[m, n] = round(sum_k x[m, k] * w[n, k] + bias[n])` for f32 rows `x`
/// (`m` rows of `k`), half weights `w` (`n` rows of `k`, contiguous) and an
/// optional half bias; `y` is `m x n`, row-major.
pub(crate) fn linear_rows<T: Weight>(x: &[f32], m: usize, w: &[T], bias: Option<&[T]>, n: usize) -> Vec<T> {
    linear_rows_with(x, m, w, bias, n, true)
}

/// [`linear_rows`]; `allow_wide: false` keeps the portable loop (the tests
/// run both on an AVX-512 machine).
fn linear_rows_with<T: Weight>(x: &[f32], m: usize, w: &[T], bias: Option<&[T]>, n: usize, allow_wide: bool) -> Vec<T> {
    let k = x.len() / m.max(1);
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    // Output features are computed transposed (`n x m`) so each task owns a
    // contiguous block, one a thread: each core streams its own half of the
    // weights, which the hardware prefetcher follows (16 interleaved tasks a
    // thread decoded 8-20% slower at mid size, measured), and the team's
    // claiming still lets one thread take every block when another is late.
    let threads = rayon::current_num_threads().max(1);
    let block = n.div_ceil(threads).max(16);
    let mut yt = vec![0f32; n * m];
    #[cfg(target_arch = "x86_64")]
    let wide = allow_wide
        && crate::matvec_x86::available()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("f16c");
    // bf16 weights meet bf16 inputs (`x` is their exact widening) in
    // `vdpbf16ps` where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    if wide && T::ELEM == crate::matvec_x86::Elem::Bf16 && crate::dpbf16::available() {
        let xb: Vec<u16> = x.iter().map(|&v| crate::convert::narrow_bits(v.to_bits())).collect();
        crate::team::chunks_mut(&mut yt, block * m, |bi, out| {
            let rows = out.len() / m;
            let wr = w[bi * block * k..(bi * block + rows) * k].as_ptr() as *const u16;
            // SAFETY: AVX512-BF16 was detected; `wr` holds the task's rows
            // of k bf16 and `xb` the m input rows.
            unsafe { crate::matvec_x86::dot_block_bf16(wr, &xb, k, m, out) };
            if let Some(bias) = bias {
                for (j, o) in out.chunks_exact_mut(m).enumerate() {
                    let b = bias[bi * block + j].widen_one();
                    o.iter_mut().for_each(|v| *v += b);
                }
            }
        });
        let mut y = Vec::with_capacity(m * n);
        for i in 0..m {
            y.extend((0..n).map(|r| T::round(yt[r * m + i])));
        }
        return y;
    }
    #[cfg(target_arch = "x86_64")]
    let narrow = allow_wide && !wide && crate::matvec_x86::available_avx2();
    #[cfg(target_arch = "x86_64")]
    if wide || narrow {
        crate::team::chunks_mut(&mut yt, block * m, |bi, out| {
            let rows = out.len() / m;
            let wr = w[bi * block * k..(bi * block + rows) * k].as_ptr() as *const u8;
            // SAFETY: the features were detected above; `wr` holds the
            // task's rows of k weights and `x` the m input rows.
            unsafe {
                match wide {
                    true => crate::matvec_x86::dot_block(T::ELEM, wr, x, k, m, out),
                    false => crate::matvec_x86::dot_block_avx2(T::ELEM, wr, x, k, m, out),
                }
            };
            if let Some(bias) = bias {
                for (j, o) in out.chunks_exact_mut(m).enumerate() {
                    let b = bias[bi * block + j].widen_one();
                    o.iter_mut().for_each(|v| *v += b);
                }
            }
        });
        let mut y = Vec::with_capacity(m * n);
        for i in 0..m {
            y.extend((0..n).map(|r| T::round(yt[r * m + i])));
        }
        return y;
    }
    crate::team::chunks_mut(&mut yt, block * m, |bi, out| {
        let mut row = vec![0f32; k];
        let rows = Rows { x, m, k, w, bias };
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { rows.run_avx2(bi * block, out, &mut row) };
            return;
        }
        rows.run(bi * block, out, &mut row);
    });
    let mut y = Vec::with_capacity(m * n);
    for i in 0..m {
        y.extend((0..n).map(|r| T::round(yt[r * m + i])));
    }
    y
}

/// One task's share of [`linear_rows`].
struct Rows<'a, T> {
    x: &'a [f32],
    m: usize,
    k: usize,
    w: &'a [T],
    bias: Option<&'a [T]>,
}

impl<T: Weight> Rows<'_, T> {
    /// Output features `first..` into `out` (`m` values per feature), with
    /// `row` (`k` long) as scratch for the widened weights.
    #[inline(always)]
    fn run(&self, first: usize, out: &mut [f32], row: &mut [f32]) {
        let (m, k) = (self.m, self.k);
        for (j, o) in out.chunks_exact_mut(m).enumerate() {
            let r = first + j;
            let wr = &self.w[r * k..(r + 1) * k];
            let wr: &[f32] = match T::as_f32(wr) {
                Some(wr) => wr,
                None => {
                    T::widen(wr, row);
                    row
                }
            };
            let b = self.bias.map_or(0.0, |b| b[r].widen_one());
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot(wr, &self.x[i * k..(i + 1) * k]) + b;
            }
        }
    }

    /// [`Self::run`] compiled for AVX2: the default x86-64 target stops at
    /// SSE2, which halves the width of every vector loop above.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(&self, first: usize, out: &mut [f32], row: &mut [f32]) {
        self.run(first, out, row)
    }
}

/// The kernel on candle tensors, or `None` where it does not apply (not
/// half precision, too many rows, weights that are not a contiguous CPU
/// buffer), in which case the caller uses candle's gemm. Shapes are
/// validated by the caller: `x` is `[.., k]`, `w` is `[n, k]`, `b` is `[n]`.
pub(crate) fn linear(x: &CTensor, w: &CTensor, b: Option<&CTensor>) -> candle_core::Result<Option<CTensor>> {
    let dt = w.dtype();
    if !matches!(dt, CDType::BF16 | CDType::F16 | CDType::F32) || x.dtype() != dt || b.is_some_and(|b| b.dtype() != dt)
    {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let xd = x.dims();
    let m: usize = xd[..xd.len() - 1].iter().product();
    let max_rows = if dt == CDType::F32 { MAX_ROWS_F32 } else { MAX_ROWS };
    if m == 0 || m > max_rows || k == 0 {
        return Ok(None);
    }
    // The input is small: one f32 copy of it, whatever its layout.
    let xf: Vec<f32> = crate::convert::f32_values(x)?;
    let b = match b {
        Some(b) => Some(b.contiguous()?),
        None => None,
    };
    let (ws, wl) = w.storage_and_layout();
    let Some((w0, w1)) = wl.contiguous_offsets() else {
        return Ok(None);
    };
    let Storage::Cpu(ws) = &*ws else {
        return Ok(None);
    };
    let mut od = xd[..xd.len() - 1].to_vec();
    od.push(n);
    let dev = w.device();
    macro_rules! run {
        ($t:ty) => {{
            let wv = &ws.as_slice::<$t>()?[w0..w1];
            let y = match &b {
                Some(b) => {
                    let (bs, bl) = b.storage_and_layout();
                    let Storage::Cpu(bs) = &*bs else {
                        return Ok(None);
                    };
                    let Some((b0, b1)) = bl.contiguous_offsets() else {
                        return Ok(None);
                    };
                    linear_rows::<$t>(&xf, m, wv, Some(&bs.as_slice::<$t>()?[b0..b1]), n)
                }
                None => linear_rows::<$t>(&xf, m, wv, None, n),
            };
            CTensor::from_vec(y, od, dev)?
        }};
    }
    let y = match dt {
        CDType::BF16 => run!(bf16),
        CDType::F16 => run!(f16),
        _ => run!(f32),
    };
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (tests need no `rand`).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
    }

    /// Relative error of `linear_rows` against an f64 product of the same
    /// (already rounded) half inputs.
    fn check<T: Weight + Into<f32>>(m: usize, k: usize, n: usize, bias: bool, from: fn(f32) -> T, tol: f64) {
        let x: Vec<f32> = values(m * k, 1).into_iter().map(|v| from(v).into()).collect();
        let w: Vec<T> = values(n * k, 2).into_iter().map(from).collect();
        let b: Vec<T> = values(n, 3).into_iter().map(from).collect();
        for wide in [true, false] {
            let y = linear_rows_with(&x, m, &w, bias.then_some(&b[..]), n, wide);
            let mut worst = 0f64;
            let mut scale = 0f64;
            for i in 0..m {
                for r in 0..n {
                    let mut acc = if bias { b[r].into() as f64 } else { 0.0 };
                    for j in 0..k {
                        acc += x[i * k + j] as f64 * w[r * k + j].into() as f64;
                    }
                    worst = worst.max((y[i * n + r].into() as f64 - acc).abs());
                    scale = scale.max(acc.abs());
                }
            }
            let rel = worst / scale.max(1e-30);
            assert!(
                rel <= tol,
                "m {m} k {k} n {n} wide {wide}: relative error {rel:e} > {tol:e}"
            );
        }
    }

    #[test]
    fn bf16_rows_match_f64() {
        for &(m, k, n) in &[(1, 37, 5), (3, 100, 33), (17, 259, 70), (1, 1, 1), (2, 16, 600)] {
            check::<bf16>(m, k, n, m % 2 == 1, bf16::from_f32, 1e-2);
        }
    }

    #[test]
    fn f32_rows_match_f64() {
        for &(m, k, n) in &[
            (1, 37, 5),
            (3, 100, 33),
            (17, 259, 70),
            (16, 1000, 40),
            (5, 64, 3),
            (2, 130, 9),
        ] {
            check::<f32>(m, k, n, m % 2 == 1, |v| v, 1e-5);
        }
    }

    #[test]
    fn f16_rows_match_f64() {
        for &(m, k, n) in &[(1, 37, 5), (3, 100, 33), (17, 259, 70), (5, 8, 1030)] {
            check::<f16>(m, k, n, m % 2 == 0, f16::from_f32, 5e-3);
        }
    }

    /// Through the backend: a transposed (non-contiguous) 3-D input and a
    /// bias, for each weight dtype, against f64 on the rounded inputs (17
    /// f32 rows and 40 rows of any dtype take candle's gemm).
    #[test]
    fn backend_linear_on_strided_inputs() {
        use emu_core::Backend;
        let cpu = crate::CpuBackend::new();
        let dev = candle_core::Device::Cpu;
        for dt in [CDType::BF16, CDType::F16, CDType::F32] {
            for &(m, k, n) in &[(1, 45, 19), (3, 37, 64), (17, 21, 9), (40, 13, 5)] {
                let round =
                    |v: Vec<f32>, d: &[usize]| CTensor::from_vec(v, d, &dev).and_then(|t| t.to_dtype(dt)).unwrap();
                // [1, k, m] viewed as [1, m, k].
                let x = round(values(m * k, 6), &[1, k, m]).transpose(1, 2).unwrap();
                assert!(m == 1 || !x.is_contiguous());
                let w = round(values(n * k, 7), &[n, k]);
                let b = round(values(n, 8), &[n]);
                let y = cpu.linear(&x, &w, Some(&b)).unwrap();
                assert_eq!(y.dims(), [1, m, n]);
                assert_eq!(y.dtype(), dt);
                let f = |t: &CTensor| -> Vec<f32> {
                    t.to_dtype(CDType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                let (xs, ws, bs, ys) = (f(&x.contiguous().unwrap()), f(&w), f(&b), f(&y));
                let (mut worst, mut scale) = (0f64, 0f64);
                for i in 0..m {
                    for r in 0..n {
                        let want =
                            bs[r] as f64 + (0..k).map(|j| xs[i * k + j] as f64 * ws[r * k + j] as f64).sum::<f64>();
                        worst = worst.max((ys[i * n + r] as f64 - want).abs());
                        scale = scale.max(want.abs());
                    }
                }
                let tol = match dt {
                    CDType::BF16 => 1e-2,
                    CDType::F16 => 5e-3,
                    _ => 1e-5,
                };
                assert!(worst / scale <= tol, "{dt:?} {m}x{k}x{n}: {:e}", worst / scale);
            }
        }
    }

    #[test]
    fn f16_widening_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn dot_matches_f64_on_odd_lengths() {
        for len in [0, 1, 7, 15, 16, 17, 1000, 4099] {
            let (a, b) = (values(len, 4), values(len, 5));
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let scale: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * scale.max(1.0),
                "len {len}: {got} vs {want}"
            );
        }
    }
}
