//! Everything this crate takes from the pipelines' crate, in one place.
//!
//! The pipelines live in `emu-cli` today and are moving to the `emu` library
//! crate under the same module paths; switching is this file plus
//! `Cargo.toml` (`emu_cli::commands::{AnyBackend, BackendKind, Backends}`
//! become `emu::{...}` there).

pub use emu_cli::commands::generate::parse_size;
pub use emu_cli::commands::{set_threads, AnyBackend, BackendKind, Backends};
pub use emu_cli::pipeline::{
    check_dtype, upstream_generation, ChatAnswer, ChatOptions, ChatPipeline, Component, CompletionOptions,
    CompletionPipeline, GenerationOptions, GenerationPipeline, ModelDir, ModelFamily,
    PipelineError,
};
pub use emu_cli::tiny::TINY_NOTICE;
