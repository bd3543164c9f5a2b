//! `linear` with block-quantized weights (`Q8_0`, `Q4_K`).
//!
//! Decode (a few input rows) is bound by how fast the weights stream from
//! memory, so the win of quantization is reading 8.5 or 4.5 bits per weight
//! instead of 16 or 32 — if widening them costs less than reading them. On
//! x86-64 with AVX2 or AVX-512 the kernels of [`crate::quant_x86`] widen each
//! block in registers and take its dot products with up to four input rows
//! at once; elsewhere each task dequantizes one weight row into an f32
//! scratch row (in L1/L2) and takes f32 dot products with it.
//!
//! The activations are *not* quantized (llama.cpp quantizes them to Q8_0 /
//! Q8_K for integer dot products): the weights are exactly `gguf.dequantize`'s,
//! and the difference from dequantize-then-f32-linear is the f32 summation
//! order (and one regrouping for Q4_K, see `quant_x86`), a relative error of
//! a few 1e-7 (the op suite holds it to 1e-5).
//!
//! Many rows (prefill) take candle's gemm instead: the weight is dequantized
//! in slabs of output features, so the transient f32 copy is one slab, not
//! the whole matrix.

use crate::matvec::dot;
use emu_core::quant::{dequantize_into, QuantTensor, QuantType};
use rayon::prelude::*;

/// Inputs with at most this many rows take the row kernel; more rows
/// dequantize slabs for gemm, which reuses each weight across rows.
pub(crate) const MAX_ROWS: usize = 16;

/// Output features dequantized at once on the gemm path (16 MiB of f32 at
/// k = 4096).
pub(crate) const SLAB_ELEMS: usize = 1 << 22;

