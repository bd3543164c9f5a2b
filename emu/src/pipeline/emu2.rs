//! The Emu2 multimodal model shared by every pipeline: EVA encoder with
//! pooling and `project_up`, the LLaMA decoder, the tokenizer, and the
//! glue that turns a rendered prompt into input embeddings.

use super::dump::{put, Dump};
use super::error::{PipelineError, Result};
use super::model::ModelDir;
use super::{Component, Timings};
use crate::memory::{checkpoint_bytes, llm_weight_bytes, loading_need, pool_of, Need, Pool};
use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::{Backend, DType, HostTensor, Tensor};
use emu_llm::{Llama, LlamaConfig, Logits, SlotIds};
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

/// Emu2 (base, Chat, or Emu2-Gen's multimodal encoder), loaded.
/// The vision encoder runs on `V`, the language model (and the projections
/// of the visual regression) on `L`; visual tokens cross from one to the
/// other through the host.
pub struct Emu2Model<V: Backend, L: Backend> {
    pub vision: VisionEncoder<V>,
    pub llm: Llama<L>,
    pub tokenizer: Emu2Tokenizer,
    pub preprocessor: Preprocessor,
    vision_backend: V,
    /// `project_up` / `project_down` on the LLM's backend, for the visual
    /// regression of Emu2-Gen (`None` when the checkpoint lacks them).
    project_up: Option<Tensor<L>>,
    project_down: Option<Tensor<L>>,
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

/// The memory the vision encoder and the language model of `ckpt` will
/// hold once loaded, each where it will live.
fn weight_needs<V: Backend, L: Backend>(
    ckpt: &Checkpoint,
    llm_cfg: &LlamaConfig,
    vision: &Component<V>,
    llm: &Component<L>,
    more_largest: u64,
) -> Result<Vec<Need>> {
    let lm = emu_llm::lm_weights(ckpt)?;
    let prefix = lm.prefix().to_string();
    let (vision_bytes, _) = checkpoint_bytes(ckpt, vision.dtype, &|k| !is_llm_key(k, &prefix))?;
    let (_, largest) = checkpoint_bytes(ckpt, DType::F32, &|_| true)?;
    let stored = |k: &str| ckpt.quant_type(&lm.key(k)).ok().flatten();
    let (mut dense, host) = llm_weight_bytes(
        llm_cfg,
        llm.dtype,
        llm.quant.as_ref(),
        &stored,
        lm.contains("lm_head.weight"),
    )?;
    if let Some((up, down)) = projection_keys(ckpt) {
        for key in [up, down] {
            if let Ok(info) = ckpt.info(&key) {
                let n = info.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
                dense = dense.saturating_add(n.saturating_mul(llm.dtype.size_in_bytes() as u64));
            }
        }
    }
    let mut needs = vec![
        Need {
            component: "vision",
            what: format!("weights in {}", vision.dtype),
            bytes: vision_bytes,
            dtype: Some(vision.dtype),
            pool: pool_of(&vision.backend),
        },
        Need {
            component: "llm",
            what: format!("weights in {}", llm.dtype),
            bytes: dense,
            dtype: Some(llm.dtype),
            pool: pool_of(&llm.backend),
        },
    ];
    if host > 0 {
        needs.push(Need {
            component: "llm",
            what: "quantized linears (kept on the host)".into(),
            bytes: host,
            dtype: None,
            pool: Pool::Host,
        });
    }
    // Tensors load one at a time, whichever checkpoint they come from.
    needs.push(loading_need("loading", largest.max(more_largest), Pool::Host));
    Ok(needs)
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
        Self::load_with(dir, variant, vision, llm, timings, Vec::new(), 0)
    }

    /// [`Self::load`], refusing before anything is loaded when these
    /// weights plus `more` (what the caller loads next, e.g. the decoder,
    /// whose largest tensor in f32 is `more_largest` bytes) cannot fit in
    /// memory (see [`crate::memory`]).
    pub(crate) fn load_with(
        dir: &ModelDir,
        variant: Variant,
        vision: &Component<V>,
        llm: &Component<L>,
        timings: &mut Timings,
        more: Vec<Need>,
        more_largest: u64,
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
        let mut needs = weight_needs(&ckpt, &llm_cfg, vision, llm, more_largest)?;
        needs.extend(more);
        crate::memory::check(
            "loading the model",
            &needs,
            "try --dtype bf16, --quantize q4_k (the language model), or another backend for a component",
        )?;
        let root = Weights::new(&ckpt);
        let encoder = VisionEncoder::load(&vision.backend, &root, vision_cfg, vision.dtype)?;
        let preprocessor = Preprocessor::for_config(&encoder.config().vision)?;
        let lm = Llama::load_quantized(
            &llm.backend,
            &emu_llm::lm_weights(&ckpt)?,
            &llm_cfg,
            llm.dtype,
            llm.quant.as_ref(),
        )?;
        let (h, d) = (llm_cfg.hidden_size, encoder.config().d_model);
        let mut project_up = None;
        let mut project_down = None;
        if let Some((up, down)) = projection_keys(&ckpt) {
            project_up = Some(root.tensor(&llm.backend, &up, &[h, d], llm.dtype)?);
            project_down = root.tensor_opt(&llm.backend, &down, &[d, h], llm.dtype)?;
        }
        timings.add("load", t0.elapsed());
        Ok(Self {
            vision: encoder,
            llm: lm,
            tokenizer,
            preprocessor,
            vision_backend: vision.backend.clone(),
            project_up,
            project_down,
        })
    }

