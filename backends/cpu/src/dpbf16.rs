//! bf16 products on AVX512-BF16 dot products (`vdpbf16ps`), for CPUs with
//! that extension but no AMX (AMD Zen 4 and later, Intel Cooper Lake).
//!
//! Without it a bf16 product widens both operands to f32 and runs the f32
//! GEMM. `vdpbf16ps` multiplies 16 pairs of bf16 exactly and adds both
//! products to 16 f32 sums, so one instruction does the work of two f32
//! FMAs on half the bytes. The result is an f32 sum of exact products, as
//! on the AMX path, rounded once by the caller; like AMX it flushes f32
//! denormals to zero.
//!
//! The operands are [`amx`](crate::amx)'s: the right one packed once per
//! call in 16-column blocks of k pairs (exactly the register layout the
//! instruction wants: a pair row of a packed tile is one vector), the left
//! one read in place (rows with k contiguous, so a k pair of one row is a
//! 32-bit word the instruction broadcasts from memory). Blocks come out
//! through the same 16 x 16 [`Block`] epilogue as the AMX tiles, so every
//! caller of `amx::gemm`, `product_here` and `product_into` runs here
//! unchanged.

use crate::amx::{Block, Left, Packed};
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows and columns of a block.
const TR: usize = 16;

/// Whether the CPU has AVX512-BF16 (with F, BW and VL for the packing).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
    })
}

/// Output blocks `rows x cols` (in blocks of 16) of `left · right` over the
/// first `left.k` k, each handed to `out(r0, c0, &block)`; rows and columns
/// past the operands are zero in the block.
///
/// # Safety
/// [`available`] must hold; `left` must hold its `rows` rows of `k`
/// (`(rows - 1) * ld + k` elements) and `right` at least `left.k` k and the
/// columns of `cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn task<F: FnMut(usize, usize, &Block)>(
    left: Left<'_>,
    right: &Packed,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut F,
) {
    let k = left.k;
    let pairs = k.div_ceil(2);
    // A block of 16 rows as [pair][row] 32-bit words, zero past the rows
    // and past an odd k: one pointer walks it, so the kernel addresses every
    // broadcast at a constant offset.
    let mut apack = vec![0u32; pairs * TR];
    let mut block = [0f32; TR * TR];
    for rb in rows {
        let r0 = rb * TR;
        let nr = TR.min(left.rows - r0);
        for i in 0..TR {
            let dst = apack.iter_mut().skip(i).step_by(TR);
            if i < nr {
                let row = &left.data[(r0 + i) * left.ld..][..k];
                for (d, pair) in dst.zip(row.chunks(2)) {
                    *d = u32::from(pair[0]) | pair.get(1).map_or(0, |&h| u32::from(h) << 16);
                }
            } else {
                dst.for_each(|d| *d = 0);
            }
        }
        for cb in cols.clone() {
            let acc = sums(apack.as_ptr(), right.column_block(cb), pairs);
            for (i, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(block.as_mut_ptr().add(i * TR), *v);
            }
            out(r0, cb * TR, &block);
        }
    }
}

/// The 16 x 16 sums of the packed rows `a` (16 words per k pair) with the
/// packed column block `b` (one vector of 16 column pairs per k pair) over
/// `pairs` k pairs.
#[inline(always)]
unsafe fn sums(a: *const u32, b: *const u16, pairs: usize) -> [__m512; TR] {
    let mut acc = [_mm512_setzero_ps(); TR];
    // Sums are indexed by constants only, so they stay in registers.
    macro_rules! rows {
        ($($i:literal)*) => {{
            for p in 0..pairs {
                let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * TR) as *const _));
                let ap = a.add(p * TR);
                $(
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add($i) as i32));
                    acc[$i] = _mm512_dpbf16_ps(acc[$i], av, bv);
                )*
            }
        }};
    }
    rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn values(n: usize, seed: u64) -> Vec<u16> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n)
            .map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0) as f32).to_bits())
            .collect()
    }

    fn f(b: u16) -> f64 {
        bf16::from_bits(b).to_f64()
    }

    /// The f32 sums (before any rounding to bf16) against f64, on ragged
    /// rows, columns and odd k, with a right operand packed both ways.
    #[test]
    fn blocks_match_f64_before_rounding() {
        if !available() {
            eprintln!("no AVX512-BF16 here: skipped");
            return;
        }
        for &(m, n, k) in &[(1, 1, 1), (17, 33, 37), (16, 16, 32), (40, 20, 515)] {
            let ld = k + 3;
            let a = values(m * ld, 1);
            let b = values(k * n, 2);
            let bt: Vec<u16> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let left = Left {
                data: &a,
                rows: m,
                k,
                ld,
            };
            for right in [Packed::from_rows(&b, k, n, n), Packed::from_columns(&bt, k, n, k)] {
                let mut seen = vec![0u32; m.div_ceil(TR) * n.div_ceil(TR)];
                // SAFETY: `available` holds; the shapes are the operands'.
                unsafe {
                    task(
                        left,
                        &right,
                        0..m.div_ceil(TR),
                        0..n.div_ceil(TR),
                        &mut |r0, c0, blk: &Block| {
                            seen[(r0 / TR) * n.div_ceil(TR) + c0 / TR] += 1;
                            for r in 0..TR {
                                for c in 0..TR {
                                    let got = blk[r * TR + c] as f64;
                                    let (i, j) = (r0 + r, c0 + c);
                                    if i >= m || j >= n {
                                        assert_eq!(got, 0.0, "padding at {i},{j}");
                                        continue;
                                    }
                                    let want: f64 = (0..k).map(|kk| f(a[i * ld + kk]) * f(b[kk * n + j])).sum();
                                    assert!(
                                        (got - want).abs() < 1e-5 * (k as f64).sqrt(),
                                        "{m}x{n}x{k} at {i},{j}: {got} vs {want}"
                                    );
                                }
                            }
                        },
                    );
                }
                assert!(seen.iter().all(|&s| s == 1), "every block exactly once");
            }
        }
    }
}
