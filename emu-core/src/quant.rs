//! Block-quantized weights with GGUF's exact layouts (`Q8_0`, `Q4_K`).
//!
//! A [`QuantTensor`] is a 2-D (or higher) weight whose last dimension is cut
//! into blocks; each block stores its own scale(s) and small integers, byte
//! for byte as ggml lays out `block_q8_0` and `block_q4_K`, so the bytes can
//! be written into a GGUF file or compared with the `gguf` Python package.
//!
//! * `Q8_0`: 32 weights per 34-byte block: f16 `d`, then 32 `i8`;
//!   `w = d * q`.
//! * `Q4_K`: 256 weights per 144-byte super-block: f16 `d`, f16 `dmin`,
//!   12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of 4-bit values;
//!   sub-block `j` of 32 weights decodes as `w = d*sc_j * q - dmin*m_j`.
//!
//! Quantization follows ggml's reference quantizers (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_K_ref`) step for step in f32 with no fused multiply-adds,
//! so the bytes equal the `gguf` package's `Q8_0` quantizer and a plain
//! (non-contracted) build of ggml's `Q4_K` one; dequantization equals
//! `gguf.dequantize`. `tools/reference/fixtures_quant.py` checks both.

use crate::{DType, Error, HostTensor, Result};
use half::f16;
use std::sync::Arc;

/// A block quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q8_0,
    Q4K,
}

/// Weights per `Q4_K` super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;
/// Weights per `Q8_0` block (ggml's `QK8_0`).
pub const QK8_0: usize = 32;

impl QuantType {
    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            QuantType::Q8_0 => QK8_0,
            QuantType::Q4K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            QuantType::Q8_0 => 2 + QK8_0,
            QuantType::Q4K => 2 + 2 + 12 + QK_K / 2,
        }
    }

    /// ggml's `ggml_type` id (the value GGUF stores in a tensor's info).
    pub fn ggml_type(self) -> u32 {
        match self {
            QuantType::Q8_0 => 8,
            QuantType::Q4K => 12,
        }
    }

    /// The format with a ggml type id, or an error naming `tensor`.
    pub fn from_ggml_type(id: u32, tensor: &str) -> Result<Self> {
        match id {
            8 => Ok(QuantType::Q8_0),
            12 => Ok(QuantType::Q4K),
            _ => Err(Error::Quant {
                tensor: tensor.to_string(),
                message: format!("unknown or unsupported quantization type id {id} (supported: 8 = Q8_0, 12 = Q4_K)"),
            }),
        }
    }

    /// The command-line / file spelling: `q8_0`, `q4_k`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4K => "q4_k",
        }
    }

    /// Parses `q8_0` / `q4_k` (any case, `Q4_K` too); a clear error otherwise.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantType::Q8_0),
            "q4_k" => Ok(QuantType::Q4K),
            _ => Err(Error::InvalidArgument(format!(
                "unknown quantization type `{s}` (expected q8_0 or q4_k)"
            ))),
        }
    }

    /// Bits of storage per weight, scales included (8.5 for Q8_0, 4.5 for Q4_K).
    pub fn bits_per_weight(self) -> f64 {
        (self.type_size() * 8) as f64 / self.block_size() as f64
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A block-quantized tensor on the host: a shape in PyTorch order (an
/// `nn.Linear` weight is `[out, in]`, blocks run along `in`) and the block
/// bytes, row after row. Cheap to clone (the bytes are shared).
#[derive(Clone, PartialEq)]
pub struct QuantTensor {
    name: String,
    qtype: QuantType,
    dims: Vec<usize>,
    data: Arc<Vec<u8>>,
}

impl std::fmt::Debug for QuantTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantTensor(`{}`, {:?}, {})", self.name, self.dims, self.qtype)
    }
}

fn quant_err(tensor: &str, message: impl Into<String>) -> Error {
    Error::Quant {
        tensor: tensor.to_string(),
        message: message.into(),
    }
}

/// Bytes that `dims` need in `qtype`, with errors naming `tensor` when the
/// last dimension is not a whole number of blocks.
pub fn quantized_size(tensor: &str, qtype: QuantType, dims: &[usize]) -> Result<usize> {
    let Some(&inner) = dims.last() else {
        return Err(quant_err(tensor, "cannot quantize a scalar"));
    };
    let bs = qtype.block_size();
    #[allow(clippy::manual_is_multiple_of)]
    if inner == 0 || inner % bs != 0 {
        return Err(quant_err(
            tensor,
            format!("inner dimension {inner} of shape {dims:?} is not a multiple of the {qtype} block size {bs}"),
        ));
    }
    let numel = crate::host::checked_numel(dims)?;
    (numel / bs)
        .checked_mul(qtype.type_size())
        .ok_or_else(|| quant_err(tensor, format!("shape {dims:?} overflows")))
}