    /// `<image>` slots per image and `[gIMG]` slots per video frame.
    pub fn n_query(&self) -> usize {
        self.vision.config().vision.n_query
    }

    pub fn v_query(&self) -> usize {
        self.vision.config().vision.v_query
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

    /// Refuses a run of the language model over a `prompt`-token prompt
    /// plus `new_tokens` generated ones with `beams` beams (`what` names it)
    /// whose KV cache and activations would not fit where it runs. Weights
    /// are resident by now, so what is available now is what these can use.
    pub(crate) fn check_llm_memory(&self, prompt: usize, beams: usize, new_tokens: usize, what: &str) -> Result<()> {
        let cfg = self.llm.config();
        let (beams, context) = (beams.max(1), prompt.saturating_add(new_tokens));
        let dtype = self.llm.dtype();
        let pool = pool_of(self.llm.backend());
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

    /// Pooled, projected visual tokens `[N·n_query, H]` on the LLM's backend.
    /// `frames` selects the dump names of video frames.
    pub fn embed_pictures(
        &self,
        images: &[RgbImage],
        n_query: usize,
        frames: bool,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<Tensor<L>> {
        let t0 = Instant::now();
        check_vision_memory(&self.vision.config().vision, &self.vision_backend, images.len())?;
        let pixels = self.preprocessor.batch(&self.vision_backend, images)?;
        let names = if frames {
            [
                "frame_values",
                "frame_features",
                "frame_pooled_tokens",
                "frame_projected_tokens",
            ]
        } else {
            ["pixel_values", "vision_features", "pooled_tokens", "projected_tokens"]
        };
        put(dump, names[0], || Ok(pixels.to_host()?))?;
        let features = self.vision.encode(&pixels)?;
        put(dump, names[1], || Ok(features.to_host()?))?;
        let pooled = self.vision.pool(&features, n_query)?;
        put(dump, names[2], || Ok(pooled.to_host()?))?;
        let n = images.len() * n_query;
        let h = self.llm.config().hidden_size;
        // The parts may run on different devices: hand over through the host.
        let out = match (self.vision.project(&pooled), &self.project_up) {
            (Ok(tokens), _) => {
                let host = tokens.reshape(&[n, h])?.to_host()?;
                Tensor::from_host(self.llm.backend(), &host)?.to_dtype(self.llm.dtype())?
            }
            // Native checkpoints keep project_up on the LLaMA module
            // (`decoder.lm.project_up`), where the vision encoder does not
            // look: project on the language model's side.
            (Err(VisionError::InvalidArgument(_)), Some(up)) => {
                let d = pooled.dim(2)?;
                let host = pooled.reshape(&[n, d])?.to_host()?;
                let pooled = Tensor::from_host(self.llm.backend(), &host)?.to_dtype(self.llm.dtype())?;
                pooled.linear(up, None)?
            }
            (Err(e), _) => return Err(e.into()),
        };
        put(dump, names[3], || Ok(out.to_host()?))?;
        timings.add("vision", t0.elapsed());
        Ok(out)
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
        let t0 = Instant::now();
        check_vision_memory(
            &self.vision.config().vision,
            &self.vision_backend,
            images.map_or(1, |i| i.len()),
        )?;
        let pixels = match images {
            Some(images) => self.preprocessor.batch(&self.vision_backend, images)?,
            None => {
                let s = self.vision.config().vision.image_size;
                Tensor::zeros(&self.vision_backend, &[1, 3, s, s], emu_core::DType::F32)?
            }
        };
        put(dump, "pixel_values", || Ok(pixels.to_host()?))?;
        let features = self.vision.encode(&pixels)?;
        put(dump, "vision_features", || Ok(features.to_host()?))?;
        let out = self.vision.pool(&features, n_query)?;
        put(dump, "pooled_tokens", || Ok(out.to_host()?))?;
        timings.add("vision", t0.elapsed());
        Ok(out)
    }

    /// Token ids of a rendered prompt and its input embeddings `[1, T, H]`
    /// with every image and video-frame slot filled.
    pub fn prompt_embeds(
        &self,
        rendered: &Rendered,
        dump: Option<&Dump>,
        timings: &mut Timings,
    ) -> Result<(Vec<u32>, Tensor<L>)> {
        let ids = self.tokenizer.encode_pieces(&rendered.pieces)?;
        let max = self.llm.config().max_position_embeddings;
        if ids.len() >= max {
            return Err(PipelineError::Input(format!(
                "the prompt is {} tokens (images included) but the model's context is {max}; use fewer or smaller inputs",
                ids.len()
            )));
        }
        put(dump, "input_ids", || {
            Ok(HostTensor::from_u32(&[ids.len()], ids.clone())?)
        })?;
        let images = if rendered.images.is_empty() {
            None
        } else {
            let pics = self.load_pictures(&rendered.images)?;
            Some(self.embed_pictures(&pics, self.n_query(), false, dump, timings)?)
        };
        let frames = if rendered.frames.is_empty() {
            None
        } else {
            let inputs: Vec<VisualInput> = rendered.frames.iter().cloned().map(VisualInput::Image).collect();
            let pics = self.load_pictures(&inputs)?;
            Some(self.embed_pictures(&pics, self.v_query(), true, dump, timings)?)
        };
        let slots = SlotIds {
            image: SpecialToken::Image.id(),
            video: SpecialToken::GImg.id(),
        };
        let embeds = self
            .llm
            .embed_with_visual(&ids, 1, images.as_ref(), frames.as_ref(), slots)?;
        put(dump, "input_embeds", || Ok(embeds.to_host()?))?;
        Ok((ids, embeds))
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
