//! The weight of an `nn.Linear`, dense on the device or block-quantized,
//! and how a model asks for its linears to be quantized at load time.
//!
//! Every model crate loads its linears through [`LinearWeight::load`], so a
//! checkpoint that already stores blocks (a GGUF written by `emu convert
//! --quantize`) and a float checkpoint quantized while loading end up in
//! the same type, whichever component the weight belongs to.

use crate::checkpoint::Weights;
use crate::quant::{QuantTensor, QuantType, QK8_0};
use crate::{Backend, DType, Error, Result, Tensor};

/// Which of a transformer's linears are block-quantized at load time, and
/// in which format: the attention projections and the MLP separately, as
/// `--quantize-linears attn,mlp` asks. The default quantizes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockQuant {
    pub attention: Option<QuantType>,
    pub mlp: Option<QuantType>,
}

impl BlockQuant {
    /// Both groups in `qtype`.
    pub fn all(qtype: QuantType) -> Self {
        Self {
            attention: Some(qtype),
            mlp: Some(qtype),
        }
    }

    pub fn is_none(&self) -> bool {
        self.attention.is_none() && self.mlp.is_none()
    }

    /// The format asked for `group`'s linears.
    pub fn of(&self, group: LinearGroup) -> Option<QuantType> {
        match group {
            LinearGroup::Attention => self.attention,
            LinearGroup::Mlp => self.mlp,
        }
    }

    /// The format a linear of `group` with `inner` input features gets:
    /// [`block_format`]'s, or `None` (kept in floats) where not even a Q8_0
    /// block divides its rows. A whole component is asked for here, not one
    /// tensor, so an odd-sized layer stays dense instead of failing the
    /// load (stable-diffusion.cpp does the same with its components).
    pub fn format(&self, group: LinearGroup, inner: usize) -> Option<QuantType> {
        self.of(group).and_then(|q| block_format(q, "", inner).ok())
    }
}

/// The two groups of a transformer block's linears that [`BlockQuant`]
/// selects; each model crate says which of its checkpoint keys are which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearGroup {
    Attention,
    Mlp,
}

/// The format a weight with `inner` input features gets when `requested`
/// is asked for: `requested`, or Q8_0 where a Q4_K super-block (256) does
/// not divide the row but a Q8_0 block (32) does (llama.cpp falls back to
/// a 32-wide format there too). An error naming `tensor` where neither
/// divides.
#[allow(clippy::manual_is_multiple_of)]
pub fn block_format(requested: QuantType, tensor: &str, inner: usize) -> Result<QuantType> {
    if inner > 0 && inner % requested.block_size() == 0 {
        Ok(requested)
    } else if inner > 0 && inner % QK8_0 == 0 {
        Ok(QuantType::Q8_0)
    } else {
        Err(Error::Quant {
            tensor: tensor.to_string(),
            message: format!(
                "{inner} input features are not a multiple of the {requested} block size {} (nor of Q8_0's {QK8_0})",
                requested.block_size()
            ),
        })
    }
}

/// An `nn.Linear` weight `[out, in]`: a device tensor in the model dtype,
/// or GGUF blocks that the backend's `linear_quant` reads.
#[derive(Debug, Clone)]
pub enum LinearWeight<B: Backend> {
    Dense(Tensor<B>),
    Quant(QuantTensor),
}

impl<B: Backend> LinearWeight<B> {
    /// Loads `weight` below `w`, of shape `[out_dim, in_dim]`. Stored blocks
    /// are kept whatever was asked; a float weight is quantized to `quant`
    /// (through [`block_format`]) when given, else uploaded in `dtype`.
    pub fn load(
        backend: &B,
        w: &Weights,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
        quant: Option<QuantType>,
    ) -> Result<Self> {
        let dims = [out_dim, in_dim];
        let key = w.key("weight");
        // The header's shape, blocks or floats, before anything is read.
        w.check_dims("weight", &dims)?;
        if let Some(stored) = w.checkpoint().get_quant(&key)? {
            return Ok(Self::Quant(stored));
        }
        let Some(requested) = quant else {
            return Ok(Self::Dense(w.tensor(backend, "weight", &dims, dtype)?));
        };
        let qtype = block_format(requested, &key, in_dim)?;
        // Quantized from f32 (ggml quantizes from f32 too); the f32 copy of
        // one tensor is the peak host memory of loading.
        let host = w.get_checked("weight", &dims, DType::F32)?;
        Ok(Self::Quant(QuantTensor::quantize(key, &host, qtype)?))
    }

    /// `x · Wᵀ (+ bias)`.
    pub fn forward(&self, x: &Tensor<B>, bias: Option<&Tensor<B>>) -> Result<Tensor<B>> {
        match self {
            Self::Dense(w) => x.linear(w, bias),
            Self::Quant(w) => x.linear_quant(w, bias),
        }
    }

    /// The block format, or `None` for a dense weight.
    pub fn quant_type(&self) -> Option<QuantType> {
        match self {
            Self::Dense(_) => None,
            Self::Quant(w) => Some(w.qtype()),
        }
    }

    /// Bytes the weight occupies (block bytes when quantized).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.dims().iter().product::<usize>() * w.dtype().size_in_bytes(),
            Self::Quant(w) => w.bytes().len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_falls_back_to_q8_0_and_names_the_tensor_when_nothing_divides() {
        assert_eq!(block_format(QuantType::Q4K, "a", 512).unwrap(), QuantType::Q4K);
        assert_eq!(block_format(QuantType::Q4K, "a", 320).unwrap(), QuantType::Q8_0);
        assert_eq!(block_format(QuantType::Q8_0, "a", 64).unwrap(), QuantType::Q8_0);
        let e = block_format(QuantType::Q8_0, "blocks.0.mlp.fc1.weight", 48).unwrap_err();
        assert!(e.to_string().contains("blocks.0.mlp.fc1.weight"), "{e}");
        assert!(block_format(QuantType::Q4K, "b", 0).is_err());
    }
}
