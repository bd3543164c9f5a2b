//! Fused dequantize-and-dot kernels for block-quantized weights on x86-64,
//! one per format and ISA (AVX-512F, AVX2+FMA), each for `R` = 1..=4 input
//! rows at once.
//!
//! The weights are widened to f32 in registers and never written out, so a
//! weight row is read from memory once and touched by two to four vector
//! instructions per 16 weights; that keeps decode bound by memory, not by
//! the dequantization. The activations stay f32 (llama.cpp instead rounds
//! them to 8 bits for integer dot products): the products are those of
//! `gguf.dequantize`'s weights with the f32 input, up to the summation order
//! and, for Q4_K, one regrouping (below).
//!
//! Q8_0: `w = q * d` is exact in f32 (an f16 times an 8-bit integer), so a
//! block's contribution is taken as `d * sum(q * x)`: the widened integers
//! meet the inputs first and the scale multiplies the block's partial sum.
//!
//! bf16 inputs with Q4_K ([`dot_block_q4k_bf16`]): nibbles are exact in
//! bf16, so a sub-block's `sum(q * x)` is one `vdpbf16ps` of exact products.
//!
//! Q4_K: a sub-block's weights are `dl * q - ml`, so its contribution is
//! `dl * sum(q * x) - ml * sum(x)`. `sum(x)` of every 32-wide sub-block is
//! computed once per input row ([`sub_block_sums`]) and shared by all output
//! features, which takes the subtraction out of the inner loop. The
//! regrouping changes rounding at the f32 epsilon level, relative to
//! `sum(|dl * q| |x|) + sum(|ml| |x|)`; the tests hold it to 1e-5 of that.

use crate::matvec_x86::{by_rows, row_groups};
use emu_core::quant::{scale_min_k4, QuantType, QK8_0, QK_K};
use std::arch::x86_64::*;

/// Bytes of one Q8_0 block (f16 scale + 32 int8) and of one Q4_K
/// super-block (2 f16 + 12 scale bytes + 128 nibble bytes).
const Q8_0_BYTES: usize = 2 + QK8_0;
const Q4K_BYTES: usize = 4 + 12 + QK_K / 2;

/// Which kernel family the CPU runs, detected once per call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
}

pub(crate) fn detect() -> Option<Isa> {
    let f16c = is_x86_feature_detected!("f16c");
    if is_x86_feature_detected!("avx512f") && f16c {
        return Some(Isa::Avx512);
    }
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && f16c {
        return Some(Isa::Avx2);
    }
    None
}

/// `sum(x[32 j .. 32 j + 32])` for every sub-block `j` of each row: `m` rows
/// of `k` (a multiple of 32), out `m * k / 32`.
pub(crate) fn sub_block_sums(x: &[f32]) -> Vec<f32> {
    // k is a whole number of 32-wide sub-blocks, so chunks never straddle
    // rows.
    x.chunks_exact(32)
        .map(|c| {
            let mut s = [0f32; 8];
            for (i, v) in c.iter().enumerate() {
                s[i % 8] += v;
            }
            ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
        })
        .collect()
}

/// `out[j * m + i] = w_j · x_i` for the `out.len() / m` quantized weight
/// rows in `rows` (`rb` bytes each, whole blocks of `k` weights) and the
/// `m` input rows `x` (`m * k`, row-major), four input rows at a time.
/// `xsum` holds the rows' sub-block sums (Q4_K only). One call a task, so
/// the format and ISA are dispatched once and the per-row work is the
/// kernel alone.
///
/// # Safety
/// The CPU must have what `isa` names (as [`detect`] found).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dot_block(
    isa: Isa,
    qt: QuantType,
    rows: &[u8],
    rb: usize,
    x: &[f32],
    xsum: &[f32],
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    let n = out.len() / m.max(1);
    assert!(
        m > 0
            && rb == k / qt.block_size() * qt.type_size()
            && rows.len() >= n * rb
            && x.len() >= m * k
            && (qt != QuantType::Q4K || xsum.len() >= m * (k / 32))
    );
    // SAFETY (all arms): the caller guarantees the ISA; shapes asserted.
    unsafe {
        match (isa, qt) {
            (Isa::Avx512, QuantType::Q8_0) => block_avx512::<true>(rows, rb, x, xsum, k, m, out),
            (Isa::Avx512, QuantType::Q4K) => block_avx512::<false>(rows, rb, x, xsum, k, m, out),
            (Isa::Avx2, QuantType::Q8_0) => block_avx2::<true>(rows, rb, x, xsum, k, m, out),
            (Isa::Avx2, QuantType::Q4K) => block_avx2::<false>(rows, rb, x, xsum, k, m, out),
        }
    }
}

