//! 2-D convolution as im2col + one gemm per tile of output rows, in NCHW.
//!
//! candle's CPU convolution transposes the input to NHWC, gathers each
//! im2col tile element by element and scatters the gemm result back to
//! NCHW, which at VAE sizes (256x256 pixels, 128 channels) costs more than
//! the gemm itself. Here the im2col rows are built in NCHW order, so a
//! stride-1 row is a plain copy of an input row segment; the weights
//! `[O, C, KH, KW]` are already the `[O, C*KH*KW]` left operand; and gemm
//! writes each tile straight into its place in the NCHW output, starting
//! from the bias. 1x1 stride-1 convolutions need no im2col at all.

use candle_core::{Storage, Tensor as CTensor};
use rayon::prelude::*;

/// Elements of the im2col buffer per tile (8 MiB of f32): large enough that
/// each gemm has work for every thread, small enough to stay out of the way.
const TILE_ELEMS: usize = 1 << 21;

/// Elements of the padded input of one band of output rows on the in-place
/// route (32 MiB of f32): the VAE at 256 px runs in one band, and a
/// 1024 px image holds a band, not a padded copy of itself.
#[cfg(target_arch = "x86_64")]
const BAND_ELEMS: usize = 1 << 23;

/// Elements of the bf16 im2col tile (8 MiB, and as much again packed):
/// larger tiles than f32's, measured on the VAE (1<<18: 387 ms, 1<<21:
/// 294, 1<<22: 271), as each tile re-reads the weights and splits into
/// more tasks.
#[cfg(target_arch = "x86_64")]
const BF16_TILE_ELEMS: usize = 1 << 22;

/// [`BAND_ELEMS`], or a test's smaller band.
#[cfg(target_arch = "x86_64")]
fn band_elems() -> usize {
    #[cfg(test)]
    if let Some(v) = tests::BAND.with(|b| b.get()) {
        return v;
    }
    BAND_ELEMS
}

/// Convolution geometry, all in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub padding: (usize, usize),
    pub stride: usize,
    pub dilation: usize,
}

fn f32_slice<'a>(s: &'a Storage, t: &CTensor) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(s) = s else {
        candle_core::bail!("conv2d: not a cpu tensor")
    };
    let Some((a, b)) = t.layout().contiguous_offsets() else {
        candle_core::bail!("conv2d: operand is not contiguous")
    };
    Ok(&s.as_slice::<f32>()?[a..b])
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst[o, n] = (dst if accumulate) + sum_k lhs[o, k] * rhs[k, n]`, with
/// row strides `dst_rs`, `k` and `rhs_rs` and unit column strides.
fn gemm_rows(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
    dims: (usize, usize, usize),
    accumulate: bool,
) {
    let (m, n, k) = dims;
    if m == 0 || n == 0 {
        return;
    }
    // The bounds every access below stays within.
    assert!(n <= dst_rs && (m - 1) * dst_rs + n <= dst.len());
    assert!(lhs.len() >= m * k && (k == 0 || (k - 1) * rhs_rs + n <= rhs.len()));
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm reads or writes
    // inside the three slices, `dst` is borrowed mutably (no aliasing) and
    // f32 is one of gemm's types.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// Fills `row` (one output row of the im2col matrix, `ow` wide) from input
/// row `src` for a kernel column whose input offset is `off` (`ix = ox *
/// stride + off`); positions in the padding are zero.
fn gather_row<T: Copy + Default>(row: &mut [T], src: &[T], off: isize, stride: usize) {
    let (ow, wi, s) = (row.len() as isize, src.len() as isize, stride as isize);
    // First and one-past-last ox whose ix lies inside the input.
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s }.min(ow);
    let hi = if wi - off > 0 { (wi - off + s - 1) / s } else { 0 }.clamp(lo, ow);
    let (lo, hi) = (lo as usize, hi as usize);
    row[..lo].fill(T::default());
    row[hi..].fill(T::default());
    if stride == 1 {
        let start = (lo as isize + off) as usize;
        row[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
    } else {
        for (ox, r) in row[lo..hi].iter_mut().enumerate() {
            *r = src[((ox + lo) as isize * s + off) as usize];
        }
    }
}