/// `y[i, r] = sum_j x[i, j] * deq(w)[r, j] + bias[r]` in f32, `m` input rows
/// of `k`, `n = w.dims()[0]` outputs; `y` is `m x n`, row-major.
///
/// `int8_activations`: Q4_K weights meet the input rounded to 8 bits (see
/// [`crate::quant_x86::Q8Rows`]) in integer dot products where the CPU has
/// AVX512-VNNI or AVX2, as llama.cpp computes them; otherwise the input stays f32.
/// `bf16_input`: every value of `x` is a bf16 value widened (a bf16
/// tensor's), so Q4_K may take exact bf16 dot products where the CPU has
/// them (`quant_x86::dot_block_q4k_bf16`).
pub(crate) fn linear_rows(
    x: &[f32],
    m: usize,
    w: &QuantTensor,
    bias: Option<&[f32]>,
    int8_activations: bool,
    bf16_input: bool,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if int8_activations && w.qtype() == QuantType::Q4K {
        if let Some(isa) = crate::quant_x86::int8_isa() {
            return linear_rows_q8(x, m, w, bias, isa);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = int8_activations;
    #[cfg(target_arch = "x86_64")]
    return linear_rows_isa(x, m, w, bias, crate::quant_x86::detect(), bf16_input);
    #[cfg(not(target_arch = "x86_64"))]
    return linear_rows_isa(x, m, w, bias, None, bf16_input);
}

#[cfg(not(target_arch = "x86_64"))]
type Isa = ();
#[cfg(target_arch = "x86_64")]
use crate::quant_x86::Isa;

/// [`linear_rows`] on the fused kernels of `isa`, or on the portable path
/// where it is `None` (the tests run every path the CPU has).
fn linear_rows_isa(
    x: &[f32],
    m: usize,
    w: &QuantTensor,
    bias: Option<&[f32]>,
    isa: Option<Isa>,
    bf16_input: bool,
) -> Vec<f32> {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    debug_assert_eq!(x.len(), m * k);
    let block = task_rows(n);
    let mut yt = vec![0f32; n * m];
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = isa {
        let xsum = match w.qtype() {
            QuantType::Q4K => crate::quant_x86::sub_block_sums(x),
            QuantType::Q8_0 => Vec::new(),
        };
        let rb = w.row_bytes();
        let bf16 = bf16_input && w.qtype() == QuantType::Q4K && crate::quant_x86::bf16_dots();
        // Truncation is exact: the values are widened bf16.
        let xb: Vec<u16> = if bf16 {
            let bits: Vec<u16> = x.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            crate::quant_x86::q4_k_bf16_planes(&bits, k)
        } else {
            Vec::new()
        };
        crate::team::chunks_mut(&mut yt, block * m, |bi, out| {
            let rows = &w.bytes()[bi * block * rb..];
            // SAFETY: `detect` (and `bf16_dots`) found the ISA; the kernels
            // assert the shapes.
            unsafe {
                if bf16 {
                    crate::quant_x86::dot_block_q4k_bf16(rows, rb, &xb, &xsum, k, m, out)
                } else {
                    crate::quant_x86::dot_block(isa, w.qtype(), rows, rb, x, &xsum, k, m, out)
                }
            };
            if let Some(b) = bias {
                for (j, o) in out.chunks_exact_mut(m).enumerate() {
                    o.iter_mut().for_each(|v| *v += b[bi * block + j]);
                }
            }
        });
        return transpose(yt, m, n);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    crate::team::chunks_mut(&mut yt, block * m, |bi, out| {
        let mut row = vec![0f32; k];
        Task { x, m, k, w, bias }.run(bi * block, out, &mut row);
    });
    transpose(yt, m, n)
}

/// [`linear_rows`] of Q4_K weights on 8-bit inputs, on the kernel of `isa`
/// (`quant_x86::int8_isa`, or AVX2 on any CPU `quant_x86::detect` accepts).
#[cfg(target_arch = "x86_64")]
pub(crate) fn linear_rows_q8(
    x: &[f32],
    m: usize,
    w: &QuantTensor,
    bias: Option<&[f32]>,
    isa: crate::quant_x86::Isa,
) -> Vec<f32> {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    let block = task_rows(n);
    let q8 = crate::quant_x86::Q8Rows::new(x);
    let rb = w.row_bytes();
    let mut yt = vec![0f32; n * m];
    crate::team::chunks_mut(&mut yt, block * m, |bi, out| {
        // SAFETY: the caller checked the ISA; the kernel asserts the shapes.
        unsafe {
            match isa {
                crate::quant_x86::Isa::Avx512 => {
                    crate::quant_x86::q4_k_q8_rows(w.bytes(), rb, bi * block, &q8, k, m, out)
                }
                crate::quant_x86::Isa::Avx2 => {
                    crate::quant_x86::q4_k_q8_rows_avx2(w.bytes(), rb, bi * block, &q8, k, m, out)
                }
            }
        };
        if let Some(b) = bias {
            for (j, o) in out.chunks_exact_mut(m).enumerate() {
                o.iter_mut().for_each(|v| *v += b[bi * block + j]);
            }
        }
    });
    transpose(yt, m, n)
}

/// Weight rows per task of the row kernels: one contiguous run a thread
/// (see `matvec::linear_rows_with`: each core streams its own part).
fn task_rows(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(8)
}

/// `n x m` (output feature major, as the tasks write) to `m x n`.
fn transpose(yt: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (r, col) in yt.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * n + r] = *v;
        }
    }
    y
}

/// The f32 values of output features `first .. first + rows` (row-major).
pub(crate) fn dequantize_rows(w: &QuantTensor, first: usize, rows: usize) -> Vec<f32> {
    let k = w.dims()[1];
    let rb = w.row_bytes();
    let mut out = vec![0f32; rows * k];
    #[cfg(target_arch = "x86_64")]
    let wide = crate::quant_x86::detect() == Some(crate::quant_x86::Isa::Avx512);
    out.par_chunks_mut(k).enumerate().for_each(|(j, o)| {
        let r = first + j;
        let row = &w.bytes()[r * rb..(r + 1) * rb];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `detect` found AVX-512F and F16C.
            unsafe { crate::quant_x86::dequantize_row_avx512(w.qtype(), row, o) };
            return;
        }
        dequantize_into(row, w.qtype(), o);
    });
    out
}

/// One rayon task's share of [`linear_rows`].
struct Task<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    w: &'a QuantTensor,
    bias: Option<&'a [f32]>,
}