impl QuantTensor {
    /// Wraps stored block bytes, checking that their length is exactly the
    /// block count the shape implies (a truncated or padded array is an error).
    pub fn from_bytes(name: impl Into<String>, qtype: QuantType, dims: &[usize], data: Vec<u8>) -> Result<Self> {
        let name = name.into();
        let need = quantized_size(&name, qtype, dims)?;
        if data.len() != need {
            let blocks_found = data.len() as f64 / qtype.type_size() as f64;
            return Err(quant_err(
                &name,
                format!(
                    "{} bytes ({blocks_found} blocks of {}) do not match shape {dims:?}, which needs {} blocks = {need} bytes{}",
                    data.len(),
                    qtype.type_size(),
                    need / qtype.type_size(),
                    if data.len() < need { " (truncated)" } else { "" }
                ),
            ));
        }
        Ok(Self {
            name,
            qtype,
            dims: dims.to_vec(),
            data: Arc::new(data),
        })
    }

    /// Quantizes a float host tensor (any float dtype; converted to f32 first,
    /// as ggml quantizes from f32).
    pub fn quantize(name: impl Into<String>, t: &HostTensor, qtype: QuantType) -> Result<Self> {
        let name = name.into();
        if !t.dtype().is_float() {
            return Err(quant_err(&name, format!("cannot quantize a {} tensor", t.dtype())));
        }
        quantized_size(&name, qtype, t.dims())?;
        let x = t.to_f32_vec()?;
        let data = quantize_f32(&x, qtype);
        Self::from_bytes(name, qtype, t.dims(), data)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn qtype(&self) -> QuantType {
        self.qtype
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The shared block bytes, so a backend can keep its own copy (a
    /// device buffer) for as long as this tensor, or a clone of it, lives:
    /// clones share one allocation, and a dead `Weak` marks the copy stale.
    pub fn shared_bytes(&self) -> &Arc<Vec<u8>> {
        &self.data
    }

    /// Number of weights.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Length of the last dimension (the one cut into blocks).
    pub fn inner(&self) -> usize {
        *self.dims.last().unwrap_or(&0)
    }

    /// Bytes of one row of the last dimension.
    pub fn row_bytes(&self) -> usize {
        self.inner() / self.qtype.block_size() * self.qtype.type_size()
    }

    /// The f32 values (`gguf.dequantize`).
    pub fn dequantize(&self) -> Result<HostTensor> {
        let mut out = vec![0f32; self.numel()];
        dequantize_into(&self.data, self.qtype, &mut out);
        HostTensor::from_f32(&self.dims, out)
    }
}

/// Quantizes `x` (a whole number of blocks) into block bytes.
pub fn quantize_f32(x: &[f32], qtype: QuantType) -> Vec<u8> {
    let bs = qtype.block_size();
    let mut out = crate::memory::huge_vec(x.len() / bs * qtype.type_size());
    for block in x.chunks_exact(bs) {
        match qtype {
            QuantType::Q8_0 => quantize_block_q8_0(block, &mut out),
            QuantType::Q4K => quantize_block_q4_k(block, &mut out),
        }
    }
    crate::memory::settle_on_huge_pages(&out);
    out
}

/// Dequantizes whole blocks of `data` into `out` (`out.len()` weights).
#[inline]
pub fn dequantize_into(data: &[u8], qtype: QuantType, out: &mut [f32]) {
    let (bs, ts) = (qtype.block_size(), qtype.type_size());
    let blocks = data.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    // One loop per format, so each inner loop is straight-line and vectorises.
    match qtype {
        QuantType::Q8_0 => blocks.for_each(|(b, y)| dequantize_block_q8_0(b, y)),
        QuantType::Q4K => blocks.for_each(|(b, y)| dequantize_block_q4_k(b, y)),
    }
}

/// ggml's `nearest_int`: round half to even through the float mantissa
/// (exact for |v| < 2^22, which every caller guarantees).
#[inline]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

#[inline]
fn f16_bits(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn quantize_block_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend_from_slice(&f16_bits(d));
    // gguf's np_roundf and ggml's roundf both round half away from zero.
    out.extend(x.iter().map(|v| ((v * id).round() as i8) as u8));
}

#[inline]
fn dequantize_block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..2 + QK8_0]) {
        *o = (q as i8) as f32 * d;
    }
}

