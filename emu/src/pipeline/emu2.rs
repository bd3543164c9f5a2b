//! The Emu2 multimodal model shared by every pipeline: EVA encoder with
//! pooling and `project_up`, the LLaMA decoder, the tokenizer, and the
//! glue that turns a rendered prompt into input embeddings.

use super::dump::{put, Dump};
use super::error::{PipelineError, Result};
use super::model::ModelDir;
use super::{hold, Component, Held, Residency, Timings};
use crate::memory::{checkpoint_bytes, component_bytes, llm_weight_bytes, pool_of, Need, Pool, Stage};
use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::{Backend, BlockQuant, DType, HostTensor, Tensor};
use emu_llm::{Llama, LlamaConfig, LlmQuant, Logits, SlotIds};
use emu_prompt::{Emu2Tokenizer, Rendered, SpecialToken, Variant, VisualInput};
use emu_vision::{load_image, EmuVisionConfig, Preprocessor, RgbImage, VisionEncoder, VisionError};
use std::time::Instant;

/// Checks that `dtype` can run on `backend`, with a message that lists what can.
pub fn check_dtype<B: Backend>(backend: &B, dtype: DType, what: &str) -> Result<()> {
    // The models compute in these three; f64 is a storage type here.
    let compute = matches!(dtype, DType::F32 | DType::BF16 | DType::F16);
    if compute && backend.supports(dtype) {
        return Ok(());
    }
    let ok: Vec<&str> = [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .filter(|d| backend.supports(*d))
        .map(|d| d.name())
        .collect();
    Err(PipelineError::DType(format!(
        "the {what} cannot run in {dtype} on backend `{}`; use --dtype {}",
        backend.name(),
        ok.join(" or ")
    )))
}

/// Where `project_up`/`project_down` sit relative to the checkpoint root:
/// Hugging Face `EmuForCausalLM` (top level), and upstream's native
/// `EmuModel`, where they are modules of the LLaMA (`decoder.lm.`, Emu2/emu/lm.py),
/// alone or under Emu2-Gen's `multimodal_encoder.`.
const PROJECTION_PREFIXES: [&str; 4] = [
    "",
    "decoder.lm.",
    "multimodal_encoder.",
    "multimodal_encoder.decoder.lm.",
];

/// The `(project_up, project_down)` keys of `ckpt`, if it has them.
/// Older native checkpoints name them `vl_adapter.projection` and
/// `decoder.lm.stu_regress_head` (upstream renames both when it loads them,
/// `EmuModel.load_state_dict`).
pub(crate) fn projection_keys(ckpt: &Checkpoint) -> Option<(String, String)> {
    let found = PROJECTION_PREFIXES
        .iter()
        .find(|p| ckpt.contains(&format!("{p}project_up.weight")))
        .map(|p| (format!("{p}project_up.weight"), format!("{p}project_down.weight")));
    found.or_else(|| {
        ckpt.contains("vl_adapter.projection.weight").then(|| {
            (
                "vl_adapter.projection.weight".to_string(),
                "decoder.lm.stu_regress_head.weight".to_string(),
            )
        })
    })
}

/// Parses the vision and LLaMA halves of an Emu2 `config.json`, naming `origin` on errors.
pub(crate) fn parse_config(config: &serde_json::Value, origin: &str) -> Result<(EmuVisionConfig, LlamaConfig)> {
    let vision = EmuVisionConfig::from_value(config).map_err(|e| match e {
        VisionError::InvalidConfig(m) => PipelineError::Model(format!("{origin}: {m}")),
        other => other.into(),
    })?;
    let llm =
        LlamaConfig::from_json_value(config.clone()).map_err(|e| PipelineError::Model(format!("{origin}: {e}")))?;
    Ok((vision, llm))
}

/// Whether checkpoint `key` is one of the LLaMA tensors under `lm` (the
/// LLaMA root's prefix); everything else of an Emu2 checkpoint is the
/// vision side and the projections.
pub(crate) fn is_llm_key(key: &str, lm: &str) -> bool {
    key.strip_prefix(lm).is_some_and(|k| {
        ["model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."]
            .iter()
            .any(|p| k.starts_with(p))
    })
}

/// Refuses to encode `n` pictures at once when the encoder's activations
/// would not fit where it runs (on `backend`).
pub(crate) fn check_vision_memory<B: Backend>(cfg: &emu_vision::EvaConfig, backend: &B, n: usize) -> Result<()> {
    let s = if n == 1 { "" } else { "s" };
    let need = Need {
        component: "vision",
        what: format!("activations of {n} picture{s}"),
        bytes: crate::memory::vision_activation_bytes(cfg, n),
        dtype: None,
        pool: pool_of(backend),
    };
    crate::memory::check(
        &format!("encoding {n} picture{s}"),
        &[need],
        "use fewer images or video frames",
    )
}

/// What the vision encoder of `ckpt` holds once loaded: every tensor that is
/// not the language model's (the projections included).
pub(crate) fn vision_stage<V: Backend>(ckpt: &Checkpoint, vision: &Component<V>) -> Result<Stage> {
    vision_stage_at(ckpt, vision.dtype, block_quant(vision), pool_of(&vision.backend))
}

/// What a component's `quant` asks of a transformer that is not the LLaMA
/// (the EVA encoder, the UNet): its attention and MLP groups.
pub(crate) fn block_quant<B: Backend>(c: &Component<B>) -> BlockQuant {
    c.quant.map(|q| q.blocks()).unwrap_or_default()
}

/// [`vision_stage`] in `dtype` with the block linears `quant` selects
/// quantized, resident in `pool` (quantized linears on the host).
pub(crate) fn vision_stage_at(ckpt: &Checkpoint, dtype: DType, quant: BlockQuant, pool: Pool) -> Result<Stage> {
    let lm = emu_llm::lm_weights(ckpt).ok().map(|w| w.prefix().to_string());
    let keep = |k: &str| lm.as_deref().is_none_or(|p| !is_llm_key(k, p));
    let select = |k: &str, dims: &[usize]| quant.format(emu_vision::linear_group(k)?, *dims.last()?);
    let (bytes, host) = component_bytes(ckpt, dtype, &keep, &select)?;
    let (_, largest_f32) = checkpoint_bytes(ckpt, DType::F32, &keep)?;
    Ok(Stage {
        name: "vision",
        needs: with_host_blocks(
            Need {
                component: "vision",
                what: format!("weights in {dtype}"),
                bytes,
                dtype: Some(dtype),
                pool,
            },
            host,
        ),
        largest_f32,
    })
}

/// `need`, and beside it the block bytes of quantized linears when there
/// are any (`QuantTensor`s live on the host whatever the backend).
pub(crate) fn with_host_blocks(need: Need, host: u64) -> Vec<Need> {
    let component = need.component;
    let mut needs = vec![need];
    if host > 0 {
        needs.push(Need {
            component,
            what: "quantized linears (kept on the host)".into(),
            bytes: host,
            dtype: None,
            pool: Pool::Host,
        });
    }
    needs
}

/// What the language model of `ckpt` (and the projections of the visual
/// regression) holds once loaded, on its backend and, for quantized
/// linears, on the host.
pub(crate) fn llm_stage<L: Backend>(ckpt: &Checkpoint, llm_cfg: &LlamaConfig, llm: &Component<L>) -> Result<Stage> {
    llm_stage_at(ckpt, llm_cfg, llm.dtype, llm.quant.as_ref(), pool_of(&llm.backend))
}

/// [`llm_stage`] in `dtype` with the linears `quant` selects quantized,
/// resident in `pool` (quantized linears on the host).
pub(crate) fn llm_stage_at(
    ckpt: &Checkpoint,
    llm_cfg: &LlamaConfig,
    dtype: DType,
    quant: Option<&LlmQuant>,
    pool: Pool,
) -> Result<Stage> {
    let lm = emu_llm::lm_weights(ckpt)?;
    let prefix = lm.prefix().to_string();
    let projections = projection_keys(ckpt);
    let is_projection = |k: &str| projections.as_ref().is_some_and(|(u, d)| k == u || k == d);
    let (_, largest_f32) = checkpoint_bytes(ckpt, DType::F32, &|k| is_llm_key(k, &prefix) || is_projection(k))?;
    let stored = |k: &str| ckpt.quant_type(&lm.key(k)).ok().flatten();
    let (mut dense, host) = llm_weight_bytes(llm_cfg, dtype, quant, &stored, lm.contains("lm_head.weight"))?;
    if let Some((up, down)) = &projections {
        for key in [up, down] {
            if let Ok(info) = ckpt.info(key) {
                let n = info.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
                dense = dense.saturating_add(n.saturating_mul(dtype.size_in_bytes() as u64));
            }
        }
    }
    Ok(Stage {
        name: "llm",
        needs: with_host_blocks(
            Need {
                component: "llm",
                what: format!("weights in {dtype}"),
                bytes: dense,
                dtype: Some(dtype),
                pool,
            },
            host,
        ),
        largest_f32,
    })
}

/// The advice of a refused load.
pub(crate) const LOAD_ADVICE: &str =
    "try --dtype bf16, --quantize q4_k (the language model), or another backend for a component";

/// The language-model side of Emu2 once loaded: the LLaMA and the
/// projections of the visual regression, on the language model's backend.
pub struct Emu2Llm<L: Backend> {
    pub llm: Llama<L>,
    /// `project_up` / `project_down` (`None` when the checkpoint lacks them).
    project_up: Option<Tensor<L>>,
    project_down: Option<Tensor<L>>,
}

impl<L: Backend> Emu2Llm<L> {
    /// Loads the LLaMA of `ckpt` (quantizing the linears `llm.quant`
    /// selects) and the projections; `d_model` is the vision width.
    fn load(ckpt: &Checkpoint, cfg: &LlamaConfig, d_model: usize, llm: &Component<L>) -> Result<Self> {
        let lm = Llama::load_quantized(
            &llm.backend,
            &emu_llm::lm_weights(ckpt)?,
            cfg,
            llm.dtype,
            llm.quant.as_ref(),
        )?;
        let root = Weights::new(ckpt);
        let (h, d) = (cfg.hidden_size, d_model);
        let mut project_up = None;
        let mut project_down = None;
        if let Some((up, down)) = projection_keys(ckpt) {
            project_up = Some(root.tensor(&llm.backend, &up, &[h, d], llm.dtype)?);
            project_down = root.tensor_opt(&llm.backend, &down, &[d, h], llm.dtype)?;
        }
        Ok(Self {
            llm: lm,
            project_up,
            project_down,
        })
    }

    /// The weights of `project_up` and `project_down` (for the regression).
    pub fn projections(&self) -> Result<(&Tensor<L>, &Tensor<L>)> {
        match (&self.project_up, &self.project_down) {
            (Some(u), Some(d)) => Ok((u, d)),
            _ => Err(PipelineError::Model(
                "this checkpoint has no project_up/project_down weights, which image generation needs".into(),
            )),
        }
    }

    /// Runs the prompt once more to dump the prefill hidden states and the
    /// last position's logits (only when dumping: generation does its own prefill).
    pub fn dump_prefill(&self, embeds: &Tensor<L>, dump: Option<&Dump>) -> Result<()> {
        let Some(dump) = dump else {
            return Ok(());
        };
        let t = embeds.dim(1)?;
        let mut cache = self.llm.new_cache(1, t)?;
        let out = self.llm.forward_embeds(embeds, &mut cache, Logits::Skip)?;
        dump.put("prefill_hidden", &out.hidden.to_host()?)?;
        let last = out.hidden.narrow(1, t - 1, 1)?;
        dump.put("prefill_logits", &self.llm.logits(&last)?.to_host()?)?;
        Ok(())
    }
}

/// Emu2 (base, Chat, or Emu2-Gen's multimodal encoder): the EVA encoder
/// with pooling and `project_up`, the LLaMA decoder, the tokenizer. The
/// vision encoder runs on `V`, the language model (and the projections of
/// the visual regression) on `L`; visual tokens cross from one to the
/// other through the host.
///
/// With [`Residency::All`] both halves are loaded by `load`; with
/// [`Residency::Sequential`] the checkpoint stays open and each half is
/// loaded for its stage of a run and dropped after it.
pub struct Emu2Model<V: Backend, L: Backend> {
    pub tokenizer: Emu2Tokenizer,
    pub preprocessor: Preprocessor,
    vision_cfg: EmuVisionConfig,
    llm_cfg: LlamaConfig,
    vision_at: Component<V>,
    llm_at: Component<L>,
    residency: Residency,
    /// Whether the checkpoint has `project_up` for the language model's
    /// side (native checkpoints keep it there, out of the vision encoder's reach).
    llm_projects: bool,
    /// [`Residency::Sequential`]: the open checkpoint the stages load from.
    ckpt: Option<Checkpoint>,
    vision: Option<VisionEncoder<V>>,
    lm: Option<Emu2Llm<L>>,
}

/// The pictures of a rendered prompt, decoded: images and video frames.
#[derive(Default)]
pub(crate) struct Pictures {
    images: Vec<RgbImage>,
    frames: Vec<RgbImage>,
}

impl Pictures {
    pub(crate) fn is_empty(&self) -> bool {
        self.images.is_empty() && self.frames.is_empty()
    }
}

/// Visual tokens of one batch of pictures, on the host between the vision
/// stage and the language model's: projected `[N·n_query, H]`, or pooled
/// `[N·n_query, d_model]` when `project_up` lives on the language model's side.
pub(crate) struct Visual {
    host: HostTensor,
    projected: bool,
    frames: bool,
}

/// The visual tokens of a prompt's images and video frames.
#[derive(Default)]
pub(crate) struct Visuals {
    images: Option<Visual>,
    frames: Option<Visual>,
}

impl<V: Backend, L: Backend> Emu2Model<V, L> {
    /// Loads the configuration, the weights and the tokenizer of `dir` (see
    /// [`ModelDir::emu_config`], [`ModelDir::open_encoder_weights`],
    /// [`ModelDir::tokenizer_dir`]). `vision` and `llm` say where each part
    /// runs and in which dtype.
    pub fn load(
        dir: &ModelDir,
        variant: Variant,
        vision: &Component<V>,
        llm: &Component<L>,
        timings: &mut Timings,
    ) -> Result<Self> {
        Self::load_with(dir, variant, vision, llm, timings, Vec::new(), Residency::All)
    }

    /// [`Self::load`] with a [`Residency`]: under [`Residency::Sequential`]
    /// only the configuration and the tokenizer are loaded here.
    pub fn load_with_residency(
        dir: &ModelDir,
        variant: Variant,
        vision: &Component<V>,
        llm: &Component<L>,
        residency: Residency,
        timings: &mut Timings,
    ) -> Result<Self> {
        Self::load_with(dir, variant, vision, llm, timings, Vec::new(), residency)
    }

    /// [`Self::load_with_residency`], refusing before anything is loaded
    /// when these weights and the `more` stages (what the caller loads
    /// next, e.g. the UNet and the VAE) cannot fit in memory: all of them
    /// at once, or the largest under [`Residency::Sequential`] (see
    /// [`crate::memory::check_stages`]).
    pub(crate) fn load_with(
        dir: &ModelDir,
        variant: Variant,
        vision: &Component<V>,
        llm: &Component<L>,
        timings: &mut Timings,
        more: Vec<Stage>,
        residency: Residency,
    ) -> Result<Self> {
        check_dtype(&vision.backend, vision.dtype, "vision encoder")?;
        check_dtype(&llm.backend, llm.dtype, "language model")?;
        let t0 = Instant::now();
        let (config, origin) = dir.emu_config()?;
        let (vision_cfg, llm_cfg) = parse_config(&config, &origin)?;
        if llm_cfg.vocab_size != variant.vocab_size() {
            return Err(PipelineError::Model(format!(
                "{origin}: vocab_size is {}, but an Emu2{} vocabulary has {} tokens",
                llm_cfg.vocab_size,
                if variant == Variant::Chat { "-Chat" } else { "" },
                variant.vocab_size()
            )));
        }
        let tokenizer_dir = dir.tokenizer_dir();
        let tokenizer = Emu2Tokenizer::from_dir(&tokenizer_dir, variant).map_err(|e| match e {
            // A native single file comes without a tokenizer: say where one is.
            emu_prompt::Error::Tokenizer(m) if dir.native_file().is_some() => PipelineError::Model(format!(
                "{m}; put the LLaMA tokenizer (upstream's Emu2/emu/conf/llama_config/tokenizer.model, or the tokenizer files of {}) beside the checkpoint",
                dir.family().repo_id()
            )),
            other => other.into(),
        })?;
        let ckpt = dir.open_encoder_weights()?;
        let mut stages = vec![vision_stage(&ckpt, vision)?, llm_stage(&ckpt, &llm_cfg, llm)?];
        stages.extend(more);
        crate::memory::check_stages("loading the model", &stages, residency, LOAD_ADVICE)?;
        let preprocessor = Preprocessor::for_config(&vision_cfg.vision)?;
        let llm_projects = projection_keys(&ckpt).is_some();
        let mut model = Self {
            tokenizer,
            preprocessor,
            vision_cfg,
            llm_cfg,
            vision_at: vision.clone(),
            llm_at: llm.clone(),
            residency,
            llm_projects,
            ckpt: None,
            vision: None,
            lm: None,
        };
        match residency {
            Residency::All => {
                model.vision = Some(model.load_vision(&ckpt)?);
                model.lm = Some(model.load_llm(&ckpt)?);
            }
            Residency::Sequential => model.ckpt = Some(ckpt),
        }
        timings.add("load", t0.elapsed());
        Ok(model)
    }

    fn load_vision(&self, ckpt: &Checkpoint) -> Result<VisionEncoder<V>> {
        let at = &self.vision_at;
        Ok(VisionEncoder::load_quantized(
            &at.backend,
            &Weights::new(ckpt),
            self.vision_cfg.clone(),
            at.dtype,
            block_quant(at),
        )?)
    }

    fn load_llm(&self, ckpt: &Checkpoint) -> Result<Emu2Llm<L>> {
        Emu2Llm::load(ckpt, &self.llm_cfg, self.vision_cfg.d_model, &self.llm_at)
    }

    /// The open checkpoint of a sequential model.
    fn checkpoint(&self) -> Result<&Checkpoint> {
        self.ckpt
            .as_ref()
            .ok_or_else(|| PipelineError::Model("the model's checkpoint is not open".into()))
    }

    /// The vision encoder for one stage: the resident one, or (sequential)
    /// loaded now, after checking that it fits.
    pub(crate) fn hold_vision(&self, timings: &mut Timings) -> Result<Held<'_, VisionEncoder<V>>> {
        hold(&self.vision, "load vision", timings, || {
            let ckpt = self.checkpoint()?;
            let stage = vision_stage(ckpt, &self.vision_at)?;
            crate::memory::check_stages("loading the vision encoder", &[stage], self.residency, LOAD_ADVICE)?;
            self.load_vision(ckpt)
        })
    }

    /// The language model for one stage, as [`Self::hold_vision`].
    pub(crate) fn hold_llm(&self, timings: &mut Timings) -> Result<Held<'_, Emu2Llm<L>>> {
        hold(&self.lm, "load llm", timings, || {
            let ckpt = self.checkpoint()?;
            let stage = llm_stage(ckpt, &self.llm_cfg, &self.llm_at)?;
            crate::memory::check_stages("loading the language model", &[stage], self.residency, LOAD_ADVICE)?;
            self.load_llm(ckpt)
        })
    }

    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// The vision encoder, when resident ([`Residency::All`]).
    pub fn vision(&self) -> Option<&VisionEncoder<V>> {
        self.vision.as_ref()
    }

    /// The language model, when resident ([`Residency::All`]).
    pub fn llm(&self) -> Option<&Llama<L>> {
        self.lm.as_ref().map(|l| &l.llm)
    }

    pub fn vision_config(&self) -> &EmuVisionConfig {
        &self.vision_cfg
    }

    pub fn llm_config(&self) -> &LlamaConfig {
        &self.llm_cfg
    }

    /// `<image>` slots per image and `[gIMG]` slots per video frame.
    pub fn n_query(&self) -> usize {
        self.vision_cfg.vision.n_query
    }

    pub fn v_query(&self) -> usize {
        self.vision_cfg.vision.v_query
    }

    /// Refuses a run of the language model over a `prompt`-token prompt
    /// plus `new_tokens` generated ones with `beams` beams (`what` names it)
    /// whose KV cache and activations would not fit where it runs. Called
    /// once the weights are resident, so what is available now is what
    /// these can use.
    pub(crate) fn check_llm_memory(&self, prompt: usize, beams: usize, new_tokens: usize, what: &str) -> Result<()> {
        let cfg = &self.llm_cfg;
        let (beams, context) = (beams.max(1), prompt.saturating_add(new_tokens));
        let dtype = self.llm_at.dtype;
        let pool = pool_of(&self.llm_at.backend);
        let needs = [
            Need {
                component: "llm",
                what: format!(
                    "KV cache ({} layers x 2 x {beams} beam{} x {context} positions x {} kv heads x {} x {} bytes)",
                    cfg.num_hidden_layers,
                    if beams == 1 { "" } else { "s" },
                    cfg.num_key_value_heads,
                    cfg.head_dim,
                    dtype.size_in_bytes()
                ),
                bytes: crate::memory::kv_cache_bytes(cfg, beams, context, dtype),
                dtype: None,
                pool: pool.clone(),
            },
            Need {
                component: "llm",
                what: "activations (prompt, then each step)".into(),
                bytes: crate::memory::llm_activation_bytes(cfg, 1, prompt, prompt, dtype)
                    .max(crate::memory::llm_activation_bytes(cfg, beams, 1, context, dtype)),
                dtype: None,
                pool,
            },
        ];
        crate::memory::check(
            what,
            &needs,
            "lower --max-new-tokens or --num-beams, or use a shorter prompt",
        )
    }

    /// Decodes the pictures of a rendered prompt in slot order.
    pub fn load_pictures(&self, inputs: &[VisualInput]) -> Result<Vec<RgbImage>> {
        inputs
            .iter()
            .map(|v| match v {
                VisualInput::Image(path) => Ok(load_image(path, &self.preprocessor.decode)?),
                VisualInput::BoxMask(mask) => Ok(RgbImage::new(mask.canvas, mask.canvas, mask.to_rgb())?),
            })
            .collect()
    }

    /// Token ids of a rendered prompt, checked against the context.
    pub(crate) fn tokenize(&self, rendered: &Rendered, dump: Option<&Dump>) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode_pieces(&rendered.pieces)?;
        let max = self.llm_cfg.max_position_embeddings;
        if ids.len() >= max {
            return Err(PipelineError::Input(format!(
                "the prompt is {} tokens (images included) but the model's context is {max}; use fewer or smaller inputs",
                ids.len()
            )));
        }
        put(dump, "input_ids", || {
            Ok(HostTensor::from_u32(&[ids.len()], ids.clone())?)
        })?;
        Ok(ids)
    }

    /// The decoded images and video frames of a rendered prompt.
    pub(crate) fn prompt_pictures(&self, rendered: &Rendered) -> Result<Pictures> {
        let frames: Vec<VisualInput> = rendered.frames.iter().cloned().map(VisualInput::Image).collect();
        Ok(Pictures {
            images: self.load_pictures(&rendered.images)?,
            frames: self.load_pictures(&frames)?,
        })
    }

    /// The vision stage of a prompt: its pictures' visual tokens, with
    /// `enc` (held by the caller when there are pictures).
    pub(crate) fn encode_visuals(
        &self,
        enc: Option<&VisionEncoder<V>>,
        pics: &Pictures,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Visuals> {
        let mut out = Visuals::default();
        if pics.is_empty() {
            return Ok(out);
        }
        let enc = enc.ok_or_else(|| PipelineError::Model("the vision encoder is not loaded".into()))?;
        if !pics.images.is_empty() {
            out.images = Some(self.encode_pictures(enc, &pics.images, self.n_query(), false, dump, timings)?);
        }
        if !pics.frames.is_empty() {
            out.frames = Some(self.encode_pictures(enc, &pics.frames, self.v_query(), true, dump, timings)?);
        }
        Ok(out)
    }

    /// [`Self::encode_visuals`] that holds the vision encoder only when
    /// there are pictures.
    pub(crate) fn visuals(&self, pics: &Pictures, dump: Option<&Dump>, timings: &mut Timings) -> Result<Visuals> {
        if pics.is_empty() {
            return Ok(Visuals::default());
        }
        let enc = self.hold_vision(timings)?;
        self.encode_visuals(Some(&enc), pics, dump, timings)
    }

    /// The vision half of [`Self::embed_pictures`]: encoded, pooled and
    /// (when the encoder has `project_up`) projected tokens, on the host.
    fn encode_pictures(
        &self,
        enc: &VisionEncoder<V>,
        images: &[RgbImage],
        n_query: usize,
        frames: bool,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Visual> {
        let t0 = Instant::now();
        let backend = &self.vision_at.backend;
        check_vision_memory(&self.vision_cfg.vision, backend, images.len())?;
        let pixels = self.preprocessor.batch(backend, images)?;
        let names = dump_names(frames);
        put(dump, names[0], || Ok(pixels.to_host()?))?;
        let features = enc.encode(&pixels)?;
        put(dump, names[1], || Ok(features.to_host()?))?;
        let pooled = enc.pool(&features, n_query)?;
        put(dump, names[2], || Ok(pooled.to_host()?))?;
        let n = images.len() * n_query;
        let h = self.llm_cfg.hidden_size;
        // The parts may run on different devices: hand over through the host.
        let out = match enc.project(&pooled) {
            Ok(tokens) => Visual {
                host: tokens.reshape(&[n, h])?.to_host()?,
                projected: true,
                frames,
            },
            // Native checkpoints keep project_up on the LLaMA module
            // (`decoder.lm.project_up`), where the vision encoder does not
            // look: project on the language model's side.
            Err(VisionError::InvalidArgument(_)) if self.llm_projects => {
                let d = pooled.dim(2)?;
                Visual {
                    host: pooled.reshape(&[n, d])?.to_host()?,
                    projected: false,
                    frames,
                }
            }
            Err(e) => return Err(e.into()),
        };
        timings.add("vision", t0.elapsed());
        Ok(out)
    }

    /// The language model's half of [`Self::embed_pictures`]: the tokens
    /// on its backend in its dtype, projected there when they are not yet.
    fn visual_tokens(
        &self,
        side: &Emu2Llm<L>,
        v: &Visual,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Tensor<L>> {
        let t0 = Instant::now();
        let tokens = Tensor::from_host(side.llm.backend(), &v.host)?.to_dtype(side.llm.dtype())?;
        let out = if v.projected {
            tokens
        } else {
            let up = side.project_up.as_ref().ok_or_else(|| {
                PipelineError::Model("this checkpoint has no project_up weights for the visual tokens".into())
            })?;
            tokens.linear(up, None)?
        };
        put(dump, dump_names(v.frames)[3], || Ok(out.to_host()?))?;
        timings.add("vision", t0.elapsed());
        Ok(out)
    }

    /// The language model's stage of a prompt: input embeddings `[1, T, H]`
    /// of `ids` with every image and video-frame slot filled by `visuals`.
    pub(crate) fn embed_prompt(
        &self,
        side: &Emu2Llm<L>,
        ids: &[u32],
        visuals: &Visuals,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Tensor<L>> {
        let images = match &visuals.images {
            Some(v) => Some(self.visual_tokens(side, v, dump, timings)?),
            None => None,
        };
        let frames = match &visuals.frames {
            Some(v) => Some(self.visual_tokens(side, v, dump, timings)?),
            None => None,
        };
        let slots = SlotIds {
            image: SpecialToken::Image.id(),
            video: SpecialToken::GImg.id(),
        };
        let embeds = side
            .llm
            .embed_with_visual(ids, 1, images.as_ref(), frames.as_ref(), slots)?;
        put(dump, "input_embeds", || Ok(embeds.to_host()?))?;
        Ok(embeds)
    }

    /// Pooled, projected visual tokens `[N·n_query, H]` on the LLM's backend.
    /// `frames` selects the dump names of video frames. Under
    /// [`Residency::Sequential`] this loads (and drops) both halves.
    pub fn embed_pictures(
        &self,
        images: &[RgbImage],
        n_query: usize,
        frames: bool,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Tensor<L>> {
        let v = {
            let enc = self.hold_vision(timings)?;
            self.encode_pictures(&enc, images, n_query, frames, dump, timings)?
        };
        let side = self.hold_llm(timings)?;
        self.visual_tokens(&side, &v, dump, timings)
    }

    /// Pooled EVA features `[N, n_query, d_model]` (no projection) of
    /// pictures, or of one all-zero normalised image when `images` is
    /// `None` (upstream's negative for the autoencoding mode), on the
    /// vision encoder's backend.
    pub fn pooled_features(
        &self,
        images: Option<&[RgbImage]>,
        n_query: usize,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Tensor<V>> {
        let enc = self.hold_vision(timings)?;
        self.pooled_with(&enc, images, n_query, dump, timings)
    }

    /// [`Self::pooled_features`] with a held encoder.
    pub(crate) fn pooled_with(
        &self,
        enc: &VisionEncoder<V>,
        images: Option<&[RgbImage]>,
        n_query: usize,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Tensor<V>> {
        let t0 = Instant::now();
        let backend = &self.vision_at.backend;
        check_vision_memory(&self.vision_cfg.vision, backend, images.map_or(1, |i| i.len()))?;
        let pixels = match images {
            Some(images) => self.preprocessor.batch(backend, images)?,
            None => {
                let s = self.vision_cfg.vision.image_size;
                Tensor::zeros(backend, &[1, 3, s, s], emu_core::DType::F32)?
            }
        };
        put(dump, "pixel_values", || Ok(pixels.to_host()?))?;
        let features = enc.encode(&pixels)?;
        put(dump, "vision_features", || Ok(features.to_host()?))?;
        let out = enc.pool(&features, n_query)?;
        put(dump, "pooled_tokens", || Ok(out.to_host()?))?;
        timings.add("vision", t0.elapsed());
        Ok(out)
    }

    /// Token ids of a rendered prompt and its input embeddings `[1, T, H]`
    /// with every image and video-frame slot filled. Under
    /// [`Residency::Sequential`] this loads (and drops) both halves.
    pub fn prompt_embeds(
        &self,
        rendered: &Rendered,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<(Vec<u32>, Tensor<L>)> {
        let ids = self.tokenize(rendered, dump)?;
        let pics = self.prompt_pictures(rendered)?;
        let visuals = self.visuals(&pics, dump, timings)?;
        let side = self.hold_llm(timings)?;
        let embeds = self.embed_prompt(&side, &ids, &visuals, dump, timings)?;
        Ok((ids, embeds))
    }
}

/// Dump names of pixel values, features, pooled and projected tokens, for
/// images or video frames.
fn dump_names(frames: bool) -> [&'static str; 4] {
    if frames {
        [
            "frame_values",
            "frame_features",
            "frame_pooled_tokens",
            "frame_projected_tokens",
        ]
    } else {
        ["pixel_values", "vision_features", "pooled_tokens", "projected_tokens"]
    }
}
