//! The vision side alone: images to EVA features, pooled tokens and LLM
//! input embeddings, without loading the language model.

use super::emu2::projection_keys;
use super::error::{PipelineError, Result};
use super::model::ModelDir;
use super::{check_dtype, Component, Timings};
use emu_core::checkpoint::Weights;
use emu_core::{Backend, HostTensor, Tensor};
use emu_vision::{load_image, Preprocessor, VisionEncoder};
use std::path::Path;
use std::time::Instant;

/// What [`EncodePipeline::encode`] returns (host tensors, model dtype).
#[derive(Debug, Clone)]
pub struct EncodedImages {
    /// Raw EVA output `[N, 1 + grid², d_model]`, CLS first.
    pub features: HostTensor,
    /// Average-pooled `[N, n_query, d_model]`.
    pub pooled: HostTensor,
    /// `project_up` of the pooled tokens `[N, n_query, hidden_size]`, when
    /// the checkpoint has `project_up`.
    pub projected: Option<HostTensor>,
    pub timings: Timings,
}

/// The EVA encoder of any Emu2 model (base, Chat, or Emu2-Gen's multimodal encoder).
pub struct EncodePipeline<B: Backend> {
    vision: VisionEncoder<B>,
    preprocessor: Preprocessor,
    backend: B,
    /// `project_up` found outside the vision encoder's reach (native
    /// checkpoints keep it on the LLaMA module, `decoder.lm.project_up`).
    project_up: Option<Tensor<B>>,
    load_timings: Timings,
}

impl<B: Backend> EncodePipeline<B> {
    pub fn load(dir: &ModelDir, vision: &Component<B>) -> Result<Self> {
        check_dtype(&vision.backend, vision.dtype, "vision encoder")?;
        let t0 = Instant::now();
        let (config, origin) = dir.emu_config()?;
        let (config, _) = super::emu2::parse_config(&config, &origin)?;
        let ckpt = dir.open_encoder_weights()?;
        // Only the vision side is loaded: the language model's tensors, when
        // the checkpoint has them, are not counted.
        let stage = super::emu2::vision_stage(&ckpt, vision)?;
        let mut needs = stage.needs.clone();
        needs.push(crate::memory::loading_need(
            "loading",
            stage.largest_f32,
            crate::memory::Pool::Host,
        ));
        crate::memory::check("loading the vision encoder", &needs, "try --dtype bf16")?;
        let encoder = VisionEncoder::load_quantized(
            &vision.backend,
            &Weights::new(&ckpt),
            config,
            vision.dtype,
            super::emu2::block_quant(vision),
        )?;
        let preprocessor = Preprocessor::for_config(&encoder.config().vision)?;
        // The vision encoder finds `project_up` where Hugging Face puts it;
        // native checkpoints have it on the LLaMA module.
        let project_up = match projection_keys(&ckpt) {
            Some((up, _)) if up.contains("decoder.lm.") || up.starts_with("vl_adapter.") => {
                let d = encoder.config().d_model;
                let h = ckpt.info(&up)?.dims.first().copied().unwrap_or(0);
                Some(Weights::new(&ckpt).tensor(&vision.backend, &up, &[h, d], vision.dtype)?)
            }
            _ => None,
        };
        let mut load_timings = Timings::default();
        load_timings.add("load", t0.elapsed());
        Ok(Self {
            vision: encoder,
            preprocessor,
            backend: vision.backend.clone(),
            project_up,
            load_timings,
        })
    }

    pub fn load_timings(&self) -> &Timings {
        &self.load_timings
    }

    /// The model's `n_query` (tokens per image after pooling).
    pub fn n_query(&self) -> usize {
        self.vision.config().vision.n_query
    }

    /// Encodes image files; `n_query` defaults to the model's.
    pub fn encode<P: AsRef<Path>>(&self, images: &[P], n_query: Option<usize>) -> Result<EncodedImages> {
        if images.is_empty() {
            return Err(PipelineError::Input(
                "no image to encode; give at least one with --image".into(),
            ));
        }
        let t0 = Instant::now();
        let pics = images
            .iter()
            .map(|p| load_image(p, &self.preprocessor.decode))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        super::emu2::check_vision_memory(&self.vision.config().vision, &self.backend, pics.len())?;
        let pixels = self.preprocessor.batch(&self.backend, &pics)?;
        let features = self.vision.encode(&pixels)?;
        let pooled = self.vision.pool(&features, n_query.unwrap_or(self.n_query()))?;
        let projected = match (self.vision.project(&pooled), &self.project_up) {
            (Ok(p), _) => Some(p.to_host()?),
            (Err(emu_vision::VisionError::InvalidArgument(_)), Some(up)) => Some(pooled.linear(up, None)?.to_host()?),
            (Err(emu_vision::VisionError::InvalidArgument(_)), None) => None,
            (Err(e), _) => return Err(e.into()),
        };
        let mut timings = Timings::default();
        timings.add("vision", t0.elapsed());
        Ok(EncodedImages {
            features: features.to_host()?,
            pooled: pooled.to_host()?,
            projected,
            timings,
        })
    }
}
