//! The Emu2 visual encoder.
//!
//! * [`EvaConfig`] / [`EmuVisionConfig`]: the `vision_config` (and `d_model`,
//!   `hidden_size`) of an Emu2 `config.json`;
//! * [`EvaVisionTransformer`]: the 448-px EVA-CLIP ViT (post-norm blocks, no
//!   final norm), generic over any [`emu_core::Backend`];
//! * [`VisionEncoder`]: the ViT plus average pooling to `n_query` tokens and
//!   `project_up`, loaded from HF (`model.visual.*`), native (`visual.*`) or
//!   Emu2-Gen (`multimodal_encoder.visual.*`) checkpoints.

pub mod config;
pub mod error;
pub mod model;

pub use config::{EmuVisionConfig, EvaConfig};
pub use error::{Result, VisionError};
pub use model::{EvaVisionTransformer, VisionEncoder};
