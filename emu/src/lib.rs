//! `emu`: the emu-rs library. Runs BAAI's Emu2 family natively from Rust.
//!
//! * [`pipeline`]: the pipelines — [`pipeline::ChatPipeline`] (Emu2-Chat),
//!   [`pipeline::CompletionPipeline`] (Emu2 few-shot),
//!   [`pipeline::GenerationPipeline`] (Emu2-Gen), [`pipeline::EncodePipeline`]
//!   (the EVA vision encoder alone) — model-directory resolution
//!   ([`pipeline::ModelDir`]) and the per-stage tensor dump;
//! * [`tiny`]: the embedded tiny model (random weights, built in code), so
//!   every pipeline runs with no download;
//! * [`backend`]: backends chosen by name at run time ([`BackendKind`],
//!   [`Backends`], [`AnyBackend`], [`with_backend!`]); each backend is a cargo
//!   feature (`cpu` by default, `wgpu`, `onnx`);
//! * [`inspect`], [`convert`], [`layout`], [`units`]: what a checkpoint holds,
//!   re-encoding checkpoints, and the checkpoint layouts they share.
//!
//! The pipelines are generic over [`emu_core::Backend`]; a program that knows
//! its backend at compile time uses it directly (`emu::backend::CpuBackend`),
//! one that takes it from a flag or a request goes through [`Backends`], as
//! below (the example of the README).
//! Nothing here prints or draws: progress is reported through callbacks
//! (`on_step`, streamed text, [`emu_core::checkpoint::set_load_observer`]).
//!
//! ```no_run
//! use emu::emu_core::DType;
//! use emu::emu_prompt::{Item, Prompt};
//! use emu::pipeline::{ChatOptions, ChatPipeline, Component, ModelDir, ModelFamily};
//! use emu::{with_backend, BackendKind, Backends};
//!
//! fn main() -> Result<(), emu::pipeline::PipelineError> {
//!     let model = ModelDir::resolve("tiny", ModelFamily::Emu2Chat)?; // or a model directory
//!     let backend = Backends::default().open(BackendKind::parse("cpu")?)?;
//!     with_backend!(backend, |b| {
//!         let cpu = Component::new(b, DType::F32);
//!         let chat = ChatPipeline::load(&model, &cpu, &cpu)?;
//!         let prompt = Prompt::new(vec![Item::Image("dog.jpg".into()), Item::Text("What is this?".into())]);
//!         println!("{}", chat.answer(&prompt, &ChatOptions::default(), None)?.text);
//!         Ok(())
//!     })
//! }
//! ```

pub mod backend;
pub mod convert;
pub mod error;
pub mod inspect;
pub mod layout;
pub mod memory;
pub mod pipeline;
pub mod tiny;
pub mod units;

pub use backend::{set_threads, AnyBackend, BackendKind, Backends, Placement};

// The component crates whose types appear in the pipelines' API (prompts,
// dtypes, generation settings), so that depending on `emu` alone is enough.
pub use emu_core;
pub use emu_decoder;
pub use emu_llm;
pub use emu_prompt;
pub use emu_vision;