macro_rules! block_fn {
    ($name:ident, $features:literal, $q8:ident, $q4:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const Q8_0: bool>(
            rows: &[u8],
            rb: usize,
            x: &[f32],
            xsum: &[f32],
            k: usize,
            m: usize,
            out: &mut [f32],
        ) {
            let sbs = k / 32;
            for (j, o) in out.chunks_exact_mut(m).enumerate() {
                let row = &rows[j * rb..(j + 1) * rb];
                for (i, r) in row_groups(m) {
                    let (xs, ss, os) = (&x[i * k..], xsum.get(i * sbs..).unwrap_or(&[]), &mut o[i..]);
                    // SAFETY: the features are this function's; `dot_block`
                    // asserted the shapes.
                    unsafe {
                        if Q8_0 {
                            by_rows!(r, $q8(row, xs, ss, k, os))
                        } else {
                            by_rows!(r, $q4(row, xs, ss, k, os))
                        }
                    }
                }
            }
        }
    };
}

block_fn!(block_avx512, "avx512f,avx2,fma,f16c", q8_0_avx512, q4_k_avx512);
block_fn!(block_avx2, "avx2,fma,f16c", q8_0_avx2, q4_k_avx2);

#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller points at two readable bytes.
    let bits = unsafe { u16::from_le_bytes([*p, *p.add(1)]) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn hsum512(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// A Q8_0 block's f16 scale in every lane. Converting in a vector register
/// (broadcast the bits, then one `vcvtph2ps`) keeps the scalar-to-vector
/// round trip off the critical path.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn scale_512(blk: *const u8) -> __m512 {
    // SAFETY: the caller points at a block (two readable bytes).
    let bits = unsafe { u16::from_le_bytes([*blk, *blk.add(1)]) };
    _mm512_cvtph_ps(_mm256_set1_epi16(bits as i16))
}

/// Q8_0 blocks are 34 bytes: an f16 scale, then 32 int8 weights. A block's
/// contribution is `d * sum(q * x)`: the integer weights (exact in f32) meet
/// the inputs first and the scale multiplies the block's partial sum once,
/// two blocks at a time into separate accumulators (twice the throughput of
/// scaling every weight; measured on Zen 4).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q8_0_avx512<const R: usize>(row: &[u8], x: &[f32], _xsum: &[f32], k: usize, out: &mut [f32]) {
    const TS: usize = Q8_0_BYTES;
    let nb = k / QK8_0;
    let (wp, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // One block into accumulator `c` of every row; the loop below unrolls it
    // by two.
    macro_rules! block {
        ($b:expr, $c:expr) => {
            // SAFETY: block b lies inside `row` (nb * TS bytes) and the
            // inputs inside `x` (R rows of k floats).
            unsafe {
                let blk = wp.add($b * TS);
                // One line a block: blocks are 34 bytes, so every line ahead
                // is asked for.
                crate::matvec_x86::prefetch(blk, 64);
                let d = scale_512(blk);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128(blk.add(2) as *const __m128i),
                ));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    blk.add(18) as *const __m128i
                )));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xi = xp.add(i * k + $b * QK8_0);
                    let t = _mm512_mul_ps(q0, _mm512_loadu_ps(xi));
                    let t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xi.add(16)), t);
                    a[$c] = _mm512_fmadd_ps(t, d, a[$c]);
                }
            }
        };
    }
    let mut b = 0;
    while b + 2 <= nb {
        block!(b, 0);
        block!(b + 1, 1);
        b += 2;
    }
    if b < nb {
        block!(b, 0);
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: same features as this function.
        *o = unsafe { hsum512(_mm512_add_ps(a[0], a[1])) };
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2<const R: usize>(row: &[u8], x: &[f32], _xsum: &[f32], k: usize, out: &mut [f32]) {
    const TS: usize = Q8_0_BYTES;
    let nb = k / QK8_0;
    let (wp, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        // SAFETY: as in `q8_0_avx512`.
        unsafe {
            let blk = wp.add(b * TS);
            let d = _mm256_set1_ps(f16_at(blk));
            // The block's integers, exact in f32; the scale multiplies the
            // block's partial sum (as in `q8_0_avx512`).
            let mut q = [_mm256_setzero_ps(); 4];
            for (c, qc) in q.iter_mut().enumerate() {
                *qc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    blk.add(2 + 8 * c) as *const __m128i
                )));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = xp.add(i * k + b * QK8_0);
                let t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xi));
                let t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xi.add(8)), t);
                let t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xi.add(16)), t);
                let t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xi.add(24)), t);
                a[b & 1] = _mm256_fmadd_ps(t, d, a[b & 1]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: same features as this function.
        *o = unsafe { hsum256(_mm256_add_ps(a[0], a[1])) };
    }
}

/// The eight (d * scale, dmin * min) pairs of a Q4_K super-block.
#[inline(always)]
fn q4_k_scales(blk: &[u8]) -> ([f32; 8], [f32; 8]) {
    let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let dmin = half::f16::from_le_bytes([blk[2], blk[3]]).to_f32();
    let mut dl = [0f32; 8];
    let mut ml = [0f32; 8];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &blk[4..16]);
        dl[j] = d * sc as f32;
        ml[j] = dmin * m as f32;
    }
    (dl, ml)
}

