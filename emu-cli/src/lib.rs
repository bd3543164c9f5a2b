//! The library side of the `emu` command: checkpoint inspection and
//! conversion, usable without the binary.
//!
//! * [`inspect::inspect`] reports what a checkpoint path holds (layout,
//!   components, tensors, dtypes, exact parameter counts, key prefixes and the
//!   memory each dtype needs) from file headers only;
//! * [`convert::convert`] re-encodes a checkpoint (typically BAAI/Emu2's fp32
//!   pickle shards) into sharded bf16/f16/f32 safetensors, one tensor at a time.

pub mod commands;
pub mod convert;
pub mod error;
pub mod inspect;
pub mod layout;
pub mod pipeline;
pub mod tiny;
pub mod units;

pub use error::{CliError, Result};