/// The sizes of one convolution, checked against its operands.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    wi: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl Dims {
    fn new(x: &CTensor, w: &CTensor, g: Geometry) -> candle_core::Result<Self> {
        let (b, c, h, wi) = x.dims4()?;
        let (o, c2, kh, kw) = w.dims4()?;
        if c2 != c || g.stride == 0 || g.dilation == 0 {
            candle_core::bail!("conv2d: input {:?}, weight {:?}", x.dims(), w.dims());
        }
        let span = |n: usize, pad: usize, k: usize| {
            (n + 2 * pad)
                .checked_sub(g.dilation * (k - 1) + 1)
                .map(|v| v / g.stride + 1)
        };
        let (Some(oh), Some(ow)) = (span(h, g.padding.0, kh), span(wi, g.padding.1, kw)) else {
            candle_core::bail!("conv2d: kernel larger than the padded input")
        };
        Ok(Dims {
            b,
            c,
            h,
            wi,
            o,
            kh,
            kw,
            oh,
            ow,
        })
    }

    fn pointwise(&self, g: Geometry) -> bool {
        self.kh == 1 && self.kw == 1 && g.stride == 1 && g.padding == (0, 0)
    }

    /// Whether a stride-1 convolution runs on the padded image in place
    /// (see `conv2d_f32`): where the dropped columns and the last panel's
    /// padding are a small part of the work, 16 pixels wide and up (an
    /// 8-wide image computes half as much again, and ran slower than
    /// im2col).
    #[cfg(target_arch = "x86_64")]
    fn shifted_fits(&self, g: Geometry) -> bool {
        let cols = self.oh * (self.wi + 2 * g.padding.1);
        g.stride == 1 && self.c > 0 && self.oh * self.ow * 20 >= cols.next_multiple_of(crate::sgemm::NR) * 17
    }

    /// Bands `(first output row, rows)` of the in-place route, each with at
    /// most about `limit` elements of padded input (one output row at
    /// least), evenly split; and the most rows of any band.
    #[cfg(target_arch = "x86_64")]
    fn bands(&self, g: Geometry, limit: usize) -> (Vec<(usize, usize)>, usize) {
        let wp = self.wi + 2 * g.padding.1;
        let halo = g.dilation * (self.kh - 1);
        let most = (limit / (self.c * wp).max(1))
            .saturating_sub(halo)
            .clamp(1, self.oh.max(1));
        let n = self.oh.div_ceil(most).max(1);
        let rows = self.oh.div_ceil(n).max(1);
        let bands = (0..self.oh).step_by(rows).map(|r| (r, rows.min(self.oh - r))).collect();
        (bands, rows)
    }

    /// Padded-image rows `p0 .. p0 + dst.len() / (C * wp)` of image `xb`,
    /// channel by channel (`[C][rows][wp]`), zero outside the image.
    #[cfg(target_arch = "x86_64")]
    fn fill_band<T: Copy + Default + Send + Sync>(&self, g: Geometry, xb: &[T], p0: usize, dst: &mut [T]) {
        let (ph, pw) = g.padding;
        let wp = self.wi + 2 * pw;
        let plane = dst.len() / self.c.max(1);
        dst.par_chunks_mut(plane.max(1))
            .zip(xb.par_chunks((self.h * self.wi).max(1)))
            .for_each(|(dst, src)| {
                for (r, row) in dst.chunks_exact_mut(wp).enumerate() {
                    let iy = (p0 + r) as isize - ph as isize;
                    if iy < 0 || iy >= self.h as isize {
                        row.fill(T::default());
                    } else {
                        row[..pw].fill(T::default());
                        row[pw + self.wi..].fill(T::default());
                        row[pw..pw + self.wi].copy_from_slice(&src[iy as usize * self.wi..][..self.wi]);
                    }
                }
            });
    }

    /// The row offsets of the in-place operand over planes of `plane`
    /// elements: im2col row (c, ky, kx) at `c*plane + (ky*wp + kx)*dil`.
    #[cfg(target_arch = "x86_64")]
    fn shifted_offsets(&self, g: Geometry, plane: usize) -> Vec<usize> {
        let wp = self.wi + 2 * g.padding.1;
        (0..self.c)
            .flat_map(|ci| {
                (0..self.kh).flat_map(move |ky| (0..self.kw).map(move |kx| ci * plane + (ky * wp + kx) * g.dilation))
            })
            .collect()
    }

    /// The in-place route over every image of `xs` into `out`, band by
    /// band: `product(padded, offs, cols)` is the `[O, cols]` product of
    /// the weights with the band's padded input (row `k` at `offs[k]`,
    /// `cols` padded-width positions), whose dropped columns are then cut.
    /// `align` is the kernel's column block: rows are read to the end of
    /// it, past the last plane. With `pairs`, an odd k gets one more row
    /// pointing at zeros that no band writes (its weights are zero, and
    /// zero times a stale Inf would not be).
    #[cfg(target_arch = "x86_64")]
    fn in_place<T: Copy + Default + Send + Sync>(
        &self,
        g: Geometry,
        xs: &[T],
        out: &mut [T],
        (align, pairs): (usize, bool),
        product: impl Fn(&[T], &[usize], usize) -> Vec<T>,
    ) {
        let (oh, ow) = (self.oh, self.ow);
        let hw = oh * ow;
        let wp = self.wi + 2 * g.padding.1;
        let halo = g.dilation * (self.kh - 1);
        let (bands, most) = self.bands(g, band_elems());
        let zero_row = self.c * (most + halo) * wp + g.dilation * (self.kw - 1) + align;
        let mut padded = vec![T::default(); zero_row + (most * wp).next_multiple_of(align)];
        let images = out
            .chunks_exact_mut(self.o * hw)
            .zip(xs.chunks_exact(self.c * self.h * self.wi));
        for (ob, xb) in images {
            for &(oy0, nr) in &bands {
                let plane = (nr + halo) * wp;
                self.fill_band(g, xb, oy0, &mut padded[..self.c * plane]);
                let mut offs = self.shifted_offsets(g, plane);
                if pairs && offs.len() % 2 == 1 {
                    offs.push(zero_row);
                }
                let cols = nr * wp;
                let wide = product(&padded, &offs, cols);
                ob.par_chunks_mut(hw).zip(wide.par_chunks(cols)).for_each(|(dst, src)| {
                    for t in 0..nr {
                        dst[(oy0 + t) * ow..][..ow].copy_from_slice(&src[t * wp..][..ow]);
                    }
                });
            }
        }
    }

    /// Output rows per im2col tile of at most `elems` elements (one row at
    /// least).
    fn tile_rows_for(&self, elems: usize) -> usize {
        (elems / (self.c * self.kh * self.kw * self.ow).max(1)).clamp(1, self.oh.max(1))
    }

    /// The im2col rows of output rows `oy0..oy0 + nr` of one image `xb`
    /// into `col` (`[C*KH*KW, nr*OW]`).
    fn im2col<T: Copy + Default + Send + Sync>(&self, g: Geometry, xb: &[T], col: &mut [T], oy0: usize, nr: usize) {
        let d = *self;
        let tp = nr * d.ow;
        col.par_chunks_mut(tp).enumerate().for_each(|(r, dst)| {
            let (ci, ky, kx) = (r / (d.kh * d.kw), (r / d.kw) % d.kh, r % d.kw);
            let plane = &xb[ci * d.h * d.wi..(ci + 1) * d.h * d.wi];
            let off = (kx * g.dilation) as isize - g.padding.1 as isize;
            for (t, row) in dst.chunks_exact_mut(d.ow).enumerate() {
                let iy = ((oy0 + t) * g.stride + ky * g.dilation) as isize - g.padding.0 as isize;
                if iy < 0 || iy >= d.h as isize {
                    row.fill(T::default());
                } else {
                    let iy = iy as usize;
                    gather_row(row, &plane[iy * d.wi..(iy + 1) * d.wi], off, g.stride);
                }
            }
        });
    }

    /// Columns `j0 .. j0 + dst.len() / k` of the im2col matrix of output
    /// rows `oy0 ..` of image `xb` (`tp` columns in all), written straight
    /// into `dst` as `[k][width]` (row stride `width`), zero past `tp`: one
    /// panel of a packed right operand, built without the im2col buffer.
    #[allow(clippy::too_many_arguments)]
    fn im2col_panel<T: Copy + Default>(
        &self,
        g: Geometry,
        xb: &[T],
        oy0: usize,
        tp: usize,
        j0: usize,
        width: usize,
        dst: &mut [T],
    ) {
        let d = *self;
        let nj = width.min(tp.saturating_sub(j0));
        // The panel's columns as segments of output rows: (first column,
        // output row in the tile, first ox, length), the same for every k.
        let mut segs = [(0usize, 0usize, 0usize, 0usize); 8];
        let mut ns = 0;
        let mut j = 0;
        while j < nj && ns < segs.len() {
            let (t, ox) = ((j0 + j) / d.ow, (j0 + j) % d.ow);
            let n = (d.ow - ox).min(nj - j);
            segs[ns] = (j, t, ox, n);
            ns += 1;
            j += n;
        }
        // More than eight output rows in one panel (a very narrow output):
        // the rest column by column through the general path below.
        let rest = j;
        let (mut ci, mut ky, mut kx) = (0, 0, 0);
        for row in dst.chunks_exact_mut(width) {
            let plane = &xb[ci * d.h * d.wi..(ci + 1) * d.h * d.wi];
            let off = (kx * g.dilation) as isize - g.padding.1 as isize;
            row[nj..].fill(T::default());
            let segments = segs[..ns]
                .iter()
                .copied()
                .chain((rest..nj).map(|j| (j, (j0 + j) / d.ow, (j0 + j) % d.ow, 1)));
            for (j, t, ox, n) in segments {
                let seg = &mut row[j..j + n];
                let iy = ((oy0 + t) * g.stride + ky * g.dilation) as isize - g.padding.0 as isize;
                if iy < 0 || iy >= d.h as isize {
                    seg.fill(T::default());
                    continue;
                }
                let src = &plane[iy as usize * d.wi..(iy as usize + 1) * d.wi];
                let first = off + (ox * g.stride) as isize;
                if g.stride == 1 && first >= 0 && first as usize + n <= d.wi {
                    seg.copy_from_slice(&src[first as usize..first as usize + n]);
                } else {
                    gather_row(seg, src, first, g.stride);
                }
            }
            kx += 1;
            if kx == d.kw {
                (kx, ky) = (0, ky + 1);
                if ky == d.kh {
                    (ky, ci) = (0, ci + 1);
                }
            }
        }
    }

    /// The convolution of every image of `xs` into `out` as products of the
    /// weights (`[O, C*KH*KW]`) with a right operand: `product(right, tp,
    /// y)` with `right` `[C*KH*KW, tp]` (row stride `tp`) and `y` the
    /// output from the tile's first position on (row stride `OH*OW`). The
    /// right operand is the image itself for a 1x1 convolution, else an
    /// im2col tile of at most `tile_elems` elements.
    fn products<T: Copy + Default + Send + Sync>(
        &self,
        g: Geometry,
        xs: &[T],
        out: &mut [T],
        tile_elems: usize,
        mut product: impl FnMut(&[T], usize, &mut [T]),
    ) {
        let (hw, kk) = (self.oh * self.ow, self.c * self.kh * self.kw);
        let images = out
            .chunks_exact_mut(self.o * hw)
            .zip(xs.chunks_exact(self.c * self.h * self.wi));
        if self.pointwise(g) {
            for (ob, xb) in images {
                product(xb, hw, ob);
            }
            return;
        }
        let rows = self.tile_rows_for(tile_elems);
        let mut col = vec![T::default(); kk * rows * self.ow];
        for (ob, xb) in images {
            for oy0 in (0..self.oh).step_by(rows) {
                let nr = rows.min(self.oh - oy0);
                let tp = nr * self.ow;
                let col = &mut col[..kk * tp];
                self.im2col(g, xb, col, oy0, nr);
                product(col, tp, &mut ob[oy0 * self.ow..]);
            }
        }
    }
}

