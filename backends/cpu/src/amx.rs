//! bf16 matrix products on AMX tiles (Intel Sapphire Rapids and later).
//!
//! Without this, every bf16 product here widens both operands to f32 and
//! runs the f32 gemm: the weights are converted on every call and the
//! arithmetic is f32's (about 300 GFLOP/s on two cores). `tdpbf16ps`
//! multiplies bf16 pairs exactly and accumulates in f32, eight times the
//! AVX-512 FMA rate (2.2 TFLOP/s per core measured on the bench machine),
//! so the result is the f32 gemm's up to summation order, rounded once to
//! bf16 as PyTorch's CPU bf16 gemm rounds. The one other difference is
//! AMX's: f32 denormals in the accumulators are flushed to zero.
//!
//! The operands: the left one is read straight from memory (rows with k
//! contiguous: a weight matrix `[N, K]`, activations `[M, K]`), 16 rows by
//! 32 k per tile; the right one is repacked once per call into tiles of
//! 16 k-pairs by 16 columns ([`Packed`]). Each task owns a block of
//! output tiles (at most 256 x 256), runs four accumulator tiles over K
//! (in chunks of `KC` k, spilling the accumulators between chunks so the
//! operands of one chunk stay in L2), and hands each finished 16 x 16 f32
//! tile to the caller's epilogue, which rounds and stores it.
//!
//! Where there are no tiles but AVX512-BF16 is there, the same operands and
//! block epilogue run on `vdpbf16ps` ([`crate::dpbf16`]): [`available`]
//! says whether either can, and every entry point here takes whichever it
//! is. `EMU_CPU_AMX=0` turns both off (everything then takes the f32 route,
//! as on CPUs with neither).

use crate::convert::{bits, bits_mut, slice_of};
use candle_core::{DType, Tensor as CTensor};
use half::bf16;
use rayon::prelude::*;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// k per tile (32 bf16 = 64 bytes per tile row).
const TK: usize = 32;
/// Rows and columns of a tile (f32 accumulators are 16 x 16).
const TR: usize = 16;
/// u16 elements in one operand tile.
const TILE: usize = TR * TK;
/// Tile blocks of k per chunk (512 k): a chunk's operands, 2 x 256 rows
/// x 1 KiB, stay in L2 with the spilled accumulators (8, 16 and 32 timed
/// within noise of each other on 1024^3).
const KC: usize = 16;
/// Largest task in tiles per side (256 rows or columns).
const CHUNK: usize = 16;

/// Whether bf16 products can run here: on AMX tiles ([`tiles`]) or, where
/// there are none, on AVX512-BF16 dot products ([`crate::dpbf16`]), unless
/// `EMU_CPU_AMX` is `0`.
pub(crate) fn available() -> bool {
    tiles() || crate::dpbf16::available()
}

/// `EMU_CPU_AMX` is not `0`: it turns off both bf16 product paths.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("EMU_CPU_AMX").map_or(true, |v| v.trim() != "0"))
}

/// Whether the CPU has AMX-BF16, the OS enables tile state and this
/// process may use it (Linux asks each process to request it), and
/// `EMU_CPU_AMX` is not `0`. Decided once per process.
pub(crate) fn tiles() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| enabled() && detect())
}

fn detect() -> bool {
    if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl"))
    {
        return false;
    }
    let (max, l1, l7) = (__cpuid(0).eax, __cpuid(1), __cpuid_count(7, 0));
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    const OSXSAVE: u32 = 1 << 27;
    if max < 7 || l7.edx & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE || l1.ecx & OSXSAVE == 0 {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: OSXSAVE (checked) means xgetbv is available; XCR0 is index 0.
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack)) };
    // XTILECFG and XTILEDATA state components (bits 17 and 18).
    if lo & (3 << 17) != 3 << 17 {
        return false;
    }
    request_permission()
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's
    // permitted xsave features; it fails cleanly on kernels without AMX.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// Palette 1, tiles 0-7 all 16 rows of 64 bytes: 0-3 accumulate, 4-5 hold
/// the left operand's two row blocks, 6-7 the right operand's two column
/// blocks.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = (TK * 2) as u8;
        c[48 + t] = TR as u8;
        t += 1;
    }
    TileConfig(c)
};

/// The tile configuration of the running thread, released on drop. Tasks
/// never call into rayon while it is held, so no other task interleaves
/// on the thread.
struct Tiles;

impl Tiles {
    /// # Safety
    /// [`available`] must have returned true.
    unsafe fn load() -> Self {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a configuration was loaded by `Tiles::load`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

macro_rules! tload {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride,
            options(nostack, readonly))
    };
}
macro_rules! tstore {
    ($t:literal, $p:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) 64usize,
            options(nostack))
    };
}
macro_rules! tzero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
    };
}
macro_rules! tdp {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem)
        )
    };
}

