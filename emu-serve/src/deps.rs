//! Everything this crate takes from the pipelines' crate (`emu`), in one place.

pub use emu::backend::{set_threads, BackendKind, Backends};
pub use emu::pipeline::parse_image_size as parse_size;
pub use emu::pipeline::{
    check_dtype, upstream_generation, BatchItem, ChatAnswer, ChatOptions, ChatPipeline, CompletionOptions,
    CompletionPipeline, Component, GenerationOptions, GenerationPipeline, ModelDir, ModelFamily, PipelineError,
    Residency,
};
pub use emu::tiny::TINY_NOTICE;
