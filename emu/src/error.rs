//! The typed errors of checkpoint inspection, conversion and layout
//! detection ([`crate::inspect`], [`crate::convert`], [`crate::layout`]).

use std::path::PathBuf;

pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// Everything that can go wrong in `inspect` and `convert`. Every message is
/// one line and says what to change.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An error from the checkpoint loader (corrupt file, bad index, ...).
    #[error(transparent)]
    Core(#[from] emu_core::Error),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} does not exist; give the path of a checkpoint directory or file", path.display())]
    NotFound { path: PathBuf },

    /// A path that exists but holds no checkpoint this tool understands.
    #[error("{} is not a checkpoint: {hint}", path.display())]
    NotACheckpoint { path: PathBuf, hint: String },

    /// A JSON file of the checkpoint layout (config, model index) that does not parse.
    #[error("{}: invalid JSON ({message}); fix or remove the file", path.display())]
    BadJson { path: PathBuf, message: String },

    #[error(
        "destination {} exists and is not empty; choose a new or empty directory, or pass --force to replace its weights",
        path.display()
    )]
    DestinationNotEmpty { path: PathBuf },

    /// A destination that cannot be used at all (a file, the source itself, inside the source).
    #[error("destination {}: {reason}", path.display())]
    BadDestination { path: PathBuf, reason: String },

    /// A tensor `convert` cannot carry over (a dtype emu-rs does not represent).
    #[error("{reason}; `emu convert` handles f64/f32/f16/bf16/i64/i32/u32/u8/bool tensors: drop this tensor from the source first")]
    Unconvertible { reason: String },

    /// An error of the pipelines' model code (the memory plan of `inspect`).
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),

    /// A command-line value that does not parse.
    #[error("{0}")]
    InvalidValue(String),
}

impl CliError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CliError::Io {
            path: path.into(),
            source,
        }
    }
}
