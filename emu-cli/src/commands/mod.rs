//! The `emu chat`, `emu complete` and `emu generate` subcommands: argument
//! definitions (clap) and the code that runs a pipeline for them.

pub mod chat;
pub mod complete;
pub mod encode;
pub mod export_onnx;
pub mod generate;
pub mod output;
pub mod progress;

use clap::Args;
use emu::pipeline::{
    check_dtype, Component, ModelDir, ModelFamily, PipelineError, QuantComponents, Residency, Result, Timings,
};
use emu::tiny::TINY_NOTICE;
use emu_core::{Backend, DType};

// Backend selection is library code (a server needs it too); these names
// stay reachable here for the subcommands.
pub use emu::backend::{set_threads, AnyBackend, BackendKind, Backends, Placement};

/// Options every model-running subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: `tiny` (built in, random weights: its output is meaningless,
    /// it only shows the pipeline running), a model directory in the Hugging
    /// Face layout, or a repo id (e.g. BAAI/Emu2-Chat) already in the local
    /// Hugging Face cache. Nothing is downloaded.
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// Where to run: cpu, wgpu (a GPU through Vulkan/Metal/DX12/GL), onnx
    /// (ONNX Runtime; set ORT_DYLIB_PATH to its shared library) or cuda (an
    /// NVIDIA GPU; EMU_CUDA_DEVICE=N picks it, EMU_CUDA_LIB_DIRS finds
    /// NVRTC/cuBLAS outside the usual places).
    #[arg(long, default_value = "cpu", value_name = "NAME")]
    pub backend: String,
    /// Where to run the vision encoder (overrides --backend).
    #[arg(long, value_name = "NAME")]
    pub vision_backend: Option<String>,
    /// Where to run the language model (overrides --backend).
    #[arg(long, value_name = "NAME")]
    pub llm_backend: Option<String>,
    /// Compute dtype of every component: f32, bf16 or f16. Default: f32 for
    /// the tiny model, bf16 for real checkpoints.
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// Compute dtype of the vision encoder only (overrides --dtype).
    #[arg(long, value_name = "DTYPE")]
    pub vision_dtype: Option<String>,
    /// Block-quantize linears while loading: q8_0 or q4_k (GGUF's layouts),
    /// the language model's unless --quantize-components says otherwise.
    /// Embeddings, norms and lm_head stay in --dtype unless
    /// --quantize-linears names lm_head.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// Which linears --quantize applies to: a comma list of attn, mlp,
    /// lm_head, or all.
    #[arg(long, value_name = "LIST", default_value = "attn,mlp")]
    pub quantize_linears: String,
    /// Which components --quantize applies to: a comma list of llm, vision
    /// (the EVA blocks' linears), unet (its transformer blocks' linears;
    /// generate only), or all. The VAE, convolutions and embeddings stay in
    /// --dtype.
    #[arg(long, value_name = "LIST", default_value = "llm")]
    pub quantize_components: String,
    /// With --quantize q4_k on the cpu backend: round decode's inputs to the
    /// Q4_K linears to 8 bits and take integer dot products, as llama.cpp
    /// does (faster; not the dequantized weights' f32 product). Needs
    /// AVX512-VNNI or AVX2.
    #[arg(long)]
    pub int8_activations: bool,
    /// Print the time each stage took.
    #[arg(long, short)]
    pub verbose: bool,
    /// Write every stage's tensors (pixel values, vision features, pooled and
    /// projected tokens, input ids and embeddings, prefill hidden states and
    /// logits, generated ids, regressed embeddings, latents, the image) into
    /// DIR as NAME.safetensors; see the pipeline docs for the names.
    #[arg(long, value_name = "DIR")]
    pub dump: Option<std::path::PathBuf>,
}

/// `--quantize TYPE --quantize-linears LIST` of any command, if given.
pub fn quant_request(quantize: Option<&str>, linears: &str) -> Result<Option<emu_llm::LlmQuant>> {
    let Some(q) = quantize else {
        return Ok(None);
    };
    Ok(Some(emu_llm::LlmQuant {
        qtype: emu_core::QuantType::parse(q)?,
        linears: emu_llm::QuantLinears::parse(linears)?,
    }))
}

/// `--quantize-components LIST` of any command, refused without `--quantize`.
pub fn quant_components(quantize: Option<&str>, list: &str) -> Result<QuantComponents> {
    let c = QuantComponents::parse(list)?;
    if quantize.is_none() && c != QuantComponents::default() {
        return Err(PipelineError::Input(
            "--quantize-components says where --quantize applies: add --quantize q8_0 or q4_k".into(),
        ));
    }
    Ok(c)
}

