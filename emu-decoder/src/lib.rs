//! The diffusion decoder of Emu2-Gen (SPEC §4.3): an SDXL-style
//! `UNet2DConditionModel` with 1792-wide cross-attention and "text_time"
//! added conditioning, the SDXL `AutoencoderKL`, diffusers'
//! `EulerDiscreteScheduler`, and the classifier-free-guided sampling loop
//! that turns 64 regressed visual embeddings into an RGB image.
//!
//! Models read diffusers folders (`config.json` + safetensors, diffusers key
//! names) and run on any [`emu_core::Backend`].

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
pub use unet::{TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
pub use vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
