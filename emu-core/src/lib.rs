//! The shared foundation of emu-rs.
//!
//! * [`Backend`]: the op-level trait that model crates are generic over, and
//!   [`Tensor`], a handle with method syntax over any backend;
//! * [`HostTensor`] and [`DType`]: data on the host, the only thing that
//!   crosses into or out of a backend;
//! * [`checkpoint`]: lazy, memory-mapped loading of safetensors, sharded
//!   safetensors and PyTorch pickle checkpoints, with dtype conversion tensor
//!   by tensor;
//! * [`quant`]: GGUF-compatible block-quantized weights (`Q8_0`, `Q4_K`);
//! * [`linear`]: a linear layer's weight, dense or quantized, loaded the
//!   same way by every model crate;
//! * [`Error`]: the typed errors of all of the above.

pub mod backend;
pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod fs;
pub mod host;
pub mod linear;
pub mod memory;
pub mod quant;
pub mod shape;
pub mod tensor;
pub mod testing;

pub use backend::{AttnMask, Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp};
pub use checkpoint::{Checkpoint, Weights};
pub use dtype::DType;
pub use error::{Error, Result};
pub use host::HostTensor;
pub use linear::{BlockQuant, LinearGroup, LinearWeight};
pub use quant::{QuantTensor, QuantType};
pub use tensor::Tensor;
