//! Image preprocessing as Emu2 does it (SPEC §1.3): PIL `convert("RGB")`,
//! `Resize((S, S), BICUBIC)` (a squash, no crop), `ToTensor()` and the CLIP
//! `Normalize`.
//!
//! The resize is a transcription of Pillow's `libImaging/Resample.c` for
//! 8-bit images: separable convolution with the a = -0.5 cubic kernel whose
//! support widens by the scale factor when downscaling, coefficients
//! normalised per output pixel and rounded to 22-bit fixed point, horizontal
//! pass then vertical pass, with truncation to 0..=255 after each. Given the
//! same decoded pixels it reproduces PIL bit for bit.
//!
//! Decoding is the `image` crate's (PNG and JPEG). The image size is read from
//! the header and checked against [`DecodeOptions`] before any pixel buffer
//! is allocated, so hostile headers (100000 x 100000) fail fast.

use crate::error::{Result, VisionError};
use crate::jpeg::{self, JpegError};
use emu_core::{Backend, Tensor};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use std::io::Cursor;
use std::path::Path;

/// OpenAI CLIP channel means (`OPENAI_DATASET_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP channel standard deviations (`OPENAI_DATASET_STD`).
// Written as upstream spells them; they round to the same f32 values.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `RGBRGB...`.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// Wraps interleaved RGB bytes; `data.len()` must be `width * height * 3`.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        let need = (width as u64) * (height as u64) * 3;
        if data.len() as u64 != need {
            return Err(VisionError::InvalidArgument(format!(
                "{} bytes given for a {width}x{height} RGB image, which needs {need}",
                data.len()
            )));
        }
        Ok(Self { width, height, data })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Interleaved RGB bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

/// Limits and options for decoding untrusted image bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Largest accepted `width * height` (default 64 Mpx).
    pub max_pixels: u64,
    /// Largest accepted width or height (default 32768).
    pub max_side: u32,
    /// Largest accepted encoded file when reading from a path (default 256 MiB).
    pub max_file_bytes: u64,
    /// Rotate/flip by the EXIF orientation tag, as phone photos need (default
    /// true). Upstream Emu2 calls `Image.open(..).convert("RGB")`, which
    /// ignores the tag; set this to false to reproduce that exactly.
    pub apply_exif_orientation: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_pixels: 64 << 20,
            max_side: 32768,
            max_file_bytes: 256 << 20,
            apply_exif_orientation: true,
        }
    }
}

fn decode_err(name: Option<&str>, message: impl Into<String>) -> VisionError {
    VisionError::Decode {
        source_name: name.map(str::to_string),
        message: message.into(),
    }
}

/// Decodes PNG or JPEG bytes to 8-bit RGB the way PIL's `convert("RGB")`
/// does: alpha is dropped (not composited), grey is replicated, palettes are
/// expanded, 16-bit samples keep their high byte.
///
/// One deliberate difference: PIL turns 16-bit *grey* PNGs ("I;16") into
/// RGB by clipping the 16-bit value to 255, which makes almost every such
/// image white; here they keep their high byte like every other 16-bit mode.
pub fn decode_image(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage> {
    decode_named(bytes, opts, None)
}

/// Reads and decodes an image file (see [`decode_image`]).
pub fn load_image(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<RgbImage> {
    let path = path.as_ref();
    let io = |e| VisionError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    // Regular files only: /dev/zero or a FIFO would never end or block.
    let len = emu_core::fs::regular_file_len(path).map_err(io)?;
    let name = path.display().to_string();
    if len > opts.max_file_bytes {
        return Err(decode_err(
            Some(&name),
            format!("file is {len} bytes, more than the limit of {}", opts.max_file_bytes),
        ));
    }
    let bytes = emu_core::fs::read_limited(path, opts.max_file_bytes).map_err(io)?;
    decode_named(&bytes, opts, Some(&name))
}

fn decode_named(bytes: &[u8], opts: &DecodeOptions, name: Option<&str>) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(decode_err(name, "the input is empty"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(name, e.to_string()))?;
    let reader_format = reader.format();
    match reader_format {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(decode_err(
                name,
                format!("{other:?} images are not supported (only PNG and JPEG)"),
            ))
        }
        None => return Err(decode_err(name, "not a PNG or JPEG image")),
    }
    // The decoders' own allocation cap is a second line of defence; the
    // explicit check below rejects oversized headers with a precise error.
    let mut limits = Limits::default();
    limits.max_alloc = Some(opts.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| decode_err(name, e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(VisionError::EmptyImage {
            source_name: name.map(str::to_string),
            width: w,
            height: h,
        });
    }
    if (w as u64) * (h as u64) > opts.max_pixels || w > opts.max_side || h > opts.max_side {
        return Err(VisionError::ImageTooLarge {
            source_name: name.map(str::to_string),
            width: w as u64,
            height: h as u64,
            limit: opts.max_pixels,
            max_side: opts.max_side,
        });
    }
    let orientation = if opts.apply_exif_orientation {
        // A malformed EXIF block should not make an otherwise good image unreadable.
        decoder.orientation().ok()
    } else {
        None
    };
    let is_jpeg = reader_format == Some(ImageFormat::Jpeg);
    let mut img = if is_jpeg {
        // libjpeg-exact decoding, so that pixels match PIL's; the `image`
        // crate's decoder covers the JPEG variants it does not implement.
        match jpeg::decode(bytes, opts.max_pixels) {
            Ok((w, h, data)) => image::RgbImage::from_raw(w as u32, h as u32, data)
                .map(DynamicImage::ImageRgb8)
                .ok_or_else(|| decode_err(name, "decoded buffer does not match the image size"))?,
            Err(JpegError::Unsupported(what)) => DynamicImage::from_decoder(decoder)
                .map_err(|e| decode_err(name, format!("{e} (a JPEG with {what})")))?,
            Err(JpegError::Corrupt(m)) => return Err(decode_err(name, m)),
        }
    } else {
        DynamicImage::from_decoder(decoder).map_err(|e| decode_err(name, e.to_string()))?
    };
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(to_rgb_like_pil(img))
}

fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let gray = |v: &mut dyn Iterator<Item = u8>| -> Vec<u8> { v.flat_map(|g| [g, g, g]).collect() };
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(b) => gray(&mut b.iter().copied()),
        DynamicImage::ImageLumaA8(b) => gray(&mut b.chunks_exact(2).map(|p| p[0])),
        // PIL's 16-bit unpackers ("RGB;16B", "LA;16B", ...) keep the high byte.
        DynamicImage::ImageRgb16(b) => b.iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        DynamicImage::ImageLuma16(b) => gray(&mut b.iter().map(|&v| (v >> 8) as u8)),
        DynamicImage::ImageLumaA16(b) => gray(&mut b.chunks_exact(2).map(|p| (p[0] >> 8) as u8)),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, data }
}

