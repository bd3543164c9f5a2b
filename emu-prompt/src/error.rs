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
    /// Reads a whole tokenizer or config file: regular files only (a FIFO or
    /// `/dev/zero` would block or never end) and at most 256 MB.
    pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
        use std::io::{Error as IoError, ErrorKind, Read};
        const LIMIT: u64 = 256 << 20;
        let fail = |e| Error::io(path, e);
        let meta = std::fs::metadata(path).map_err(fail)?;
        if !meta.is_file() {
            let what = if meta.is_dir() {
                "a directory"
            } else {
                "a special file (FIFO, device or socket)"
            };
            return Err(fail(IoError::new(
                ErrorKind::InvalidInput,
                format!("is {what}, expected a regular file"),
            )));
        }
        let mut buf = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(LIMIT + 1).read_to_end(&mut buf))
            .map_err(fail)?;
        if buf.len() as u64 > LIMIT {
            return Err(fail(IoError::new(ErrorKind::InvalidData, "is larger than 256 MB")));
        }
        Ok(buf)
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