/// The right operand of a product in tiles: for each block of 16 columns
/// and each block of 32 k, 16 rows (k pairs) of 16 columns x 2 bf16
/// (`t[r][c] = (b(k0 + 2r, c0 + c), b(k0 + 2r + 1, c0 + c))`), zero past
/// the matrix.
pub(crate) struct Packed {
    data: Vec<u16>,
    cols: usize,
    k: usize,
    kblocks: usize,
}

impl Packed {
    fn new(k: usize, cols: usize) -> Self {
        let kblocks = k.div_ceil(TK);
        Packed {
            data: vec![0u16; cols.div_ceil(TR) * kblocks * TILE],
            cols,
            k,
            kblocks,
        }
    }

    fn cblocks(&self) -> usize {
        self.cols.div_ceil(TR)
    }

    /// From a matrix whose column `c` has its k values contiguous: element
    /// `(k, c)` at `src[c * ld + k]` (activations `[M, K]` as the right
    /// operand of a linear layer, or the keys of `q k^T`).
    pub(crate) fn from_columns(src: &[u16], k: usize, cols: usize, ld: usize) -> Self {
        let mut p = Packed::new(k, cols);
        assert!(cols == 0 || k == 0 || ((cols - 1) * ld + k <= src.len() && ld >= k));
        let kb = p.kblocks;
        if kb == 0 {
            return p;
        }
        p.data.par_chunks_mut(kb * TILE).enumerate().for_each(|(cb, dst)| {
            // SAFETY: AVX-512 F/BW/VL are part of `available` (callers check
            // it); the assert above bounds every row read.
            unsafe { pack_columns(src, k, cols, ld, cb, dst) }
        });
        p
    }

    /// From a row-major `[K, cols]` matrix: element `(k, c)` at
    /// `src[k * ld + c]` (the right operand of `x @ b`, an im2col buffer).
    pub(crate) fn from_rows(src: &[u16], k: usize, cols: usize, ld: usize) -> Self {
        let mut p = Packed::new(0, 0);
        p.repack_rows(src, k, cols, ld);
        p
    }

    /// [`Self::from_rows`] into this buffer, reusing its memory (a
    /// convolution packs one im2col tile after another). Every element of
    /// the used part is written, so the buffer is never cleared.
    pub(crate) fn repack_rows(&mut self, src: &[u16], k: usize, cols: usize, ld: usize) {
        assert!(cols == 0 || k == 0 || ((k - 1) * ld + cols <= src.len() && ld >= cols));
        let kb = k.div_ceil(TK);
        let len = cols.div_ceil(TR) * kb * TILE;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        (self.k, self.cols, self.kblocks) = (k, cols, kb);
        if kb == 0 {
            return;
        }
        self.data[..len]
            .par_chunks_mut(kb * TILE)
            .enumerate()
            .for_each(|(cb, dst)| {
                // SAFETY: as in `from_columns`.
                unsafe { pack_rows(src, k, cols, ld, cb, dst) }
            });
    }

    fn tile(&self, cb: usize, kb: usize) -> *const u16 {
        self.data[(cb * self.kblocks + kb) * TILE..].as_ptr()
    }

    /// Column block `cb`: its k pairs one after another, 16 columns x 2
    /// bf16 each, through the whole (zero-padded) k.
    pub(crate) fn column_block(&self, cb: usize) -> *const u16 {
        self.tile(cb, 0)
    }
}

/// Column block `cb` of [`Packed::from_columns`] into `dst`. Viewed as
/// u32 pairs each tile is the 16 x 16 transpose of the source block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_columns(src: &[u16], k: usize, cols: usize, ld: usize, cb: usize, dst: &mut [u16]) {
    let c0 = cb * TR;
    let nc = TR.min(cols - c0);
    for (b, tile) in dst.chunks_exact_mut(TILE).enumerate() {
        let k0 = b * TK;
        let nk = TK.min(k - k0);
        // Reads are masked to the nk valid k of the nc valid rows.
        let mask: __mmask32 = if nk == TK { !0 } else { (1u32 << nk) - 1 };
        let mut rows = [_mm512_setzero_si512(); 16];
        for (c, r) in rows.iter_mut().enumerate().take(nc) {
            *r = _mm512_maskz_loadu_epi16(mask, src.as_ptr().add((c0 + c) * ld + k0) as *const i16);
        }
        let t = transpose16(rows);
        for (r, v) in t.iter().enumerate() {
            _mm512_storeu_si512(tile.as_mut_ptr().add(r * 32) as *mut _, *v);
        }
    }
}