// ---------------------------------------------------------------- resize

/// Fixed-point precision of PIL's 8-bit resampler: 32 bits minus 8 for the
/// value and 2 for the overshoot of negative-lobe kernels.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel with a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, and fixed-point weights for the taps.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full box
/// `0..in_size`, with its exact floating-point evaluation order.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; the clamp makes the sign moot.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + n];
        for (dst, &kx) in row.iter_mut().zip(&k[..n]) {
            let v = if ww != 0.0 { kx / ww } else { kx };
            let scaled = v * (1i64 << PRECISION_BITS) as f64;
            *dst = if v < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, weights }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over `rows` rows of `src` (width `iw`) starting at `row0`.
fn horizontal_pass(src: &[u8], iw: usize, row0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let ow = c.bounds.len();
    let mut out = vec![0u8; rows * ow * 3];
    for y in 0..rows {
        let src = &src[(y + row0) * iw * 3..(y + row0 + 1) * iw * 3];
        let dst = &mut out[y * ow * 3..(y + 1) * ow * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            let (mut r, mut g, mut b) = (half, half, half);
            for (x, &kx) in k.iter().enumerate() {
                let p = &src[(x + xmin) * 3..(x + xmin) * 3 + 3];
                r += p[0] as i32 * kx;
                g += p[1] as i32 * kx;
                b += p[2] as i32 * kx;
            }
            dst[xx * 3] = clip8(r);
            dst[xx * 3 + 1] = clip8(g);
            dst[xx * 3 + 2] = clip8(b);
        }
    }
    out
}

/// Vertical pass over `src` (width `w`), whose first row is source row `row0`.
fn vertical_pass(src: &[u8], w: usize, row0: usize, c: &Coeffs) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let stride = w * 3;
    let mut out = vec![0u8; c.bounds.len() * stride];
    let mut acc = vec![0i32; stride];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        acc.fill(half);
        // Row-wise accumulation: the same integer sums as PIL's per-pixel
        // loop (integer addition is associative), but cache-friendly.
        for (y, &ky) in k.iter().enumerate() {
            let r = ymin + y - row0;
            for (a, &p) in acc.iter_mut().zip(&src[r * stride..(r + 1) * stride]) {
                *a += p as i32 * ky;
            }
        }
        for (d, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

/// Resizes to `width x height` exactly as PIL's `Image.resize(size, BICUBIC)`
/// does for an RGB image (no crop; the aspect ratio is not kept).
///
/// The pass order follows Pillow 13 (the pinned reference): vertical first
/// when the height shrinks by more than twice as many pixels as the width,
/// else horizontal first. Older Pillow always went horizontal first, which
/// can differ by one level on some pixels in the vertical-first cases.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(VisionError::InvalidArgument(format!(
            "cannot resize to {width}x{height}"
        )));
    }
    let (iw, ih) = (img.width as usize, img.height as usize);
    let (ow, oh) = (width as usize, height as usize);
    let (need_h, need_v) = (ow != iw, oh != ih);
    let data = match (need_h, need_v) {
        (false, false) => return Ok(img.clone()),
        (true, false) => horizontal_pass(&img.data, iw, 0, ih, &precompute_coeffs(iw, ow)),
        (false, true) => vertical_pass(&img.data, iw, 0, &precompute_coeffs(ih, oh)),
        (true, true) => {
            let (hc, vc) = (precompute_coeffs(iw, ow), precompute_coeffs(ih, oh));
            let shrink_h = ih as i64 - oh as i64;
            let horizontal_first = !(shrink_h > 0 && shrink_h > (iw as i64 - ow as i64) * 2);
            if horizontal_first {
                // Only the source rows the vertical pass reads go through the horizontal pass.
                let first = vc.bounds[0].0;
                let last = vc.bounds[oh - 1].0 + vc.bounds[oh - 1].1;
                let tmp = horizontal_pass(&img.data, iw, first, last - first, &hc);
                vertical_pass(&tmp, ow, first, &vc)
            } else {
                let tmp = vertical_pass(&img.data, iw, 0, &vc);
                horizontal_pass(&tmp, iw, 0, oh, &hc)
            }
        }
    };
    RgbImage::new(width, height, data)
}

