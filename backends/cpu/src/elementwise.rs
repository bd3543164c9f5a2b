//! Elementwise f32 kernels for the ops the models run on every activation:
//! SiLU, both GELUs, sigmoid and exp, and same-shape or trailing-broadcast
//! add/sub/mul/div.
//!
//! candle evaluates these with libm's scalar `expf`/`erff` and splits them
//! over threads that spin on a barrier between ops; on the UNet and EVA
//! that was a third of the run time. Here each op is one pass over the
//! data in rayon tasks of `CHUNK` elements, with branch-free `exp` and
//! `erf` approximations that the compiler vectorises. Accuracy: `exp`
//! within 2.5e-7 relative of libm (see `attention::exp`); `erf` through
//! Abramowitz–Stegun 7.1.26 (absolute error 1.5e-7), used only inside GELU
//! where it is added to 1.

use crate::attention::exp;
use emu_core::backend::{BinaryOp, UnaryOp};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// Whether [`unary`] computes `op` (the rest stay with candle).
pub(crate) fn has_unary(op: UnaryOp) -> bool {
    matches!(
        op,
        UnaryOp::Silu
            | UnaryOp::Gelu
            | UnaryOp::GeluTanh
            | UnaryOp::Sigmoid
            | UnaryOp::Exp
            | UnaryOp::Relu
            | UnaryOp::Neg
            | UnaryOp::Sqr
    )
}

/// `1 + erf(x)`, without cancellation for negative `x` (where it is the
/// small A–S residual itself).
#[inline(always)]
fn one_plus_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_7, -1.453_152, 1.061_405_4];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    // erfc(|x|) = poly * e^{-x^2}
    let r = poly * exp(-z * z);
    if x < 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[inline(always)]
fn apply(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Silu => x / (1.0 + exp(-x)),
        UnaryOp::Sigmoid => 1.0 / (1.0 + exp(-x)),
        UnaryOp::Gelu => 0.5 * x * one_plus_erf(x * std::f32::consts::FRAC_1_SQRT_2),
        UnaryOp::GeluTanh => {
            // 1 + tanh(y) = 2 / (1 + e^{-2y}): no cancellation near -1.
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            let y = C * (x + 0.044_715 * x * x * x);
            x / (1.0 + exp(-2.0 * y))
        }
        UnaryOp::Exp => exp(x),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Neg => -x,
        UnaryOp::Sqr => x * x,
        _ => f32::NAN,
    }
}

/// Runs `f` on `data` compiled for the widest vector ISA the CPU has
/// (AVX-512, AVX2+FMA, or the baseline), so that loops `f` inlines
/// vectorise at that width.
#[inline(always)]
pub(crate) fn wide<F: FnOnce(&mut [f32])>(data: &mut [f32], f: F) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512<F: FnOnce(&mut [f32])>(data: &mut [f32], f: F) {
            f(data)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<F: FnOnce(&mut [f32])>(data: &mut [f32], f: F) {
            f(data)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { avx512(data, f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { avx2(data, f) };
        }
    }
    f(data)
}

/// One pass of `op` ([`has_unary`]) over `xs`, in place.
pub(crate) fn unary(op: UnaryOp, xs: &mut [f32]) {
    xs.par_chunks_mut(CHUNK).for_each(|c| unary_chunk(op, c));
}

/// `op` ([`has_unary`]) over bf16 `xs` into a new buffer: each task widens
/// its chunk into an f32 scratch, applies the f32 kernel and rounds once,
/// so no full-size f32 copy is made (PyTorch's rounding, one pass each way).
pub(crate) fn unary_bf16(op: UnaryOp, xs: &[half::bf16]) -> Vec<half::bf16> {
    use crate::norm::RowElem;
    let mut out = vec![half::bf16::ZERO; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, (o, x)| {
            buf.resize(x.len(), 0.0);
            wide(buf, |b| half::bf16::widen(x, b));
            unary_chunk(op, buf);
            wide(buf, |b| half::bf16::narrow(b, o));
        });
    out
}

/// `a op b` in bf16 into a new vector, `b` repeating along `a` (as in
/// [`binary_repeat`]): each chunk widened, computed in f32 and rounded once,
/// the bits [`binary_repeat`] on the widened values and a rounding give, in
/// one pass and one allocation (the general path widened both operands
/// into new vectors and rounded into a third: a decode step's 2048-wide
/// products took 4 us).
pub(crate) fn binary_bf16(op: BinaryOp, a: &[half::bf16], b: &[half::bf16]) -> Vec<half::bf16> {
    use crate::norm::RowElem;
    let n = b.len();
    let mut out = vec![half::bf16::ZERO; a.len()];
    if n == 0 {
        return out;
    }
    let mut bw = vec![0f32; n];
    half::bf16::widen(b, &mut bw);
    let per = (CHUNK / n).max(1) * n;
    out.par_chunks_mut(per)
        .zip(a.par_chunks(per))
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, (o, x)| {
            buf.resize(x.len(), 0.0);
            wide(buf, |c| half::bf16::widen(x, c));
            binary_chunk(op, buf, &bw);
            wide(buf, |c| half::bf16::narrow(c, o));
        });
    out
}