/// An f32 convolution with one group: `x` `[B, C, H, W]`, `w` `[O, C, KH,
/// KW]`, `bias` `[O]`, all contiguous f32 CPU tensors (validated by the
/// caller). Returns `[B, O, OH, OW]`.
pub(crate) fn conv2d_f32(
    x: &CTensor,
    w: &CTensor,
    bias: Option<&CTensor>,
    g: Geometry,
) -> candle_core::Result<CTensor> {
    let d = Dims::new(x, w, g)?;
    let (b, o, oh, ow) = (d.b, d.o, d.oh, d.ow);
    let (hw, kk) = (oh * ow, d.c * d.kh * d.kw);
    let (xs, _) = x.storage_and_layout();
    let xs = f32_slice(&xs, x)?;
    let (ws, _) = w.storage_and_layout();
    let ws = f32_slice(&ws, w)?;
    let mut out = vec![0f32; b * o * hw];
    #[cfg(target_arch = "x86_64")]
    if crate::sgemm::available() {
        // Our own kernel (see `sgemm`): the weights are the left operand,
        // each right operand packed; the bias is added to each finished sum.
        use crate::sgemm::{self, product_into, Bias, Left, Packed, Shifted};
        let bv: Option<Vec<f32>> = bias.map(|t| t.to_vec1()).transpose()?;
        let sb = bv.as_deref().map_or(Bias::None, Bias::Rows);
        let left = Left {
            data: ws,
            rows: o,
            k: kk,
            ld: kk,
        };
        let images = out.chunks_exact_mut(o * hw).zip(xs.chunks_exact(d.c * d.h * d.wi));
        let hwp = hw.next_multiple_of(sgemm::NR);
        let group = TILE_ELEMS / (kk * hwp).max(1);
        if b > 1 && group > 1 && !d.shifted_fits(g) {
            // Small images (the UNet's 8x8 latents): several in one
            // product, each from a panel boundary, so the weights are
            // packed once for all of them rather than once per image (a
            // tenth of the work at 64 columns an image).
            let mut packed = Packed::empty();
            let xs_img: Vec<&[f32]> = xs.chunks_exact(d.c * d.h * d.wi).collect();
            for (gi, imgs) in xs_img.chunks(group).enumerate() {
                packed.refill(kk, imgs.len() * hwp, |p, dst| {
                    let (img, j0) = (p * sgemm::NR / hwp, p * sgemm::NR % hwp);
                    d.im2col_panel(g, imgs[img], 0, hw, j0, sgemm::NR, dst)
                });
                let y = sgemm::product_new(left, &packed, sb);
                let ld = imgs.len() * hwp;
                let first = gi * group * o * hw;
                out[first..first + imgs.len() * o * hw]
                    .par_chunks_mut(hw)
                    .enumerate()
                    .for_each(|(r, dst)| {
                        let (img, oc) = (r / o, r % o);
                        dst.copy_from_slice(&y[oc * ld + img * hwp..][..hw]);
                    });
            }
        } else if d.pointwise(g) {
            for (ob, xb) in images {
                product_into(left, &Packed::from_rows(xb, kk, hw, hw), ob, hw, sb);
            }
        } else if d.shifted_fits(g) {
            // Stride 1: the zero-padded image is the right operand where it
            // lies (`sgemm::Shifted`): with output positions counted over
            // the padded width, im2col row (c, ky, kx) is the padded image
            // from `c*plane + ky*dil*wp + kx*dil` on. The kernel reads one
            // padded copy of the input instead of building nine; the few
            // columns past each output row are computed and dropped. In
            // bands of output rows, so the copies stay a bounded size.
            d.in_place(g, xs, &mut out, (sgemm::NR, false), |padded, offs, cols| {
                sgemm::product_new(left, &Shifted::new(padded, offs, cols), sb)
            });
        } else {
            // Each tile's im2col columns go straight into the packed
            // panels (one buffer, reused): building the im2col matrix and
            // then packing it was a third of the VAE's time in copies.
            let rows = d.tile_rows_for(TILE_ELEMS);
            let mut packed = Packed::empty();
            for (ob, xb) in images {
                for oy0 in (0..oh).step_by(rows) {
                    let tp = rows.min(oh - oy0) * ow;
                    packed.refill(kk, tp, |p, dst| {
                        d.im2col_panel(g, xb, oy0, tp, p * sgemm::NR, sgemm::NR, dst)
                    });
                    product_into(left, &packed, &mut ob[oy0 * ow..], hw, sb);
                }
            }
        }
        return CTensor::from_vec(out, (b, o, oh, ow), x.device());
    }
    if let Some(bias) = bias {
        let bv: Vec<f32> = bias.to_vec1()?;
        for ob in out.chunks_exact_mut(o * hw) {
            for (ch, &bv) in ob.chunks_exact_mut(hw).zip(&bv) {
                ch.fill(bv);
            }
        }
    }
    let acc = bias.is_some();
    d.products(g, xs, &mut out, TILE_ELEMS, |r, tp, y| {
        gemm_rows(y, hw, ws, r, tp, (o, tp, kk), acc)
    });
    CTensor::from_vec(out, (b, o, oh, ow), x.device())
}