/// The 6-bit (scale, min) of sub-block `j` from the 12 packed bytes
/// (ggml's `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Weighted search for the (scale, min) of one 32-weight sub-block on the
/// grid `0..=nmax` (ggml's `make_qkx2_quants` with `use_mad = false`).
/// Returns `(scale, -min)` and writes the levels to `l`.
fn make_qkx2_quants(x: &[f32], w: &[f32], nmax: i32, rmin: f32, rdelta: f32, nstep: i32, l: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let qf = q as f32;
            sum_l += w[i] * qf;
            sum_l2 += w[i] * qf * qf;
            sum_xl += w[i] * qf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if err < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn quantize_block_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (wi, v) in w.iter_mut().zip(xs) {
            *wi = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &w, 15, -1.0, 0.1, 20, &mut levels[32 * j..32 * j + 32]);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..QK_K / 32 {
        // ggml stores nearest_int's result in a uint8_t before clamping.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d16 = f16_bits(max_scale / 63.0);
    let dmin16 = f16_bits(max_min / 63.0);
    let d = f16::from_le_bytes(d16).to_f32();
    let dmin = f16::from_le_bytes(dmin16).to_f32();
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d16);
    out.extend_from_slice(&dmin16);
    out.extend_from_slice(&packed);
    for chunk in levels.chunks_exact(64) {
        out.extend((0..32).map(|i| chunk[i] | (chunk[i + 32] << 4)));
    }
}

#[inline]
fn dequantize_block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..16 + QK_K / 2];
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, scales);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        // Sub-blocks 2k and 2k+1 share 32 bytes: low nibbles, then high.
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for (o, &q) in y[32 * j..32 * j + 32].iter_mut().zip(bytes) {
            *o = dl * ((q >> shift) & 0xF) as f32 - ml;
        }
    }
}

/// Whether a tensor of `dtype` and `dims` can be quantized to `qtype`
/// (a float tensor whose last dimension is a whole number of blocks).
pub fn can_quantize(qtype: QuantType, dtype: DType, dims: &[usize]) -> bool {
    #[allow(clippy::manual_is_multiple_of)]
    let fits = dims.last().is_some_and(|&d| d > 0 && d % qtype.block_size() == 0);
    dtype.is_float() && fits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
        assert_eq!(nearest_int(14.6), 15);
    }

    #[test]
    fn block_sizes_are_ggmls() {
        assert_eq!(QuantType::Q8_0.type_size(), 34);
        assert_eq!(QuantType::Q4K.type_size(), 144);
        assert_eq!(QuantType::Q4K.bits_per_weight(), 4.5);
        assert_eq!(QuantType::Q8_0.bits_per_weight(), 8.5);
    }

    #[test]
    fn roundtrip_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for qt in [QuantType::Q8_0, QuantType::Q4K] {
            let t = HostTensor::from_f32(&[2, 256], x.clone()).unwrap();
            let q = QuantTensor::quantize("w", &t, qt).unwrap();
            let y = q.dequantize().unwrap().to_f32_vec().unwrap();
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let step = match qt {
                QuantType::Q8_0 => amax / 127.0,
                QuantType::Q4K => 2.0 * amax / 15.0,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= step, "{qt}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_input_names_the_tensor() {
        let t = HostTensor::from_f32(&[2, 48], vec![0.0; 96]).unwrap();
        let e = QuantTensor::quantize("blk.0.w", &t, QuantType::Q8_0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.w") && e.contains("multiple of the q8_0 block size 32"),
            "{e}"
        );
        let e = QuantTensor::from_bytes("x.w", QuantType::Q4K, &[2, 256], vec![0; 200])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.w") && e.contains("truncated") && e.contains("needs 2 blocks"),
            "{e}"
        );
        let e = QuantTensor::from_bytes("y.w", QuantType::Q8_0, &[1, 32], vec![0; 68])
            .unwrap_err()
            .to_string();
        assert!(e.contains("y.w") && e.contains("needs 1 blocks"), "{e}");
        let e = QuantType::from_ggml_type(2, "z.w").unwrap_err().to_string();
        assert!(e.contains("z.w") && e.contains("type id 2"), "{e}");
        assert!(QuantType::parse("q5_k").is_err());
    }
}
