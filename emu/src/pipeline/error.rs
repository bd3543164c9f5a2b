//! Errors of the pipelines: every component crate's error, plus model
//! resolution and user input. Each message is one line that says what to change.

/// Result with [`PipelineError`].
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Core(#[from] emu_core::Error),

    #[error(transparent)]
    Vision(#[from] emu_vision::VisionError),

    #[error(transparent)]
    Llm(#[from] emu_llm::Error),

    #[error(transparent)]
    Prompt(#[from] emu_prompt::Error),

    #[error(transparent)]
    Decoder(#[from] emu_decoder::Error),

    /// `--model` names nothing usable, or a checkpoint of the wrong kind.
    #[error("{0}")]
    Model(String),

    /// A backend name that is not compiled in.
    #[error("unknown backend `{name}`; available backends: {available}")]
    UnknownBackend { name: String, available: String },

    /// A backend emu-rs has, but this build was compiled without.
    #[error("backend `{name}` is not compiled into this build (available: {available}); enable the `{feature}` feature of the `emu` crate")]
    BackendNotCompiled {
        name: &'static str,
        feature: &'static str,
        available: String,
    },

    /// A dtype the chosen backend cannot run.
    #[error("{0}")]
    DType(String),

    /// Inputs that do not fit the pipeline (image count, sizes, ...).
    #[error("{0}")]
    Input(String),

    /// Standard output cannot be written (full disk, closed pipe).
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
    /// A run that would not fit in memory, refused before it starts (see [`crate::memory`]).
    #[error("{0}")]
    Memory(String),

    /// The caller asked to stop (see `answer_cancellable`, `generate_cancellable`).
    #[error("the computation was cancelled")]
    Cancelled,

    /// Building the embedded tiny model failed (a temporary file could not be written).
    #[error("tiny model: {0}")]
    Tiny(String),
}

impl PipelineError {
    /// The same error for another request that it also ends (a failed
    /// stage shared by a batch): the variants that carry a message keep
    /// their kind, any other becomes [`PipelineError::Model`] with its text.
    pub fn duplicate(&self) -> Self {
        match self {
            PipelineError::Model(m) => PipelineError::Model(m.clone()),
            PipelineError::DType(m) => PipelineError::DType(m.clone()),
            PipelineError::Input(m) => PipelineError::Input(m.clone()),
            PipelineError::Memory(m) => PipelineError::Memory(m.clone()),
            PipelineError::Cancelled => PipelineError::Cancelled,
            other => PipelineError::Model(other.to_string()),
        }
    }
}
