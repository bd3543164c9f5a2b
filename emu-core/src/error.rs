//! Errors of the core crate: ops, host tensors and checkpoint loading.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Operands whose shapes do not fit the op.
    #[error("shape error: {0}")]
    Shape(String),

    /// Operands whose dtypes do not fit the op, or an impossible conversion.
    #[error("dtype error: {0}")]
    DType(String),

    /// A backend that cannot do what was asked (dtype, op variant, device limit).
    #[error("backend `{backend}` does not support {what}")]
    Unsupported { backend: String, what: String },

    /// A backend that could not be created (no device, no driver, no library).
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable { backend: String, reason: String },

    /// An error reported by a backend's own library.
    #[error("backend `{backend}`: {message}")]
    Backend { backend: String, message: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint file that cannot be parsed (truncated, corrupt, unknown format).
    #[error("{}: {message}", path.display())]
    CheckpointFormat { path: PathBuf, message: String },

    /// A tensor the model needs and the checkpoint does not have.
    #[error("tensor `{key}` not found in {location}")]
    MissingTensor { key: String, location: String },

    /// A tensor whose shape differs from what the config implies.
    #[error("tensor `{key}` in {location}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        key: String,
        location: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A quantized tensor that cannot be made, stored or read (its block
    /// bytes do not match its shape, an unknown type, a shape that is not a
    /// whole number of blocks).
    #[error("quantized tensor `{tensor}`: {message}")]
    Quant { tensor: String, message: String },

    /// A config file that is missing a field or holds an unsupported value.
    #[error("config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn shape(msg: impl Into<String>) -> Self {
        Error::Shape(msg.into())
    }
}
