//! Emu2-Gen: text (and images, and boxes) to image (SPEC §4).

use super::dump::{put, Dump};
use super::emu2::{block_quant, check_dtype, with_host_blocks, Emu2Model, Pictures, Visuals};
use super::error::{PipelineError, Result};
use super::model::{ModelDir, ModelFamily};
use super::{hold, Component, Held, Residency, Timings};
use crate::memory::Stage;
use emu_core::checkpoint::Checkpoint;
use emu_core::{Backend, HostTensor, Tensor};
use emu_decoder::{
    AutoencoderKL, AutoencoderKLConfig, EulerDiscreteScheduler, TextTimeCond, UNet2DConditionConfig,
    UNet2DConditionModel,
};
use emu_llm::regress_visual;
use emu_prompt::{render, Item, ModelKind, Prompt, RenderOptions, Variant};
use emu_vision::RgbImage;
use std::path::Path;
use std::time::Instant;

/// Upstream's `original_size` time ids (`EmuVisualGeneration.forward`
/// default), used for every output size.
const UPSTREAM_ORIGINAL_SIZE: (f32, f32) = (1024.0, 1024.0);

/// Settings of [`GenerationPipeline::generate`]; the defaults are upstream's.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// Euler steps (upstream: 50).
    pub steps: usize,
    /// Classifier-free guidance scale (upstream: 3.0); guidance is off at 1.0 or below.
    pub guidance: f32,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Output `(height, width)` in pixels; default: the VAE's `sample_size` (1024 upstream).
    pub size: Option<(usize, usize)>,
    /// The negative prompt; default: upstream's, the embeddings regressed from
    /// an empty prompt (for a lone image: the encoding of an all-zero image).
    pub negative: Option<Prompt>,
    /// Initial latents `[1, C, h, w]` (unscaled noise) instead of seeded noise,
    /// e.g. to reproduce a reference run; they are multiplied by the
    /// scheduler's initial sigma like fresh noise.
    pub latents: Option<HostTensor>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            guidance: 3.0,
            seed: 0,
            size: None,
            negative: None,
            latents: None,
        }
    }
}

/// A generated picture.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB bytes.
    pub rgb: Vec<u8>,
    /// The conditioning `[1, n_query, d_model]` the UNet attended to.
    pub condition: HostTensor,
    /// The final latents (before division by the VAE scaling factor).
    pub latents: HostTensor,
    pub timings: Timings,
}