/// Column block `cb` of [`Packed::from_rows`] into `dst`: rows k and k+1
/// interleaved.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_rows(src: &[u16], k: usize, cols: usize, ld: usize, cb: usize, dst: &mut [u16]) {
    let c0 = cb * TR;
    let nc = TR.min(cols - c0);
    // Reads are masked to the nc valid columns of rows that exist.
    let mask: __mmask16 = if nc == TR { !0 } else { (1u16 << nc) - 1 };
    let row = |kk: usize| {
        if kk < k {
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                mask,
                src.as_ptr().add(kk * ld + c0) as *const i16,
            ))
        } else {
            _mm512_setzero_si512()
        }
    };
    for (b, tile) in dst.chunks_exact_mut(TILE).enumerate() {
        let k0 = b * TK;
        for r in 0..TR {
            let v = _mm512_or_si512(row(k0 + 2 * r), _mm512_slli_epi32::<16>(row(k0 + 2 * r + 1)));
            _mm512_storeu_si512(tile.as_mut_ptr().add(r * 32) as *mut _, v);
        }
    }
}

/// The left operand: `rows` rows of `k` bf16 (as bits), row `i` at
/// `data[i * ld..]`.
#[derive(Clone, Copy)]
pub(crate) struct Left<'a> {
    pub data: &'a [u16],
    pub rows: usize,
    pub k: usize,
    pub ld: usize,
}

/// 16 x 16 transpose of 32-bit lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
pub(crate) unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + c], 128-bit lane l: rows 4i..4i+3 of column 4l + c.
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    let mut o = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let e = _mm512_shuffle_i32x4::<0x88>(b[c], b[4 + c]);
        let f = _mm512_shuffle_i32x4::<0xdd>(b[c], b[4 + c]);
        let g = _mm512_shuffle_i32x4::<0x88>(b[8 + c], b[12 + c]);
        let h = _mm512_shuffle_i32x4::<0xdd>(b[8 + c], b[12 + c]);
        o[c] = _mm512_shuffle_i32x4::<0x88>(e, g);
        o[8 + c] = _mm512_shuffle_i32x4::<0xdd>(e, g);
        o[4 + c] = _mm512_shuffle_i32x4::<0x88>(f, h);
        o[12 + c] = _mm512_shuffle_i32x4::<0xdd>(f, h);
    }
    o
}

/// A finished 16 x 16 block of f32 sums, `t[r * 16 + c]` for left row
/// `r0 + r` and right column `c0 + c` (rows and columns past the operands
/// hold zeros).
pub(crate) type Block = [f32; TR * TR];

/// Calls `out(r0, c0, &block)` once for every 16 x 16 block of
/// `left · right`, from rayon's threads (each block exactly once).
///
/// # Panics
/// If the operands' k differ. The caller checks [`available`] first.
pub(crate) fn gemm<F: Fn(usize, usize, &Block) + Sync>(left: Left<'_>, right: &Packed, out: F) {
    assert_eq!(left.k, right.k, "amx gemm: k differs");
    assert!(available(), "amx gemm without AMX");
    assert!(
        left.rows == 0 || left.k == 0 || ((left.rows - 1) * left.ld + left.k <= left.data.len() && left.ld >= left.k)
    );
    let (rb, cb) = (left.rows.div_ceil(TR), right.cblocks());
    if rb == 0 || cb == 0 {
        return;
    }
    // Tasks of up to CHUNK x CHUNK tiles, smaller until there are a few
    // per thread (pairs stay whole: the kernel runs 2 x 2 tiles).
    let want = 4 * rayon::current_num_threads().max(1);
    let (mut rc, mut cc) = (CHUNK.min(rb.next_multiple_of(2)), CHUNK.min(cb.next_multiple_of(2)));
    while rb.div_ceil(rc) * cb.div_ceil(cc) < want && (rc > 2 || cc > 2) {
        if rc >= cc {
            rc = (rc / 2).max(2);
        } else {
            cc = (cc / 2).max(2);
        }
    }
    let tasks: Vec<(usize, usize)> = (0..rb.div_ceil(rc))
        .flat_map(|i| (0..cb.div_ceil(cc)).map(move |j| (i, j)))
        .collect();
    tasks.into_par_iter().for_each(|(i, j)| {
        let rows = i * rc..((i + 1) * rc).min(rb);
        let cols = j * cc..((j + 1) * cc).min(cb);
        let mut out = |r: usize, c: usize, b: &Block| out(r, c, b);
        // SAFETY: `available` was checked above; an AMX task holds the
        // tile state until it returns and makes no rayon calls meanwhile.
        unsafe { any_task(left, right, right.kblocks, rows, cols, &mut out) };
    });
}