/// The bf16 convolution on AMX tiles (see `amx`), same layout as
/// [`conv2d_f32`]: the weights are the left operand as they lie, each
/// im2col tile (or the image itself, for 1x1) the packed right one. The
/// product is rounded to bf16 and the bias added after, rounding again, as
/// the f32 route gives. `x`, `w`, `bias` contiguous bf16 CPU tensors.
#[cfg(target_arch = "x86_64")]
pub(crate) fn conv2d_bf16(
    x: &CTensor,
    w: &CTensor,
    bias: Option<&CTensor>,
    g: Geometry,
) -> candle_core::Result<CTensor> {
    use crate::amx::{product_into, Bias, Left, Packed};
    use crate::convert::{bits, bits_mut, with_slice};
    let d = Dims::new(x, w, g)?;
    let (b, o, oh, ow) = (d.b, d.o, d.oh, d.ow);
    let (hw, kk) = (oh * ow, d.c * d.kh * d.kw);
    let bias_bits = match bias {
        Some(t) => Some(with_slice::<half::bf16, _>(&t.contiguous()?, |s| bits(s).to_vec())?),
        None => None,
    };
    let bias = match &bias_bits {
        Some(v) => Bias::Rounded(v),
        None => Bias::None,
    };
    let out = with_slice::<half::bf16, _>(x, |xs| {
        with_slice::<half::bf16, _>(w, |ws| {
            let left = Left {
                data: bits(ws),
                rows: o,
                k: kk,
                ld: kk,
            };
            let mut out = vec![half::bf16::ZERO; b * o * hw];
            if !crate::amx::tiles() && crate::dpbf16::available() && !d.pointwise(g) && d.shifted_fits(g) {
                // As `conv2d_f32` does: the padded image in place (in bands
                // of output rows), each k pair interleaved in registers from
                // its two rows.
                d.in_place(g, bits(xs), bits_mut(&mut out), (16, true), |padded, offs, cols| {
                    let mut wide = vec![0u16; o * cols];
                    let right = crate::dpbf16::Shifted::new(padded, offs, cols);
                    crate::amx::shifted_into(left, &right, &mut wide, cols, bias);
                    wide
                });
                return out;
            }
            let mut packed = Packed::from_rows(&[], 0, 0, 0);
            d.products(g, bits(xs), bits_mut(&mut out), BF16_TILE_ELEMS, |r, tp, y| {
                packed.repack_rows(r, kk, tp, tp);
                product_into(left, &packed, y, hw, bias)
            });
            out
        })
    })??;
    CTensor::from_vec(out, (b, o, oh, ow), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    thread_local! {
        /// A band size for this test thread's in-place convolutions.
        pub(super) static BAND: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    /// The in-place route in several bands of output rows per image: the
    /// same bits as in one band (f32, and bf16 where the CPU has
    /// AVX512-BF16), and f32 against f64.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn in_place_bands_match_one_band() {
        type Case = ([usize; 4], [usize; 4], (usize, usize), usize);
        let cases: &[Case] = &[
            ([2, 3, 20, 40], [5, 3, 3, 3], (1, 1), 1),
            ([1, 2, 30, 64], [4, 2, 3, 2], (2, 1), 2),
            ([1, 3, 17, 33], [6, 3, 5, 5], (2, 2), 1),
        ];
        let dev = Device::Cpu;
        for &(xd, wd, padding, dilation) in cases {
            let g = Geometry {
                padding,
                stride: 1,
                dilation,
            };
            let xv = values(xd.iter().product(), 7);
            let wv = values(wd.iter().product(), 8);
            let bv = values(wd[0], 9);
            let x = CTensor::from_vec(xv.clone(), &xd, &dev).unwrap();
            let w = CTensor::from_vec(wv.clone(), &wd, &dev).unwrap();
            let b = CTensor::from_vec(bv.clone(), wd[0], &dev).unwrap();
            let d = Dims::new(&x, &w, g).unwrap();
            assert!(d.shifted_fits(g));
            let small = 1000;
            assert!(d.bands(g, small).0.len() >= 3, "{xd:?}: not several bands");
            let run = |band: Option<usize>, f: &dyn Fn() -> CTensor| {
                BAND.with(|c| c.set(band));
                let y = f();
                BAND.with(|c| c.set(None));
                y.to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let f32_conv = || conv2d_f32(&x, &w, Some(&b), g).unwrap();
            let (one, many) = (run(None, &f32_conv), run(Some(small), &f32_conv));
            assert!(
                one.iter().zip(&many).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{xd:?} f32"
            );
            let want = reference(&xv, &wv, Some(&bv), xd, wd, g, d.oh, d.ow);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = many
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(worst / scale <= 1e-5, "{xd:?}: {:e}", worst / scale);
            if crate::dpbf16::available() && !crate::amx::tiles() {
                let h = |t: &CTensor| t.to_dtype(candle_core::DType::BF16).unwrap();
                let bf16_conv = || conv2d_bf16(&h(&x), &h(&w), Some(&h(&b)), g).unwrap();
                let (one, many) = (run(None, &bf16_conv), run(Some(small), &bf16_conv));
                assert!(
                    one.iter().zip(&many).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{xd:?} bf16"
                );
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = emu_core::testing::Rng::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
    }

    /// Direct f64 convolution.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        xd: [usize; 4],
        wd: [usize; 4],
        g: Geometry,
        oh: usize,
        ow: usize,
    ) -> Vec<f64> {
        let [b, c, h, wi] = xd;
        let [o, _, kh, kw] = wd;
        let mut y = vec![0f64; b * o * oh * ow];
        for n in 0..b {
            for oc in 0..o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias.map_or(0.0, |bv| bv[oc] as f64);
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding.0 as isize;
                                    let ix = (ox * g.stride + kx * g.dilation) as isize - g.padding.1 as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wi {
                                        acc += x[((n * c + ci) * h + iy as usize) * wi + ix as usize] as f64
                                            * w[((oc * c + ci) * kh + ky) * kw + kx] as f64;
                                    }
                                }
                            }
                        }
                        y[((n * o + oc) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_f64_on_odd_shapes() {
        // input, weight, padding, stride, dilation, bias
        type Case = ([usize; 4], [usize; 4], (usize, usize), usize, usize, bool);
        let cases: &[Case] = &[
            ([2, 3, 9, 11], [5, 3, 3, 3], (1, 1), 1, 1, true),
            ([1, 4, 7, 6], [3, 4, 3, 3], (0, 2), 2, 1, false),
            ([1, 2, 10, 9], [4, 2, 3, 2], (2, 1), 1, 2, true),
            ([3, 5, 4, 5], [7, 5, 1, 1], (0, 0), 1, 1, true),
            ([1, 3, 6, 6], [2, 3, 1, 1], (1, 0), 2, 1, false),
            ([1, 1, 3, 3], [1, 1, 3, 3], (0, 0), 1, 1, false),
            ([1, 3, 5, 4], [2, 3, 5, 4], (1, 1), 3, 1, true),
            // Wide enough for the padded image in place (`shifted_fits`):
            // two images (the border must stay zero), dilation, a 3x2
            // kernel, uneven padding, a 5x5 kernel, ragged panels.
            ([2, 3, 20, 40], [5, 3, 3, 3], (1, 1), 1, 1, true),
            ([1, 2, 12, 64], [4, 2, 3, 2], (2, 1), 1, 2, true),
            ([1, 4, 6, 70], [13, 4, 5, 5], (2, 2), 1, 1, false),
            ([3, 5, 9, 33], [7, 5, 3, 3], (0, 1), 1, 1, true),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            let shifted = cases
                .iter()
                .filter(|&&(xd, wd, padding, stride, dilation, _)| {
                    let g = Geometry {
                        padding,
                        stride,
                        dilation,
                    };
                    let dev = Device::Cpu;
                    let x = CTensor::zeros(&xd, candle_core::DType::F32, &dev).unwrap();
                    let w = CTensor::zeros(&wd, candle_core::DType::F32, &dev).unwrap();
                    let d = Dims::new(&x, &w, g).unwrap();
                    !d.pointwise(g) && d.shifted_fits(g)
                })
                .count();
            assert_eq!(shifted, 4, "the in-place cases no longer take that route");
        }
        let dev = Device::Cpu;
        for &(xd, wd, padding, stride, dilation, with_bias) in cases {
            let g = Geometry {
                padding,
                stride,
                dilation,
            };
            let xv = values(xd.iter().product(), 1);
            let wv = values(wd.iter().product(), 2);
            let bv = values(wd[0], 3);
            let x = CTensor::from_vec(xv.clone(), &xd, &dev).unwrap();
            let w = CTensor::from_vec(wv.clone(), &wd, &dev).unwrap();
            let b = CTensor::from_vec(bv.clone(), wd[0], &dev).unwrap();
            let y = conv2d_f32(&x, &w, with_bias.then_some(&b), g).unwrap();
            let (_, _, oh, ow) = y.dims4().unwrap();
            let want = reference(&xv, &wv, with_bias.then_some(&bv[..]), xd, wd, g, oh, ow);
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(worst / scale <= 1e-5, "{xd:?} {wd:?} {g:?}: {:e}", worst / scale);
            // The bf16 route (AMX or AVX512-BF16)
            // on the same inputs rounded to bf16, against f64 on those.
            #[cfg(target_arch = "x86_64")]
            if crate::amx::available() {
                use candle_core::DType;
                let r = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
                let (xr, wr, br) = (r(&xv), r(&wv), r(&bv));
                let h = |t: &CTensor| t.to_dtype(DType::BF16).unwrap();
                let y = conv2d_bf16(&h(&x), &h(&w), with_bias.then(|| h(&b)).as_ref(), g).unwrap();
                let want = reference(&xr, &wr, with_bias.then_some(&br[..]), xd, wd, g, oh, ow);
                let got: Vec<f32> = y
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let worst = got
                    .iter()
                    .zip(&want)
                    .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                assert!(worst / scale <= 1e-2, "bf16 {xd:?} {wd:?} {g:?}: {:e}", worst / scale);
            }
        }
    }

    /// Empty batches and channel counts go through the backend without a
    /// panic (they are left to candle's kernel).
    #[test]
    fn empty_operands_through_the_backend() {
        use emu_core::backend::{Backend, Conv2dParams};
        let cpu = crate::CpuBackend::new();
        let dev = Device::Cpu;
        let p = Conv2dParams {
            stride: (1, 1),
            padding: (1, 1),
            dilation: (1, 1),
            groups: 1,
        };
        for (xd, wd) in [([0, 2, 4, 4], [3, 2, 3, 3]), ([1, 2, 4, 4], [0, 2, 3, 3])] {
            let x = CTensor::zeros(&xd, candle_core::DType::F32, &dev).unwrap();
            let w = CTensor::zeros(&wd, candle_core::DType::F32, &dev).unwrap();
            if let Ok(y) = cpu.conv2d(&x, &w, None, p) {
                assert_eq!(y.dims(), [xd[0], wd[0], 4, 4]);
            }
        }
    }

    /// Tiles of output rows: an input whose im2col does not fit one tile.
    #[test]
    fn tiled_output_rows_match_f64() {
        let (xd, wd) = ([1, 8, 40, 1200], [3, 8, 3, 3]);
        let g = Geometry {
            padding: (1, 1),
            stride: 1,
            dilation: 1,
        };
        const { assert!(8 * 9 * 1200 * 40 > TILE_ELEMS) };
        let xv = values(xd.iter().product(), 4);
        let wv = values(wd.iter().product(), 5);
        let dev = Device::Cpu;
        let x = CTensor::from_vec(xv.clone(), &xd, &dev).unwrap();
        let w = CTensor::from_vec(wv.clone(), &wd, &dev).unwrap();
        let y = conv2d_f32(&x, &w, None, g).unwrap();
        let want = reference(&xv, &wv, None, xd, wd, g, 40, 1200);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(worst / scale <= 1e-5, "{:e}", worst / scale);
    }
}
