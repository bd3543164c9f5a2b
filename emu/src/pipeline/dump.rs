//! `--dump DIR`: every stage's tensors as safetensors, for research and for
//! stage-by-stage comparison with the reference implementation.
//!
//! Each tensor is written to `DIR/<name>.safetensors` under the key `<name>`,
//! in the dtype it was computed in. Names (shapes for one prompt; `N`
//! pictures, `T` prompt tokens):
//!
//! | name | shape | stage |
//! |---|---|---|
//! | `pixel_values` | `[N, 3, S, S]` f32 | preprocessed pictures (`image_values` for video frames: `frame_values`) |
//! | `vision_features` | `[N, 1 + g², D]` | raw EVA output, CLS first (`frame_features` for frames) |
//! | `pooled_tokens` | `[N, n_query, D]` | average-pooled features (`frame_pooled_tokens`) |
//! | `projected_tokens` | `[N·n_query, H]` | after `project_up` (`frame_projected_tokens`) |
//! | `input_ids` | `[T]` u32 | the tokenized prompt |
//! | `input_embeds` | `[1, T, H]` | token embeddings with the visual slots filled |
//! | `prefill_hidden` | `[1, T, H]` | last-layer hidden states after the final norm |
//! | `prefill_logits` | `[1, 1, V]` | logits at the last prompt position |
//! | `generated_ids` | `[n]` u32 | the answer's ids, EOS excluded |
//! | `condition` | `[1, n_query, D]` | Emu2-Gen: regressed (or autoencoded) embeddings |
//! | `negative_condition` | `[1, n_query, D]` | Emu2-Gen: the CFG negative |
//! | `initial_latents` | `[1, C, h, w]` | noise times the initial sigma |
//! | `final_latents` | `[1, C, h, w]` | after the last step |
//! | `image` | `[H, W, 3]` u8 | the decoded picture |
//!
//! For Emu2-Gen, the encoder stages of the negative prompt are written with
//! the prefix `negative_` (e.g. `negative_input_ids`).

use super::error::{PipelineError, Result};
use emu_core::{DType, HostTensor};
use std::path::{Path, PathBuf};

/// Checks that `dir` is a directory or can become one (nothing else is
/// there), so that a file given by mistake is named before any work is done.
pub fn check_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(PipelineError::Input(format!(
            "--dump needs a directory, but `{}` is a file",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Where stage tensors go.
#[derive(Debug, Clone)]
pub struct Dump {
    dir: PathBuf,
    prefix: String,
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F64 => S::F64,
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::U32 => S::U32,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

impl Dump {
    /// Dumps into `dir`, which is created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        check_dir(&dir)?;
        std::fs::create_dir_all(&dir).map_err(|e| emu_core::Error::io(&dir, e))?;
        Ok(Self {
            dir,
            prefix: String::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The same directory, with `prefix` put before every name.
    pub fn with_prefix(&self, prefix: &str) -> Self {
        Self {
            dir: self.dir.clone(),
            prefix: format!("{}{prefix}", self.prefix),
        }
    }

    /// Writes `DIR/<prefix><name>.safetensors`.
    pub fn put(&self, name: &str, t: &HostTensor) -> Result<()> {
        let key = format!("{}{name}", self.prefix);
        let view = safetensors::tensor::TensorView::new(st_dtype(t.dtype()), t.dims().to_vec(), t.as_bytes())
            .map_err(|e| PipelineError::Input(format!("dump `{key}`: {e}")))?;
        let bytes = safetensors::tensor::serialize([(key.as_str(), view)], None)
            .map_err(|e| PipelineError::Input(format!("dump `{key}`: {e}")))?;
        let path = self.dir.join(format!("{key}.safetensors"));
        std::fs::write(&path, bytes).map_err(|e| emu_core::Error::io(&path, e))?;
        Ok(())
    }

    /// Writes token ids as a `[n]` u32 tensor.
    pub fn put_ids(&self, name: &str, ids: &[u32]) -> Result<()> {
        self.put(name, &HostTensor::from_u32(&[ids.len()], ids.to_vec())?)
    }
}

/// Writes to `dump` if there is one.
pub(crate) fn put<F>(dump: Option<&Dump>, name: &str, f: F) -> Result<()>
where
    F: FnOnce() -> Result<HostTensor>,
{
    match dump {
        Some(d) => d.put(name, &f()?),
        None => Ok(()),
    }
}