/// [`gemm`] on the calling thread, over the first `left.k` k of `right`
/// (which may hold more: `left` is zero-padded to whole tiles, so its
/// extra k add nothing) and the blocks holding its first `cols` columns.
/// For callers that are already one of many parallel tasks.
///
/// # Panics
/// If `left.k` or `cols` exceed `right`'s. The caller checks [`available`].
pub(crate) fn product_here<F: FnMut(usize, usize, &Block)>(left: Left<'_>, right: &Packed, cols: usize, mut out: F) {
    assert!(
        left.k <= right.k && cols <= right.cols,
        "amx product: operands disagree"
    );
    assert!(available(), "amx product without AMX");
    assert!(
        left.rows == 0 || left.k == 0 || ((left.rows - 1) * left.ld + left.k <= left.data.len() && left.ld >= left.k)
    );
    let (rb, cb) = (left.rows.div_ceil(TR), cols.div_ceil(TR));
    if rb == 0 || cb == 0 {
        return;
    }
    // SAFETY: checked above; no rayon calls while the tiles are held.
    unsafe { any_task(left, right, left.k.div_ceil(TK), 0..rb, 0..cb, &mut out) };
}

/// [`product_here`] into a row-major f32 `y` (`left.rows x cols`, row
/// stride `ldy`), the sums as they are (no rounding).
pub(crate) fn product_here_f32(left: Left<'_>, right: &Packed, cols: usize, y: &mut [f32], ldy: usize) {
    let rows = left.rows;
    assert!(rows == 0 || cols == 0 || (ldy >= cols && (rows - 1) * ldy + cols <= y.len()));
    product_here(left, right, cols, |r0, c0, blk| {
        let n = TR.min(cols - c0);
        for r in 0..TR.min(rows - r0) {
            y[(r0 + r) * ldy + c0..][..n].copy_from_slice(&blk[r * TR..r * TR + n]);
        }
    });
}

/// Where the left operand's tile `(row block, k block)` is: straight in
/// the matrix where the tile is whole, else in a zero-padded copy.
struct LeftTiles<'a> {
    left: Left<'a>,
    first: usize,
    pad: Vec<Pad>,
    kfull: usize,
    kblocks: usize,
}

enum Pad {
    /// All rows are there and k is a multiple of 32.
    None,
    /// Rows missing: the whole block, zero-padded (`kblocks * 32` wide).
    Block(Vec<u16>),
    /// k ragged: the block's last k tile, zero-padded.
    Tail(Vec<u16>),
}

impl<'a> LeftTiles<'a> {
    fn new(left: Left<'a>, blocks: std::ops::Range<usize>, kblocks: usize) -> Self {
        let kfull = left.k / TK;
        let pad = blocks
            .clone()
            .map(|rbk| {
                let r0 = rbk * TR;
                let nr = TR.min(left.rows - r0);
                if nr < TR {
                    let w = kblocks * TK;
                    let mut p = vec![0u16; TR * w];
                    for r in 0..nr {
                        p[r * w..r * w + left.k].copy_from_slice(&left.data[(r0 + r) * left.ld..][..left.k]);
                    }
                    Pad::Block(p)
                } else if kfull < kblocks {
                    let (k0, nk) = (kfull * TK, left.k - kfull * TK);
                    let mut p = vec![0u16; TILE];
                    for r in 0..TR {
                        p[r * TK..r * TK + nk].copy_from_slice(&left.data[(r0 + r) * left.ld + k0..][..nk]);
                    }
                    Pad::Tail(p)
                } else {
                    Pad::None
                }
            })
            .collect();
        LeftTiles {
            left,
            first: blocks.start,
            pad,
            kfull,
            kblocks,
        }
    }

    /// The first k tile that may come from a padded copy.
    fn split(&self) -> usize {
        if self.left.k.is_multiple_of(TK) {
            self.kblocks
        } else {
            self.kfull
        }
    }

    /// Pointer and byte stride of tile `(rbk, kb)`.
    #[inline(always)]
    fn at(&self, rbk: usize, kb: usize) -> (*const u16, usize) {
        match &self.pad[rbk - self.first] {
            Pad::Block(p) => (p[kb * TK..].as_ptr(), self.kblocks * TK * 2),
            Pad::Tail(p) if kb >= self.kfull => (p.as_ptr(), TK * 2),
            _ => (
                self.left.data[rbk * TR * self.left.ld + kb * TK..].as_ptr(),
                self.left.ld * 2,
            ),
        }
    }
}

/// [`task`] on AMX, else on [`crate::dpbf16`] (over `left.k`: past it the
/// left operand is zero, as a padded tile would be).
///
/// # Safety
/// [`available`] must hold and the operands fit (`gemm` and
/// `product_here` check).
unsafe fn any_task<F: FnMut(usize, usize, &Block)>(
    left: Left<'_>,
    right: &Packed,
    kblocks: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut F,
) {
    if tiles() {
        task(left, right, kblocks, rows, cols, out)
    } else {
        crate::dpbf16::task(left, right, rows, cols, out)
    }
}