fn parse_dtype(s: &str) -> Result<DType> {
    match DType::parse(s) {
        Some(d @ (DType::F32 | DType::BF16 | DType::F16)) => Ok(d),
        _ => Err(PipelineError::DType(format!(
            "`{s}` is not a compute dtype; use --dtype f32, bf16 or f16"
        ))),
    }
}

impl ModelArgs {
    /// Checks the backend and dtype names, then resolves the model (the tiny
    /// one is built here), so that a typo fails before anything is loaded.
    pub fn resolve(&self, family: ModelFamily) -> Result<(Placement, ModelDir)> {
        let kind = self.check_names()?;
        match family {
            ModelFamily::Emu2Gen => {}
            ModelFamily::Emu2Chat => self.no_unet("chat")?,
            _ => self.no_unet("complete")?,
        }
        let dir = ModelDir::resolve(&self.model, family)?;
        if dir.is_tiny() {
            eprintln!("{TINY_NOTICE}");
        }
        Ok((kind, dir))
    }

    /// Checks the backend and dtype names; returns where each part runs.
    pub fn check_names(&self) -> Result<Placement> {
        let all = BackendKind::parse(&self.backend)?;
        let or_all = |o: &Option<String>| {
            o.as_deref()
                .map(BackendKind::parse)
                .transpose()
                .map(|k| k.unwrap_or(all))
        };
        let placement = Placement {
            vision: or_all(&self.vision_backend)?,
            llm: or_all(&self.llm_backend)?,
        };
        for d in [&self.dtype, &self.vision_dtype].into_iter().flatten() {
            parse_dtype(d)?;
        }
        if let Some(d) = &self.dump {
            emu::pipeline::check_dump_dir(d)?;
        }
        self.quant()?;
        self.quant_components()?;
        if self.int8_activations {
            self.check_int8_activations(placement)?;
        }
        Ok(placement)
    }

    /// `--int8-activations` only where it changes something.
    fn check_int8_activations(&self, placement: Placement) -> Result<()> {
        let q4k = self.quant()?.is_some_and(|q| q.qtype == emu_core::QuantType::Q4K);
        if !q4k {
            return Err(PipelineError::Input(
                "--int8-activations applies to Q4_K linears: add --quantize q4_k".into(),
            ));
        }
        if placement.llm != BackendKind::Cpu {
            return Err(PipelineError::Input(format!(
                "--int8-activations applies to the cpu backend; the language model runs on {}",
                placement.llm.name()
            )));
        }
        if !emu::backend::CpuBackend::int8_activations_available() {
            return Err(PipelineError::Input(
                "--int8-activations needs a CPU with AVX512-VNNI or AVX2 and FMA, which this one lacks".into(),
            ));
        }
        Ok(())
    }

    /// The backends to open components on (with `--int8-activations`).
    pub fn backends(&self) -> Backends {
        Backends::default().cpu_int8_activations(self.int8_activations)
    }

    /// The `--quantize` request for the language model, if any.
    pub fn quant(&self) -> Result<Option<emu_llm::LlmQuant>> {
        quant_request(self.quantize.as_deref(), &self.quantize_linears)
    }

    /// `--quantize-components`, refused without `--quantize`.
    pub fn quant_components(&self) -> Result<QuantComponents> {
        quant_components(self.quantize.as_deref(), &self.quantize_components)
    }

    /// Refuses `--quantize-components unet` on a command without a UNet.
    pub fn no_unet(&self, command: &str) -> Result<()> {
        if self.quantize.is_some() && self.quant_components()?.unet {
            return Err(PipelineError::Input(format!(
                "`{command}` runs no UNet: --quantize-components unet applies to `generate`"
            )));
        }
        Ok(())
    }

    /// The `--quantize` request for the UNet (`--quantize-components unet`).
    pub fn decoder_quant(&self) -> Result<Option<emu_llm::LlmQuant>> {
        Ok(self.quant_components()?.split(self.quant()?).2)
    }

    /// The `--dump` folder, created if missing.
    pub fn dump(&self) -> Result<Option<emu::pipeline::Dump>> {
        self.dump.as_ref().map(emu::pipeline::Dump::new).transpose()
    }

    /// The compute dtypes `(vision encoder, everything else)`.
    pub fn dtypes(&self, dir: &ModelDir) -> Result<(DType, DType)> {
        let default = if dir.is_tiny() { DType::F32 } else { DType::BF16 };
        let dtype = self.dtype.as_deref().map(parse_dtype).transpose()?.unwrap_or(default);
        let vision_dtype = self
            .vision_dtype
            .as_deref()
            .map(parse_dtype)
            .transpose()?
            .unwrap_or(dtype);
        Ok((vision_dtype, dtype))
    }

