//! The `emu chat`, `emu complete` and `emu generate` subcommands: argument
//! definitions (clap) and the code that runs a pipeline for them.

/// Runs `$body` with `$b` bound to the concrete backend inside an
/// [`AnyBackend`], so each pipeline is written once, generically, and
/// monomorphised per backend (nest it to place components separately).
macro_rules! with_backend {
    ($any:expr, |$b:ident| $body:expr) => {
        match $any {
            $crate::commands::AnyBackend::Cpu($b) => $body,
            $crate::commands::AnyBackend::Wgpu($b) => $body,
            $crate::commands::AnyBackend::Onnx($b) => $body,
        }
    };
}

pub mod chat;
pub mod complete;
pub mod encode;
pub mod export_onnx;
pub mod generate;
pub mod progress;

use crate::pipeline::{check_dtype, Component, ModelDir, ModelFamily, PipelineError, Result, Timings};
use crate::tiny::TINY_NOTICE;
use clap::Args;
use emu_backend_cpu::CpuBackend;
use emu_backend_onnx::OnnxBackend;
use emu_backend_wgpu::WgpuBackend;
use emu_core::{Backend, DType};
use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the threads of CPU computation for this process: the cpu backend's
/// pool and ONNX Runtime's intra-op threads of backends opened afterwards
/// (0: each library's default). Call it before any computation.
pub fn set_threads(n: usize) -> Result<()> {
    emu_backend_cpu::set_num_threads(n)?;
    THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// Backends compiled into this binary.
pub const BACKENDS: &[&str] = &["cpu", "wgpu", "onnx"];

/// A backend chosen by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Wgpu,
    Onnx,
}

impl BackendKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" => Ok(BackendKind::Wgpu),
            "onnx" => Ok(BackendKind::Onnx),
            _ => Err(PipelineError::UnknownBackend {
                name: name.to_string(),
                available: BACKENDS.join(", "),
            }),
        }
    }
}

/// An opened backend of any kind compiled in; `with_backend!` turns it
/// back into its concrete type.
#[derive(Debug, Clone)]
pub enum AnyBackend {
    Cpu(CpuBackend),
    Wgpu(WgpuBackend),
    Onnx(OnnxBackend),
}

/// Opens each kind of backend at most once, so components placed on the
/// same kind share one device (and one ONNX Runtime environment).
#[derive(Debug, Default)]
pub struct Backends {
    cpu: Option<CpuBackend>,
    wgpu: Option<WgpuBackend>,
    onnx: Option<OnnxBackend>,
}

impl Backends {
    /// The backend of `kind`, opened on first use. A backend that cannot
    /// start here (no GPU adapter, no ONNX Runtime library) is an error
    /// that says why.
    pub fn open(&mut self, kind: BackendKind) -> Result<AnyBackend> {
        Ok(match kind {
            BackendKind::Cpu => AnyBackend::Cpu(self.cpu.get_or_insert_with(CpuBackend::new).clone()),
            BackendKind::Wgpu => AnyBackend::Wgpu(match &self.wgpu {
                Some(b) => b.clone(),
                None => self.wgpu.insert(WgpuBackend::new()?).clone(),
            }),
            BackendKind::Onnx => AnyBackend::Onnx(match &self.onnx {
                Some(b) => b.clone(),
                None => self
                    .onnx
                    .insert(OnnxBackend::with_threads(THREADS.load(Ordering::Relaxed))?)
                    .clone(),
            }),
        })
    }
}

/// Where the vision encoder and the language model run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub vision: BackendKind,
    pub llm: BackendKind,
}

/// Options every model-running subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: `tiny` (built in, random weights: its output is meaningless,
    /// it only shows the pipeline running), a model directory in the Hugging
    /// Face layout, or a repo id (e.g. BAAI/Emu2-Chat) already in the local
    /// Hugging Face cache. Nothing is downloaded.
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// Where to run: cpu, wgpu (a GPU through Vulkan/Metal/DX12/GL) or
    /// onnx (ONNX Runtime; set ORT_DYLIB_PATH to its shared library).
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
    /// Block-quantize the language model's linears while loading: q8_0 or
    /// q4_k (GGUF's layouts). Embeddings, norms and lm_head stay in --dtype
    /// unless --quantize-linears names lm_head.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// Which linears --quantize applies to: a comma list of attn, mlp,
    /// lm_head, or all.
    #[arg(long, value_name = "LIST", default_value = "attn,mlp")]
    pub quantize_linears: String,
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
        self.quant()?;
        Ok(placement)
    }

    /// The `--quantize` request for the language model, if any.
    pub fn quant(&self) -> Result<Option<emu_llm::LlmQuant>> {
        let Some(q) = &self.quantize else {
            return Ok(None);
        };
        Ok(Some(emu_llm::LlmQuant {
            qtype: emu_core::QuantType::parse(q)?,
            linears: emu_llm::QuantLinears::parse(&self.quantize_linears)?,
        }))
    }

    /// The `--dump` folder, created if missing.
    pub fn dump(&self) -> Result<Option<crate::pipeline::Dump>> {
        self.dump.as_ref().map(crate::pipeline::Dump::new).transpose()
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
        let mut llm = component(llm, dtype, "language model")?;
        llm.quant = self.quant()?;
        Ok((component(vision, vision_dtype, "vision encoder")?, llm))
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

impl DecodeArgs {
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
            ..crate::pipeline::upstream_generation()
        }
    }
}

/// Prints stage timings to stderr.
pub fn report_timings(verbose: bool, load: &Timings, run: &Timings) {
    if verbose {
        let mut all = load.clone();
        all.merge(run);
        eprintln!("timings: {all}");
        eprintln!("cpu threads: {}", emu_backend_cpu::num_threads());
    }
}