/// [`unary`] on one task's chunk.
fn unary_chunk(op: UnaryOp, c: &mut [f32]) {
    macro_rules! run {
        ($op:expr) => {
            wide(c, |c| {
                for v in c.iter_mut() {
                    *v = apply($op, *v);
                }
            })
        };
    }
    // One monomorphic loop per op, so each vectorises on its own.
    match op {
        UnaryOp::Silu => run!(UnaryOp::Silu),
        UnaryOp::Sigmoid => run!(UnaryOp::Sigmoid),
        UnaryOp::Gelu => run!(UnaryOp::Gelu),
        UnaryOp::GeluTanh => run!(UnaryOp::GeluTanh),
        UnaryOp::Exp => run!(UnaryOp::Exp),
        UnaryOp::Relu => run!(UnaryOp::Relu),
        UnaryOp::Neg => run!(UnaryOp::Neg),
        UnaryOp::Sqr => run!(UnaryOp::Sqr),
        _ => c.fill(f32::NAN),
    }
}

#[inline(always)]
fn bin(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Maximum => a.max(b),
        BinaryOp::Minimum => a.min(b),
    }
}

/// `a op b` into `a`, where `b` repeats along `a` (`a.len()` a multiple of
/// `b.len()`; `b.len() == a.len()` is the same-shape case).
pub(crate) fn binary_repeat(op: BinaryOp, a: &mut [f32], b: &[f32]) {
    let n = b.len();
    if n == 0 {
        return;
    }
    // Tasks hold whole repeats of `b`, so its index restarts at 0.
    let per = (CHUNK / n).max(1) * n;
    a.par_chunks_mut(per).for_each(|c| binary_chunk(op, c, b));
}

/// [`binary_repeat`] into a new vector, `a` left as it is.
pub(crate) fn binary_repeat_new(op: BinaryOp, a: &[f32], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    if n == 0 {
        return a.to_vec();
    }
    map_new(a, (CHUNK / n).max(1) * n, |c| binary_chunk(op, c, b))
}

/// [`unary`] into a new vector.
pub(crate) fn unary_new(op: UnaryOp, xs: &[f32]) -> Vec<f32> {
    map_new(xs, CHUNK, |c| unary_chunk(op, c))
}

/// `src` through the in-place `kernel`, `per` elements a task, into a new
/// vector: each task copies its chunk while it is in cache and runs the
/// kernel there. A copy of the whole input first (and the zeroing of its
/// buffer) cost two extra passes over memory: at the VAE's 256 px, 8-16 MiB
/// per activation, about a millisecond each.
fn map_new(src: &[f32], per: usize, kernel: impl Fn(&mut [f32]) + Sync) -> Vec<f32> {
    let n = src.len();
    let per = per.max(1);
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(per)
        .zip(src.par_chunks(per))
        .for_each(|(o, x)| {
            // SAFETY: `o` and `x` have the same length and do not overlap;
            // the copy initialises all of `o` before it is viewed as f32.
            let o = unsafe {
                std::ptr::copy_nonoverlapping(x.as_ptr(), o.as_mut_ptr().cast::<f32>(), x.len());
                std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<f32>(), x.len())
            };
            kernel(o);
        });
    // SAFETY: the tasks above wrote every one of the first `n` elements.
    unsafe { out.set_len(n) };
    out
}

