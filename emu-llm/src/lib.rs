//! The LLaMA decoder of Emu2.
//!
//! * [`LlamaConfig`]: the hyper-parameters from a Hugging Face `config.json`
//!   (plain LLaMA or Emu2's `EmuConfig`).

pub mod config;
pub mod error;

pub use config::LlamaConfig;
pub use error::{Error, Result};
