//! The crate's error type.

/// Everything that can go wrong while building, rendering or tokenizing a prompt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A tokenizer file is malformed or does not describe a LLaMA/Emu2 tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A JSON document (tokenizer file, prompt) does not parse.
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The prompt markup does not parse; `line`/`column` are 1-based, `offset` is in bytes.
    #[error("markup error at line {line}, column {column}: {message}")]
    Markup {
        offset: usize,
        line: usize,
        column: usize,
        message: String,
    },
    /// The prompt cannot be rendered for the chosen model (e.g. boxes for Emu2-Chat input).
    #[error("prompt: {0}")]
    Prompt(String),
    /// A value is outside its documented range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
