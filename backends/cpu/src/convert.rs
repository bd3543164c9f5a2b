//! bf16 <-> f32 conversion of whole tensors.
//!
//! Every half-precision op here computes in f32 (PyTorch's rule), so bf16
//! models convert on every op; candle converts element by element through
//! non-inlined calls, which made conversion a third of a bf16 EVA encode.
//! bf16 is the top half of an f32: widening is a shift, narrowing rounds to
//! nearest-even on the integer bits, bit for bit `half::bf16::from_f32`
//! (NaNs stay NaN, quieted).

use candle_core::{DType, Layout, Storage, Tensor as CTensor};
use half::bf16;
use rayon::prelude::*;

const CHUNK: usize = 1 << 15;

#[inline(always)]
pub(crate) fn narrow_bits(x: u32) -> u16 {
    if x & 0x7fff_ffff > 0x7f80_0000 {
        ((x >> 16) as u16) | 0x0040
    } else {
        ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }
}

/// `src` widened into a new vector.
pub(crate) fn widen(src: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
        crate::elementwise::wide(o, |o| {
            for (d, s) in o.iter_mut().zip(s) {
                *d = f32::from_bits((s.to_bits() as u32) << 16);
            }
        })
    });
    out
}

/// `src` rounded to bf16 into a new vector.
pub(crate) fn narrow(src: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; src.len()];
    out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
        let bits: &mut [u16] = bits_mut(o);
        for (d, s) in bits.iter_mut().zip(s) {
            *d = narrow_bits(s.to_bits());
        }
    });
    out
}

/// bf16 is `repr(transparent)` over u16, so its slice is a u16 slice.
pub(crate) fn bits(s: &[bf16]) -> &[u16] {
    // SAFETY: as in `bits_mut`.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) }
}

/// [`bits`], writable.
pub(crate) fn bits_mut(s: &mut [bf16]) -> &mut [u16] {
    // SAFETY: half::bf16 is #[repr(transparent)] over u16 (same size and
    // alignment, every bit pattern valid both ways).
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u16, s.len()) }
}

/// The elements of a contiguous CPU tensor's storage, from its offset on.
pub(crate) fn slice_of<'a, T: candle_core::WithDType>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (Storage::Cpu(s), Some((lo, hi))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("not a contiguous cpu tensor")
    };
    Ok(&s.as_slice::<T>()?[lo..hi])
}

/// Runs `f` on the elements of a contiguous CPU tensor of type `T`.
pub(crate) fn with_slice<T: candle_core::WithDType, R>(
    t: &CTensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    Ok(f(slice_of::<T>(&s, l)?))
}

/// Runs `f` on the values of `t` in f32, contiguous (no copy where `t`
/// already is contiguous f32).
pub(crate) fn with_f32<R>(t: &CTensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_slice(&to_f32(t)?.contiguous()?, f)
}

/// The values of `t` as one contiguous f32 vector.
pub(crate) fn f32_values(t: &CTensor) -> candle_core::Result<Vec<f32>> {
    to_f32(t)?.flatten_all()?.to_vec1()
}

/// `t` in f32 (bf16 by the fast path; a transposed view stays one).
pub(crate) fn to_f32(t: &CTensor) -> candle_core::Result<CTensor> {
    if t.dtype() != DType::BF16 {
        return t.to_dtype(DType::F32);
    }
    if !t.is_contiguous() && t.rank() >= 2 {
        let tt = t.t()?;
        if tt.is_contiguous() {
            return to_f32(&tt)?.t();
        }
    }
    let t = t.contiguous()?;
    let v = with_slice::<bf16, _>(&t, widen)?;
    CTensor::from_vec(v, t.dims(), t.device())
}

/// f32 `t` in `dtype` (bf16 by the fast path).
pub(crate) fn from_f32(t: &CTensor, dtype: DType) -> candle_core::Result<CTensor> {
    if dtype != DType::BF16 || t.dtype() != DType::F32 {
        return t.to_dtype(dtype);
    }
    let t = t.contiguous()?;
    let v = with_slice::<f32, _>(&t, narrow)?;
    CTensor::from_vec(v, t.dims(), t.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_is_bit_identical_to_half() {
        let mut xs: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
        ]);
        let got = narrow(&xs);
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), bf16::from_f32(*x).to_bits(), "{x:e} ({:#x})", x.to_bits());
        }
        let back = widen(&got);
        for (g, b) in got.iter().zip(&back) {
            assert_eq!(b.to_bits(), g.to_f32().to_bits());
        }
    }
}