/// One task: output blocks `rows x cols` (in tiles) over the first
/// `kblocks` k tiles.
///
/// # Safety
/// AMX must be available.
unsafe fn task<F: FnMut(usize, usize, &Block)>(
    left: Left<'_>,
    right: &Packed,
    kblocks: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut F,
) {
    let lt = LeftTiles::new(left, rows.clone(), kblocks);
    let chunks = kblocks.div_ceil(KC);
    let ncols = cols.len();
    // Accumulators spilled between k chunks, one tile per output block.
    let mut spill = if chunks > 1 {
        vec![0f32; rows.len() * ncols * TR * TR]
    } else {
        Vec::new()
    };
    let spill_at = spill.as_mut_ptr();
    let mut blocks = [[0f32; TR * TR]; 4];
    let _tiles = Tiles::load();
    for ch in 0..chunks {
        let ks = ch * KC..((ch + 1) * KC).min(kblocks);
        let (first, last) = (ch == 0, ch + 1 == chunks);
        for r in rows.clone().step_by(2) {
            let nr = (rows.end - r).min(2);
            for c in cols.clone().step_by(2) {
                let nc = (cols.end - c).min(2);
                let slot = |i: usize, j: usize| {
                    let s = ((r - rows.start + i) * ncols + (c - cols.start + j)) * TR * TR;
                    spill_at.wrapping_add(s)
                };
                let acc: [*mut f32; 4] = if first {
                    [std::ptr::null_mut(); 4]
                } else {
                    [slot(0, 0), slot(0, 1), slot(1, 0), slot(1, 1)]
                };
                match (nr, nc) {
                    (2, 2) => kernel::<2, 2>(&lt, right, r, c, ks.clone(), acc),
                    (2, _) => kernel::<2, 1>(&lt, right, r, c, ks.clone(), acc),
                    (_, 2) => kernel::<1, 2>(&lt, right, r, c, ks.clone(), acc),
                    _ => kernel::<1, 1>(&lt, right, r, c, ks.clone(), acc),
                }
                if last {
                    if nr == 2 && nc == 2 {
                        for (t, b) in blocks.iter_mut().enumerate() {
                            store_acc(t, b.as_mut_ptr());
                        }
                    } else {
                        for i in 0..nr {
                            for j in 0..nc {
                                store_acc(2 * i + j, blocks[2 * i + j].as_mut_ptr());
                            }
                        }
                    }
                    for i in 0..nr {
                        for j in 0..nc {
                            out((r + i) * TR, (c + j) * TR, &blocks[2 * i + j]);
                        }
                    }
                } else {
                    for i in 0..nr {
                        for j in 0..nc {
                            store_acc(2 * i + j, slot(i, j));
                        }
                    }
                }
            }
        }
    }
}

/// Stores accumulator tile `t` (0-3) to 1 KiB at `p`.
#[inline(always)]
unsafe fn store_acc(t: usize, p: *mut f32) {
    match t {
        0 => tstore!("0", p),
        1 => tstore!("1", p),
        2 => tstore!("2", p),
        _ => tstore!("3", p),
    }
}

/// Accumulates `NR x NC` output tiles (left row blocks `r, r+1`, right
/// column blocks `c, c+1`) over k blocks `ks`, starting from zero or from
/// the spilled tiles in `acc` (indexed `2i + j`).
#[inline(always)]
unsafe fn kernel<const NR: usize, const NC: usize>(
    lt: &LeftTiles<'_>,
    right: &Packed,
    r: usize,
    c: usize,
    ks: std::ops::Range<usize>,
    acc: [*mut f32; 4],
) {
    if acc[0].is_null() {
        tzero!("0");
        tzero!("1");
        tzero!("2");
        tzero!("3");
    } else {
        tload!("0", acc[0], 64usize);
        if NC == 2 {
            tload!("1", acc[1], 64usize);
        }
        if NR == 2 {
            tload!("2", acc[2], 64usize);
            if NC == 2 {
                tload!("3", acc[3], 64usize);
            }
        }
    }
    // Whole k tiles step through memory at a fixed stride; a ragged last
    // one comes from its padded copy.
    let split = ks.end.min(lt.split()).max(ks.start);
    for (k0, n) in [(ks.start, split - ks.start), (split, ks.end - split)] {
        if n == 0 {
            continue;
        }
        let (a0, s0) = lt.at(r, k0);
        let (a1, s1) = if NR == 2 { lt.at(r + 1, k0) } else { (a0, s0) };
        let b0 = right.tile(c, k0);
        let b1 = if NC == 2 { right.tile(c + 1, k0) } else { b0 };
        steps::<NR, NC>([a0, a1], [s0, s1], [b0, b1], n);
    }
}