/// The eight `d * scale` and eight `dmin * min` of a Q4_K super-block at
/// `blk`, in vector lanes: the 6-bit fields unpacked from three words at
/// once (see [`scale_min_k4`] for the layout), the products rounded as the
/// scalar `d * sc as f32` rounds them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_scales_v(blk: *const u8) -> (__m256, __m256) {
    // SAFETY: the caller points at a whole 144-byte super-block.
    let (w0, w1, w2) = unsafe {
        (
            u32::from_le_bytes(*(blk.add(4) as *const [u8; 4])),
            u32::from_le_bytes(*(blk.add(8) as *const [u8; 4])),
            u32::from_le_bytes(*(blk.add(12) as *const [u8; 4])),
        )
    };
    // Sub-blocks 0..4 keep the low six bits of bytes 0..4 (scales) and
    // 4..8 (mins); 4..8 take their low nibble from bytes 8..12 and their
    // top two bits from the tops of bytes 0..4 (scales) or 4..8 (mins).
    let sc = (w0 & 0x3f3f_3f3f) as u64 | ((((w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4)) as u64) << 32);
    let mn =
        (w1 & 0x3f3f_3f3f) as u64 | (((((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4)) as u64) << 32);
    let widen = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
    // SAFETY: d and dmin are the block's first four bytes.
    let (d, dmin) = unsafe { (f16_at(blk), f16_at(blk.add(2))) };
    (
        _mm256_mul_ps(_mm256_set1_ps(d), widen(sc)),
        _mm256_mul_ps(_mm256_set1_ps(dmin), widen(mn)),
    )
}

/// Q4_K super-blocks are 144 bytes: f16 d, f16 dmin, 12 bytes of packed
/// 6-bit scales and mins, then 128 bytes holding 256 nibbles; sub-blocks
/// 2p and 2p+1 are the low and high nibbles of bytes 32p .. 32p + 32.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_k_avx512<const R: usize>(row: &[u8], x: &[f32], xsum: &[f32], k: usize, out: &mut [f32]) {
    const TS: usize = Q4K_BYTES;
    let nb = k / QK_K;
    let sbs = k / 32;
    let xp = x.as_ptr();
    let mask = _mm256_set1_epi8(0x0F);
    // Even and odd sub-blocks accumulate apart (latency, as in Q8_0); the
    // minima's `ml * sum(x)` gather in one vector a row, summed at the end.
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut mins = [_mm256_setzero_ps(); R];
    assert!(row.len() >= nb * TS && xsum.len() >= R * sbs && x.len() >= R * k);
    for b in 0..nb {
        let blk = row.as_ptr().add(b * TS);
        // Two lines a block: 128 of each 144 bytes ahead, and the rest
        // comes with the next block's.
        crate::matvec_x86::prefetch(blk, 128);
        let (dlv, mlv) = q4_k_scales_v(blk);
        for (i, m) in mins.iter_mut().enumerate() {
            // SAFETY: row i's eight sub-block sums of block b are in `xsum`
            // (asserted above).
            *m = _mm256_fmadd_ps(mlv, unsafe { _mm256_loadu_ps(xsum.as_ptr().add(i * sbs + b * 8)) }, *m);
        }
        let mut dl = [0f32; 8];
        // SAFETY: eight lanes into eight floats.
        unsafe { _mm256_storeu_ps(dl.as_mut_ptr(), dlv) };
        for p in 0..4 {
            // SAFETY: bytes 16 + 32p .. 48 + 32p are inside the 144-byte
            // block; the inputs are inside `x` (asserted above).
            unsafe {
                let v = _mm256_loadu_si256(blk.add(16 + 32 * p) as *const __m256i);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                for (h, nib) in [lo, hi].into_iter().enumerate() {
                    let j = 2 * p + h;
                    let w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(nib)));
                    let w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(nib, 1)));
                    let s = _mm512_set1_ps(dl[j]);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xi = xp.add(i * k + b * QK_K + 32 * j);
                        let t = _mm512_mul_ps(w0, _mm512_loadu_ps(xi));
                        let t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi.add(16)), t);
                        a[h] = _mm512_fmadd_ps(s, t, a[h]);
                    }
                }
            }
        }
    }
    for ((o, a), m) in out.iter_mut().zip(acc).zip(mins) {
        // SAFETY: same features as this function. One horizontal sum a row
        // (see `q4_k_bf16`).
        *o = unsafe { hsum512(_mm512_sub_ps(_mm512_add_ps(a[0], a[1]), _mm512_zextps256_ps512(m))) };
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_avx2<const R: usize>(row: &[u8], x: &[f32], xsum: &[f32], k: usize, out: &mut [f32]) {
    const TS: usize = Q4K_BYTES;
    let nb = k / QK_K;
    let sbs = k / 32;
    let xp = x.as_ptr();
    let mask = _mm_set1_epi8(0x0F);
    // As `q4_k_avx512`: scales unpacked in vector lanes, the minima's
    // `ml * sum(x)` gathered in one vector a row, one horizontal sum a row.
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut mins = [_mm256_setzero_ps(); R];
    assert!(row.len() >= nb * TS && xsum.len() >= R * sbs && x.len() >= R * k);
    for b in 0..nb {
        let blk = row.as_ptr().add(b * TS);
        let (dlv, mlv) = q4_k_scales_v(blk);
        for (i, m) in mins.iter_mut().enumerate() {
            // SAFETY: row i's eight sub-block sums of block b are in `xsum`
            // (asserted above).
            *m = _mm256_fmadd_ps(mlv, unsafe { _mm256_loadu_ps(xsum.as_ptr().add(i * sbs + b * 8)) }, *m);
        }
        let mut dl = [0f32; 8];
        // SAFETY: eight lanes into eight floats.
        unsafe { _mm256_storeu_ps(dl.as_mut_ptr(), dlv) };
        for p in 0..4 {
            for half in 0..2 {
                // SAFETY: 16 bytes at 16 + 32p + 16 half are inside the
                // block; the inputs are inside `x` (asserted above).
                unsafe {
                    let v = _mm_loadu_si128(blk.add(16 + 32 * p + 16 * half) as *const __m128i);
                    let lo = _mm_and_si128(v, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                    for (h, nib) in [lo, hi].into_iter().enumerate() {
                        let j = 2 * p + h;
                        let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nib));
                        let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8)));
                        let s = _mm256_set1_ps(dl[j]);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xi = xp.add(i * k + b * QK_K + 32 * j + 16 * half);
                            let t = _mm256_mul_ps(w0, _mm256_loadu_ps(xi));
                            let t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xi.add(8)), t);
                            a[h] = _mm256_fmadd_ps(s, t, a[h]);
                        }
                    }
                }
            }
        }
    }
    for ((o, a), m) in out.iter_mut().zip(acc).zip(mins) {
        // SAFETY: same features as this function.
        *o = unsafe { hsum256(_mm256_sub_ps(_mm256_add_ps(a[0], a[1]), m)) };
    }
}

