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
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows and columns of a block.
const TR: usize = 16;

/// Whether the CPU has AVX512-BF16 (with F, BW and VL for the packing)
/// and `EMU_CPU_AMX` is not `0`.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        crate::amx::enabled()
            && is_x86_feature_detected!("avx512f")
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
pub(crate) unsafe fn task<R: Pairs, F: FnMut(usize, usize, &Block)>(
    left: Left<'_>,
    right: &R,
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
        pack_rows(left, r0, nr, &mut apack);
        for cb in cols.clone() {
            let (b, offs) = right.block(cb);
            let acc = if R::SHIFTED {
                sums::<true>(apack.as_ptr(), b, offs, pairs)
            } else {
                sums::<false>(apack.as_ptr(), b, offs, pairs)
            };
            for (i, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(block.as_mut_ptr().add(i * TR), *v);
            }
            out(r0, cb * TR, &block);
        }
    }
}

/// A right operand as [`task`] reads it, one column block at a time.
pub(crate) trait Pairs: Sync {
    /// Rows read in place at per-row offsets ([`Shifted`]) rather than
    /// packed pair rows ([`Packed`]).
    const SHIFTED: bool;
    /// Block `cb`'s first packed pair row, or its base and the row
    /// offsets (null when packed).
    fn block(&self, cb: usize) -> (*const u16, *const usize);
}

impl Pairs for Packed {
    const SHIFTED: bool = false;
    fn block(&self, cb: usize) -> (*const u16, *const usize) {
        (self.column_block(cb), std::ptr::null())
    }
}

impl Pairs for Shifted<'_> {
    const SHIFTED: bool = true;
    fn block(&self, cb: usize) -> (*const u16, *const usize) {
        (self.data.as_ptr().wrapping_add(cb * TR), self.offs.as_ptr())
    }
}

/// A right operand read where it lies, unpacked (see `sgemm::Shifted`):
/// element `(k, c)` is `data[offs[k] + c]`. `offs` has an even length (an
/// odd k takes one more row, which should be zeros: its weights are zero).
pub(crate) struct Shifted<'a> {
    data: &'a [u16],
    offs: &'a [usize],
    cols: usize,
}

impl<'a> Shifted<'a> {
    /// # Panics
    /// If `offs` is odd or a row, read to the end of its last block, runs
    /// past `data`.
    pub(crate) fn new(data: &'a [u16], offs: &'a [usize], cols: usize) -> Self {
        let reach = cols.next_multiple_of(TR);
        assert!(
            offs.len().is_multiple_of(2)
                && offs
                    .iter()
                    .all(|&o| o.checked_add(reach).is_some_and(|e| e <= data.len())),
            "dpbf16: a shifted row runs past its data"
        );
        Shifted { data, offs, cols }
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }
}

/// Calls `out(r0, c0, &block)` once for every 16 x 16 block of `left ·
/// right`, from rayon's threads; the pairs of `right` are interleaved in
/// registers, so a block's sums are those of the packed route exactly.
///
/// # Panics
/// If [`available`] does not hold, `left.k` exceeds the rows of `right`
/// or `left` is too short.
pub(crate) fn shifted_gemm<F: Fn(usize, usize, &Block) + Sync>(left: Left<'_>, right: &Shifted<'_>, out: F) {
    use rayon::prelude::*;
    assert!(available(), "dpbf16 without AVX512-BF16");
    assert!(left.k.div_ceil(2) * 2 <= right.offs.len(), "dpbf16: operands disagree");
    assert!(
        left.rows == 0 || left.k == 0 || ((left.rows - 1) * left.ld + left.k <= left.data.len() && left.ld >= left.k)
    );
    let (rb, cb) = (left.rows.div_ceil(TR), right.cols.div_ceil(TR));
    if rb == 0 || cb == 0 {
        return;
    }
    // Each task packs its row blocks once and passes them over up to 16
    // column blocks; smaller until there are a few tasks per thread.
    let want = 4 * rayon::current_num_threads().max(1);
    let (mut rc, mut cc) = (rb.min(4), cb.min(16));
    while rb.div_ceil(rc) * cb.div_ceil(cc) < want && (rc > 1 || cc > 1) {
        if cc > 2 || rc == 1 {
            cc = (cc / 2).max(1);
        } else {
            rc = (rc / 2).max(1);
        }
    }
    let tasks: Vec<(usize, usize)> = (0..rb.div_ceil(rc))
        .flat_map(|i| (0..cb.div_ceil(cc)).map(move |j| (i, j)))
        .collect();
    tasks.into_par_iter().for_each(|(i, j)| {
        let rows = i * rc..((i + 1) * rc).min(rb);
        let cols = j * cc..((j + 1) * cc).min(cb);
        let mut out = |r: usize, c: usize, b: &Block| out(r, c, b);
        // SAFETY: `available` was checked; `Shifted::new` keeps every row
        // read, to the end of its last block, inside `data`.
        unsafe { task(left, right, rows, cols, &mut out) };
    });
}

