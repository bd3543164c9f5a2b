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
//! [`Residency`] says whether every component stays loaded between and
//! during runs (the default) or each is loaded only for its stage
//! (`--offload sequential`).
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
pub use emu2::{check_dtype, Emu2Llm, Emu2Model};
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
    /// Linears block-quantized at load time: the LLaMA's (by its groups),
    /// or, on the vision component, the EVA blocks' attention and MLP
    /// linears, or, on the decoder component, the UNet transformer blocks'
    /// (the VAE stays dense). `lm_head` applies to the LLaMA alone.
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

/// Which components `--quantize` applies to (`--quantize-components`):
/// the language model by default; the EVA encoder and the UNet on request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantComponents {
    pub llm: bool,
    pub vision: bool,
    pub unet: bool,
}

impl Default for QuantComponents {
    fn default() -> Self {
        Self {
            llm: true,
            vision: false,
            unet: false,
        }
    }
}

impl QuantComponents {
    /// Every component with linears worth quantizing.
    pub const ALL: Self = Self {
        llm: true,
        vision: true,
        unet: true,
    };

    /// Parses a comma list of `llm`, `vision`, `unet` (or `all`).
    pub fn parse(s: &str) -> Result<Self> {
        let mut c = Self {
            llm: false,
            vision: false,
            unet: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "llm" => c.llm = true,
                "vision" => c.vision = true,
                "unet" => c.unet = true,
                "all" => c = Self::ALL,
                _ => {
                    return Err(PipelineError::Input(format!(
                        "unknown component `{part}` in --quantize-components (expected llm, vision, unet or all)"
                    )))
                }
            }
        }
        if c == (Self {
            llm: false,
            vision: false,
            unet: false,
        }) {
            return Err(PipelineError::Input(
                "--quantize-components names no component (use llm, vision, unet or all)".into(),
            ));
        }
        Ok(c)
    }

    /// `quant` for each of (vision, LLM, decoder) as these components say.
    pub fn split(
        self,
        quant: Option<emu_llm::LlmQuant>,
    ) -> (
        Option<emu_llm::LlmQuant>,
        Option<emu_llm::LlmQuant>,
        Option<emu_llm::LlmQuant>,
    ) {
        let on = |b: bool| quant.filter(|_| b);
        (on(self.vision), on(self.llm), on(self.unet))
    }
}

/// Which components a pipeline keeps in memory.
///
/// * [`Residency::All`] (the default, `--offload none`): every component is
///   loaded by `load` and stays resident; peak memory is the sum of their
///   weights.
/// * [`Residency::Sequential`] (`--offload sequential`, as diffusers'
///   sequential model offload): `load` opens the checkpoints (headers; data
///   is mapped lazily) and each run loads a component only for its stage and
///   drops it when the stage is over: the vision encoder encodes the
///   pictures, then the language model answers or regresses, then the UNet
///   denoises, then the VAE decodes. Peak memory is the largest stage, at
///   the price of reading (and, with `--quantize`, re-quantizing) every
///   component's weights on every run; the run's [`Timings`] show each load
///   (`load vision`, `load llm`, `load unet`, `load vae`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    #[default]
    All,
    Sequential,
}

impl Residency {
    /// The values of `--offload`, each with what it does.
    pub const CHOICES: [(&'static str, &'static str); 2] = [
        ("none", "every component stays in memory"),
        ("sequential", "one component in memory at a time"),
    ];

    /// Parses an `--offload` value: `none` or `sequential`.
    pub fn parse_offload(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Residency::All),
            "sequential" => Ok(Residency::Sequential),
            _ => Err(PipelineError::Input(format!(
                "--offload `{s}` is not a choice; use {}",
                Self::choices()
            ))),
        }
    }

    /// `none (…) or sequential (…)`, for messages.
    pub fn choices() -> String {
        Self::CHOICES
            .iter()
            .map(|(n, what)| format!("{n} ({what})"))
            .collect::<Vec<_>>()
            .join(" or ")
    }

    /// The `--offload` value that selects this.
    pub fn offload_name(self) -> &'static str {
        match self {
            Residency::All => "none",
            Residency::Sequential => "sequential",
        }
    }
}

/// A component for the length of one stage: the resident one
/// ([`Residency::All`]) or one loaded for this stage alone, dropped with
/// this value ([`Residency::Sequential`]).
pub(crate) enum Held<'a, T> {
    Resident(&'a T),
    Loaded(T),
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Resident(t) => t,
            Held::Loaded(t) => t,
        }
    }
}

/// `slot`'s component when resident, else `load()`'s, timed as `stage` in `timings`.
pub(crate) fn hold<'a, T>(
    slot: &'a Option<T>,
    stage: &'static str,
    timings: &mut Timings,
    load: impl FnOnce() -> Result<T>,
) -> Result<Held<'a, T>> {
    if let Some(t) = slot {
        return Ok(Held::Resident(t));
    }
    let t0 = std::time::Instant::now();
    let t = load()?;
    timings.add(stage, t0.elapsed());
    Ok(Held::Loaded(t))
}

/// The stages of `dir`'s pipeline (vision encoder, language model and,
/// for Emu2-Gen, UNet and VAE), in each of `formats`: a compute dtype for
/// every component, and the linears quantized as asked, on the components
/// asked.
/// Everything is counted in host memory. The outer error is a model that
/// cannot be read; a format that does not apply (block sizes that do not
/// divide) is an inner error.
pub(crate) fn model_stages(
    dir: &ModelDir,
    formats: &[(DType, Option<emu_llm::LlmQuant>, QuantComponents)],
) -> Result<Vec<Result<Vec<crate::memory::Stage>>>> {
    use crate::memory::Pool;
    let (config, origin) = dir.emu_config()?;
    let (_, llm_cfg) = emu2::parse_config(&config, &origin)?;
    let ckpt = dir.open_encoder_weights()?;
    let decoders = if dir.family() == ModelFamily::Emu2Gen {
        vec![
            ("unet", generate::open_component(dir.root(), "unet")?),
            ("vae", generate::open_component(dir.root(), "vae")?),
        ]
    } else {
        Vec::new()
    };
    Ok(formats
        .iter()
        .map(|(dtype, quant, on)| {
            let (qv, ql, qd) = on.split(*quant);
            let blocks = |q: Option<emu_llm::LlmQuant>| q.map(|q| q.blocks()).unwrap_or_default();
            let mut stages = vec![
                emu2::vision_stage_at(&ckpt, *dtype, blocks(qv), Pool::Host)?,
                emu2::llm_stage_at(&ckpt, &llm_cfg, *dtype, ql.as_ref(), Pool::Host)?,
            ];
            for (name, c) in &decoders {
                stages.push(generate::decoder_stage_at(c, name, *dtype, blocks(qd), Pool::Host)?);
            }
            Ok(stages)
        })
        .collect())
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
