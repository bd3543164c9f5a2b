//! AVX-512 dot products for small-batch `linear` (decode): one weight row
//! against up to four f32 input rows, the weights widened in registers
//! (bf16: a 16-bit shift; f16: `vcvtph2ps`) and never written out.
//!
//! Decode is bound by how fast the weights stream in, and the autovectorised
//! loop of `matvec.rs` (AVX2, one weight row widened into a scratch row and
//! then read again) reached about half the read bandwidth, below candle's
//! AVX-512 gemm at one row. Each input row has four accumulators, so the
//! FMA latency of one 64-weight step overlaps the next; a row's summation
//! order does not depend on how many rows share the call, so a batch gives
//! each row what it gets alone.

use std::arch::x86_64::*;

/// How the weight elements widen to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    Bf16,
    F16,
}

pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// 16 weights from `p` (element `j` of the row) as f32 lanes; `mask` keeps
/// the lanes that exist (the row's tail).
#[inline(always)]
unsafe fn load16(e: Elem, p: *const u8, j: usize, mask: __mmask16) -> __m512 {
    // SAFETY: the caller's mask covers only elements inside the row.
    unsafe {
        match e {
            Elem::F32 => _mm512_maskz_loadu_ps(mask, (p as *const f32).add(j)),
            Elem::Bf16 => {
                let h = _mm256_maskz_loadu_epi16(mask, (p as *const i16).add(j));
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
            Elem::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (p as *const i16).add(j))),
        }
    }
}

/// `out[j * m + i] = w_j · x_i` for the `out.len() / m` consecutive weight
/// rows of type `e` from `w` and the `m` f32 input rows `x` (`m * k`), four
/// input rows at a time. One call a task, so the per-row work is the
/// products alone.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW ([`available`] checks F; BW
/// ships with it on every AVX-512 CPU but Knights Landing, which is also
/// checked by the caller through `is_x86_feature_detected`); `w` must hold
/// `out.len() / m` rows of `k` elements of `e`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot_block(e: Elem, w: *const u8, x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    assert!(m > 0 && x.len() >= m * k);
    let size = match e {
        Elem::F32 => 4,
        Elem::Bf16 | Elem::F16 => 2,
    };
    for (j, o) in out.chunks_exact_mut(m).enumerate() {
        // SAFETY: row j of the caller's block.
        let wr = unsafe { w.add(j * k * size) };
        for (i, r) in row_groups(m) {
            let (xs, os) = (&x[i * k..], &mut o[i..]);
            // SAFETY (each arm): forwarded; xs holds r rows of k.
            unsafe { by_rows!(r, rows(e, wr, xs, k, os)) }
        }
    }
}

/// Whether [`dot_block_avx2`] can run: AVX2, FMA and F16C.
pub(crate) fn available_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// [`dot_block`] for CPUs without AVX-512: 8 lanes, weights widened in
/// registers as there (the portable loop widens a row into a scratch row
/// and reads it again, which ran bf16 decode at half of what PyTorch
/// reaches on an AVX2-only VM), input rows in pairs (4 sums a row in 16
/// registers).
///
/// # Safety
/// [`available_avx2`] must hold; `w` must hold `out.len() / m` rows of `k`
/// elements of `e`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_block_avx2(e: Elem, w: *const u8, x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    assert!(m > 0 && x.len() >= m * k);
    let size = match e {
        Elem::F32 => 4,
        Elem::Bf16 | Elem::F16 => 2,
    };
    for (j, o) in out.chunks_exact_mut(m).enumerate() {
        // SAFETY: row j of the caller's block.
        let wr = unsafe { w.add(j * k * size) };
        for i in (0..m).step_by(2) {
            let (xs, os) = (&x[i * k..], &mut o[i..]);
            // SAFETY (each arm): forwarded; xs holds one or two rows of k.
            unsafe {
                match m - i {
                    1 => rows_avx2::<1>(e, wr, xs, k, os),
                    _ => rows_avx2::<2>(e, wr, xs, k, os),
                }
            }
        }
    }
}

/// 8 weights from `p` (elements `j ..= j + 7` of the row) as f32 lanes.
#[inline(always)]
unsafe fn load8(e: Elem, p: *const u8, j: usize) -> __m256 {
    // SAFETY: the caller reads elements inside the row.
    unsafe {
        match e {
            Elem::F32 => _mm256_loadu_ps((p as *const f32).add(j)),
            Elem::Bf16 => {
                let h = _mm_loadu_si128((p as *const u16).add(j) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            Elem::F16 => _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(j) as *const __m128i)),
        }
    }
}