    /// The (vision, language model) components on their backends.
    pub fn components<V: Backend, L: Backend>(
        &self,
        vision: &V,
        llm: &L,
        dir: &ModelDir,
    ) -> Result<(Component<V>, Component<L>)> {
        let (vision_dtype, dtype) = self.dtypes(dir)?;
        let (qv, ql, _) = self.quant_components()?.split(self.quant()?);
        let mut llm = component(llm, dtype, "language model")?;
        llm.quant = ql;
        let mut vision = component(vision, vision_dtype, "vision encoder")?;
        vision.quant = qv;
        Ok((vision, llm))
    }
}

/// `backend` with `dtype`, checked to run there.
pub fn component<B: Backend>(backend: &B, dtype: DType, what: &str) -> Result<Component<B>> {
    check_dtype(backend, dtype, what)?;
    Ok(Component::new(backend.clone(), dtype))
}

impl ModelArgs {
    /// Opens the backends of `placement`: `(vision, language model)`.
    pub fn open(&self, placement: Placement, backends: &mut Backends) -> Result<(AnyBackend, AnyBackend)> {
        Ok((backends.open(placement.vision)?, backends.open(placement.llm)?))
    }
}

/// `--offload`, on the subcommands that run more than one component.
#[derive(Args, Debug, Clone)]
pub struct OffloadArgs {
    /// Which components stay in memory: none (all of them, loaded once) or
    /// sequential (each loaded for its stage of a run and dropped after it:
    /// the peak is the largest component instead of the sum, at the cost of
    /// reading, and with --quantize re-quantizing, the weights on every run).
    #[arg(long, default_value = "none", value_name = "MODE", value_parser = parse_offload)]
    pub offload: Residency,
}

fn parse_offload(s: &str) -> std::result::Result<Residency, String> {
    Residency::parse_offload(s).map_err(|_| format!("expected {}", Residency::choices()))
}

/// Decoding options of the text subcommands (defaults as upstream, SPEC §3.7).
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_new_tokens: usize,
    /// Beam search width (upstream: 5). 1 is greedy search, which streams the answer.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub num_beams: usize,
    /// Beam scores are divided by length^PENALTY. Upstream's -1 favours short
    /// answers (VQA); about 2.0 gives longer chat answers.
    #[arg(long, default_value_t = -1.0, allow_negative_numbers = true, value_name = "PENALTY")]
    pub length_penalty: f32,
    /// Sample instead of searching (needs --num-beams 1).
    #[arg(long)]
    pub sample: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep the K most likely tokens when sampling (0: all).
    #[arg(long, default_value_t = 50, value_name = "K")]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Penalty on repeating generated tokens (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop once the answer's text ends with STRING (kept in the answer);
    /// repeat for several. Applies to every beam in beam search.
    #[arg(long = "stop", value_name = "STRING")]
    pub stop: Vec<String>,
    /// Which transformers `generate` to follow where versions differ (beam
    /// scoring; the BOS under --repetition-penalty): 5 (5.x, the default) or
    /// 4.31 (the version upstream Emu2 pins).
    #[arg(long, default_value = "5", value_parser = parse_transformers, value_name = "VERSION")]
    pub transformers: emu_llm::TransformersVersion,
}

fn parse_transformers(s: &str) -> std::result::Result<emu_llm::TransformersVersion, String> {
    match s {
        "5" => Ok(emu_llm::TransformersVersion::V5),
        "4.31" => Ok(emu_llm::TransformersVersion::V4_31),
        _ => Err(format!("expected 5 or 4.31, found {s:?}")),
    }
}

/// Most tokens `--max-new-tokens` may ask for: far beyond any context
/// (Emu2: 2048), so that a typo is named here instead of deep in generation.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

impl DecodeArgs {
    /// Checks the numbers that size memory (beams, tokens) by flag name,
    /// before a model is loaded.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PipelineError::Input(m));
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return bad(format!(
                "--max-new-tokens {}: between 1 and {MAX_NEW_TOKENS} (the model's context is the real limit)",
                self.max_new_tokens
            ));
        }
        if self.num_beams == 0 || self.num_beams > emu_llm::MAX_BEAMS {
            return bad(format!(
                "--num-beams {}: between 1 and {} (upstream uses 5; each beam holds a full KV cache)",
                self.num_beams,
                emu_llm::MAX_BEAMS
            ));
        }
        Ok(())
    }

    pub fn generation(&self) -> emu_llm::GenerationConfig {
        emu_llm::GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            do_sample: self.sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_strings: self.stop.clone(),
            transformers: self.transformers,
            ..emu::pipeline::upstream_generation()
        }
    }
}

/// Prints stage timings to stderr.
pub fn report_timings(verbose: bool, load: &Timings, run: &Timings) {
    if verbose {
        let mut all = load.clone();
        all.merge(run);
        eprintln!("timings: {all}");
        eprintln!("cpu threads: {}", emu::backend::cpu_threads());
    }
}
