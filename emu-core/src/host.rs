//! Host-resident tensors: the only thing that crosses the backend boundary.

use crate::{DType, Error, Result};
use half::{bf16, f16};

/// A dense, row-major tensor in host memory, stored as little-endian bytes.
///
/// Host tensors are how data enters and leaves a backend
/// ([`crate::Backend::upload`] / [`crate::Backend::download`]) and what the
/// checkpoint loader produces. They are deliberately dumb: no ops, only
/// construction and dtype conversion.
///
/// ```
/// use emu_core::{DType, HostTensor};
/// let t = HostTensor::from_f32(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
/// let h = t.to_dtype(DType::BF16).unwrap();
/// assert_eq!(h.dims(), &[2, 2]);
/// assert_eq!(h.to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
/// ```
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    dims: Vec<usize>,
    dtype: DType,
    data: Vec<u8>,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor({:?}, {})", self.dims, self.dtype)
    }
}

/// Number of elements of a shape, or an error when it overflows `usize`.
pub fn checked_numel(dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("shape {dims:?} has more elements than fit in memory")))
}

impl HostTensor {
    /// Wraps raw little-endian bytes; the length must match shape and dtype.
    pub fn from_bytes(dims: &[usize], dtype: DType, data: Vec<u8>) -> Result<Self> {
        let n = checked_numel(dims)?;
        let expected = n
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| Error::Shape(format!("shape {dims:?} overflows")))?;
        if data.len() != expected {
            return Err(Error::Shape(format!(
                "{} bytes given for a {dtype} tensor of shape {dims:?}, which needs {expected}",
                data.len()
            )));
        }
        Ok(Self {
            dims: dims.to_vec(),
            dtype,
            data,
        })
    }

    pub fn from_f32(dims: &[usize], v: Vec<f32>) -> Result<Self> {
        Self::from_bytes(dims, DType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn from_f64(dims: &[usize], v: Vec<f64>) -> Result<Self> {
        Self::from_bytes(dims, DType::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn from_u32(dims: &[usize], v: Vec<u32>) -> Result<Self> {
        Self::from_bytes(dims, DType::U32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn from_i64(dims: &[usize], v: Vec<i64>) -> Result<Self> {
        Self::from_bytes(dims, DType::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// A tensor of zeros.
    pub fn zeros(dims: &[usize], dtype: DType) -> Result<Self> {
        let n = checked_numel(dims)?;
        Self::from_bytes(dims, dtype, vec![0u8; n * dtype.size_in_bytes()])
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Same data, another shape with the same number of elements.
    pub fn reshape(mut self, dims: &[usize]) -> Result<Self> {
        if checked_numel(dims)? != self.numel() {
            return Err(Error::Shape(format!("cannot reshape {:?} into {dims:?}", self.dims)));
        }
        self.dims = dims.to_vec();
        Ok(self)
    }

    /// Every element as f64 (exact for all supported dtypes but large i64/u64).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let d = &self.data;
        Ok(match self.dtype {
            DType::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::U32 => d
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::U8 | DType::Bool => d.iter().map(|&b| b as f64).collect(),
        })
    }

    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::F32 {
            return Ok(self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect());
        }
        if self.dtype == DType::BF16 {
            // bf16 is the top half of an f32 (exact, no detour through f64).
            return Ok(self
                .data
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect());
        }
        Ok(self.to_f64_vec()?.into_iter().map(|x| x as f32).collect())
    }

    /// Integer view (token ids, indices). Floats are rejected rather than truncated.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let d = &self.data;
        Ok(match self.dtype {
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DType::U32 => d
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DType::U8 | DType::Bool => d.iter().map(|&b| b as i64).collect(),
            other => return Err(Error::DType(format!("expected an integer tensor, found {other}"))),
        })
    }

    /// Converts to another dtype. Float→float conversions round to nearest even
    /// (as PyTorch's `.to()` does); float→integer conversion is refused.
    pub fn to_dtype(&self, dtype: DType) -> Result<HostTensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let data: Vec<u8> = match dtype {
            DType::F64 => self.to_f64_vec()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::F32 => self
                .to_f64_vec()?
                .iter()
                .flat_map(|&x| (x as f32).to_le_bytes())
                .collect(),
            // Go through f32 for f32 sources so that f32->f16/bf16 rounds once, exactly like torch.
            DType::F16 => self
                .to_f32_vec()?
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            DType::BF16 => self
                .to_f32_vec()?
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            DType::I64 => self.to_i64_vec()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::I32 => self
                .to_i64_vec()?
                .iter()
                .map(|&x| i32::try_from(x).map_err(|_| Error::DType(format!("{x} does not fit in i32"))))
                .collect::<Result<Vec<_>>>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::U32 => self
                .to_i64_vec()?
                .iter()
                .map(|&x| u32::try_from(x).map_err(|_| Error::DType(format!("{x} does not fit in u32"))))
                .collect::<Result<Vec<_>>>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::U8 | DType::Bool => self
                .to_i64_vec()?
                .iter()
                .map(|&x| u8::try_from(x).map_err(|_| Error::DType(format!("{x} does not fit in u8"))))
                .collect::<Result<Vec<_>>>()?,
        };
        HostTensor::from_bytes(&self.dims, dtype, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_and_round_to_nearest_even() {
        let t = HostTensor::from_f32(&[3], vec![1.0, -2.5, 1.0 + 1.0 / 256.0 + 1e-6]).unwrap();
        let b = t.to_dtype(DType::BF16).unwrap().to_f32_vec().unwrap();
        assert_eq!(b[0], 1.0);
        assert_eq!(b[1], -2.5);
        // 1 + 2^-8 + eps is just above the halfway point between 1 and 1 + 2^-7.
        assert_eq!(b[2], 1.0 + 1.0 / 128.0);
        let i = HostTensor::from_u32(&[2], vec![7, 9]).unwrap();
        assert_eq!(i.to_dtype(DType::I64).unwrap().to_i64_vec().unwrap(), vec![7, 9]);
        assert!(t.to_dtype(DType::I64).is_err());
    }

    #[test]
    fn wrong_byte_count_is_an_error() {
        assert!(HostTensor::from_bytes(&[2, 3], DType::F32, vec![0; 23]).is_err());
        assert!(checked_numel(&[usize::MAX, 2]).is_err());
    }
}