impl Task<'_> {
    /// Output features `first..` into `out` (`m` values each); `row` is the
    /// `k`-long scratch for one dequantized weight row.
    #[inline(always)]
    fn run(&self, first: usize, out: &mut [f32], row: &mut [f32]) {
        let (m, k) = (self.m, self.k);
        let rb = self.w.row_bytes();
        let bytes = self.w.bytes();
        let qt = self.w.qtype();
        for (j, o) in out.chunks_exact_mut(m).enumerate() {
            let r = first + j;
            dequantize_into(&bytes[r * rb..(r + 1) * rb], qt, row);
            let b = self.bias.map_or(0.0, |b| b[r]);
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot(row, &self.x[i * k..(i + 1) * k]) + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use emu_core::{HostTensor, QuantType};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
    }

    /// Against an f64 product with the dequantized weights: the kernel's
    /// only error is f32 summation, bounded by 1e-5 of sum |x| |w| per output.
    /// Every kernel this CPU can run, and the portable path.
    fn isas() -> Vec<Option<Isa>> {
        let mut v = vec![None];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::quant_x86::Isa;
            if let Some(best) = crate::quant_x86::detect() {
                v.push(Some(best));
                if best == Isa::Avx512 {
                    v.push(Some(Isa::Avx2));
                }
            }
        }
        v
    }

    #[test]
    fn rows_match_dequantized_f64() {
        for isa in isas() {
            for qt in [QuantType::Q8_0, QuantType::Q4K] {
                for &(m, k, n, bias) in &[
                    (1, 256, 5, false),
                    (3, 512, 33, true),
                    (16, 1024, 70, true),
                    (2, 256, 1, false),
                    (5, 768, 9, false),
                    (7, 256, 300, true),
                ] {
                    // bf16-exact inputs take the bf16 kernel where it exists.
                    for bf16 in [false, true] {
                        let mut x = values(m * k, 1);
                        if bf16 {
                            x.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
                        }
                        let w =
                            QuantTensor::quantize("t.w", &HostTensor::from_f32(&[n, k], values(n * k, 2)).unwrap(), qt)
                                .unwrap();
                        let b = values(n, 3);
                        let y = linear_rows_isa(&x, m, &w, bias.then_some(&b[..]), isa, bf16);
                        let wd = w.dequantize().unwrap().to_f32_vec().unwrap();
                        for i in 0..m {
                            for r in 0..n {
                                let terms = (0..k).map(|j| x[i * k + j] as f64 * wd[r * k + j] as f64);
                                let want = terms.clone().sum::<f64>() + if bias { b[r] as f64 } else { 0.0 };
                                let mag = terms.map(f64::abs).sum::<f64>() + 1.0;
                                let got = y[i * n + r] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * mag,
                                    "{isa:?} {qt} bf16 {bf16} {m}x{k}x{n} [{i},{r}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dequantized_rows_are_the_host_dequantization() {
        let w = QuantTensor::quantize(
            "t.w",
            &HostTensor::from_f32(&[6, 512], values(3072, 9)).unwrap(),
            QuantType::Q4K,
        )
        .unwrap();
        let all = w.dequantize().unwrap().to_f32_vec().unwrap();
        assert_eq!(dequantize_rows(&w, 2, 3), all[2 * 512..5 * 512].to_vec());
    }

    /// The vectorised dequantization is bit-identical to the host one,
    /// outliers, zero blocks and negative ranges included.
    #[test]
    fn wide_dequantization_is_bit_identical() {
        #[cfg(target_arch = "x86_64")]
        if crate::quant_x86::detect() == Some(crate::quant_x86::Isa::Avx512) {
            let mut v = values(4 * 768, 5);
            v[7] = 40.0;
            v[300..556].fill(0.0);
            v[900..1200].iter_mut().for_each(|x| *x = -x.abs() - 2.0);
            for qt in [QuantType::Q8_0, QuantType::Q4K] {
                let w = QuantTensor::quantize("t.w", &HostTensor::from_f32(&[4, 768], v.clone()).unwrap(), qt).unwrap();
                let host = w.dequantize().unwrap().to_f32_vec().unwrap();
                let mut out = vec![0f32; 4 * 768];
                for (r, o) in out.chunks_exact_mut(768).enumerate() {
                    let row = &w.bytes()[r * w.row_bytes()..(r + 1) * w.row_bytes()];
                    // SAFETY: detected above.
                    unsafe { crate::quant_x86::dequantize_row_avx512(qt, row, o) };
                }
                let same = out.iter().zip(&host).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{qt}");
            }
        }
    }
}
