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
//!   [`generate_with`] adds stop strings (`GenerationConfig::stop_strings`,
//!   matched on text from the caller's decoder) and custom stop rules;
//!   [`generate_batch`] runs several prompts, each with its own settings,
//!   in lockstep decode steps.
//! * [`LlmQuant`]: block-quantized (Q8_0 / Q4_K) linears chosen at load
//!   time ([`Llama::load_quantized`]).
//! * [`regress_visual`]: Emu2-Gen's autoregressive regression of visual
//!   embeddings on the KV cache.
//!
//! ```
//! use emu_backend_cpu::CpuBackend;
//! use emu_core::{checkpoint::Checkpoint, DType, Tensor};
//! use emu_llm::{generate, lm_weights, GenerationConfig, Llama, LlamaConfig, SlotIds};
//!
//! // A tiny LlamaForCausalLM saved by transformers (tests/fixtures/llm/mha).
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llm/mha");
//! let cfg = LlamaConfig::from_file(format!("{dir}/config.json"))?;
//! let ckpt = Checkpoint::open(format!("{dir}/model.safetensors"))?;
//! let backend = CpuBackend::new();
//! let model = Llama::load(&backend, &lm_weights(&ckpt)?, &cfg, DType::F32)?;
//!
//! // Two image slots (ids 390 here; Emu2's `<image>` is 32003) take two visual tokens.
//! let slots = SlotIds { image: 390, video: 391 };
//! let visual = Tensor::zeros(&backend, &[2, cfg.hidden_size], DType::F32)?;
//! let embeds = model.embed_with_visual(&[1, 390, 390, 17, 42], 1, Some(&visual), None, slots)?;
//!
//! let settings = GenerationConfig { max_new_tokens: 5, num_beams: 3, ..Default::default() };
//! let out = generate(&model, &embeds, &[], &settings, None)?;
//! assert_eq!(out[0].len(), 5);
//! # Ok::<(), emu_llm::Error>(())
//! ```

pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod quant;
pub mod visual;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use generate::{
    generate, generate_batch, generate_with, BatchRow, Decode, EarlyStopping, GenerationConfig, Hooks, OnToken,
    StopCheck, StopStrings, TransformersVersion, MAX_BEAMS,
};
pub use model::{lm_weights, KvCache, Linear, Llama, LlamaOutput, Logits, SlotIds, LM_PREFIXES};
pub use quant::{LlmQuant, QuantLinears};
pub use visual::regress_visual;
