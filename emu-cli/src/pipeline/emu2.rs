//! The Emu2 multimodal model shared by every pipeline: EVA encoder with
//! pooling and `project_up`, the LLaMA decoder, the tokenizer, and the
//! glue that turns a rendered prompt into input embeddings.

use super::dump::{put, Dump};
use super::error::{PipelineError, Result};
use super::{Component, Timings};
use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::{Backend, DType, HostTensor, Tensor};
use emu_llm::{Llama, LlamaConfig, Logits, SlotIds};
use emu_prompt::{Emu2Tokenizer, Rendered, SpecialToken, Variant, VisualInput};
use emu_vision::{load_image, EmuVisionConfig, Preprocessor, RgbImage, VisionEncoder};
use std::path::Path;
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

/// Where `project_up`/`project_down` sit relative to the checkpoint root,
/// in the layouts the vision encoder accepts (HF, native, native Gen).
const PROJECTION_PREFIXES: [&str; 2] = ["", "multimodal_encoder."];

impl<V: Backend, L: Backend> Emu2Model<V, L> {
    /// Loads `config.json`, the weights and the tokenizer. `vision` and `llm`
    /// say where each part runs and in which dtype.
    pub fn load(
        encoder_dir: &Path,
        tokenizer_dir: &Path,
        variant: Variant,
        vision: &Component<V>,
        llm: &Component<L>,
        timings: &mut Timings,
    ) -> Result<Self> {
        check_dtype(&vision.backend, vision.dtype, "vision encoder")?;
        check_dtype(&llm.backend, llm.dtype, "language model")?;
        let t0 = Instant::now();
        let config_path = encoder_dir.join("config.json");
        let vision_cfg = EmuVisionConfig::from_file(&config_path)?;
        let llm_cfg = LlamaConfig::from_file(&config_path)?;
        if llm_cfg.vocab_size != variant.vocab_size() {
            return Err(PipelineError::Model(format!(
                "{}: vocab_size is {}, but an Emu2{} vocabulary has {} tokens",
                config_path.display(),
                llm_cfg.vocab_size,
                if variant == Variant::Chat { "-Chat" } else { "" },
                variant.vocab_size()
            )));
        }
        let tokenizer = Emu2Tokenizer::from_dir(tokenizer_dir, variant)?;
        let ckpt = Checkpoint::open(encoder_dir)?;
        let root = Weights::new(&ckpt);
        let encoder = VisionEncoder::load(&vision.backend, &root, vision_cfg, vision.dtype)?;
        let preprocessor = Preprocessor::for_config(&encoder.config().vision)?;
        let lm = Llama::load(&llm.backend, &emu_llm::lm_weights(&ckpt)?, &llm_cfg, llm.dtype)?;
        let (h, d) = (llm_cfg.hidden_size, encoder.config().d_model);
        let mut project_up = None;
        let mut project_down = None;
        if let Some(prefix) = PROJECTION_PREFIXES
            .iter()
            .find(|p| ckpt.contains(&format!("{p}project_up.weight")))
        {
            let w = Weights::with_prefix(&ckpt, *prefix);
            project_up = Some(w.tensor(&llm.backend, "project_up.weight", &[h, d], llm.dtype)?);
            project_down = w.tensor_opt(&llm.backend, "project_down.weight", &[d, h], llm.dtype)?;
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
        let tokens = self.vision.project(&pooled)?.reshape(&[n, h])?;
        put(dump, names[3], || Ok(tokens.to_host()?))?;
        // The parts may run on different devices: hand over through the host.
        let host = tokens.to_host()?;
        let out = Tensor::from_host(self.llm.backend(), &host)?.to_dtype(self.llm.dtype())?;
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
