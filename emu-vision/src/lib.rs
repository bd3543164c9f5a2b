//! The Emu2 visual encoder.
//!
//! * [`EvaConfig`] / [`EmuVisionConfig`]: the `vision_config` (and `d_model`,
//!   `hidden_size`) of an Emu2 `config.json`;
//! * [`EvaVisionTransformer`]: the 448-px EVA-CLIP ViT (post-norm blocks, no
//!   final norm), generic over any [`emu_core::Backend`];
//! * [`VisionEncoder`]: the ViT plus average pooling to `n_query` tokens and
//!   `project_up`, loaded from HF (`model.visual.*`), native (`visual.*`) or
//!   Emu2-Gen (`multimodal_encoder.visual.*`) checkpoints
//!   ([`VisionEncoder::from_dir`] with a `config.json`,
//!   [`VisionEncoder::from_checkpoint`] with [`EmuVisionConfig::emu2`] for
//!   native files);
//! * [`preprocess`]: PNG/JPEG decoding with header-checked limits, PIL-exact
//!   bicubic resize and CLIP normalisation ([`Preprocessor`]).
//!
//! ```no_run
//! use emu_backend_cpu::CpuBackend;
//! use emu_core::DType;
//! use emu_vision::{Preprocessor, VisionEncoder};
//! let cpu = CpuBackend::new();
//! let enc = VisionEncoder::from_dir(&cpu, "Emu2", DType::F32)?;
//! let pre = Preprocessor::for_config(&enc.config().vision)?;
//! let pixels = pre.batch_from_paths(&cpu, &["dog.jpg", "squirrel.jpeg"])?;
//! let features = enc.encode(&pixels)?; // [2, 1025, 1792], CLS first
//! let tokens = enc.pool(&features, 64)?; // [2, 64, 1792]
//! let embeds = enc.project(&tokens)?; // [2, 64, 6656]
//! # Ok::<(), emu_vision::VisionError>(())
//! ```

// `usize::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod config;
pub mod error;
mod jpeg;
pub mod model;
pub mod preprocess;

pub use config::{EmuVisionConfig, EvaConfig};
pub use error::{Result, VisionError};
pub use model::{linear_group, EvaVisionTransformer, VisionEncoder};
pub use preprocess::{decode_image, load_image, resize_bicubic, DecodeOptions, Preprocessor, RgbImage};
