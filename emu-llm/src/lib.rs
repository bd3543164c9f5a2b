//! The LLaMA decoder of Emu2.
//!
//! * [`LlamaConfig`]: the hyper-parameters from a Hugging Face `config.json`
//!   (plain LLaMA or Emu2's `EmuConfig`).
//! * [`Llama`]: transformers' `LlamaForCausalLM` over any backend, fed by
//!   input embeddings (with Emu2's image/video slots filled by
//!   [`Llama::embed_with_visual`]), with a preallocated [`KvCache`] that also
//!   serves left-padded batches.
//! * [`generate()`]: greedy, sampling and beam search with transformers'
//!   `generate` semantics.
//! * [`regress_visual`]: Emu2-Gen's autoregressive regression of visual
//!   embeddings on the KV cache.

pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod visual;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use generate::{generate, EarlyStopping, GenerationConfig, OnToken};
pub use model::{KvCache, Llama, LlamaOutput, Logits, SlotIds, LM_PREFIXES};
pub use visual::regress_visual;