/// Element `j` of the row, widened.
#[inline(always)]
unsafe fn load1(e: Elem, p: *const u8, j: usize) -> f32 {
    // SAFETY: the caller reads an element inside the row.
    unsafe {
        match e {
            Elem::F32 => *(p as *const f32).add(j),
            Elem::Bf16 => f32::from_bits((*(p as *const u16).add(j) as u32) << 16),
            Elem::F16 => half::f16::from_bits(*(p as *const u16).add(j)).to_f32(),
        }
    }
}

#[inline(always)]
unsafe fn rows_avx2<const R: usize>(e: Elem, w: *const u8, x: &[f32], k: usize, out: &mut [f32]) {
    let xp = x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let mut j = 0;
    // SAFETY: every vector load reads elements j .. j + 32 <= k or
    // j .. j + 8 <= k of w and of each input row; the tail is scalar.
    unsafe {
        while j + 32 <= k {
            let ws = [
                load8(e, w, j),
                load8(e, w, j + 8),
                load8(e, w, j + 16),
                load8(e, w, j + 24),
            ];
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = xp.add(i * k + j);
                for (q, wq) in ws.iter().enumerate() {
                    a[q] = _mm256_fmadd_ps(*wq, _mm256_loadu_ps(xi.add(8 * q)), a[q]);
                }
            }
            j += 32;
        }
        let mut q = 0;
        while j + 8 <= k {
            let wq = load8(e, w, j);
            for (i, a) in acc.iter_mut().enumerate() {
                a[q] = _mm256_fmadd_ps(wq, _mm256_loadu_ps(xp.add(i * k + j)), a[q]);
            }
            j += 8;
            q += 1;
        }
        for (i, (o, a)) in out.iter_mut().zip(acc).enumerate() {
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            let mut t = _mm_cvtss_f32(h);
            for jj in j..k {
                t += load1(e, w, jj) * *xp.add(i * k + jj);
            }
            *o = t;
        }
    }
}

/// How far ahead of the weights in hand the quantized row kernels
/// prefetch: the next rows follow in memory, and asking for them early keeps
/// more reads in flight than the hardware prefetcher does while the kernel
/// is busy widening blocks (measured: Q4_K and Q8_0 decode faster; the
/// plain f32/bf16 rows, pure streams, slower, so they do not).
pub(crate) const PREFETCH: usize = 1024;

/// 32 bf16 bit patterns as `vdpbf16ps`'s operand type: a plain
/// reinterpretation of the register.
macro_rules! bh {
    ($v:expr) => {
        std::mem::transmute::<std::arch::x86_64::__m512i, std::arch::x86_64::__m512bh>($v)
    };
}
pub(crate) use bh;

/// Input rows in groups of at most four, the row kernels' register budget:
/// `(first row, rows in the group)`.
pub(crate) fn row_groups(m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m).step_by(4).map(move |i| (i, (m - i).min(4)))
}

/// `$kernel::<R>(args)` with the const `R` the group size `$r` (1 to 4),
/// for the row kernels that keep one accumulator set a row in registers.
macro_rules! by_rows {
    ($r:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $r {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            _ => $kernel::<4>($($arg),*),
        }
    };
}
pub(crate) use by_rows;

/// Prefetches the `bytes` (a multiple of 64) that lie [`PREFETCH`] past
/// `at`. A prefetch never faults, so the address may lie past the weights.
#[inline(always)]
pub(crate) fn prefetch(at: *const u8, bytes: usize) {
    let mut l = 0;
    while l < bytes {
        // SAFETY: prefetching reads nothing architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH + l) as *const i8) };
        l += 64;
    }
}

#[inline(always)]
unsafe fn rows<const R: usize>(e: Elem, w: *const u8, x: &[f32], k: usize, out: &mut [f32]) {
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let full = k / 64 * 64;
    let mut j = 0;
    // SAFETY: every load below reads elements j .. j + 64 < k (full
    // steps) or masked ones < k (the tail), of w and of each input row.
    unsafe {
        while j < full {
            let ws = [
                load16(e, w, j, !0),
                load16(e, w, j + 16, !0),
                load16(e, w, j + 32, !0),
                load16(e, w, j + 48, !0),
            ];
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = xp.add(i * k + j);
                for (q, wq) in ws.iter().enumerate() {
                    a[q] = _mm512_fmadd_ps(*wq, _mm512_loadu_ps(xi.add(16 * q)), a[q]);
                }
            }
            j += 64;
        }
        let mut q = 0;
        while j < k {
            let left = (k - j).min(16);
            let mask: __mmask16 = if left == 16 { !0 } else { (1u16 << left) - 1 };
            let wq = load16(e, w, j, mask);
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(i * k + j));
                a[q] = _mm512_fmadd_ps(wq, xv, a[q]);
            }
            j += 16;
            q += 1;
        }
        for (o, a) in out.iter_mut().zip(acc) {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *o = _mm512_reduce_add_ps(s);
        }
    }
}

