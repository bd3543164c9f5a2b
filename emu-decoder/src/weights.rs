//! Where model constructors get their parameters from.
//!
//! [`Vb`] is a prefix-scoped view over any [`TensorSource`] that uploads
//! shape-checked tensors in the model's dtype. A source is anything that
//! maps full diffusers key names to host tensors.

use crate::error::Result;
use emu_core::{Backend, DType, HostTensor, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A set of named host tensors.
pub trait TensorSource: Send + Sync {
    /// The tensor stored under the full key `key`.
    fn get(&self, key: &str) -> Result<HostTensor>;
    /// Where the tensors come from, for error messages.
    fn location(&self) -> String;
}

/// All tensors of one or more safetensors files, read into memory.
#[derive(Debug, Clone, Default)]
pub struct TensorMap {
    tensors: HashMap<String, HostTensor>,
    location: String,
}

fn st_dtype(path: &Path, d: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as S;
    Ok(match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        other => {
            return Err(emu_core::Error::CheckpointFormat {
                path: path.to_path_buf(),
                message: format!("unsupported safetensors dtype {other:?}"),
            }
            .into())
        }
    })
}

impl TensorMap {
    /// Reads every tensor of a safetensors file.
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| emu_core::Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| emu_core::Error::CheckpointFormat {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let dt = st_dtype(path, view.dtype())?;
            tensors.insert(name, HostTensor::from_bytes(view.shape(), dt, view.data().to_vec())?);
        }
        Ok(Self {
            tensors,
            location: path.display().to_string(),
        })
    }

    /// Reads the diffusers weights file of a model folder:
    /// `diffusion_pytorch_model[.<variant>].safetensors`.
    pub fn from_diffusers_dir(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<Self> {
        let name = match variant {
            Some(v) => format!("diffusion_pytorch_model.{v}.safetensors"),
            None => "diffusion_pytorch_model.safetensors".to_string(),
        };
        let path: PathBuf = dir.as_ref().join(name);
        Self::from_safetensors(path)
    }

    pub fn insert(&mut self, key: impl Into<String>, t: HostTensor) {
        self.tensors.insert(key.into(), t);
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }
}

impl TensorSource for TensorMap {
    fn get(&self, key: &str) -> Result<HostTensor> {
        self.tensors.get(key).cloned().ok_or_else(|| {
            emu_core::Error::MissingTensor {
                key: key.to_string(),
                location: self.location.clone(),
            }
            .into()
        })
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

/// A prefix-scoped view of a [`TensorSource`] that uploads parameters to a
/// backend in one dtype.
#[derive(Clone)]
pub struct Vb<'a, B: Backend> {
    src: &'a dyn TensorSource,
    prefix: String,
    backend: B,
    dtype: DType,
}

impl<'a, B: Backend> Vb<'a, B> {
    pub fn new(src: &'a dyn TensorSource, backend: &B, dtype: DType) -> Self {
        Self {
            src,
            prefix: String::new(),
            backend: backend.clone(),
            dtype,
        }
    }

    /// The view below `name` (`vb.pp("up_blocks").pp(0)` reads `up_blocks.0.*`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            src: self.src,
            prefix: format!("{}{name}.", self.prefix),
            backend: self.backend.clone(),
            dtype: self.dtype,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The parameter `name` below this view, checked to have shape `dims`.
    pub fn get(&self, name: &str, dims: &[usize]) -> Result<Tensor<B>> {
        let key = format!("{}{name}", self.prefix);
        let host = self.src.get(&key)?;
        if host.dims() != dims {
            return Err(emu_core::Error::ShapeMismatch {
                key,
                location: self.src.location(),
                expected: dims.to_vec(),
                found: host.dims().to_vec(),
            }
            .into());
        }
        Ok(Tensor::from_host(&self.backend, &host.to_dtype(self.dtype)?)?)
    }
}
