//! Library pipelines: what the `emu` subcommands run, usable from any Rust
//! project.
//!
//! * [`ChatPipeline`]: Emu2-Chat — images, video frames and a question, one
//!   or several turns, optionally in grounding mode.
//! * [`CompletionPipeline`]: Emu2 (base) — interleaved few-shot prompts that
//!   the model continues.
//!
//! Each pipeline composes the component crates (emu-vision, emu-llm,
//! emu-prompt) over any [`emu_core::Backend`]; the vision encoder and the
//! language model each get their own [`Component`] (backend and dtype).
//! Models are found by [`ModelDir::resolve`]: `tiny` (the built-in random
//! model, see [`crate::tiny`]), a directory in the Hugging Face layout, or a
//! repo id in the local Hugging Face cache.
//!
//! ```no_run
//! use emu::backend::CpuBackend;
//! use emu::pipeline::{ChatOptions, ChatPipeline, Component, ModelDir, ModelFamily};
//! use emu::emu_core::DType;
//! use emu::emu_prompt::{Item, Prompt};
//! let model = ModelDir::resolve("BAAI/Emu2-Chat", ModelFamily::Emu2Chat)?;
//! let cpu = Component::new(CpuBackend::new(), DType::BF16);
//! let chat = ChatPipeline::load(&model, &cpu, &cpu)?;
//! let prompt = Prompt::new(vec![Item::Image("dog.jpg".into()), Item::Text("What is this?".into())]);
//! let answer = chat.answer(&prompt, &ChatOptions::default(), None)?;
//! println!("{}", answer.text);
//! # Ok::<(), emu::pipeline::PipelineError>(())
//! ```

mod dump;
mod emu2;
mod encode;
mod error;
mod generate;
mod model;
mod text;

pub use dump::{check_dir as check_dump_dir, Dump};
pub use emu2::{check_dtype, Emu2Model};
pub use encode::{EncodePipeline, EncodedImages};
pub use error::{PipelineError, Result};
pub use generate::{gaussian_noise, parse_image_size, GeneratedImage, GenerationOptions, GenerationPipeline};
pub use model::{detect_family, ModelDir, ModelFamily};
pub use text::{
    upstream_generation, BatchItem, ChatAnswer, ChatOptions, ChatPipeline, CompletionOptions, CompletionPipeline,
};

use emu_core::{Backend, DType};
use std::time::Duration;

/// Where one part of a pipeline runs, and in which dtype.
#[derive(Debug, Clone)]
pub struct Component<B: Backend> {
    pub backend: B,
    pub dtype: DType,
    /// Linears block-quantized at load time (the language model only).
    pub quant: Option<emu_llm::LlmQuant>,
}

impl<B: Backend> Component<B> {
    pub fn new(backend: B, dtype: DType) -> Self {
        Self {
            backend,
            dtype,
            quant: None,
        }
    }
}

/// Wall-clock time per stage, in the order stages first ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    stages: Vec<(&'static str, Duration)>,
}

impl Timings {
    /// Adds `d` to stage `name`.
    pub fn add(&mut self, name: &'static str, d: Duration) {
        match self.stages.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += d,
            None => self.stages.push((name, d)),
        }
    }

    pub fn stages(&self) -> &[(&'static str, Duration)] {
        &self.stages
    }

    /// Adds every stage of `other`.
    pub fn merge(&mut self, other: &Timings) {
        for (n, d) in &other.stages {
            self.add(n, *d);
        }
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: Duration = self.stages.iter().map(|(_, d)| *d).sum();
        for (n, d) in &self.stages {
            write!(f, "{n} {:.3}s, ", d.as_secs_f64())?;
        }
        write!(f, "total {:.3}s", total.as_secs_f64())
    }
}
