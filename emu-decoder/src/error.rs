//! Errors of the decoder crate.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Ops, host tensors and checkpoint loading.
    #[error(transparent)]
    Core(#[from] emu_core::Error),

    /// A config file that cannot be read or parsed.
    #[error("config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A config value this crate does not implement, named by its config key
    /// so that a user knows which setting to change.
    #[error("unsupported {component} config: `{field}` = {value}")]
    Unsupported {
        component: &'static str,
        field: &'static str,
        value: String,
    },

    /// Arguments that do not fit the model (shapes, step counts, sizes).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn unsupported(component: &'static str, field: &'static str, value: impl std::fmt::Debug) -> Self {
        Error::Unsupported {
            component,
            field,
            value: format!("{value:?}"),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// Reads and parses a JSON config file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = emu_core::fs::read_text(path).map_err(|e| emu_core::Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
