//! `Vb`: what model constructors read their parameters through — a
//! checkpoint view ([`Weights`]) together with the backend and the dtype the
//! parameters are uploaded in, so that layer constructors take one argument.

use crate::error::Result;
use emu_core::{Backend, DType, Tensor, Weights};

#[derive(Clone)]
pub(crate) struct Vb<B: Backend> {
    weights: Weights,
    backend: B,
    dtype: DType,
}

impl<B: Backend> Vb<B> {
    pub fn new(weights: &Weights, backend: &B, dtype: DType) -> Self {
        Self {
            weights: weights.clone(),
            backend: backend.clone(),
            dtype,
        }
    }

    /// The view below `name` (`vb.pp("up_blocks").pp(0)` reads `up_blocks.0.*`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            weights: self.weights.pp(name),
            backend: self.backend.clone(),
            dtype: self.dtype,
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
