//! f32 matrix products with our own AVX-512 microkernel, and an AVX2+FMA
//! one for CPUs without AVX-512.
//!
//! The `gemm` crate sizes its blocks from the cache sizes CPUID reports (on
//! the VM the benchmarks ran on, a 480 MiB L3), and there its f32 products
//! ran at a sixth of the FMA peak; this kernel runs at about 40% of it
//! (the register tile alone, in L1, at half: the rest is the lead). This is the classic layout with blocks
//! fixed to the per-core caches every AVX-512 CPU has (32+ KiB L1, 1+ MiB
//! L2): the right operand packed once per call into panels of 32 columns
//! (`k x 32`, contiguous), the left one read in place (rows with k
//! contiguous, each element broadcast), a 12 x 32 tile of sums in 24
//! registers, k in chunks of 256 so a panel chunk (32 KiB) stays in L1
//! while the tiles of a task's rows pass over it.
//!
//! Each output is one running sum over k in order (partial sums are stored
//! in the output between k chunks and picked up again), so a result does
//! not depend on the blocking or the thread count; the bias is added to the
//! finished sum, as `x @ w.T + b` computes it.
//!
//! Without AVX-512 (AVX2 and FMA only) the same packed layouts and tiles
//! run through [`Tile::run_avx2`], which walks a 12 x 32 tile as four 6 x 16
//! blocks (12 sums in 8-lane registers, the classic AVX2 shape), and the
//! packings go through 8 x 8 transposes. Each sum is the same chain of
//! FMAs in the same order, so both ISAs give the same bits; where the
//! `gemm` crate ran instead (candle's route) it reached about half of ONNX
//! Runtime's speed on an AVX2-only VM.

use crate::amx::transpose16;
use crate::convert::slice_of;
use candle_core::{DType, Tensor as CTensor};
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows of a register tile.
const MR: usize = 12;
/// Columns of a panel (two vectors of 16).
pub(crate) const NR: usize = 32;
/// k per chunk.
const KC: usize = 256;
/// k per chunk of the AVX2 kernel: it walks a tile in four passes, each
/// storing and reloading its partial sums once a chunk, so longer chunks
/// pay (1024^3 on one thread, alternating: 36-38 ms at 256, 31-36 at 512;
/// 128 was slower, 1024 no faster). The sums do not depend on it.
const KC_AVX2: usize = 512;
/// Largest task: rows and panels.
const TASK_ROWS: usize = 8 * MR;
const TASK_PANELS: usize = 8;

/// Which kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 F/BW/VL (the packing uses the 32-bit transpose of `amx`).
    Avx512,
    /// AVX2 and FMA.
    Avx2,
}

/// Runs the AVX2 kernels on an AVX-512 CPU too (`EMU_CPU_SGEMM=avx2`, or
/// a test): the two give the same bits, so this only changes the speed.
static FORCE_AVX2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The kernels this CPU runs, if any.
pub(crate) fn isa() -> Option<Isa> {
    static BASE: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        if std::env::var("EMU_CPU_SGEMM").is_ok_and(|v| v == "avx2") {
            FORCE_AVX2.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            Some(Isa::Avx512)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(Isa::Avx2)
        } else {
            None
        }
    });
    match base {
        Some(Isa::Avx512) if FORCE_AVX2.load(std::sync::atomic::Ordering::Relaxed) => Some(Isa::Avx2),
        b => b,
    }
}

/// Whether the kernels can run (AVX-512, or AVX2 with FMA).
pub(crate) fn available() -> bool {
    isa().is_some()
}

/// The right operand in panels of 32 columns: panel `p` holds, for each k,
/// columns `32p .. 32p + 32` (zero past the matrix).
pub(crate) struct Packed {
    data: Vec<f32>,
    k: usize,
    cols: usize,
}

impl Packed {
    /// From a row-major `[k, cols]` matrix (element `(k, c)` at
    /// `src[k * ld + c]`).
    pub(crate) fn from_rows(src: &[f32], k: usize, cols: usize, ld: usize) -> Self {
        assert!(cols == 0 || k == 0 || ((k - 1) * ld + cols <= src.len() && ld >= cols));
        let mut data = vec![0f32; cols.div_ceil(NR) * k * NR];
        if k > 0 {
            data.par_chunks_mut(k * NR).enumerate().for_each(|(p, dst)| {
                let (c0, nc) = (p * NR, NR.min(cols - p * NR));
                for (kk, row) in dst.chunks_exact_mut(NR).enumerate() {
                    row[..nc].copy_from_slice(&src[kk * ld + c0..][..nc]);
                }
            });
        }
        Packed { data, k, cols }
    }

    /// An empty operand, to [`Self::refill`].
    pub(crate) fn empty() -> Self {
        Packed {
            data: Vec::new(),
            k: 0,
            cols: 0,
        }
    }