/// [`binary_repeat`] on one task's chunk (whole repeats of `b`).
fn binary_chunk(op: BinaryOp, c: &mut [f32], b: &[f32]) {
    let n = b.len();
    macro_rules! run {
        ($op:expr) => {{
            wide(c, |c| {
                for row in c.chunks_mut(n) {
                    for (x, &y) in row.iter_mut().zip(b) {
                        *x = bin($op, *x, y);
                    }
                }
            })
        }};
    }
    match op {
        BinaryOp::Add => run!(BinaryOp::Add),
        BinaryOp::Sub => run!(BinaryOp::Sub),
        BinaryOp::Mul => run!(BinaryOp::Mul),
        BinaryOp::Div => run!(BinaryOp::Div),
        BinaryOp::Maximum => run!(BinaryOp::Maximum),
        BinaryOp::Minimum => run!(BinaryOp::Minimum),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The new-vector forms give the in-place kernels' bits, on lengths
    /// that end mid-chunk and a repeat that does not divide the chunk.
    #[test]
    fn new_vectors_match_the_in_place_kernels() {
        let mut rng = emu_core::testing::Rng::new(5);
        let x: Vec<f32> = (0..CHUNK * 3 + 123).map(|_| rng.uniform(-6.0, 6.0) as f32).collect();
        for op in [UnaryOp::Silu, UnaryOp::Gelu, UnaryOp::Exp, UnaryOp::Sqr] {
            let mut want = x.clone();
            unary(op, &mut want);
            let got = unary_new(op, &x);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{op:?}");
        }
        let a: Vec<f32> = (0..3 * 7001).map(|_| rng.uniform(-2.0, 2.0) as f32).collect();
        for b_len in [7001, 3 * 7001, 1] {
            let b: Vec<f32> = (0..b_len).map(|_| rng.uniform(0.5, 2.0) as f32).collect();
            for op in [BinaryOp::Add, BinaryOp::Div, BinaryOp::Maximum] {
                let mut want = a.clone();
                binary_repeat(op, &mut want, &b);
                let got = binary_repeat_new(op, &a, &b);
                assert!(
                    got.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{op:?} {b_len}"
                );
            }
        }
        assert!(unary_new(UnaryOp::Silu, &[]).is_empty());
    }

    /// bf16 chunks widened, computed and rounded once: bit for bit the f32
    /// kernel on the widened values, rounded.
    #[test]
    fn bf16_unary_is_the_f32_kernel_rounded_once() {
        let mut rng = emu_core::testing::Rng::new(21);
        let x: Vec<half::bf16> = (0..CHUNK * 2 + 77)
            .map(|_| half::bf16::from_f32(rng.uniform(-8.0, 8.0) as f32))
            .collect();
        for op in [UnaryOp::Silu, UnaryOp::Gelu, UnaryOp::Exp, UnaryOp::Neg] {
            let mut f: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            unary(op, &mut f);
            let want: Vec<u16> = f.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
            let got: Vec<u16> = unary_bf16(op, &x).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{op:?}");
        }
    }

    /// The bf16 binary path: bit for bit the f32 kernel on the widened
    /// operands, rounded once, for every op, a same-length and a repeating
    /// right operand, and lengths that end mid-chunk.
    #[test]
    fn bf16_binary_is_the_f32_kernel_rounded_once() {
        let mut rng = emu_core::testing::Rng::new(22);
        let mut bf = |n: usize, lo: f64, hi: f64| -> Vec<half::bf16> {
            (0..n)
                .map(|_| half::bf16::from_f32(rng.uniform(lo, hi) as f32))
                .collect()
        };
        let a = bf(CHUNK * 2 + 3 * 77, -4.0, 4.0);
        for b in [bf(a.len(), 0.25, 3.0), bf(77, -3.0, 3.0), bf(1, 0.5, 1.5)] {
            for op in BinaryOp::ALL {
                let mut f: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
                let bw: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
                binary_repeat(op, &mut f, &bw);
                let want: Vec<u16> = f.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
                let got: Vec<u16> = binary_bf16(op, &a, &b).iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{op:?} with {} repeating", b.len());
            }
        }
    }

    fn reference(op: UnaryOp, x: f64) -> f64 {
        match op {
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            UnaryOp::Exp => x.exp(),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Neg => -x,
            UnaryOp::Sqr => x * x,
            _ => unreachable!(),
        }
    }

    /// erf in f64 by its Taylor series (|x| < 3) and continued fraction
    /// for erfc beyond: an independent reference for the A–S formula.
    fn erf(x: f64) -> f64 {
        let z = x.abs();
        let v = if z < 3.0 {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f)
        };
        v.copysign(x)
    }

    /// Each op against f64 over [-12, 12]: error within 5e-7 |y| + 1e-7 |x|
    /// — relative, plus, where the exact value is far below the input's
    /// scale (GELU's negative tail), A–S's absolute erf error times |x| / 2.
    #[test]
    fn unary_ops_match_f64() {
        for op in [
            UnaryOp::Silu,
            UnaryOp::Sigmoid,
            UnaryOp::Gelu,
            UnaryOp::GeluTanh,
            UnaryOp::Exp,
            UnaryOp::Relu,
            UnaryOp::Neg,
            UnaryOp::Sqr,
        ] {
            assert!(has_unary(op));
            let xs: Vec<f32> = (0..48_001).map(|i| -12.0 + i as f32 * 0.0005).collect();
            let mut ys = xs.clone();
            unary(op, &mut ys);
            for (x, y) in xs.iter().zip(&ys) {
                let want = reference(op, *x as f64);
                let err = (*y as f64 - want).abs();
                let bound = 5e-7 * want.abs() + 1e-7 * (*x as f64).abs();
                assert!(err <= bound, "{op:?}({x}) = {y}, want {want} (err {err:e})");
            }
        }
    }

    #[test]
    fn binary_repeat_broadcasts_trailing_rows() {
        let mut a: Vec<f32> = (0..40_000).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..8).map(|i| i as f32 * 10.0).collect();
        binary_repeat(BinaryOp::Sub, &mut a, &b);
        for (i, v) in a.iter().enumerate() {
            assert_eq!(*v, i as f32 - (i % 8) as f32 * 10.0);
        }
    }
}