/// Rows `r0 .. r0 + nr` of `left` into `apack` as [pair][16 rows] words
/// (16 x 16 word transposes), zero past the rows and past k.
#[inline(always)]
unsafe fn pack_rows(left: Left<'_>, r0: usize, nr: usize, apack: &mut [u32]) {
    let k = left.k;
    let zero = _mm512_setzero_si512();
    for k0 in (0..k).step_by(2 * TR) {
        let nk = (k - k0).min(2 * TR);
        // One bit per bf16, so an odd k leaves the last pair's high half 0.
        let mask: __mmask32 = if nk == 2 * TR { !0 } else { (1u32 << nk) - 1 };
        let mut rows = [zero; TR];
        for (i, r) in rows.iter_mut().enumerate().take(nr) {
            *r = _mm512_maskz_loadu_epi16(mask, left.data.as_ptr().add((r0 + i) * left.ld + k0) as *const i16);
        }
        let t = crate::amx::transpose16(rows);
        let dst = apack.as_mut_ptr().add(k0 / 2 * TR);
        for (q, v) in t.iter().enumerate().take(nk.div_ceil(2)) {
            _mm512_storeu_si512(dst.add(q * TR) as *mut _, *v);
        }
    }
}

/// The 16 x 16 sums of the packed rows `a` (16 words per k pair) with
/// one column block over `pairs` k pairs: packed, `b` holds one vector of
/// 16 column pairs per k pair; `SHIFTED`, row `k` is read in place at
/// `b + offs[k]` and each pair of rows interleaved in registers (the same
/// pairs, so the same sums).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn sums<const SHIFTED: bool>(a: *const u32, b: *const u16, offs: *const usize, pairs: usize) -> [__m512; TR] {
    // Word 2j from the first row's j, word 2j + 1 from the second's.
    let idx = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
        32, 0,
    );
    let mut acc = [_mm512_setzero_ps(); TR];
    // Sums are indexed by constants only, so they stay in registers.
    macro_rules! rows {
        ($($i:literal)*) => {{
            for p in 0..pairs {
                let bv = if SHIFTED {
                    let lo = _mm256_loadu_si256(b.add(*offs.add(2 * p)) as *const __m256i);
                    let hi = _mm256_loadu_si256(b.add(*offs.add(2 * p + 1)) as *const __m256i);
                    _mm512_castsi512_ps(_mm512_permutex2var_epi16(
                        _mm512_castsi256_si512(lo),
                        idx,
                        _mm512_castsi256_si512(hi),
                    ))
                } else {
                    _mm512_loadu_ps(b.add(p * 2 * TR) as *const f32)
                };
                let ap = a.add(p * TR);
                // The row's pair is broadcast by the instruction itself
                // (`{1to16}`): written as a separate broadcast, as the
                // compiler emits the intrinsics, each one took an FP pipe
                // slot and the kernel ran at 2.6 G dot products/s per core
                // instead of 3.5 (Zen 4).
                $(
                    asm!(
                        concat!("vdpbf16ps {acc}, {b}, dword ptr [{a} + ", stringify!($i), " * 4]{{1to16}}"),
                        acc = inout(zmm_reg) acc[$i],
                        b = in(zmm_reg) bv,
                        a = in(reg) ap,
                        options(nostack, readonly, pure),
                    );
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