/// `out[j * m + i] = w_j · x_i` for the `out.len() / m` consecutive bf16
/// weight rows from `w` and the `m` bf16 input rows `x` (as bits, `m * k`),
/// on `vdpbf16ps`: 32 products per instruction, against a widen, a shift
/// and an FMA per 16 in [`dot_block`]. The products are exact and summed in
/// f32 as there (in another order, and with bf16/f32 denormals flushed to
/// zero, as the instruction does); decode with bf16 weights runs here where
/// the CPU has AVX512-BF16. One call a task, so the per-row work is the
/// products alone (a call per row cost about a tenth of bf16 decode at mid
/// size).
///
/// # Safety
/// The CPU must have AVX512-BF16 (`crate::dpbf16::available`); `w` must
/// hold `out.len() / m` rows of `k` bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn dot_block_bf16(w: *const u16, x: &[u16], k: usize, m: usize, out: &mut [f32]) {
    assert!(m > 0 && x.len() >= m * k);
    for (j, o) in out.chunks_exact_mut(m).enumerate() {
        // SAFETY: row j of the caller's block.
        let wr = unsafe { w.add(j * k) };
        for (i, r) in row_groups(m) {
            let (xs, os) = (&x[i * k..], &mut o[i..]);
            // SAFETY: forwarded; xs holds r rows of k.
            unsafe { by_rows!(r, rows_bf16(wr, xs, k, os)) }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn rows_bf16<const R: usize>(w: *const u16, x: &[u16], k: usize, out: &mut [f32]) {
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut j = 0;
    // SAFETY: full steps read elements j .. j + 64 <= k of w and of each
    // input row; the tail's loads are masked to elements < k (zeros past
    // it add nothing).
    unsafe {
        while j + 64 <= k {
            let w0 = bh!(_mm512_loadu_si512(w.add(j) as *const _));
            let w1 = bh!(_mm512_loadu_si512(w.add(j + 32) as *const _));
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = xp.add(i * k + j);
                a[0] = _mm512_dpbf16_ps(a[0], w0, bh!(_mm512_loadu_si512(xi as *const _)));
                a[1] = _mm512_dpbf16_ps(a[1], w1, bh!(_mm512_loadu_si512(xi.add(32) as *const _)));
            }
            j += 64;
        }
        while j < k {
            let left = (k - j).min(32);
            let mask: __mmask32 = if left == 32 { !0 } else { (1u32 << left) - 1 };
            let wv = bh!(_mm512_maskz_loadu_epi16(mask, w.add(j) as *const i16));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = bh!(_mm512_maskz_loadu_epi16(mask, xp.add(i * k + j) as *const i16));
                a[0] = _mm512_dpbf16_ps(a[0], wv, xv);
            }
            j += 32;
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 row kernel against f64 for every weight type, ragged k
    /// (the 32-step, the 8-step and the scalar tail) and one to five rows
    /// (pairs and a single row).
    #[test]
    fn avx2_rows_match_f64() {
        if !available_avx2() {
            return eprintln!("no AVX2+FMA+F16C here: skipped");
        }
        let mut rng = emu_core::testing::Rng::new(21);
        for &(k, m, n) in &[(1, 1, 3), (7, 2, 5), (40, 3, 4), (301, 5, 7), (1024, 1, 3)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            let wf: Vec<f32> = (0..n * k).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            for e in [Elem::F32, Elem::Bf16, Elem::F16] {
                let (bytes, wv): (Vec<u8>, Vec<f64>) = match e {
                    Elem::F32 => (
                        wf.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        wf.iter().map(|&v| v as f64).collect(),
                    ),
                    Elem::Bf16 => (
                        wf.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
                        wf.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect(),
                    ),
                    Elem::F16 => (
                        wf.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                        wf.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect(),
                    ),
                };
                let mut out = vec![f32::NAN; n * m];
                // SAFETY: the features were checked; `bytes` holds n rows of k.
                unsafe { dot_block_avx2(e, bytes.as_ptr(), &x, k, m, &mut out) };
                for r in 0..n {
                    for i in 0..m {
                        let want: f64 = (0..k).map(|j| wv[r * k + j] * x[i * k + j] as f64).sum();
                        let got = out[r * m + i] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                            "{e:?} k {k} row {r} input {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
