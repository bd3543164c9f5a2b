//! `Vb`: what model constructors read their parameters through — a
//! checkpoint view ([`Weights`]) together with the backend and the dtype the
//! parameters are uploaded in, so that layer constructors take one argument.

use crate::error::Result;
use emu_core::{Backend, BlockQuant, DType, Tensor, Weights};

#[derive(Clone)]
pub(crate) struct Vb<B: Backend> {
    weights: Weights,
    backend: B,
    dtype: DType,
    /// The transformer linears to block-quantize (the UNet's; none for the VAE).
    quant: BlockQuant,
}

impl<B: Backend> Vb<B> {
    pub fn new(weights: &Weights, backend: &B, dtype: DType) -> Self {
        Self {
            weights: weights.clone(),
            backend: backend.clone(),
            dtype,
            quant: BlockQuant::default(),
        }
    }

    /// This view, with `quant` asked of the linears loaded through it.
    pub fn with_quant(mut self, quant: BlockQuant) -> Self {
        self.quant = quant;
        self
    }

    pub fn quant(&self) -> BlockQuant {
        self.quant
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The view below `name` (`vb.pp("up_blocks").pp(0)` reads `up_blocks.0.*`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            weights: self.weights.pp(name),
            backend: self.backend.clone(),
            dtype: self.dtype,
            quant: self.quant,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The parameter `name` below this view, checked to have shape `dims`.
    pub fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor<B>> {
        Ok(self.weights.tensor(&self.backend, name, dims, self.dtype)?)
    }
}