/// Dequantizes one weight row (whole blocks) into `out`, bit for bit as
/// `emu_core::quant::dequantize_into` (same products and roundings), for
/// the prefill path that hands f32 slabs to gemm.
///
/// # Safety
/// The CPU must have AVX-512F and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_row_avx512(qt: QuantType, row: &[u8], out: &mut [f32]) {
    let k = out.len();
    let op = out.as_mut_ptr();
    match qt {
        QuantType::Q8_0 => {
            const TS: usize = Q8_0_BYTES;
            for b in 0..k / QK8_0 {
                let blk = &row[b * TS..(b + 1) * TS];
                // SAFETY: the block and its 32 outputs are in bounds.
                unsafe {
                    let d = _mm512_set1_ps(f16_at(blk.as_ptr()));
                    for h in 0..2 {
                        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.as_ptr().add(2 + 16 * h) as *const __m128i));
                        _mm512_storeu_ps(op.add(b * QK8_0 + 16 * h), _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
                    }
                }
            }
        }
        QuantType::Q4K => {
            const TS: usize = Q4K_BYTES;
            let mask = _mm256_set1_epi8(0x0F);
            for b in 0..k / QK_K {
                let blk = &row[b * TS..(b + 1) * TS];
                let (dl, ml) = q4_k_scales(blk);
                for p in 0..4 {
                    // SAFETY: bytes and outputs of sub-blocks 2p, 2p+1 are
                    // in bounds.
                    unsafe {
                        let v = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * p) as *const __m256i);
                        let lo = _mm256_and_si256(v, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                        for (h, nib) in [lo, hi].into_iter().enumerate() {
                            let j = 2 * p + h;
                            let (s, m) = (_mm512_set1_ps(dl[j]), _mm512_set1_ps(ml[j]));
                            let halves = [_mm256_castsi256_si128(nib), _mm256_extracti128_si256(nib, 1)];
                            for (e, part) in halves.into_iter().enumerate() {
                                let w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part));
                                let y = _mm512_sub_ps(_mm512_mul_ps(s, w), m);
                                _mm512_storeu_ps(op.add(b * QK_K + 32 * j + 16 * e), y);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// bf16 bit patterns of the nibble values, twice: a `vpermw` table indexed
/// by five bits of which the low four are the nibble.
const NIBBLE_BF16: [u16; 32] = {
    let mut t = [0u16; 32];
    let mut v = 0;
    while v < 32 {
        t[v] = (((v % 16) as f32).to_bits() >> 16) as u16;
        v += 1;
    }
    t
};

/// Whether [`dot_block_q4k_bf16`] can run: AVX512-BF16 (with BW and VL).
pub(crate) fn bf16_dots() -> bool {
    crate::dpbf16::available()
}

/// [`dot_block`] for Q4_K weights and bf16 inputs (`xb`: `m` rows of `k`
/// bit patterns, permuted by [`q4_k_bf16_planes`]). A nibble (0..15) is
/// exact in bf16, so each sub-block's `sum(q * x)` is taken by `vdpbf16ps`
/// of exact products instead of widening every weight to f32. The inputs
/// are permuted once a call so that 64 bytes of nibbles, loaded as 32
/// words, become four bf16 vectors by a shift and one `vpermw` each, with
/// no widening or masking (a hot single-thread matvec ran 1.4x faster than
/// widening the bytes to words first). Same regrouping and rounding as
/// [`dot_block`]'s, `xsum` being the f32 sums of the same inputs.
///
/// # Safety
/// [`bf16_dots`] must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
pub(crate) unsafe fn dot_block_q4k_bf16(
    rows: &[u8],
    rb: usize,
    xb: &[u16],
    xsum: &[f32],
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    let n = out.len() / m.max(1);
    assert!(
        m > 0 && rb == k / QK_K * Q4K_BYTES && rows.len() >= n * rb && xb.len() >= m * k && xsum.len() >= m * (k / 32)
    );
    let sbs = k / 32;
    for (j, o) in out.chunks_exact_mut(m).enumerate() {
        let row = &rows[j * rb..(j + 1) * rb];
        for (i, r) in row_groups(m) {
            let (xs, ss, os) = (&xb[i * k..], &xsum[i * sbs..], &mut o[i..]);
            // SAFETY: the features are this function's; shapes asserted.
            unsafe { by_rows!(r, q4_k_bf16(row, xs, ss, k, os)) }
        }
    }
}

/// The bf16 inputs in the order [`q4_k_bf16`] reads them: per super-block,
/// per 64-byte half (chunks 2h and 2h + 1), four planes of 32 words, one per
/// (nibble, byte parity): plane `P` word `i` is the input of the weight that
/// word `i` of the half's bytes holds in its nibble `P` (low of the even
/// byte, high of the even byte, low of the odd byte, high of the odd byte).
/// `x` is `m` rows of `k` bf16 bit patterns; the result has the same size.
pub(crate) fn q4_k_bf16_planes(x: &[u16], k: usize) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (b, ob) in or.chunks_exact_mut(QK_K).enumerate() {
            for (g, o) in ob.iter_mut().enumerate() {
                let (half, plane, i) = (g / 128, (g / 32) % 4, g % 32);
                let chunk = 2 * half + i / 16;
                let sub = 2 * chunk + (plane & 1);
                let l = 2 * (i % 16) + (plane >> 1);
                *o = xr[b * QK_K + 32 * sub + l];
            }
        }
    }
    out
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
unsafe fn q4_k_bf16<const R: usize>(row: &[u8], xb: &[u16], xsum: &[f32], k: usize, out: &mut [f32]) {
    const TS: usize = Q4K_BYTES;
    let nb = k / QK_K;
    let sbs = k / 32;
    let xp = xb.as_ptr();
    use crate::matvec_x86::bh;
    // SAFETY: 32 readable u16.
    let table = unsafe { _mm512_loadu_si512(NIBBLE_BF16.as_ptr() as *const _) };
    let zero = _mm512_setzero_ps();
    // Lanes 0..8 of a plane's dot products belong to the half's first
    // chunk, 8..16 to its second: the scales of sub-blocks (4h + s, 4h + 2 + s).
    let pick = |a: i32, b: i32| _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
    let idx = [[pick(0, 2), pick(1, 3)], [pick(4, 6), pick(5, 7)]];
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut mins = [_mm256_setzero_ps(); R];
    assert!(row.len() >= nb * TS && xsum.len() >= R * sbs && xb.len() >= R * k);
    for b in 0..nb {
        let blk = row.as_ptr().add(b * TS);
        crate::matvec_x86::prefetch(blk, 128);
        let (dlv, mlv) = q4_k_scales_v(blk);
        for (i, m) in mins.iter_mut().enumerate() {
            // SAFETY: row i's eight sub-block sums of block b (asserted).
            *m = _mm256_fmadd_ps(mlv, unsafe { _mm256_loadu_ps(xsum.as_ptr().add(i * sbs + b * 8)) }, *m);
        }
        let dl = _mm512_castps256_ps512(dlv);
        for (h, hidx) in idx.iter().enumerate() {
            // SAFETY: bytes 16 + 64h .. 80 + 64h are inside the block; the
            // planes are inside `xb` (asserted above).
            unsafe {
                let v = _mm512_loadu_si512(blk.add(16 + 64 * h) as *const _);
                // vpermw reads the low five bits of each word; the table
                // repeats, so the bit above the nibble does not matter.
                let w = [
                    _mm512_permutexvar_epi16(v, table),
                    _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(v), table),
                    _mm512_permutexvar_epi16(_mm512_srli_epi16::<8>(v), table),
                    _mm512_permutexvar_epi16(_mm512_srli_epi16::<12>(v), table),
                ];
                let s_lo = _mm512_permutexvar_ps(hidx[0], dl);
                let s_hi = _mm512_permutexvar_ps(hidx[1], dl);
                for (i, a) in acc.iter_mut().enumerate() {
                    let xq = xp.add(i * k + b * QK_K + 128 * h);
                    let p = [
                        bh!(_mm512_loadu_si512(xq as *const _)),
                        bh!(_mm512_loadu_si512(xq.add(32) as *const _)),
                        bh!(_mm512_loadu_si512(xq.add(64) as *const _)),
                        bh!(_mm512_loadu_si512(xq.add(96) as *const _)),
                    ];
                    let lo = _mm512_dpbf16_ps(_mm512_dpbf16_ps(zero, bh!(w[0]), p[0]), bh!(w[2]), p[2]);
                    let hi = _mm512_dpbf16_ps(_mm512_dpbf16_ps(zero, bh!(w[1]), p[1]), bh!(w[3]), p[3]);
                    a[0] = _mm512_fmadd_ps(s_lo, lo, a[0]);
                    a[1] = _mm512_fmadd_ps(s_hi, hi, a[1]);
                }
            }
        }
    }
    for ((o, a), m) in out.iter_mut().zip(acc).zip(mins) {
        // One horizontal sum a row: the minima subtracted in the low lanes
        // first (a second reduction was a tenth of a short row's time).
        *o = hsum512(_mm512_sub_ps(_mm512_add_ps(a[0], a[1]), _mm512_zextps256_ps512(m)));
    }
}

/// Input rows rounded to 8 bits per 256 values, as llama.cpp's Q8_K
/// rounds them for its integer dot products with Q4_K: per block `d =
/// max|x| / 127` and `q = round_ties_even(x / d)` (all zero when the block
/// is), plus `d * sum(q)` of every 32-wide sub-block (for the minima term).
pub(crate) struct Q8Rows {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sums: Vec<f32>,
}

impl Q8Rows {
    /// `x`: rows of `k` (a multiple of 256) f32 values.
    pub(crate) fn new(x: &[f32]) -> Self {
        let blocks = x.len() / QK_K;
        let mut q = Vec::with_capacity(x.len());
        let mut d = Vec::with_capacity(blocks);
        let mut sums = Vec::with_capacity(x.len() / 32);
        for blk in x.chunks_exact(QK_K) {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (scale, inv) = if amax > 0.0 {
                (amax / 127.0, 127.0 / amax)
            } else {
                (0.0, 0.0)
            };
            d.push(scale);
            for sub in blk.chunks_exact(32) {
                let mut s = 0i32;
                for v in sub {
                    let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                    s += r as i32;
                    q.push(r);
                }
                sums.push(scale * s as f32);
            }
        }
        Q8Rows { q, d, sums }
    }
}

/// Whether [`q4_k_q8_rows`] can run: AVX-512 with VNNI (`vpdpbusd`).
pub(crate) fn vnni() -> bool {
    detect() == Some(Isa::Avx512) && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
}

/// The 8-bit-activation kernel this CPU runs: [`q4_k_q8_rows`] with VNNI,
/// else [`q4_k_q8_rows_avx2`] (AVX2 and FMA, as `detect` found them).
pub(crate) fn int8_isa() -> Option<Isa> {
    if vnni() {
        Some(Isa::Avx512)
    } else {
        detect().map(|_| Isa::Avx2)
    }
}

/// `out[j * m + i] = w_row(first + j) · x_i` for the `out.len() / m` Q4_K
/// weight rows from `first` (`rows`: the whole weight, `rb` bytes a row)
/// and all `m` rows of `x`, on 8-bit integers: per sub-block `j` of
/// super-block `b` the exact integer `S = sum(q_w q_x)` (`vpdpbusd`, four
/// unsigned nibbles times four signed bytes a lane), then in f32 `sum_b
/// sum_j (dl_j d_x) S - ml_j (d_x sum(q_x))`: llama.cpp's Q4_K x Q8_K rule,
/// up to f32 summation order. One call a task: the per-row work is the
/// products alone.
///
/// # Safety
/// [`vnni`] must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q4_k_q8_rows(
    rows: &[u8],
    rb: usize,
    first: usize,
    x: &Q8Rows,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    let n = out.len() / m.max(1);
    assert!(m > 0 && rows.len() >= (first + n) * rb && rb == k / QK_K * Q4K_BYTES);
    for (i, r) in row_groups(m) {
        // SAFETY (each arm): VNNI from the caller; shapes asserted here and
        // in the kernel.
        unsafe { by_rows!(r, q4_k_q8(rows, rb, first, x, i, k, m, out)) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_k_q8<const R: usize>(
    rows: &[u8],
    rb: usize,
    first: usize,
    x: &Q8Rows,
    x0: usize,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    const TS: usize = Q4K_BYTES;
    let nb = k / QK_K;
    let sbs = k / 32;
    let n = out.len() / m;
    assert!(x.q.len() >= (x0 + R) * k && x.d.len() >= (x0 + R) * nb && x.sums.len() >= (x0 + R) * sbs && x0 + R <= m);
    let mask = _mm256_set1_epi8(0x0F);
    // Lanes 0..8 of a product are sub-block 2p, lanes 8..16 sub-block 2p + 1.
    let pick = [
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5),
        _mm512_setr_epi32(6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7),
    ];
    for j in 0..n {
        let row = rows.as_ptr().add((first + j) * rb);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = row.add(b * TS);
            crate::matvec_x86::prefetch(blk, 128);
            let (dlv, mlv) = q4_k_scales_v(blk);
            let mut scale = [_mm512_setzero_ps(); R];
            for i in 0..R {
                let xi = x0 + i;
                // SAFETY: row xi's eight sub-block sums of block b (asserted).
                let sums = unsafe { _mm256_loadu_ps(x.sums.as_ptr().add(xi * sbs + b * 8)) };
                mins[i] = _mm256_fmadd_ps(mlv, sums, mins[i]);
                scale[i] = _mm512_castps256_ps512(_mm256_mul_ps(dlv, _mm256_set1_ps(x.d[xi * nb + b])));
            }
            for (p, pick) in pick.iter().enumerate() {
                // SAFETY: bytes 16 + 32p .. 48 + 32p are inside the block
                // (rows asserted by the caller); the 64 inputs at b * 256 +
                // 64p are inside each row (asserted).
                unsafe {
                    let v = _mm256_loadu_si256(blk.add(16 + 32 * p) as *const __m256i);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    for i in 0..R {
                        let xq = x.q.as_ptr().add((x0 + i) * k + b * QK_K + 64 * p);
                        let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq as *const _));
                        let sc = _mm512_permutexvar_ps(*pick, scale[i]);
                        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[i]);
                    }
                }
            }
        }
        for i in 0..R {
            out[j * m + x0 + i] = hsum512(_mm512_sub_ps(acc[i], _mm512_zextps256_ps512(mins[i])));
        }
    }
}

