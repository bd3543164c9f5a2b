//! The diffusion decoder of Emu2-Gen (SPEC §4.3): an SDXL-style
//! `UNet2DConditionModel` with 1792-wide cross-attention and "text_time"
//! added conditioning, the SDXL `AutoencoderKL`, diffusers'
//! `EulerDiscreteScheduler`, and the classifier-free-guided sampling loop
//! that turns 64 regressed visual embeddings into an RGB image.
//!
//! Models read diffusers folders (`config.json` + safetensors, diffusers key
//! names) and run on any [`emu_core::Backend`].
//!
//! ```
//! use emu_backend_cpu::CpuBackend;
//! use emu_core::{DType, Tensor};
//! use emu_decoder::{DiffusionDecoder, SamplingParams};
//!
//! let cpu = CpuBackend::new();
//! // A tiny model in Emu2-Gen's folder layout (unet/, vae/, scheduler/).
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/decoder/pipeline");
//! let decoder = DiffusionDecoder::load_dir(&cpu, dir, None, DType::F32)?;
//! // Emu2-Gen: [1, 64, 1792] embeddings for the prompt and for the empty prompt.
//! let cond = Tensor::full(&cpu, &[1, 5, 20], 0.5, DType::F32)?;
//! let uncond = Tensor::zeros(&cpu, &[1, 5, 20], DType::F32)?;
//! let noise = Tensor::full(&cpu, &[1, 4, 8, 8], 0.1, DType::F32)?; // from the caller's RNG
//! let params = SamplingParams { height: 16, width: 16, num_inference_steps: 2, ..Default::default() };
//! let images = decoder.generate(&cond, Some(&uncond), &noise, &params, &mut |p| {
//!     eprintln!("step {}/{} (t = {})", p.step, p.total, p.timestep)
//! })?;
//! assert_eq!((images[0].width, images[0].height, images[0].data.len()), (16, 16, 16 * 16 * 3));
//! # Ok::<(), emu_decoder::Error>(())
//! ```

pub mod error;
mod nn;
pub mod pipeline;
pub mod scheduler;
pub mod unet;
pub mod vae;
mod weights;

pub use error::{Error, Result};
pub use pipeline::{to_rgb8, DiffusionDecoder, Progress, RgbImage, SamplingParams};
pub use scheduler::{EulerDiscreteConfig, EulerDiscreteScheduler, PredictionType, TimestepSpacing};
pub use unet::{
    linear_group as unet_linear_group, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel, UNetResnetBlock,
    UNetTransformerBlock,
};
pub use vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
