//! A prefix-scoped view of a checkpoint, used by model constructors.

use super::{Checkpoint, TensorInfo};
use crate::{Backend, DType, Error, HostTensor, Result, Tensor};
use std::fmt::Display;

/// Tensors of a [`Checkpoint`] under a key prefix.
///
/// Model code names tensors relative to its module (`w.pp("self_attn").pp("q_proj")`
/// then `"weight"`) and never spells out where the module sits in a given
/// checkpoint layout: that is decided once, when the root view is made, with
/// [`Weights::resolve_prefix`] (HF layouts put the Emu2 model under `model.`,
/// the native checkpoints at the top level, Emu2-Gen's under
/// `multimodal_encoder.`).
///
/// ```
/// use emu_core::checkpoint::{Checkpoint, Weights};
/// use emu_core::DType;
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/loader/safetensors_sharded");
/// let ckpt = Checkpoint::open(dir)?;
/// // The fixture stores everything under `model.`; a native layout would match "".
/// let root = Weights::resolve_prefix(&ckpt, &["multimodal_encoder.", "model.", ""], "layers.0.weight")?;
/// assert_eq!(root.prefix(), "model.");
/// let layer = root.pp("layers").pp(0);
/// assert_eq!(layer.info("weight")?.dims, vec![4, 3]);
/// assert!(layer.get_opt("no_such_bias")?.is_none());
/// let err = layer.get_as("missing", DType::F32).unwrap_err();
/// assert!(err.to_string().contains("model.layers.0.missing"));
/// # Ok::<(), emu_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Weights {
    ckpt: Checkpoint,
    prefix: String,
}

impl Weights {
    /// Every tensor of `ckpt`, with no prefix.
    pub fn new(ckpt: &Checkpoint) -> Self {
        Self::with_prefix(ckpt, "")
    }

    /// Tensors whose key starts with `prefix`, used verbatim (so include the
    /// trailing dot: `"model."`).
    pub fn with_prefix(ckpt: &Checkpoint, prefix: impl Into<String>) -> Self {
        Self {
            ckpt: ckpt.clone(),
            prefix: prefix.into(),
        }
    }

    /// The view under the first of `candidates` for which `probe` (a key
    /// relative to the prefix) exists; a [`Error::MissingTensor`] naming all
    /// tried keys if none does.
    pub fn resolve_prefix(ckpt: &Checkpoint, candidates: &[&str], probe: &str) -> Result<Self> {
        Self::new(ckpt).resolve(candidates, probe)
    }

    /// [`Weights::resolve_prefix`] below this view: the view at
    /// `<prefix><candidate>` for the first candidate under which `probe`
    /// exists (e.g. `root.resolve(&["visual.", "model.visual."], "cls_token")`).
    pub fn resolve(&self, candidates: &[&str], probe: &str) -> Result<Self> {
        for c in candidates {
            let sub = format!("{}{c}", self.prefix);
            if self.ckpt.contains(&format!("{sub}{probe}")) {
                return Ok(Self::with_prefix(&self.ckpt, sub));
            }
        }
        let tried: Vec<String> = candidates
            .iter()
            .map(|c| format!("`{}{c}{probe}`", self.prefix))
            .collect();
        Err(Error::MissingTensor {
            key: probe.to_string(),
            location: format!("{} (tried {})", self.ckpt.location(), tried.join(", ")),
        })
    }

    /// The view one module deeper: `pp("layers").pp(3)` is `<prefix>layers.3.`.
    pub fn pp(&self, sub: impl Display) -> Self {
        Self {
            ckpt: self.ckpt.clone(),
            prefix: format!("{}{sub}.", self.prefix),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The full checkpoint key of `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.key(name))
    }

    /// Names under this view (prefix stripped), sorted.
    pub fn keys(&self) -> Vec<&str> {
        self.ckpt
            .keys_with_prefix(&self.prefix)
            .map(|k| &k[self.prefix.len()..])
            .collect()
    }

    /// Checks that this view (e.g. `model.layers.`) holds no numbered entry
    /// at or past `configured`: a config that declares fewer layers than the
    /// checkpoint has would otherwise drop the rest without a word.
    /// `field` names the config field for the message.
    pub fn check_layer_count(&self, configured: usize, field: &str) -> Result<()> {
        let most = self
            .keys()
            .into_iter()
            .filter_map(|k| k.split('.').next()?.parse::<usize>().ok())
            .max();
        match most {
            Some(n) if n >= configured => Err(crate::checkpoint::format_err(
                self.ckpt.origin(),
                format!(
                    "the checkpoint holds {} layers (`{}{n}.*`) but the config's `{field}` is {configured}; \
                     the config does not match these weights",
                    n + 1,
                    self.prefix
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Shape and dtype without reading data.
    pub fn info(&self, name: &str) -> Result<TensorInfo> {
        self.ckpt.info(&self.key(name))
    }

    /// Reads a tensor in its stored dtype.
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        self.ckpt.get(&self.key(name))
    }

    /// Reads a tensor converted to `dtype`.
    pub fn get_as(&self, name: &str, dtype: DType) -> Result<HostTensor> {
        self.ckpt.get_as(&self.key(name), dtype)
    }

    /// Like [`Weights::get`], but `None` for a tensor the checkpoint does not
    /// have (optional biases, buffers some exports drop).
    pub fn get_opt(&self, name: &str) -> Result<Option<HostTensor>> {
        if self.contains(name) {
            self.get(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Checks that `name` has shape `dims` (before reading anything).
    pub fn check_dims(&self, name: &str, dims: &[usize]) -> Result<()> {
        let key = self.key(name);
        let info = self.ckpt.info(&key)?;
        if info.dims != dims {
            return Err(Error::ShapeMismatch {
                location: self.ckpt.file_of(&key)?.display().to_string(),
                key,
                expected: dims.to_vec(),
                found: info.dims,
            });
        }
        Ok(())
    }

    /// Reads `name` converted to `dtype` after checking that its shape is
    /// `dims` (for weights that are rearranged on the host before upload).
    pub fn get_checked(&self, name: &str, dims: &[usize], dtype: DType) -> Result<HostTensor> {
        self.check_dims(name, dims)?;
        self.get_as(name, dtype)
    }

    /// Reads `name`, checks its shape is `dims`, converts it to `dtype` and
    /// uploads it. The host copy is dropped before returning, so loading a
    /// model tensor by tensor holds at most one tensor on the host.
    pub fn tensor<B: Backend>(&self, backend: &B, name: &str, dims: &[usize], dtype: DType) -> Result<Tensor<B>> {
        Tensor::from_host(backend, &self.get_checked(name, dims, dtype)?)
    }

    /// Like [`Weights::tensor`], but `None` for a tensor the checkpoint does
    /// not have; a tensor that exists with the wrong shape is still an error.
    pub fn tensor_opt<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        dims: &[usize],
        dtype: DType,
    ) -> Result<Option<Tensor<B>>> {
        if self.contains(name) {
            self.tensor(backend, name, dims, dtype).map(Some)
        } else {
            Ok(None)
        }
    }
}
