//! Errors of the vision crate.

use std::path::PathBuf;

pub type Result<T, E = VisionError> = std::result::Result<T, E>;

/// Everything that can go wrong in config parsing, weight loading, image
/// decoding and the encoder's forward pass.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// An error from the backend or the checkpoint loader.
    #[error(transparent)]
    Core(#[from] emu_core::Error),

    /// A config that cannot be read or parsed.
    #[error("config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A config that asks for an architecture feature this encoder does not implement.
    #[error("unsupported vision_config feature `{feature}`: {reason}")]
    UnsupportedFeature { feature: &'static str, reason: String },

    /// A config value that is inconsistent (e.g. a patch size that does not divide the image).
    #[error("invalid vision config: {0}")]
    InvalidConfig(String),

    /// A checkpoint whose key layout is none of the known ones.
    #[error("{location}: no EVA vision encoder found (looked for `<prefix>cls_token` with prefixes {tried:?})")]
    NoVisionWeights { location: String, tried: Vec<String> },

    /// Bytes that are not a decodable PNG/JPEG image (corrupt, truncated, unknown format).
    #[error("cannot decode image{}: {message}", fmt_source(.source_name))]
    Decode {
        source_name: Option<String>,
        message: String,
    },

    /// An image whose header declares more pixels than the configured limit.
    #[error("image{} is {width}x{height}, more than the limit of {limit} pixels ({max_side} per side)", fmt_source(.source_name))]
    ImageTooLarge {
        source_name: Option<String>,
        width: u64,
        height: u64,
        limit: u64,
        max_side: u32,
    },

    /// An image with a zero width or height.
    #[error("image{} has zero size ({width}x{height})", fmt_source(.source_name))]
    EmptyImage {
        source_name: Option<String>,
        width: u32,
        height: u32,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A caller-supplied argument that does not fit (e.g. an `n_query` that does not tile the grid).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn fmt_source(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" `{s}`"),
        None => String::new(),
    }
}