/// [`q4_k_q8_rows`] without VNNI: the same exact integer sums, each lane
/// four products as `vpdpbusd` takes them, by `vpmaddubsw` (unsigned
/// nibbles times signed bytes, pairs added in 16 bits: at most 2 x 15 x 127,
/// so never saturated) then `vpmaddwd` by ones; the f32 steps after are the
/// same rule.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`detect`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4_k_q8_rows_avx2(
    rows: &[u8],
    rb: usize,
    first: usize,
    x: &Q8Rows,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    let n = out.len() / m.max(1);
    assert!(m > 0 && rows.len() >= (first + n) * rb && rb == k / QK_K * Q4K_BYTES);
    for (i, r) in row_groups(m) {
        // SAFETY (each arm): AVX2 from the caller; shapes asserted here and
        // in the kernel.
        unsafe { by_rows!(r, q4_k_q8_avx2(rows, rb, first, x, i, k, m, out)) }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_k_q8_avx2<const R: usize>(
    rows: &[u8],
    rb: usize,
    first: usize,
    x: &Q8Rows,
    x0: usize,
    k: usize,
    m: usize,
    out: &mut [f32],
) {
    const TS: usize = Q4K_BYTES;
    let nb = k / QK_K;
    let sbs = k / 32;
    let n = out.len() / m;
    assert!(x.q.len() >= (x0 + R) * k && x.d.len() >= (x0 + R) * nb && x.sums.len() >= (x0 + R) * sbs && x0 + R <= m);
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for j in 0..n {
        let row = rows.as_ptr().add((first + j) * rb);
        // Even and odd sub-blocks apart, as the VNNI kernel's two halves.
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut mins = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = row.add(b * TS);
            let (dlv, mlv) = q4_k_scales_v(blk);
            let mut scale = [[0f32; 8]; R];
            for i in 0..R {
                let xi = x0 + i;
                // SAFETY: row xi's eight sub-block sums of block b (asserted);
                // eight lanes into eight floats.
                unsafe {
                    let sums = _mm256_loadu_ps(x.sums.as_ptr().add(xi * sbs + b * 8));
                    mins[i] = _mm256_fmadd_ps(mlv, sums, mins[i]);
                    _mm256_storeu_ps(
                        scale[i].as_mut_ptr(),
                        _mm256_mul_ps(dlv, _mm256_set1_ps(x.d[xi * nb + b])),
                    );
                }
            }
            for p in 0..4 {
                // SAFETY: bytes 16 + 32p .. 48 + 32p are inside the block;
                // the 64 inputs at b * 256 + 64p are inside each row
                // (asserted).
                unsafe {
                    let v = _mm256_loadu_si256(blk.add(16 + 32 * p) as *const __m256i);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    for i in 0..R {
                        let xq = x.q.as_ptr().add((x0 + i) * k + b * QK_K + 64 * p);
                        let s_lo =
                            _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xq as *const __m256i)), ones);
                        let s_hi = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xq.add(32) as *const __m256i)),
                            ones,
                        );
                        let a = &mut acc[i];
                        a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_lo), _mm256_set1_ps(scale[i][2 * p]), a[0]);
                        a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_hi), _mm256_set1_ps(scale[i][2 * p + 1]), a[1]);
                    }
                }
            }
        }
        for i in 0..R {
            out[j * m + x0 + i] = hsum256(_mm256_sub_ps(_mm256_add_ps(acc[i][0], acc[i][1]), mins[i]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector unpacking of Q4_K's scales and mins gives the scalar
    /// products bit for bit, over random bytes (every 6-bit pattern).
    #[test]
    fn vector_scales_are_the_scalar_ones() {
        if detect().is_none() {
            return;
        }
        let mut rng = emu_core::testing::Rng::new(5);
        for _ in 0..2000 {
            let mut blk = [0u8; Q4K_BYTES];
            for b in blk.iter_mut() {
                *b = (rng.uniform(0.0, 256.0) as u32).min(255) as u8;
            }
            // Finite f16 d and dmin (exponent below all ones).
            blk[1] &= 0x7b;
            blk[3] &= 0x7b;
            let (dl, ml) = q4_k_scales(&blk);
            let mut got = ([0f32; 8], [0f32; 8]);
            // SAFETY: AVX2, FMA and F16C were detected; blk is a whole block.
            unsafe {
                let (a, b) = q4_k_scales_v(blk.as_ptr());
                _mm256_storeu_ps(got.0.as_mut_ptr(), a);
                _mm256_storeu_ps(got.1.as_mut_ptr(), b);
            }
            assert_eq!(got.0.map(f32::to_bits), dl.map(f32::to_bits), "{blk:?}");
            assert_eq!(got.1.map(f32::to_bits), ml.map(f32::to_bits), "{blk:?}");
        }
    }

    /// Q4_K on 8-bit inputs: against the rule it implements (exact integer
    /// sums, the f32 scale products), computed in f64, to 1e-6 of the sum
    /// of the terms' magnitudes; and against the dequantized weights' f64
    /// product within the rounding bound `sum over blocks of d_x / 2 *
    /// sum(|w|)` (plus f32 slack). Row counts 1..=6, a bias, rows with an
    /// all-zero block.
    #[test]
    fn int8_rows_follow_their_rule_and_bound() {
        // The VNNI kernel where the CPU has it, and the AVX2 one always.
        let isas: Vec<Isa> = [vnni().then_some(Isa::Avx512), detect().map(|_| Isa::Avx2)]
            .into_iter()
            .flatten()
            .collect();
        for isa in isas {
            int8_rows_on(isa);
        }
    }

    fn int8_rows_on(isa: Isa) {
        let mut rng = emu_core::testing::Rng::new(9);
        let (n, k) = (37, 512);
        let wsrc: Vec<f64> = (0..n * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let host = emu_core::HostTensor::from_f64(&[n, k], wsrc).unwrap();
        let w = emu_core::QuantTensor::quantize("t.weight", &host, QuantType::Q4K).unwrap();
        let wd = w.dequantize().unwrap().to_f64_vec().unwrap();
        let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        for m in 1..=6 {
            let mut x: Vec<f32> = (0..m * k).map(|_| rng.uniform(-2.0, 2.0) as f32).collect();
            if m > 1 {
                x[k..k + 256].iter_mut().for_each(|v| *v = 0.0);
            }
            let got = crate::quant::linear_rows_q8(&x, m, &w, Some(&bias), isa);
            let q8 = Q8Rows::new(&x);
            let rb = w.row_bytes();
            for i in 0..m {
                for r in 0..n {
                    let row = &w.bytes()[r * rb..(r + 1) * rb];
                    let (mut rule, mut mag, mut exact, mut bound) = (bias[r] as f64, 0f64, bias[r] as f64, 0f64);
                    for b in 0..k / QK_K {
                        let (dl, ml) = q4_k_scales(&row[b * Q4K_BYTES..(b + 1) * Q4K_BYTES]);
                        let dx = q8.d[i * (k / QK_K) + b];
                        let qs = &row[b * Q4K_BYTES + 16..(b + 1) * Q4K_BYTES];
                        for j in 0..8 {
                            let mut sum = 0i64;
                            for e in 0..32 {
                                let q = (qs[(j / 2) * 32 + e] >> (4 * (j % 2))) & 15;
                                sum += q as i64 * q8.q[i * k + b * QK_K + 32 * j + e] as i64;
                            }
                            let t = (dl[j] * dx) as f64 * sum as f64;
                            let u = ml[j] as f64 * q8.sums[i * (k / 32) + b * 8 + j] as f64;
                            rule += t - u;
                            mag += t.abs() + u.abs();
                        }
                        for e in 0..QK_K {
                            let c = b * QK_K + e;
                            exact += wd[r * k + c] * x[i * k + c] as f64;
                            bound += wd[r * k + c].abs() * dx as f64 / 2.0;
                        }
                    }
                    let g = got[i * n + r] as f64;
                    assert!(
                        (g - rule).abs() <= 1e-6 * (mag + 1.0),
                        "m {m} row {i} out {r}: {g} vs rule {rule}"
                    );
                    assert!(
                        (g - exact).abs() <= bound * (1.0 + 1e-5) + 1e-5 * (mag + 1.0),
                        "m {m} row {i} out {r}: {g} vs {exact}, bound {bound}"
                    );
                }
            }
        }
    }
}