/// `n` k tiles from the given tiles on: the left ones advance 32 k, the
/// right ones one packed tile, per step.
#[inline(always)]
unsafe fn steps<const NR: usize, const NC: usize>(a: [*const u16; 2], sa: [usize; 2], b: [*const u16; 2], n: usize) {
    let ([mut a0, mut a1], [mut b0, mut b1]) = (a, b);
    // Loads interleaved with the products: tile registers are not
    // renamed, so a load into a tile waits for the products reading it;
    // in this order each load overlaps products on other tiles.
    for _ in 0..n {
        tload!("4", a0, sa[0]);
        tload!("6", b0, 64usize);
        tdp!("0", "4", "6");
        if NC == 2 {
            tload!("7", b1, 64usize);
            tdp!("1", "4", "7");
        }
        if NR == 2 {
            tload!("5", a1, sa[1]);
            tdp!("2", "5", "6");
            if NC == 2 {
                tdp!("3", "5", "7");
            }
        }
        a0 = a0.wrapping_add(TK);
        a1 = a1.wrapping_add(TK);
        b0 = b0.wrapping_add(TILE);
        b1 = b1.wrapping_add(TILE);
    }
}

/// Rounds 16 f32 to bf16 bits (nearest-even, NaN kept quiet), bit for bit
/// `half::bf16::from_f32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn narrow16(v: __m512) -> __m256i {
    let x = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb));
    let nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff)),
        _mm512_set1_epi32(0x7f80_0000),
    );
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x0040));
    _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn widen16(p: *const u16, mask: __mmask16) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(mask, p as *const i16),
    )))
}

/// A raw output pointer shared by the tasks, which write disjoint blocks.
#[derive(Clone, Copy)]
struct Out(*mut u16);
// SAFETY: every block of the output is written by exactly one task.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element `i` places past the start (a method, so closures
    /// capture the whole `Out` rather than its raw pointer).
    fn at(self, i: usize) -> *mut i16 {
        self.0.wrapping_add(i) as *mut i16
    }
}

/// How a block's sums become bf16 outputs.
#[derive(Clone, Copy)]
pub(crate) enum Bias<'a> {
    None,
    /// Added in f32 before the one rounding (PyTorch's `addmm`).
    Fused(&'a [u16]),
    /// Added after rounding the product, in f32 and rounded again (the
    /// product and a separate bf16 add).
    Rounded(&'a [u16]),
}

/// Block `b` (left rows = output columns `n0..`, right columns = output
/// rows `m0..`) transposed into the `m x n` output, masked to the valid
/// rows and columns, with the bias.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_transposed(b: &Block, out: Out, n0: usize, m0: usize, n: usize, m: usize, bias: Bias<'_>) {
    let (nn, nm) = (TR.min(n - n0), TR.min(m - m0));
    let nmask: __mmask16 = if nn == TR { !0 } else { (1u16 << nn) - 1 };
    let mut rows = [_mm512_setzero_si512(); 16];
    for (r, v) in rows.iter_mut().enumerate() {
        *v = _mm512_loadu_si512(b.as_ptr().add(r * TR) as *const _);
    }
    let t = transpose16(rows);
    let bias_v = match bias {
        Bias::Fused(bv) | Bias::Rounded(bv) => widen16(bv.as_ptr().add(n0), nmask),
        Bias::None => _mm512_setzero_ps(),
    };
    for (j, v) in t.iter().enumerate().take(nm) {
        let h = finish(_mm512_castsi512_ps(*v), bias, bias_v);
        _mm256_mask_storeu_epi16(out.at((m0 + j) * n + n0), nmask, h);
    }
}

/// Block `b` into rows `r0..` and columns `c0..` of `y` (row stride `ldy`),
/// the bias per row.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_rows(b: &Block, out: Out, r0: usize, c0: usize, rows: usize, cols: usize, ldy: usize, bias: Bias<'_>) {
    let (nr, nc) = (TR.min(rows - r0), TR.min(cols - c0));
    let cmask: __mmask16 = if nc == TR { !0 } else { (1u16 << nc) - 1 };
    for r in 0..nr {
        let bias_v = match bias {
            Bias::Fused(bv) | Bias::Rounded(bv) => _mm512_set1_ps(f32::from_bits((bv[r0 + r] as u32) << 16)),
            Bias::None => _mm512_setzero_ps(),
        };
        let h = finish(_mm512_loadu_ps(b.as_ptr().add(r * TR)), bias, bias_v);
        _mm256_mask_storeu_epi16(out.at((r0 + r) * ldy + c0), cmask, h);
    }
}

/// 16 sums to bf16 with the bias (`bias_v`, widened) as `bias` says.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn finish(v: __m512, bias: Bias<'_>, bias_v: __m512) -> __m256i {
    match bias {
        Bias::None => narrow16(v),
        Bias::Fused(_) => narrow16(_mm512_add_ps(v, bias_v)),
        Bias::Rounded(_) => {
            let p = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(narrow16(v))));
            narrow16(_mm512_add_ps(p, bias_v))
        }
    }
}

