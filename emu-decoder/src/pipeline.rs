//! The Emu2-Gen diffusion decoder: classifier-free-guided Euler sampling of
//! the UNet conditioned on the 64 regressed visual embeddings, then VAE
//! decoding to RGB8 (SPEC §4.3, `EmuVisualGeneration.forward`).

use crate::error::{Error, Result};
use crate::scheduler::{EulerDiscreteConfig, EulerDiscreteScheduler};
use crate::unet::{TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use emu_core::checkpoint::Checkpoint;
use emu_core::{Backend, DType, Tensor};
use std::path::Path;

/// An 8-bit RGB image, rows top to bottom, `[r, g, b]` per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Sampling settings, with `EmuVisualGeneration.forward`'s defaults
/// (1024x1024, 50 steps, guidance 3, original size 1024x1024, no crop).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Output size in pixels; multiples of the VAE's downscale factor.
    pub height: usize,
    pub width: usize,
    pub num_inference_steps: usize,
    /// Classifier-free guidance is on when this is above 1.
    pub guidance_scale: f64,
    /// SDXL micro-conditioning `(height, width)` of the "original" image.
    /// Upstream keeps this at 1024x1024 whatever the output size.
    pub original_size: (usize, usize),
    /// SDXL micro-conditioning `(top, left)` crop offset.
    pub crop_coords: (usize, usize),
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            height: 1024,
            width: 1024,
            num_inference_steps: 50,
            guidance_scale: 3.0,
            original_size: (1024, 1024),
            crop_coords: (0, 0),
        }
    }
}

impl SamplingParams {
    /// The six `time_ids`: original size, crop offset, target size.
    pub fn time_ids(&self) -> [f32; 6] {
        let (oh, ow) = self.original_size;
        let (ct, cl) = self.crop_coords;
        [oh, ow, ct, cl, self.height, self.width].map(|v| v as f32)
    }
}

/// Where the sampler is; passed to the progress callback after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps done so far (1 after the first step).
    pub step: usize,
    pub total: usize,
    /// The UNet timestep of the step just done.
    pub timestep: f32,
}

/// UNet, VAE and scheduler of an Emu2-Gen (diffusers) folder.
#[derive(Debug, Clone)]
pub struct DiffusionDecoder<B: Backend> {
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub scheduler: EulerDiscreteConfig,
}

impl<B: Backend> DiffusionDecoder<B> {
    /// Loads `unet/`, `vae/` and `scheduler/` of a diffusers pipeline folder
    /// (Emu2-Gen's layout). `variant` picks e.g. the
    /// `diffusion_pytorch_model.bf16.safetensors` files; parameters are
    /// uploaded in `dtype`.
    pub fn load_dir(backend: &B, root: impl AsRef<Path>, variant: Option<&str>, dtype: DType) -> Result<Self> {
        let root = root.as_ref();
        let unet_cfg = UNet2DConditionConfig::from_file(root.join("unet/config.json"))?;
        let vae_cfg = AutoencoderKLConfig::from_file(root.join("vae/config.json"))?;
        let scheduler = EulerDiscreteConfig::from_file(root.join("scheduler/scheduler_config.json"))?;
        // Validate the scheduler before the (slow) weight loading.
        EulerDiscreteScheduler::new(&scheduler)?;
        let unet_ckpt = Checkpoint::open_dir(root.join("unet"), variant)?;
        let unet = UNet2DConditionModel::load(backend, &unet_ckpt.weights(), &unet_cfg, dtype)?;
        let vae_ckpt = Checkpoint::open_dir(root.join("vae"), variant)?;
        let vae = AutoencoderKL::load(backend, &vae_ckpt.weights(), &vae_cfg, dtype)?;
        Ok(Self { unet, vae, scheduler })
    }