    /// Rebuilds this operand as `k x cols`, reusing its memory: `fill(p,
    /// dst)` writes panel `p` (`dst` is `k x 32`, row-major, and must be
    /// written whole, zeros past `cols` included), in parallel.
    pub(crate) fn refill(&mut self, k: usize, cols: usize, fill: impl Fn(usize, &mut [f32]) + Sync) {
        let len = cols.div_ceil(NR) * k * NR;
        if self.data.len() < len {
            self.data.resize(len, 0.0);
        }
        (self.k, self.cols) = (k, cols);
        if k > 0 {
            self.data[..len]
                .par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, dst)| fill(p, dst));
        }
    }

    /// From a matrix whose column `c` has its k values contiguous (element
    /// `(k, c)` at `src[c * ld + k]`: the weights `[n, k]` of a linear
    /// layer), by 16 x 16 transposes.
    pub(crate) fn from_columns(src: &[f32], k: usize, cols: usize, ld: usize) -> Self {
        assert!(cols == 0 || k == 0 || ((cols - 1) * ld + k <= src.len() && ld >= k));
        let mut data = vec![0f32; cols.div_ceil(NR) * k * NR];
        if k > 0 {
            let isa = isa();
            data.par_chunks_mut(k * NR).enumerate().for_each(|(p, dst)| {
                // SAFETY: the ISA was detected (the callers check
                // `available`); reads are masked to the rows and k that
                // exist.
                unsafe {
                    match isa {
                        Some(Isa::Avx512) => pack_columns(src, k, cols, ld, p, dst),
                        _ => pack_columns_avx2(src, k, cols, ld, p, dst),
                    }
                }
            });
        }
        Packed { data, k, cols }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_columns(src: &[f32], k: usize, cols: usize, ld: usize, p: usize, dst: &mut [f32]) {
    for half in 0..2 {
        let c0 = p * NR + half * 16;
        if c0 >= cols {
            break;
        }
        let nc = 16.min(cols - c0);
        for k0 in (0..k).step_by(16) {
            let nk = 16.min(k - k0);
            let mask: __mmask16 = if nk == 16 { !0 } else { (1u16 << nk) - 1 };
            let mut rows = [_mm512_setzero_si512(); 16];
            for (c, r) in rows.iter_mut().enumerate().take(nc) {
                *r = _mm512_maskz_loadu_epi32(mask, src.as_ptr().add((c0 + c) * ld + k0) as *const i32);
            }
            let t = transpose16(rows);
            for (kk, v) in t.iter().enumerate().take(nk) {
                _mm512_storeu_si512(dst.as_mut_ptr().add((k0 + kk) * NR + half * 16) as *mut _, *v);
            }
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn pack_columns_avx2(src: &[f32], k: usize, cols: usize, ld: usize, p: usize, dst: &mut [f32]) {
    for g in 0..NR / 8 {
        let c0 = p * NR + g * 8;
        if c0 >= cols {
            break;
        }
        let nc = 8.min(cols - c0);
        for k0 in (0..k).step_by(8) {
            let nk = 8.min(k - k0);
            let mask = lanes(nk);
            let mut rows = [_mm256_setzero_ps(); 8];
            for (c, r) in rows.iter_mut().enumerate().take(nc) {
                *r = _mm256_maskload_ps(src.as_ptr().add((c0 + c) * ld + k0), mask);
            }
            let t = transpose8(rows);
            for (kk, v) in t.iter().enumerate().take(nk) {
                _mm256_storeu_ps(dst.as_mut_ptr().add((k0 + kk) * NR + g * 8), *v);
            }
        }
    }
}

/// The first `n` of 8 lanes set (a mask for `maskload`/`maskstore`).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn lanes(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// The transpose of 8 rows of 8 f32.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit
    // halves swapped across.
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xee>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xee>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xee>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xee>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

/// A right operand as the kernel walks it: panel `p` from row `k0` on.
pub(crate) trait Right: Sync {
    /// Rows at per-row offsets (see [`Shifted`]) rather than one after
    /// another `NR` apart.
    const SHIFTED: bool;
    fn k(&self) -> usize;
    fn cols(&self) -> usize;
    /// The first row's address (packed) or the panel's base and the row
    /// offsets from `k0` on (shifted).
    fn panel(&self, p: usize, k0: usize) -> (*const f32, *const usize);
}

impl Right for Packed {
    const SHIFTED: bool = false;
    fn k(&self) -> usize {
        self.k
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn panel(&self, p: usize, k0: usize) -> (*const f32, *const usize) {
        (
            self.data.as_ptr().wrapping_add((p * self.k + k0) * NR),
            std::ptr::null(),
        )
    }
}

/// A right operand read where it lies, unpacked: element `(k, c)` is
/// `data[offs[k] + c]`. A stride-1 convolution over a padded image is one
/// (see `conv`): each (channel, ky, kx) row of its im2col matrix is the
/// padded image shifted, so the kernel reads the image itself instead of a
/// nine-fold copy of it.
pub(crate) struct Shifted<'a> {
    data: &'a [f32],
    offs: &'a [usize],
    cols: usize,
}

impl<'a> Shifted<'a> {
    /// # Panics
    /// If a row, read to the end of its last panel, runs past `data`.
    pub(crate) fn new(data: &'a [f32], offs: &'a [usize], cols: usize) -> Self {
        let reach = cols.next_multiple_of(NR);
        assert!(
            offs.iter()
                .all(|&o| o.checked_add(reach).is_some_and(|e| e <= data.len())),
            "sgemm: a shifted row runs past its data"
        );
        Shifted { data, offs, cols }
    }
}

impl Right for Shifted<'_> {
    const SHIFTED: bool = true;
    fn k(&self) -> usize {
        self.offs.len()
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn panel(&self, p: usize, k0: usize) -> (*const f32, *const usize) {
        (
            self.data.as_ptr().wrapping_add(p * NR),
            self.offs.as_ptr().wrapping_add(k0),
        )
    }
}

/// The left operand: `rows` rows of `k` f32, row `i` at `data[i * ld..]`.
#[derive(Clone, Copy)]
pub(crate) struct Left<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub k: usize,
    pub ld: usize,
}

/// What is added to each finished sum.
#[derive(Clone, Copy)]
pub(crate) enum Bias<'a> {
    None,
    /// One value per output column (`x @ w.T + b`).
    Cols(&'a [f32]),
    /// One value per output row (a convolution's channels).
    Rows(&'a [f32]),
}

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks write disjoint blocks of the output.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `y = left · right + bias` into `y` (`[rows, cols]`, row stride `ldy`),
/// split over rayon.
///
/// # Panics
/// If the operands disagree or `y` is too small. The caller checks
/// [`available`].
pub(crate) fn product_into<R: Right>(left: Left<'_>, right: &R, y: &mut [f32], ldy: usize, bias: Bias<'_>) {
    // SAFETY: `y` is borrowed mutably for the call.
    unsafe { product_raw(left, right, y.as_mut_ptr(), y.len(), ldy, bias) }
}

/// `left · right + bias` as a new `[rows, cols]` vector, written by the
/// product alone: zeroing it first was a few percent of every product
/// (glibc's `calloc` clears reused heap memory).
pub(crate) fn product_new<R: Right>(left: Left<'_>, right: &R, bias: Bias<'_>) -> Vec<f32> {
    let (m, n) = (left.rows, right.cols());
    let len = m * n;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the product writes every element of its `m x n` output
    // (each tile stores its sums, zero for k = 0, before any chunk reads
    // them back) and reads none before writing it; so all `len` are
    // initialised when the length is set.
    unsafe {
        product_raw(left, right, y.as_mut_ptr(), len, n, bias);
        y.set_len(len);
    }
    y
}

/// [`product_into`] into `ylen` elements at `y`.
///
/// # Safety
/// `y` must be valid for writes of `ylen` elements, not aliased during the
/// call; an element is read only after the call has written it.
unsafe fn product_raw<R: Right>(left: Left<'_>, right: &R, y: *mut f32, ylen: usize, ldy: usize, bias: Bias<'_>) {
    let (m, n, k) = (left.rows, right.cols(), left.k);
    let isa = isa();
    assert!(isa.is_some() && k == right.k(), "sgemm: operands disagree");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldy >= n && (m - 1) * ldy + n <= ylen);
    assert!(k == 0 || ((m - 1) * left.ld + k <= left.data.len() && left.ld >= k));
    match bias {
        Bias::Cols(b) => assert!(b.len() >= n),
        Bias::Rows(b) => assert!(b.len() >= m),
        Bias::None => {}
    }
    let out = Out(y);
    let panels = n.div_ceil(NR);
    let want = 4 * rayon::current_num_threads().max(1);
    let (mut tr, mut tp) = (TASK_ROWS, TASK_PANELS);
    while m.div_ceil(tr) * panels.div_ceil(tp) < want && (tr > MR || tp > 1) {
        if tr > MR && (tr * 4 >= tp * NR || tp == 1) {
            tr = (tr / 2).next_multiple_of(MR).max(MR);
        } else {
            tp = (tp / 2).max(1);
        }
    }
    // The left operand tile by tile as [k][12] (zero rows past the
    // matrix): one pointer walks a tile, so the kernel keeps its 24 sums
    // and both panel vectors in registers. Packed once for all tasks where
    // several groups of panels would each pack the same rows again (a
    // convolution's few weight rows against a wide image); else each task
    // packs its own, while they are in cache.
    let shared = (panels.div_ceil(tp) > 1).then(|| {
        let mut apack = vec![0f32; m.div_ceil(MR) * k * MR];
        if k > 0 {
            apack.par_chunks_mut(k * MR).enumerate().for_each(|(t, dst)| {
                pack_tile(left, t * MR, 0, k, dst, isa);
            });
        }
        apack
    });
    let shared = shared.as_deref();
    let tasks: Vec<(usize, usize)> = (0..m.div_ceil(tr))
        .flat_map(|i| (0..panels.div_ceil(tp)).map(move |j| (i, j)))
        .collect();
    tasks.into_par_iter().for_each(|(i, j)| {
        let rows = i * tr..((i + 1) * tr).min(m);
        let pans = j * tp..((j + 1) * tp).min(panels);
        // SAFETY: the ISA was detected above; the task writes rows `rows`
        // and the columns of panels `pans` only, inside `y` (asserted).
        unsafe {
            match isa {
                Some(Isa::Avx512) => task_avx512(left, shared, right, rows, pans, out, ldy, bias),
                _ => task_avx2(left, shared, right, rows, pans, out, ldy, bias),
            }
        };
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn task_avx512<R: Right>(
    left: Left<'_>,
    shared: Option<&[f32]>,
    right: &R,
    rows: std::ops::Range<usize>,
    pans: std::ops::Range<usize>,
    out: Out,
    ldy: usize,
    bias: Bias<'_>,
) {
    task::<R, true>(left, shared, right, rows, pans, out, ldy, bias)
}

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn task_avx2<R: Right>(
    left: Left<'_>,
    shared: Option<&[f32]>,
    right: &R,
    rows: std::ops::Range<usize>,
    pans: std::ops::Range<usize>,
    out: Out,
    ldy: usize,
    bias: Bias<'_>,
) {
    task::<R, false>(left, shared, right, rows, pans, out, ldy, bias)
}

/// One task's tiles on the AVX-512 (`WIDE`) or AVX2 kernels; inlined into
/// the wrapper that enables that ISA.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn task<R: Right, const WIDE: bool>(
    left: Left<'_>,
    shared: Option<&[f32]>,
    right: &R,
    rows: std::ops::Range<usize>,
    pans: std::ops::Range<usize>,
    out: Out,
    ldy: usize,
    bias: Bias<'_>,
) {
    let k = left.k;
    let n = right.cols();
    let kc = if WIDE { KC } else { KC_AVX2 };
    let chunks = k.div_ceil(kc).max(1);
    let tiles = rows.len().div_ceil(MR);
    let mut own = if shared.is_none() {
        vec![0f32; tiles * kc.min(k.max(1)) * MR]
    } else {
        Vec::new()
    };
    for ch in 0..chunks {
        let k0 = ch * kc;
        let kn = kc.min(k - k0.min(k));
        let (first, last) = (ch == 0, ch + 1 == chunks);
        if shared.is_none() {
            for t in 0..tiles {
                pack_tile(
                    left,
                    rows.start + t * MR,
                    k0,
                    kn,
                    &mut own[t * kn * MR..(t + 1) * kn * MR],
                    Some(if WIDE { Isa::Avx512 } else { Isa::Avx2 }),
                );
            }
        }
        for p in pans.clone() {
            let c0 = p * NR;
            let nc = NR.min(n - c0);
            let (panel, offs) = right.panel(p, k0);
            for t in 0..tiles {
                let r0 = rows.start + t * MR;
                let tile = Tile {
                    a: match shared {
                        Some(a) => a.as_ptr().add((r0 / MR * k + k0) * MR),
                        None => own.as_ptr().add(t * kn * MR),
                    },
                    b: panel,
                    offs,
                    kn,
                    c: out.at(r0 * ldy + c0),
                    ldc: ldy,
                    nr: MR.min(rows.end - r0),
                    nc,
                    first,
                    last,
                    bias,
                    r0,
                    c0,
                };
                match (WIDE, R::SHIFTED) {
                    (true, true) => tile.run::<true>(),
                    (true, false) => tile.run::<false>(),
                    (false, true) => tile.run_avx2::<true>(),
                    (false, false) => tile.run_avx2::<false>(),
                }
            }
        }
    }
}

/// Rows `r0 .. r0 + 12` of `left`, columns `k0 .. k0 + kn`, into `dst`
/// as `[kn][12]`, zero for rows past the matrix: by 16 x 16 transposes
/// (element by element it was 4% of a 1024-cube product).
///
/// # Panics
/// If `dst` is shorter than `kn * 12` or the rows run past `left`. `isa`
/// must be what [`isa`] detected.
fn pack_tile(left: Left<'_>, r0: usize, k0: usize, kn: usize, dst: &mut [f32], isa: Option<Isa>) {
    let nr = MR.min(left.rows - r0);
    assert!(dst.len() >= kn * MR);
    assert!(nr == 0 || kn == 0 || (r0 + nr - 1) * left.ld + k0 + kn <= left.data.len());
    // SAFETY: the ISA was detected; reads are masked to the rows' `kn`
    // columns and writes to `dst`'s first `kn * 12` (asserted above).
    unsafe {
        match isa {
            Some(Isa::Avx512) => pack_tile_avx512(left, r0, nr, k0, kn, dst),
            Some(Isa::Avx2) => pack_tile_avx2(left, r0, nr, k0, kn, dst),
            None => panic!("sgemm: no kernels on this CPU"),
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn pack_tile_avx2(left: Left<'_>, r0: usize, nr: usize, k0: usize, kn: usize, dst: &mut [f32]) {
    // Rows 0..8, then 8..12 (the upper half of that transpose is zeros).
    for i0 in [0, 8] {
        let ni = nr.saturating_sub(i0).min(8);
        for c0 in (0..kn).step_by(8) {
            let nk = 8.min(kn - c0);
            let mask = lanes(nk);
            let mut rows = [_mm256_setzero_ps(); 8];
            for (i, r) in rows.iter_mut().enumerate().take(ni) {
                *r = _mm256_maskload_ps(left.data.as_ptr().add((r0 + i0 + i) * left.ld + k0 + c0), mask);
            }
            let t = transpose8(rows);
            for (kk, v) in t.iter().enumerate().take(nk) {
                let d = dst.as_mut_ptr().add((c0 + kk) * MR + i0);
                if i0 == 0 {
                    _mm256_storeu_ps(d, *v);
                } else {
                    _mm_storeu_ps(d, _mm256_castps256_ps128(*v));
                }
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_tile_avx512(left: Left<'_>, r0: usize, nr: usize, k0: usize, kn: usize, dst: &mut [f32]) {
    for c0 in (0..kn).step_by(16) {
        let nk = 16.min(kn - c0);
        let mask: __mmask16 = if nk == 16 { !0 } else { (1u16 << nk) - 1 };
        let mut rows = [_mm512_setzero_si512(); 16];
        for (i, r) in rows.iter_mut().enumerate().take(nr) {
            *r = _mm512_maskz_loadu_epi32(mask, left.data.as_ptr().add((r0 + i) * left.ld + k0 + c0) as *const i32);
        }
        let t = transpose16(rows);
        for (kk, v) in t.iter().enumerate().take(nk) {
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add((c0 + kk) * MR) as *mut i32, 0x0fff, *v);
        }
    }
}

/// One register tile's work for one k chunk.
struct Tile<'a> {
    /// The packed rows ([k][12]).
    a: *const f32,
    /// The panel's first row (packed) or its base (shifted: row `kk` at
    /// `b + offs[kk]`).
    b: *const f32,
    offs: *const usize,
    kn: usize,
    c: *mut f32,
    ldc: usize,
    nr: usize,
    nc: usize,
    first: bool,
    last: bool,
    bias: Bias<'a>,
    r0: usize,
    c0: usize,
}

/// `$body` once for each row `$i` of a tile, `$i` a constant: the sums
/// are only ever indexed by constants, so they live in registers (loops
/// over the array, even of constant length, left them on the stack).
macro_rules! each_row {
    ($i:ident => $body:block) => {{
        each_row!(@ $i $body; 0 1 2 3 4 5 6 7 8 9 10 11)
    }};
    (@ $i:ident $body:block; $($n:literal)*) => {{
        $({
            const $i: usize = $n;
            $body
        })*
    }};
}

impl Tile<'_> {
    /// Start from zero (first chunk) or the stored partial sums, run the
    /// chunk's k, store the partial sums or (last chunk) the sums plus the
    /// bias, masked to the tile's rows and the panel's columns.
    #[inline(always)]
    unsafe fn run<const SHIFTED: bool>(&self) {
        const _: () = assert!(MR == 12, "each_row! unrolls 12 rows");
        let m0: __mmask16 = if self.nc >= 16 { !0 } else { (1u16 << self.nc) - 1 };
        let m1: __mmask16 = if self.nc >= 32 {
            !0
        } else if self.nc > 16 {
            (1u16 << (self.nc - 16)) - 1
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if !self.first {
            each_row!(I => {
                if I < self.nr {
                    let c = self.c.add(I * self.ldc);
                    acc[I][0] = _mm512_maskz_loadu_ps(m0, c);
                    acc[I][1] = _mm512_maskz_loadu_ps(m1, c.add(16));
                }
            });
        }
        let (mut a, mut b, mut offs) = (self.a, self.b, self.offs);
        for _ in 0..self.kn {
            let row = if SHIFTED {
                let r = self.b.add(*offs);
                offs = offs.add(1);
                r
            } else {
                b
            };
            let b0 = _mm512_loadu_ps(row);
            let b1 = _mm512_loadu_ps(row.add(16));
            // Each row's element is broadcast by the FMA itself (`{1to16}`,
            // once per panel vector): a separate broadcast takes an FP pipe
            // slot, and on Zen 4, which issues one 512-bit FMA per cycle,
            // the kernel ran at 41% of the FMA peak for that alone.
            each_row!(I => {
                fma_bcast::<I>(&mut acc[I][0], b0, a);
                fma_bcast::<I>(&mut acc[I][1], b1, a);
            });
            a = a.add(MR);
            if !SHIFTED {
                b = b.add(NR);
            }
        }
        let (bias0, bias1) = match (self.last, self.bias) {
            (true, Bias::Cols(bv)) => (
                _mm512_maskz_loadu_ps(m0, bv.as_ptr().add(self.c0)),
                _mm512_maskz_loadu_ps(m1, bv.as_ptr().add(self.c0 + 16)),
            ),
            _ => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        each_row!(I => {
            if I < self.nr {
                let (mut v0, mut v1) = (acc[I][0], acc[I][1]);
                if self.last {
                    match self.bias {
                        Bias::Cols(_) => {
                            v0 = _mm512_add_ps(v0, bias0);
                            v1 = _mm512_add_ps(v1, bias1);
                        }
                        Bias::Rows(bv) => {
                            let r = _mm512_set1_ps(bv[self.r0 + I]);
                            v0 = _mm512_add_ps(v0, r);
                            v1 = _mm512_add_ps(v1, r);
                        }
                        Bias::None => {}
                    }
                }
                let c = self.c.add(I * self.ldc);
                _mm512_mask_storeu_ps(c, m0, v0);
                _mm512_mask_storeu_ps(c.add(16), m1, v1);
            }
        });
    }
}

/// `$body` once for each row `$i` of a 6-row AVX2 block, `$i` a constant
/// (see [`each_row!`]).
macro_rules! each_of_six {
    ($i:ident => $body:block) => {{
        each_row!(@ $i $body; 0 1 2 3 4 5)
    }};
}

impl Tile<'_> {
    /// [`Tile::run`] on AVX2: the tile as four 6 x 16 blocks (rows 0..6,
    /// 6..12 by columns 0..16, 16..32), each over the whole chunk; the same
    /// FMAs per sum in the same order.
    #[inline(always)]
    unsafe fn run_avx2<const SHIFTED: bool>(&self) {
        for half in 0..2 {
            let c = half * 16;
            if c >= self.nc {
                break;
            }
            let masks = [lanes(self.nc - c), lanes(self.nc.saturating_sub(c + 8))];
            for r in [0, 6] {
                if r >= self.nr {
                    break;
                }
                self.block_avx2::<SHIFTED>(r, c, masks);
            }
        }
    }

    /// Rows `r .. r + 6`, columns `c .. c + 16` of the tile (`masks`: the
    /// columns that exist, per 8).
    #[inline(always)]
    unsafe fn block_avx2<const SHIFTED: bool>(&self, r: usize, c: usize, masks: [__m256i; 2]) {
        let nr = self.nr - r;
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        if !self.first {
            each_of_six!(I => {
                if I < nr {
                    let p = self.c.add((r + I) * self.ldc + c);
                    acc[I][0] = _mm256_maskload_ps(p, masks[0]);
                    acc[I][1] = _mm256_maskload_ps(p.add(8), masks[1]);
                }
            });
        }
        let (mut a, mut b, mut offs) = (self.a.add(r), self.b.add(c), self.offs);
        for _ in 0..self.kn {
            let row = if SHIFTED {
                let p = self.b.add(*offs + c);
                offs = offs.add(1);
                p
            } else {
                b
            };
            let b0 = _mm256_loadu_ps(row);
            let b1 = _mm256_loadu_ps(row.add(8));
            each_of_six!(I => {
                let x = _mm256_broadcast_ss(&*a.add(I));
                acc[I][0] = _mm256_fmadd_ps(x, b0, acc[I][0]);
                acc[I][1] = _mm256_fmadd_ps(x, b1, acc[I][1]);
            });
            a = a.add(MR);
            if !SHIFTED {
                b = b.add(NR);
            }
        }
        let col_bias = match (self.last, self.bias) {
            (true, Bias::Cols(bv)) => {
                let p = bv.as_ptr().add(self.c0 + c);
                Some([_mm256_maskload_ps(p, masks[0]), _mm256_maskload_ps(p.add(8), masks[1])])
            }
            _ => None,
        };
        each_of_six!(I => {
            if I < nr {
                let (mut v0, mut v1) = (acc[I][0], acc[I][1]);
                if self.last {
                    if let Some(cb) = col_bias {
                        v0 = _mm256_add_ps(v0, cb[0]);
                        v1 = _mm256_add_ps(v1, cb[1]);
                    } else if let Bias::Rows(bv) = self.bias {
                        let x = _mm256_set1_ps(bv[self.r0 + r + I]);
                        v0 = _mm256_add_ps(v0, x);
                        v1 = _mm256_add_ps(v1, x);
                    }
                }
                let p = self.c.add((r + I) * self.ldc + c);
                _mm256_maskstore_ps(p, masks[0], v0);
                _mm256_maskstore_ps(p.add(8), masks[1], v1);
            }
        });
    }
}

/// `acc += a[I] * b`, the scalar broadcast from memory by the FMA.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fma_bcast<const I: usize>(acc: &mut __m512, b: __m512, a: *const f32) {
    std::arch::asm!(
        "vfmadd231ps {acc}, {b}, dword ptr [{a} + {off}]{{1to16}}",
        acc = inout(zmm_reg) *acc,
        b = in(zmm_reg) b,
        a = in(reg) a,
        off = const I * 4,
        options(nostack, readonly, pure),
    );
}

/// `y = x w^T (+ bias)`: `x` `[m, k]` contiguous, `w` `[n, k]` contiguous,
/// `bias` `[n]`; returns `[m, n]`. Either the weights are packed once and
/// the rows stream past them, or the weights are the left operand (read
/// once, in L2-sized pieces) and the rows the packed right one, the product
/// transposed at the end: whichever copies less (256 x 2048 -> 2048: 11.0-11.6
/// ms against 13.0-14.8 with the weights packed).
pub(crate) fn linear(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Vec<f32> {
    // Packing the weights copies `n * k`; the other way round packs the
    // rows (`m * k`) and transposes the product (`m * n`, twice the work
    // of a copy).
    if n * k <= m * k + 2 * m * n {
        let left = Left {
            data: x,
            rows: m,
            k,
            ld: k,
        };
        let b = bias.map_or(Bias::None, Bias::Cols);
        return product_new(left, &Packed::from_columns(w, k, n, k), b);
    }
    let left = Left {
        data: w,
        rows: n,
        k,
        ld: k,
    };
    let b = bias.map_or(Bias::None, Bias::Rows);
    let yt = product_new(left, &Packed::from_columns(x, k, m, k), b);
    // In 16 x 16 blocks: element by element, the strided reads cost as
    // much as a small product (512 x 1024 out of k = 128: a third).
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = Out(y.as_mut_ptr());
    (0..m.div_ceil(16)).into_par_iter().for_each(|ib| {
        let ni = 16.min(m - ib * 16);
        // SAFETY: `available` (checked by the product above); block `ib`
        // reads rows `j < n`, columns `i < m` of `yt` and writes rows
        // `16 ib .. + ni` of `y` alone, inside its capacity.
        unsafe {
            match isa() {
                Some(Isa::Avx512) => transpose_rows(&yt, m, n, ib * 16, ni, out.at(ib * 16 * n)),
                _ => transpose_rows_avx2(&yt, m, n, ib * 16, ni, out.at(ib * 16 * n)),
            }
        }
    });
    // SAFETY: the blocks above wrote every row `i < m`, each whole.
    unsafe { y.set_len(m * n) };
    y
}

/// Rows `i0 .. i0 + ni` of the transpose of `src` (`[n, m]`) into `dst`
/// (`[ni, n]`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn transpose_rows(src: &[f32], m: usize, n: usize, i0: usize, ni: usize, dst: *mut f32) {
    assert!(ni <= 16 && i0 + ni <= m && src.len() >= n * m);
    let mask: __mmask16 = if ni == 16 { !0 } else { (1u16 << ni) - 1 };
    for j0 in (0..n).step_by(16) {
        let nj = 16.min(n - j0);
        let mut rows = [_mm512_setzero_si512(); 16];
        for (j, r) in rows.iter_mut().enumerate().take(nj) {
            *r = _mm512_maskz_loadu_epi32(mask, src.as_ptr().add((j0 + j) * m + i0) as *const i32);
        }
        let t = transpose16(rows);
        let jm: __mmask16 = if nj == 16 { !0 } else { (1u16 << nj) - 1 };
        for (i, v) in t.iter().enumerate().take(ni) {
            _mm512_mask_storeu_epi32(dst.add(i * n + j0) as *mut i32, jm, *v);
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn transpose_rows_avx2(src: &[f32], m: usize, n: usize, i0: usize, ni: usize, dst: *mut f32) {
    assert!(ni <= 16 && i0 + ni <= m && src.len() >= n * m);
    for g in (0..ni).step_by(8) {
        let nig = 8.min(ni - g);
        let mask = lanes(nig);
        for j0 in (0..n).step_by(8) {
            let nj = 8.min(n - j0);
            let mut rows = [_mm256_setzero_ps(); 8];
            for (j, r) in rows.iter_mut().enumerate().take(nj) {
                *r = _mm256_maskload_ps(src.as_ptr().add((j0 + j) * m + i0 + g), mask);
            }
            let t = transpose8(rows);
            let jm = lanes(nj);
            for (i, v) in t.iter().enumerate().take(nig) {
                _mm256_maskstore_ps(dst.add((g + i) * n + j0), jm, *v);
            }
        }
    }
}

/// f32 `a @ b` (`a [.., m, k]`, `b [.., k, n]`, validated by the caller),
/// or `None` where it does not apply: no AVX-512, another dtype, or a batch
/// layout [`Batched`](crate::batched::Batched) does not take.
pub(crate) fn matmul_tensor(a: &CTensor, b: &CTensor) -> candle_core::Result<Option<CTensor>> {
    if !available() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Ok(None);
    }
    let Some(p) = crate::batched::Batched::plan(a, b)? else {
        return Ok(None);
    };
    let (m, k, n) = (p.m, p.k, p.n);
    let (ag, al) = p.a.storage_and_layout();
    let (bg, bl) = p.b.storage_and_layout();
    let (asl, bsl) = (slice_of::<f32>(&ag, al)?, slice_of::<f32>(&bg, bl)?);
    let total: usize = p.out_dims().iter().product();
    let mut y: Vec<f32> = Vec::with_capacity(total);
    let mut right = None;
    for i in 0..total.checked_div(m * n).unwrap_or(0) {
        // A shared right operand is packed once for the whole batch.
        if i == 0 || !p.shared {
            let src = &bsl[p.b_at(i)..];
            right = Some(if p.b_rows {
                Packed::from_rows(src, k, n, n)
            } else {
                Packed::from_columns(src, k, n, k)
            });
        }
        let left = Left {
            data: &asl[i * m * k..],
            rows: m,
            k,
            ld: k,
        };
        if let Some(r) = &right {
            // SAFETY: batch `i`'s `m x n` block lies inside the capacity
            // and is written whole by the product (see `product_new`).
            unsafe { product_raw(left, r, y.as_mut_ptr().add(i * m * n), m * n, n, Bias::None) };
        }
    }
    // SAFETY: every batch's block was written whole above (an empty
    // product has no elements).
    unsafe { y.set_len(total) };
    Ok(Some(CTensor::from_vec(y, p.out_dims(), a.device())?))
}

/// f32 `linear` (`x [.., k]`, `w [n, k]`, `b [n]`, shapes checked by the
/// caller), or `None` where it does not apply: no AVX-512, another dtype,
/// weights that are not one contiguous block.
pub(crate) fn linear_tensor(x: &CTensor, w: &CTensor, b: Option<&CTensor>) -> candle_core::Result<Option<CTensor>> {
    let f = |t: &CTensor| t.dtype() == DType::F32;
    if !available() || !f(x) || !f(w) || !b.is_none_or(f) || !w.is_contiguous() {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let xd = x.dims();
    let m: usize = xd[..xd.len() - 1].iter().product();
    let x = x.contiguous()?;
    let b = b.map(|b| b.contiguous()).transpose()?;
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let bg = b.as_ref().map(|b| b.storage_and_layout());
    let bias = match &bg {
        Some((g, l)) => Some(slice_of::<f32>(g, l)?),
        None => None,
    };
    let y = linear(slice_of(&xg, xl)?, m, slice_of(&wg, wl)?, n, k, bias);
    let mut od = xd[..xd.len() - 1].to_vec();
    od.push(n);
    Ok(Some(CTensor::from_vec(y, od, w.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
    }

    /// Both orientations of `linear` (many rows: weights packed; few:
    /// weights as the left operand, transposed at the end) against f64.
    #[test]
    fn linear_matches_f64_both_ways() {
        if !available() {
            eprintln!("no AVX-512 or AVX2+FMA here: skipped");
            return;
        }
        for &(m, n, k) in &[(20, 300, 70), (300, 40, 33), (17, 17, 600), (33, 500, 100)] {
            let (x, w, b) = (values(m * k, 5), values(n * k, 6), values(n, 7));
            let y = linear(&x, m, &w, n, k, Some(&b));
            for i in 0..m {
                for j in 0..n {
                    let s: f64 = (0..k)
                        .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                        .sum::<f64>()
                        + b[j] as f64;
                    assert!(
                        (y[i * n + j] as f64 - s).abs() < 1e-5 * (k as f64).sqrt(),
                        "{m}x{n}x{k} at {i},{j}"
                    );
                }
            }
        }
    }

    /// The AVX2 kernels and packings give the AVX-512 ones' bits (on a
    /// CPU without AVX-512 both runs take AVX2, and the other tests check
    /// it against f64).
    #[test]
    fn avx2_matches_avx512_bit_for_bit() {
        if !available() {
            eprintln!("no AVX2+FMA here: skipped");
            return;
        }
        use std::sync::atomic::Ordering::Relaxed;
        for &(m, n, k) in &[(13, 70, 300), (300, 40, 33), (5, 129, 600), (100, 64, 520)] {
            let (x, w, b) = (values(m * k, 11), values(n * k, 12), values(n, 13));
            let run = |force: bool| {
                FORCE_AVX2.store(force, Relaxed);
                let y = linear(&x, m, &w, n, k, Some(&b));
                FORCE_AVX2.store(false, Relaxed);
                y
            };
            let (wide, narrow) = (run(false), run(true));
            assert!(
                wide.iter().zip(&narrow).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{m}x{n}x{k}"
            );
        }
    }

    #[test]
    fn products_match_f64_on_ragged_shapes() {
        if !available() {
            eprintln!("no AVX-512 or AVX2+FMA here: skipped");
            return;
        }
        // Ragged rows (tiles of 1..12), columns (partial panels), k over
        // one chunk; both packings and the operand read in place (its rows
        // in reverse order, a row's data padded to the end of its last
        // panel); both biases.
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 7), (25, 70, 300), (100, 64, 520), (7, 129, 17)] {
            let a = values(m * (k + 2), 1);
            let b = values(k * n, 2);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let (bc, br) = (values(n, 3), values(m, 4));
            let left = Left {
                data: &a,
                rows: m,
                k,
                ld: k + 2,
            };
            for (mode, bias) in [(0, Bias::None), (1, Bias::Cols(&bc)), (2, Bias::Rows(&br))] {
                let mut y1 = vec![f32::NAN; m * (n + 1)];
                let mut y2 = vec![f32::NAN; m * (n + 1)];
                product_into(left, &Packed::from_rows(&b, k, n, n), &mut y1, n + 1, bias);
                product_into(left, &Packed::from_columns(&bt, k, n, k), &mut y2, n + 1, bias);
                let mut in_place = vec![f32::NAN; k * n + n.next_multiple_of(NR)];
                let offs: Vec<usize> = (0..k).map(|kk| (k - 1 - kk) * n).collect();
                for kk in 0..k {
                    in_place[offs[kk]..][..n].copy_from_slice(&b[kk * n..][..n]);
                }
                // What lies past column n is read but never reaches a
                // written output: NaN there must not show.
                let mut y3 = vec![f32::NAN; m * (n + 1)];
                product_into(left, &Shifted::new(&in_place, &offs, n), &mut y3, n + 1, bias);
                for i in 0..m {
                    for j in 0..n {
                        let s: f64 = (0..k).map(|kk| a[i * (k + 2) + kk] as f64 * b[kk * n + j] as f64).sum();
                        let want = s + match mode {
                            1 => bc[j] as f64,
                            2 => br[i] as f64,
                            _ => 0.0,
                        };
                        let (g1, g2) = (y1[i * (n + 1) + j], y2[i * (n + 1) + j]);
                        assert_eq!(g1.to_bits(), g2.to_bits(), "packings differ at {i},{j}");
                        assert_eq!(
                            g1.to_bits(),
                            y3[i * (n + 1) + j].to_bits(),
                            "in place differs at {i},{j}"
                        );
                        assert!(
                            (g1 as f64 - want).abs() < 1e-5 * (k as f64).sqrt(),
                            "{m}x{n}x{k} {mode}: {g1} vs {want}"
                        );
                    }
                    // The padding column is never written.
                    assert!(y1[i * (n + 1) + n].is_nan() && y3[i * (n + 1) + n].is_nan());
                }
            }
        }
    }
}