/// `y = x w^T (+ bias)` in bf16: `x` `[m, k]` (row stride `ldx`), `w`
/// `[n, k]` contiguous, `bias` `[n]`; returns `[m, n]` row-major.
pub(crate) fn linear(x: &[u16], m: usize, ldx: usize, w: &[u16], n: usize, k: usize, bias: Bias<'_>) -> Vec<bf16> {
    // The weights are the left operand (read in place), the activations
    // the packed right one; blocks come out transposed (`n x m`).
    let right = Packed::from_columns(x, k, m, ldx);
    let mut y: Vec<bf16> = Vec::with_capacity(m * n);
    let out = Out(y.as_mut_ptr() as *mut u16);
    let left = Left {
        data: w,
        rows: n,
        k,
        ld: k,
    };
    gemm(left, &right, |n0, m0, b| {
        // SAFETY: AVX-512 (gemm checked `available`); rows m0.. and
        // columns n0.. of the output are this block's alone.
        unsafe { store_transposed(b, out, n0, m0, n, m, bias) }
    });
    // SAFETY: the blocks cover every (row, column) of the m x n output once.
    unsafe { y.set_len(m * n) };
    y
}

/// `y = a · right (+ bias per left row)` in bf16 with the blocks in place
/// (`[rows, cols]` row-major with row stride `ldy`, into `y`).
pub(crate) fn product_into(left: Left<'_>, right: &Packed, y: &mut [u16], ldy: usize, bias: Bias<'_>) {
    let (rows, cols) = (left.rows, right.cols);
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(ldy >= cols && (rows - 1) * ldy + cols <= y.len());
    let out = Out(y.as_mut_ptr());
    gemm(left, right, |r0, c0, b| {
        // SAFETY: AVX-512 (gemm checked `available`); rows r0.., columns
        // c0.. of `y` belong to this block alone and lie inside it
        // (asserted above).
        unsafe { store_rows(b, out, r0, c0, rows, cols, ldy, bias) }
    });
}

/// [`product_into`] with the right operand read in place (AVX512-BF16
/// only, see [`crate::dpbf16::Shifted`]).
pub(crate) fn shifted_into(
    left: Left<'_>,
    right: &crate::dpbf16::Shifted<'_>,
    y: &mut [u16],
    ldy: usize,
    bias: Bias<'_>,
) {
    let (rows, cols) = (left.rows, right.cols());
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(ldy >= cols && (rows - 1) * ldy + cols <= y.len());
    if let Bias::Fused(b) | Bias::Rounded(b) = bias {
        assert!(b.len() >= rows);
    }
    let out = Out(y.as_mut_ptr());
    crate::dpbf16::shifted_gemm(left, right, |r0, c0, b| {
        // SAFETY: AVX-512 (`shifted_gemm` checked AVX512-BF16, which comes
        // with it); rows r0.., columns c0.. of `y` belong to this block
        // alone and lie inside it (asserted above).
        unsafe { store_rows(b, out, r0, c0, rows, cols, ldy, bias) }
    });
}