/// Standard normal samples from a seed, identical on every run (SplitMix64
/// and Box–Muller in f64).
pub fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        // 53 random bits in (0, 1].
        (((z ^ (z >> 31)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Emu2-Gen: the multimodal encoder regresses visual embeddings from the
/// prompt; the UNet denoises latents attending to them; the VAE decodes.
/// The vision encoder runs on `V`, the language model on `L`, the UNet and
/// the VAE on `D`; tensors cross between them through the host.
///
/// Under [`Residency::Sequential`] each [`Self::generate`] runs four stages,
/// each loading its component and dropping it afterwards: the vision
/// encoder (the prompt's pictures, for the conditioning and the negative),
/// the language model (both regressions), the UNet (every denoising step),
/// the VAE (decoding).
pub struct GenerationPipeline<V: Backend, L: Backend, D: Backend> {
    encoder: Emu2Model<V, L>,
    unet: Option<UNet2DConditionModel<D>>,
    vae: Option<AutoencoderKL<D>>,
    /// Sequential: the open checkpoints the UNet and VAE stages load from.
    unet_ckpt: Option<Checkpoint>,
    vae_ckpt: Option<Checkpoint>,
    unet_cfg: UNet2DConditionConfig,
    vae_cfg: AutoencoderKLConfig,
    scheduler: EulerDiscreteScheduler,
    decoder_at: Component<D>,
    load_timings: Timings,
    dump: Option<Dump>,
}

pub(crate) fn open_component(root: &Path, name: &str) -> Result<Checkpoint> {
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(PipelineError::Model(format!(
            "`{}` has no {name}/ folder; an Emu2-Gen directory holds multimodal_encoder/, unet/, vae/ and scheduler/",
            root.display()
        )));
    }
    Ok(Checkpoint::open(&dir)?)
}

/// What the UNet or the VAE (`name`) of `ckpt` holds once loaded.
/// (The UNet's transformer linears are quantized as `at.quant` asks; the
/// VAE stays dense.)
pub(crate) fn decoder_stage<D: Backend>(ckpt: &Checkpoint, name: &'static str, at: &Component<D>) -> Result<Stage> {
    decoder_stage_at(
        ckpt,
        name,
        at.dtype,
        block_quant(at),
        crate::memory::pool_of(&at.backend),
    )
}

/// [`decoder_stage`] in `dtype` with the UNet linears `quant` selects
/// quantized, resident in `pool`.
pub(crate) fn decoder_stage_at(
    ckpt: &Checkpoint,
    name: &'static str,
    dtype: emu_core::DType,
    quant: emu_core::BlockQuant,
    pool: crate::memory::Pool,
) -> Result<Stage> {
    let what = if name == "unet" { "UNet" } else { "VAE" };
    let unet = name == "unet";
    let select = |k: &str, dims: &[usize]| {
        unet.then(|| quant.format(emu_decoder::unet_linear_group(k)?, *dims.last()?))
            .flatten()
    };
    let (bytes, host) = crate::memory::component_bytes(ckpt, dtype, &|_| true, &select)?;
    let (_, largest_f32) = crate::memory::checkpoint_bytes(ckpt, emu_core::DType::F32, &|_| true)?;
    Ok(Stage {
        name,
        needs: with_host_blocks(
            crate::memory::Need {
                component: "decoder",
                what: format!("{what} weights in {dtype}"),
                bytes,
                dtype: Some(dtype),
                pool,
            },
            host,
        ),
        largest_f32,
    })
}

/// Moves a tensor to another backend through the host.
fn transfer<A: Backend, B: Backend>(t: &Tensor<A>, to: &B) -> Result<Tensor<B>> {
    Ok(Tensor::from_host(to, &t.to_host()?)?)
}

/// What one conditioning needs, worked out before any component runs.
enum CondJob {
    /// Pooled EVA features of the autoencoding mode's image, or of an
    /// all-zero image (`None`: its negative).
    Pool(Option<Vec<RgbImage>>),
    /// Visual embeddings regressed from a prompt.
    Regress { ids: Vec<u32>, pics: Pictures },
}

/// A conditioning between the vision and the language model's stages.
enum CondPart<D: Backend> {
    Done(Tensor<D>),
    Regress { ids: Vec<u32>, visuals: Visuals },
}

impl<V: Backend, L: Backend, D: Backend> GenerationPipeline<V, L, D> {
    /// Loads an Emu2-Gen pipeline folder: `vision` runs the EVA encoder,
    /// `llm` the language model (and the visual regression), `decoder` the
    /// UNet and the VAE. Every component stays resident.
    pub fn load(dir: &ModelDir, vision: &Component<V>, llm: &Component<L>, decoder: &Component<D>) -> Result<Self> {
        Self::load_with_residency(dir, vision, llm, decoder, Residency::All)
    }

    /// [`Self::load`] with a [`Residency`]: under [`Residency::Sequential`]
    /// the configurations, the tokenizer and the scheduler are loaded here
    /// and each component's weights in its stage of every run.
    pub fn load_with_residency(
        dir: &ModelDir,
        vision: &Component<V>,
        llm: &Component<L>,
        decoder: &Component<D>,
        residency: Residency,
    ) -> Result<Self> {
        if dir.family() != ModelFamily::Emu2Gen {
            return Err(PipelineError::Model(format!(
                "{} is not an Emu2-Gen pipeline folder; image generation needs BAAI/Emu2-Gen",
                dir.root().display()
            )));
        }
        check_dtype(&decoder.backend, decoder.dtype, "UNet and VAE")?;
        let mut load_timings = Timings::default();
        let root = dir.root();
        // Opening reads headers only: the decoder's weights join the
        // encoder's in one memory check before anything is loaded.
        let unet_ckpt = open_component(root, "unet")?;
        let vae_ckpt = open_component(root, "vae")?;
        let more = vec![
            decoder_stage(&unet_ckpt, "unet", decoder)?,
            decoder_stage(&vae_ckpt, "vae", decoder)?,
        ];
        let enc = Emu2Model::load_with(dir, Variant::Base, vision, llm, &mut load_timings, more, residency)?;
        let t0 = Instant::now();
        let unet_cfg = UNet2DConditionConfig::from_file(root.join("unet").join("config.json"))?;
        let vae_cfg = AutoencoderKLConfig::from_file(root.join("vae").join("config.json"))?;
        let scheduler = EulerDiscreteScheduler::from_config_file(root.join("scheduler").join("scheduler_config.json"))?;
        let mut pipe = Self {
            encoder: enc,
            unet: None,
            vae: None,
            unet_ckpt: None,
            vae_ckpt: None,
            unet_cfg,
            vae_cfg,
            scheduler,
            decoder_at: decoder.clone(),
            load_timings: Timings::default(),
            dump: None,
        };
        match residency {
            Residency::All => {
                pipe.unet = Some(pipe.load_unet(&unet_ckpt)?);
                pipe.vae = Some(pipe.load_vae(&vae_ckpt)?);
            }
            Residency::Sequential => {
                pipe.unet_ckpt = Some(unet_ckpt);
                pipe.vae_ckpt = Some(vae_ckpt);
            }
        }
        load_timings.add("load", t0.elapsed());
        pipe.load_timings = load_timings;
        Ok(pipe)
    }

    fn load_unet(&self, ckpt: &Checkpoint) -> Result<UNet2DConditionModel<D>> {
        let at = &self.decoder_at;
        Ok(UNet2DConditionModel::load_quantized(
            &at.backend,
            &ckpt.weights(),
            &self.unet_cfg,
            at.dtype,
            block_quant(at),
        )?)
    }

    fn load_vae(&self, ckpt: &Checkpoint) -> Result<AutoencoderKL<D>> {
        let at = &self.decoder_at;
        Ok(AutoencoderKL::load(
            &at.backend,
            &ckpt.weights(),
            &self.vae_cfg,
            at.dtype,
        )?)
    }

    /// A decoder checkpoint of a sequential pipeline, after checking that
    /// its stage fits.
    fn decoder_checkpoint<'a>(&self, ckpt: &'a Option<Checkpoint>, name: &'static str) -> Result<&'a Checkpoint> {
        let ckpt = ckpt
            .as_ref()
            .ok_or_else(|| PipelineError::Model(format!("the {name} checkpoint is not open")))?;
        let stage = decoder_stage(ckpt, name, &self.decoder_at)?;
        crate::memory::check_stages(
            &format!("loading the {name}"),
            &[stage],
            self.encoder.residency(),
            "try --dtype bf16 or another --decoder-backend",
        )?;
        Ok(ckpt)
    }

    /// The UNet for the denoising stage (see [`super::Held`]).
    fn hold_unet(&self, timings: &mut Timings) -> Result<Held<'_, UNet2DConditionModel<D>>> {
        hold(&self.unet, "load unet", timings, || {
            self.load_unet(self.decoder_checkpoint(&self.unet_ckpt, "unet")?)
        })
    }

    /// The VAE for the decoding stage.
    fn hold_vae(&self, timings: &mut Timings) -> Result<Held<'_, AutoencoderKL<D>>> {
        hold(&self.vae, "load vae", timings, || {
            self.load_vae(self.decoder_checkpoint(&self.vae_ckpt, "vae")?)
        })
    }

    pub fn load_timings(&self) -> &Timings {
        &self.load_timings
    }

    pub fn residency(&self) -> Residency {
        self.encoder.residency()
    }

    /// Writes every stage's tensors of the following calls into a folder (see [`Dump`]).
    pub fn set_dump(&mut self, dump: Option<Dump>) {
        self.dump = dump;
    }

    pub fn encoder(&self) -> &Emu2Model<V, L> {
        &self.encoder
    }

    /// The default output size `(height, width)`: the VAE's `sample_size`.
    pub fn default_size(&self) -> usize {
        self.vae_cfg
            .sample_size
            .as_ref()
            .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
            .map(|s| s as usize)
            .unwrap_or(1024)
    }

    /// Pixels per latent cell times the UNet's total downsampling: output
    /// sizes must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        let levels = self.unet_cfg.block_out_channels.len();
        self.vae_cfg.downscale_factor() << levels.saturating_sub(1)
    }

    /// Whether `prompt` is the autoencoding mode: one image and nothing else.
    fn is_autoencoding(prompt: &Prompt) -> Result<bool> {
        let items: Vec<&Item> = prompt.items().collect();
        let all_images = !items.is_empty() && items.iter().all(|i| matches!(i, Item::Image(_)));
        if all_images && items.len() > 1 {
            return Err(PipelineError::Input(
                "a prompt of images only is the autoencoding mode, which takes one image; add text (it may be empty: {text \"\"}) to generate from several".into(),
            ));
        }
        Ok(all_images)
    }

    /// What the conditioning of `prompt` needs: its image (autoencoding
    /// mode), or its tokens and pictures.
    fn plan(&self, prompt: &Prompt, dump: Option<&Dump>) -> Result<CondJob> {
        let enc = &self.encoder;
        if Self::is_autoencoding(prompt)? {
            let Some(Item::Image(path)) = prompt.items().next() else {
                return Err(PipelineError::Input("the autoencoding mode needs an image".into()));
            };
            let pics = enc.load_pictures(&[emu_prompt::VisualInput::Image(path.clone())])?;
            return Ok(CondJob::Pool(Some(pics)));
        }
        let mut ropts = RenderOptions::new(ModelKind::Emu2Gen);
        ropts.n_query = enc.n_query();
        ropts.v_query = enc.v_query();
        let rendered = render(prompt, &ropts)?;
        let ids = enc.tokenize(&rendered, dump)?;
        let pics = enc.prompt_pictures(&rendered)?;
        Ok(CondJob::Regress { ids, pics })
    }

    /// Upstream's negative for `prompt`: an all-zero image in the
    /// autoencoding mode, else the empty prompt.
    fn plan_default_negative(&self, prompt: &Prompt, dump: Option<&Dump>) -> Result<CondJob> {
        if Self::is_autoencoding(prompt)? {
            return Ok(CondJob::Pool(None));
        }
        self.plan(&Prompt::new(vec![Item::Text(String::new())]), dump)
    }

    /// The conditionings `[1, n_query, d_model]` of `jobs` on the UNet's
    /// backend: first every picture through the vision encoder, then every
    /// regression through the language model (each component held for its
    /// stage only).
    fn conditions(&self, jobs: Vec<(CondJob, Option<Dump>)>, timings: &mut Timings) -> Result<Vec<Tensor<D>>> {
        let to = &self.decoder_at.backend;
        let enc = &self.encoder;
        let n = enc.n_query();
        let needs_vision = jobs.iter().any(|(j, _)| match j {
            CondJob::Pool(_) => true,
            CondJob::Regress { pics, .. } => !pics.is_empty(),
        });
        let mut parts = Vec::with_capacity(jobs.len());
        {
            let vision = if needs_vision {
                Some(enc.hold_vision(timings)?)
            } else {
                None
            };
            for (job, dump) in &jobs {
                let part = match job {
                    CondJob::Pool(pics) => {
                        let v = vision
                            .as_deref()
                            .ok_or_else(|| PipelineError::Model("the vision encoder is not loaded".into()))?;
                        CondPart::Done(transfer(
                            &enc.pooled_with(v, pics.as_deref(), n, dump.as_ref(), timings)?,
                            to,
                        )?)
                    }
                    CondJob::Regress { ids, pics } => CondPart::Regress {
                        ids: ids.clone(),
                        visuals: enc.encode_visuals(vision.as_deref(), pics, dump.as_ref(), timings)?,
                    },
                };
                parts.push(part);
            }
        }
        let needs_llm = parts.iter().any(|p| matches!(p, CondPart::Regress { .. }));
        let side = if needs_llm { Some(enc.hold_llm(timings)?) } else { None };
        let mut out = Vec::with_capacity(parts.len());
        for (part, (_, dump)) in parts.into_iter().zip(&jobs) {
            let t = match (part, &side) {
                (CondPart::Done(t), _) => t,
                (CondPart::Regress { ids, visuals }, Some(side)) => {
                    let embeds = enc.embed_prompt(side, &ids, &visuals, dump.as_ref(), timings)?;
                    enc.check_llm_memory(
                        ids.len(),
                        1,
                        n,
                        &format!("regressing {n} visual embeddings after a {}-token prompt", ids.len()),
                    )?;
                    let t0 = Instant::now();
                    let (up, down) = side.projections()?;
                    let regressed = regress_visual(&side.llm, &embeds, &[], up, down, n)?;
                    timings.add("regress", t0.elapsed());
                    transfer(&regressed, to)?
                }
                (CondPart::Regress { .. }, None) => {
                    return Err(PipelineError::Model("the language model is not loaded".into()))
                }
            };
            out.push(t);
        }
        Ok(out)
    }

    /// The one conditioning of `job`.
    fn condition_of(&self, job: CondJob, dump: Option<Dump>, timings: &mut Timings) -> Result<Tensor<D>> {
        self.conditions(vec![(job, dump)], timings)?
            .pop()
            .ok_or_else(|| PipelineError::Model("no conditioning was computed".into()))
    }

    /// The visual conditioning `[1, n_query, d_model]` of a prompt, on the
    /// UNet's backend.
    pub fn condition(&self, prompt: &Prompt, timings: &mut Timings) -> Result<Tensor<D>> {
        let job = self.plan(prompt, self.dump.as_ref())?;
        self.condition_of(job, self.dump.clone(), timings)
    }

    fn negative_dump(&self) -> Option<Dump> {
        self.dump.as_ref().map(|d| d.with_prefix("negative_"))
    }

    /// Upstream's negative conditioning for `prompt`: the encoding of an
    /// all-zero image in the autoencoding mode, else the embeddings
    /// regressed from the empty prompt.
    pub fn default_negative(&self, prompt: &Prompt, timings: &mut Timings) -> Result<Tensor<D>> {
        let dump = self.negative_dump();
        let job = self.plan_default_negative(prompt, dump.as_ref())?;
        self.condition_of(job, dump, timings)
    }

    /// Generates an image for `prompt` (text, images, grounded objects; see
    /// [`emu_prompt::Prompt`]). `on_step` is called after each denoising step
    /// with `(done, total)`.
    pub fn generate(
        &self,
        prompt: &Prompt,
        opts: &GenerationOptions,
        on_step: Option<&mut dyn FnMut(usize, usize)>,
    ) -> Result<GeneratedImage> {
        self.generate_cancellable(prompt, opts, on_step, &|| false)
    }

    /// [`Self::generate`] that stops before the next denoising step once
    /// `cancel` returns true, with [`PipelineError::Cancelled`] (a server
    /// whose client went away).
    pub fn generate_cancellable(
        &self,
        prompt: &Prompt,
        opts: &GenerationOptions,
        mut on_step: Option<&mut dyn FnMut(usize, usize)>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<GeneratedImage> {
        let mut timings = Timings::default();
        if opts.steps == 0 || opts.steps > 1000 {
            return Err(PipelineError::Input(format!(
                "--steps {} is out of range; use 1 to 1000 (upstream: 50)",
                opts.steps
            )));
        }
        if !opts.guidance.is_finite() || opts.guidance < 0.0 {
            return Err(PipelineError::Input(format!(
                "--guidance {} is not a non-negative number (upstream: 3.0)",
                opts.guidance
            )));
        }
        let mult = self.size_multiple();
        let (height, width) = opts.size.unwrap_or((self.default_size(), self.default_size()));
        for (what, v) in [("height", height), ("width", width)] {
            if v == 0 || v % mult != 0 || v > 8192 {
                return Err(PipelineError::Input(format!(
                    "image {what} {v} is not supported: use a multiple of {mult} up to 8192 (this model's default is {})",
                    self.default_size()
                )));
            }
        }
        // Refused before any work: at upstream's 1024 px a small model's
        // full-resolution attention would need hundreds of GB and abort.
        {
            let (f, guided) = (self.vae_cfg.downscale_factor(), opts.guidance > 1.0);
            let (lh, lw) = (height / f, width / f);
            let need = self
                .unet_cfg
                .attention_bytes(if guided { 2 } else { 1 }, lh, lw)?
                .max(self.vae_cfg.attention_bytes(lh, lw));
            let need = crate::memory::Need {
                component: "decoder",
                what: "attention matrices".into(),
                bytes: need,
                dtype: None,
                pool: crate::memory::pool_of(&self.decoder_at.backend),
            };
            crate::memory::check(
                &format!("a {width}x{height} image with this model"),
                &[need],
                &format!("use a smaller --size (this model's default is {})", self.default_size()),
            )?;
        }
        let unet_backend = &self.decoder_at.backend;
        let guided = opts.guidance > 1.0;
        // Every conditioning first: the vision stage, then the language model's.
        let mut jobs = vec![(self.plan(prompt, self.dump.as_ref())?, self.dump.clone())];
        if guided {
            let dump = self.negative_dump();
            let job = match &opts.negative {
                Some(p) => self.plan(p, dump.as_ref())?,
                None => self.plan_default_negative(prompt, dump.as_ref())?,
            };
            jobs.push((job, dump));
        }
        let mut conds = self.conditions(jobs, &mut timings)?.into_iter();
        let cond = conds
            .next()
            .ok_or_else(|| PipelineError::Model("no conditioning was computed".into()))?;
        put(self.dump.as_ref(), "condition", || Ok(cond.to_host()?))?;
        let hidden = match conds.next() {
            Some(neg) => {
                put(self.dump.as_ref(), "negative_condition", || Ok(neg.to_host()?))?;
                if neg.dims() != cond.dims() {
                    return Err(PipelineError::Input(format!(
                        "the negative conditioning is {:?} but the prompt's is {:?}",
                        neg.dims(),
                        cond.dims()
                    )));
                }
                // Row order [cond; uncond], as upstream.
                Tensor::concat(&[&cond, &neg], 0)?
            }
            None => cond.clone(),
        };
        let unet = self.hold_unet(&mut timings)?;
        let t0 = Instant::now();
        let batch = hidden.dim(0)?;
        let text_embeds = hidden.mean(1, false)?;
        // SDXL micro-conditioning as upstream passes it (diffusion.py):
        // original_size + crop_info + [height, width], with upstream's fixed
        // defaults original_size = 1024x1024 and crop_info = (0, 0) whatever
        // the output size.
        let (oh, ow) = UPSTREAM_ORIGINAL_SIZE;
        let time_ids = vec![[oh, ow, 0.0, 0.0, height as f32, width as f32]; batch];
        let added = TextTimeCond { text_embeds, time_ids };
        let factor = self.vae_cfg.downscale_factor();
        let channels = self.unet_cfg.in_channels;
        let dims = [1, channels, height / factor, width / factor];
        let mut scheduler = self.scheduler.clone();
        scheduler.set_timesteps(opts.steps)?;
        let noise = match &opts.latents {
            Some(l) => {
                if l.dims() != dims {
                    return Err(PipelineError::Input(format!(
                        "initial latents must be {dims:?} for a {height}x{width} image, found {:?}",
                        l.dims()
                    )));
                }
                Tensor::from_host(unet_backend, &l.to_dtype(emu_core::DType::F32)?)?
            }
            None => {
                let n = dims.iter().product();
                Tensor::from_f32(unet_backend, &dims, gaussian_noise(opts.seed, n))?
            }
        };
        let mut latents = noise.affine(scheduler.init_noise_sigma()? as f64, 0.0)?;
        put(self.dump.as_ref(), "initial_latents", || Ok(latents.to_host()?))?;
        let udtype = self.decoder_at.dtype;
        let hidden = hidden.to_dtype(udtype)?;
        let total = scheduler.num_steps();
        for step in 0..total {
            if cancel() {
                return Err(PipelineError::Cancelled);
            }
            let t = scheduler.timesteps()[step];
            let x = scheduler.scale_model_input(&latents, step)?.to_dtype(udtype)?;
            let x = if guided { Tensor::concat(&[&x, &x], 0)? } else { x };
            let eps = unet.forward(&x, t, &hidden, Some(&added))?;
            let eps = if guided {
                let c = eps.narrow(0, 0, 1)?;
                let u = eps.narrow(0, 1, 1)?;
                u.add(&c.sub(&u)?.affine(opts.guidance as f64, 0.0)?)?
            } else {
                eps
            };
            latents = scheduler.step(&eps, step, &latents)?;
            if let Some(f) = on_step.as_mut() {
                f(step + 1, total);
            }
        }
        timings.add("diffusion", t0.elapsed());
        // The denoising stage ends here (sequential: the UNet is dropped).
        drop(unet);
        put(self.dump.as_ref(), "final_latents", || Ok(latents.to_host()?))?;
        let vae = self.hold_vae(&mut timings)?;
        let t0 = Instant::now();
        let z = latents
            .affine(1.0 / self.vae_cfg.scaling_factor, 0.0)?
            .to_dtype(self.decoder_at.dtype)?;
        let img = vae.decode(&z)?;
        drop(vae);
        let values = img.to_f32_vec()?;
        let (h, w) = (height, width);
        if values.len() != 3 * h * w {
            return Err(PipelineError::Input(format!(
                "the VAE returned {} values for a {h}x{w} RGB image",
                values.len()
            )));
        }
        // clamp(x / 2 + 0.5, 0, 1) * 255, rounded; CHW to HWC.
        let mut rgb = vec![0u8; 3 * h * w];
        for c in 0..3 {
            for i in 0..h * w {
                let v = (values[c * h * w + i] / 2.0 + 0.5).clamp(0.0, 1.0);
                rgb[i * 3 + c] = (v * 255.0).round() as u8;
            }
        }
        timings.add("vae", t0.elapsed());
        put(self.dump.as_ref(), "image", || {
            Ok(HostTensor::from_bytes(&[h, w, 3], emu_core::DType::U8, rgb.clone())?)
        })?;
        Ok(GeneratedImage {
            width: w,
            height: h,
            rgb,
            condition: cond.to_host()?,
            latents: latents.to_host()?,
            timings,
        })
    }
}

/// Parses `N` or `WxH` into `(height, width)`.
pub fn parse_image_size(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        PipelineError::Input(format!(
            "--size `{s}` is not a size; write N for a square or WIDTHxHEIGHT, e.g. 1024 or 768x512"
        ))
    };
    let num = |t: &str| t.trim().parse::<usize>().map_err(|_| bad());
    match s.split_once(['x', 'X']) {
        Some((w, h)) => Ok((num(h)?, num(w)?)),
        None => {
            let n = num(s)?;
            Ok((n, n))
        }
    }
}