    /// Generates one image per row of `cond` (`[B, S, cross_attention_dim]`,
    /// Emu2-Gen: the `[B, 64, 1792]` visual embeddings), guided away from
    /// `uncond` (same shape; required when guidance is on).
    ///
    /// `noise` is the unit-variance initial latent `[B, C, H / f, W / f]`
    /// (`f` the VAE downscale factor), supplied by the caller so that runs are
    /// reproducible; it is scaled by the scheduler's `init_noise_sigma` as in
    /// diffusers' `prepare_latents`. `progress` is called after every step.
    pub fn generate(
        &self,
        cond: &Tensor<B>,
        uncond: Option<&Tensor<B>>,
        noise: &Tensor<B>,
        params: &SamplingParams,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<RgbImage>> {
        let latents = self.denoise(cond, uncond, noise, params, progress)?;
        let image = self.decode_latents(&latents)?;
        to_rgb8(&image)
    }

    /// The sampling loop alone: returns the final latents (float32).
    pub fn denoise(
        &self,
        cond: &Tensor<B>,
        uncond: Option<&Tensor<B>>,
        noise: &Tensor<B>,
        params: &SamplingParams,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Tensor<B>> {
        let f = self.vae.config().downscale_factor();
        let (h, w) = (params.height, params.width);
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(Error::invalid(format!(
                "image size {h}x{w} is not a positive multiple of the VAE factor {f}"
            )));
        }
        let batch = cond.dim(0)?;
        let latent_dims = [batch, self.unet.config().in_channels, h / f, w / f];
        if noise.dims() != latent_dims {
            return Err(Error::invalid(format!(
                "initial noise {:?}, expected {latent_dims:?} for {batch} image(s) of {h}x{w}",
                noise.dims()
            )));
        }
        let guided = params.guidance_scale > 1.0;
        let dtype = self.unet.dtype();
        let context = match (guided, uncond) {
            (true, Some(u)) => {
                if u.dims() != cond.dims() {
                    return Err(Error::invalid(format!(
                        "unconditional embeddings {:?} differ from the conditional {:?}",
                        u.dims(),
                        cond.dims()
                    )));
                }
                Tensor::concat(&[cond, u], 0)?
            }
            (true, None) => {
                return Err(Error::invalid(
                    "guidance_scale > 1 needs unconditional embeddings".to_string(),
                ))
            }
            (false, _) => cond.clone(),
        }
        .to_dtype(dtype)?;
        let rows = context.dim(0)?;
        // Emu2-Gen pools the prompt embeddings by a plain mean over tokens.
        let cond = TextTimeCond {
            text_embeds: context.mean(1, false)?,
            time_ids: vec![params.time_ids(); rows],
        };

        let mut sched = EulerDiscreteScheduler::new(&self.scheduler)?;
        sched.set_timesteps(params.num_inference_steps)?;
        let sigma0 = sched.init_noise_sigma()?;
        let mut latents =
            noise
                .to_dtype(DType::F32)?
                .mul(&Tensor::from_f32(noise.backend(), &[1, 1, 1, 1], vec![sigma0])?)?;
        let total = sched.num_steps();
        for i in 0..total {
            let t = sched.timesteps()[i];
            let input = if guided {
                Tensor::concat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sched.scale_model_input(&input, i)?.to_dtype(dtype)?;
            let eps = self.unet.forward(&input, t, &context, Some(&cond))?;
            let eps = if guided {
                let e_cond = eps.narrow(0, 0, batch)?;
                let e_uncond = eps.narrow(0, batch, batch)?;
                e_uncond.add(&e_cond.sub(&e_uncond)?.affine(params.guidance_scale, 0.0)?)?
            } else {
                eps
            };
            latents = sched.step(&eps.to_dtype(DType::F32)?, i, &latents)?.materialize()?;
            progress(Progress {
                step: i + 1,
                total,
                timestep: t,
            });
        }
        Ok(latents)
    }

    /// `vae.decode(latents / scaling_factor)`, mapped from `[-1, 1]` to
    /// `[0, 1]` and clamped: `[B, 3, H, W]` in the VAE dtype.
    pub fn decode_latents(&self, latents: &Tensor<B>) -> Result<Tensor<B>> {
        let vae_dtype = self.vae.dtype();
        let z = latents
            .affine(1.0 / self.vae.config().scaling_factor, 0.0)?
            .to_dtype(vae_dtype)?;
        let img = self.vae.decode(&z)?.affine(0.5, 0.5)?;
        let dims = vec![1usize; img.rank()];
        let zero = Tensor::zeros(img.backend(), &dims, img.dtype())?;
        let one = Tensor::full(img.backend(), &dims, 1.0, img.dtype())?;
        Ok(img.maximum(&zero)?.minimum(&one)?)
    }
}

/// `[B, 3, H, W]` in `[0, 1]` to RGB8 (`round(x * 255)`, ties to even as
/// `torch.round`).
pub fn to_rgb8<B: Backend>(image: &Tensor<B>) -> Result<Vec<RgbImage>> {
    let d = image.dims();
    if d.len() != 4 || d[1] != 3 {
        return Err(Error::invalid(format!("expected [B, 3, H, W] images, found {d:?}")));
    }
    let (b, h, w) = (d[0], d[2], d[3]);
    let v = image.to_f32_vec()?;
    let plane = h * w;
    Ok((0..b)
        .map(|n| {
            let base = n * 3 * plane;
            let mut data = Vec::with_capacity(3 * plane);
            for p in 0..plane {
                for c in 0..3 {
                    let x = v[base + c * plane + p].clamp(0.0, 1.0);
                    data.push((x * 255.0).round_ties_even() as u8);
                }
            }
            RgbImage {
                width: w,
                height: h,
                data,
            }
        })
        .collect())
}