/// bf16 `linear` on tiles (`x [.., k]`, `w [n, k]`, `b [n]`, shapes
/// checked by the caller), or `None` where it does not apply: no AMX,
/// another dtype, weights that are not one contiguous block.
pub(crate) fn linear_tensor(x: &CTensor, w: &CTensor, b: Option<&CTensor>) -> candle_core::Result<Option<CTensor>> {
    let bf = |t: &CTensor| t.dtype() == DType::BF16;
    if !available() || !bf(x) || !bf(w) || !b.is_none_or(bf) || !w.is_contiguous() {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let xd = x.dims();
    let m: usize = xd[..xd.len() - 1].iter().product();
    if m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let b = b.map(|b| b.contiguous()).transpose()?;
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let bg = b.as_ref().map(|b| b.storage_and_layout());
    let bias = match &bg {
        Some((g, l)) => Bias::Fused(bits(slice_of::<bf16>(g, l)?)),
        None => Bias::None,
    };
    let y = linear(bits(slice_of(&xg, xl)?), m, k, bits(slice_of(&wg, wl)?), n, k, bias);
    let mut od = xd[..xd.len() - 1].to_vec();
    od.push(n);
    Ok(Some(CTensor::from_vec(y, od, w.device())?))
}

/// bf16 `a @ b` on tiles (`a [.., m, k]`, `b [.., k, n]`, validated by the
/// caller), or `None` where it does not apply: no AMX, another dtype, or a
/// batch layout [`Batched`](crate::batched::Batched) does not take.
pub(crate) fn matmul_tensor(a: &CTensor, b: &CTensor) -> candle_core::Result<Option<CTensor>> {
    if !available() || a.dtype() != DType::BF16 || b.dtype() != DType::BF16 {
        return Ok(None);
    }
    let Some(p) = crate::batched::Batched::plan(a, b)? else {
        return Ok(None);
    };
    let (m, k, n) = (p.m, p.k, p.n);
    let (ag, al) = p.a.storage_and_layout();
    let (bg, bl) = p.b.storage_and_layout();
    let (asl, bsl) = (bits(slice_of::<bf16>(&ag, al)?), bits(slice_of::<bf16>(&bg, bl)?));
    let mut y = vec![bf16::ZERO; p.out_dims().iter().product()];
    let mut right = None;
    for (i, yb) in bits_mut(&mut y).chunks_exact_mut(m * n).enumerate() {
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
            product_into(left, r, yb, n, Bias::None);
        }
    }
    Ok(Some(CTensor::from_vec(y, p.out_dims(), a.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<u16> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n)
            .map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0) as f32).to_bits())
            .collect()
    }

    fn f(b: u16) -> f64 {
        bf16::from_bits(b).to_f64()
    }

    /// Largest |got - want| over max |want|, with `want` in f64 and
    /// rounded to bf16 as the kernel's output is.
    fn rel(got: &[u16], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-30f64, |a, w| a.max(w.abs()));
        got.iter().zip(want).map(|(g, w)| (f(*g) - w).abs()).fold(0.0, f64::max) / scale
    }

    #[test]
    fn transpose_is_a_transpose() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        let src: Vec<i32> = (0..256).collect();
        // SAFETY: AVX-512 (implied by `available`).
        unsafe {
            let mut rows = [_mm512_setzero_si512(); 16];
            for (r, v) in rows.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(src[r * 16..].as_ptr() as *const _);
            }
            let t = transpose16(rows);
            let mut out = [0i32; 256];
            for (r, v) in t.iter().enumerate() {
                _mm512_storeu_si512(out[r * 16..].as_mut_ptr() as *mut _, *v);
            }
            for r in 0..16 {
                for c in 0..16 {
                    assert_eq!(out[r * 16 + c], src[c * 16 + r]);
                }
            }
        }
    }

    #[test]
    fn linear_matches_f64_on_ragged_shapes() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        // Ragged rows, columns and k; one k over KC tiles (spilled sums).
        for &(m, n, k) in &[
            (1, 1, 1),
            (33, 17, 37),
            (16, 16, 32),
            (70, 45, 100),
            (40, 50, 1100),
            (130, 300, 64),
        ] {
            let (x, w, bias) = (values(m * (k + 3), 1), values(n * k, 2), values(n, 3));
            let ldx = k + 3;
            for mode in 0..3 {
                let b = match mode {
                    0 => Bias::None,
                    1 => Bias::Fused(&bias),
                    _ => Bias::Rounded(&bias),
                };
                let y = linear(&x, m, ldx, &w, n, k, b);
                let y = bits(&y);
                let want: Vec<f64> = (0..m * n)
                    .map(|i| {
                        let (r, c) = (i / n, i % n);
                        let s: f64 = (0..k).map(|kk| f(x[r * ldx + kk]) * f(w[c * k + kk])).sum();
                        s + if mode == 0 { 0.0 } else { f(bias[c]) }
                    })
                    .collect();
                let e = rel(y, &want);
                assert!(e < 1e-2, "{m}x{n}x{k} mode {mode}: rel {e}");
            }
        }
    }

    #[test]
    fn fused_bias_rounds_once_like_f32_then_bf16() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        // With k = 2 the f32 sum is exact, so the result must equal the
        // exact value rounded once.
        let (m, n, k) = (20, 20, 2);
        let (x, w, bias) = (values(m * k, 4), values(n * k, 5), values(n, 6));
        let y = linear(&x, m, k, &w, n, k, Bias::Fused(&bias));
        let y = bits(&y);
        for (i, got) in y.iter().enumerate() {
            let (r, c) = (i / n, i % n);
            let s = (f(x[r * k]) * f(w[c * k]) + f(x[r * k + 1]) * f(w[c * k + 1])) as f32 + f(bias[c]) as f32;
            assert_eq!(*got, bf16::from_f32(s).to_bits(), "{r},{c}");
        }
    }

    #[test]
    fn products_from_rows_and_columns_agree() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        let (m, n, k) = (37, 29, 75);
        let a = values(m * k, 7);
        let b = values(k * n, 8);
        // b^T, so `from_columns` sees the same matrix.
        let bt: Vec<u16> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let left = Left {
            data: &a,
            rows: m,
            k,
            ld: k,
        };
        let mut y1 = vec![0u16; m * n];
        let mut y2 = vec![0u16; m * n];
        product_into(left, &Packed::from_rows(&b, k, n, n), &mut y1, n, Bias::None);
        product_into(left, &Packed::from_columns(&bt, k, n, k), &mut y2, n, Bias::None);
        assert_eq!(y1, y2);
        let want: Vec<f64> = (0..m * n)
            .map(|i| (0..k).map(|kk| f(a[(i / n) * k + kk]) * f(b[kk * n + i % n])).sum())
            .collect();
        assert!(rel(&y1, &want) < 1e-2);
    }
}
