//! Errors of the LLaMA decoder: configs, weights, inputs and generation settings.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op, transfer or checkpoint error from the core crate.
    #[error(transparent)]
    Core(#[from] emu_core::Error),

    /// A config file that cannot be read or parsed.
    #[error("config {}: {message}", path.display())]
    ConfigFile { path: PathBuf, message: String },

    /// A config field that is missing or holds a value this implementation
    /// does not support; `field` is the JSON name.
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },

    /// The number of image/video slot tokens in the prompt differs from the
    /// number of visual embeddings given.
    #[error("{what}: the prompt has {slots} slot tokens (id {token_id}) but {given} embeddings were given")]
    SlotCount {
        what: &'static str,
        token_id: u32,
        slots: usize,
        given: usize,
    },

    /// A forward step that would write past the end of the KV cache.
    #[error("context length exceeded: {needed} positions needed, the KV cache holds {capacity}")]
    ContextOverflow { needed: usize, capacity: usize },

    /// Inputs whose shape, dtype or values do not fit the model.
    #[error("invalid input: {0}")]
    Input(String),

    /// Generation settings that are inconsistent or out of range.
    #[error("invalid generation settings: {0}")]
    Generation(String),
}

impl Error {
    pub(crate) fn config(field: &str, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.to_string(),
            message: message.into(),
        }
    }
}