// ---------------------------------------------------------------- tensors

/// torchvision's `ToTensor()` then `Normalize(mean, std)`, in f32 with the
/// same operation order (`x / 255`, then `(x - mean) / std`): CHW values.
pub fn to_normalized_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let n = img.width as usize * img.height as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// The whole Emu2 preprocessing: decode, squash-resize to `image_size`,
/// normalise; batches of images of any sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessor {
    pub image_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub decode: DecodeOptions,
}

impl Preprocessor {
    /// CLIP normalisation at `image_size` (448 for every Emu2 model).
    pub fn new(image_size: u32) -> Self {
        Self {
            image_size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            decode: DecodeOptions::default(),
        }
    }

    /// The preprocessing matching an encoder config.
    pub fn for_config(cfg: &crate::EvaConfig) -> Result<Self> {
        let s = u32::try_from(cfg.image_size)
            .map_err(|_| VisionError::InvalidConfig(format!("image_size {} is too large", cfg.image_size)))?;
        Ok(Self::new(s))
    }

    /// CHW f32 values of one decoded image.
    pub fn process(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let r = resize_bicubic(img, self.image_size, self.image_size)?;
        Ok(to_normalized_chw(&r, self.mean, self.std))
    }

    /// Decodes and processes one encoded image (PNG/JPEG bytes).
    pub fn process_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        self.process(&decode_image(bytes, &self.decode)?)
    }

    /// Loads and processes one image file.
    pub fn process_path(&self, path: impl AsRef<Path>) -> Result<Vec<f32>> {
        self.process(&load_image(path, &self.decode)?)
    }

    /// A batch `[N, 3, S, S]` (f32) of decoded images of any sizes.
    pub fn batch<B: Backend>(&self, backend: &B, images: &[RgbImage]) -> Result<Tensor<B>> {
        if images.is_empty() {
            return Err(VisionError::InvalidArgument("an empty batch of images".into()));
        }
        let s = self.image_size as usize;
        let mut all = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            all.extend(self.process(img)?);
        }
        Ok(Tensor::from_f32(backend, &[images.len(), 3, s, s], all)?)
    }

    /// A batch `[N, 3, S, S]` (f32) from image files.
    pub fn batch_from_paths<B: Backend, P: AsRef<Path>>(&self, backend: &B, paths: &[P]) -> Result<Tensor<B>> {
        let images = paths
            .iter()
            .map(|p| load_image(p, &self.decode))
            .collect::<Result<Vec<_>>>()?;
        self.batch(backend, &images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(10, 3), (3, 10), (1280, 448), (355, 448), (7, 7), (1, 5), (5, 1)] {
            let c = precompute_coeffs(i, o);
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                assert!(xmin + n <= i && n >= 1, "{i}->{o} at {xx}");
                let s: i64 = c.weights[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&w| w as i64)
                    .sum();
                // Rounding each tap can move the sum by at most half a unit per tap.
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o} at {xx}: {s}");
            }
        }
    }

    #[test]
    fn constant_images_stay_constant_and_shapes_are_right() {
        let img = RgbImage::new(13, 7, [10u8, 200, 255].repeat(13 * 7)).unwrap();
        for (w, h) in [(4, 4), (30, 2), (13, 20), (1, 1)] {
            let r = resize_bicubic(&img, w, h).unwrap();
            assert_eq!(
                (r.width(), r.height(), r.as_bytes().len()),
                (w, h, (w * h * 3) as usize)
            );
            assert!(r.as_bytes().chunks_exact(3).all(|p| p == [10, 200, 255]), "{w}x{h}");
        }
        assert!(resize_bicubic(&img, 0, 3).is_err());
        assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
    }

    #[test]
    fn normalisation_is_torchvision_order() {
        let img = RgbImage::new(1, 1, vec![0, 128, 255]).unwrap();
        let v = to_normalized_chw(&img, CLIP_MEAN, CLIP_STD);
        assert_eq!(v[0], (0.0f32 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert_eq!(v[1], (128.0f32 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1]);
        assert_eq!(v[2], (1.0f32 - CLIP_MEAN[2]) / CLIP_STD[2]);
    }
}
