//! How a checkpoint path is laid out: a Hugging Face model directory, a
//! diffusers pipeline folder, a single file, ... and which of its files are
//! weights.

use crate::error::{CliError, Result};
use emu_core::checkpoint::{open_dir_files, Checkpoint, CheckpointFiles};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The layout of what was given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `config.json` (transformers) next to the weights: BAAI/Emu2, Emu2-Chat,
    /// Emu2-Gen's `multimodal_encoder/`.
    HfModel,
    /// `model_index.json` and one folder per component: BAAI/Emu2-Gen.
    DiffusersPipeline,
    /// One diffusers component folder (`config.json` with `_class_name`).
    DiffusersComponent,
    /// Component folders (weights or `config.json` in subfolders) without a
    /// `model_index.json`.
    ComponentsDirectory,
    /// Weights without any config file.
    WeightsDirectory,
    /// One file with the native (non-HF) Emu2 key names.
    NativeFile,
    /// Any other single safetensors / `torch.save` file.
    SingleFile,
    /// A `*.index.json` naming shards.
    IndexFile,
}

impl Layout {
    pub fn describe(self) -> &'static str {
        match self {
            Layout::HfModel => "Hugging Face model directory",
            Layout::DiffusersPipeline => "diffusers pipeline folder",
            Layout::DiffusersComponent => "diffusers component folder",
            Layout::ComponentsDirectory => "folder of components (no model_index.json)",
            Layout::WeightsDirectory => "directory of weights (no config.json)",
            Layout::NativeFile => "native single-file checkpoint",
            Layout::SingleFile => "single checkpoint file",
            Layout::IndexFile => "shard index file",
        }
    }
}

/// Extensions of weight files in any framework; such files are never copied
/// as "non-weight" files.
const WEIGHT_EXTS: [&str; 8] = [
    ".safetensors",
    ".bin",
    ".pth",
    ".pt",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
];

/// `name` holds weights or indexes weights (`*.safetensors`,
/// `pytorch_model.bin.index.json`, `model.safetensors.index.bf16.json`, ...).
pub fn is_weight_file(name: &str) -> bool {
    if WEIGHT_EXTS.iter().any(|e| name.ends_with(e)) {
        return true;
    }
    name.ends_with(".json") && WEIGHT_EXTS.iter().any(|e| name.contains(&format!("{e}.index")))
}

/// The variant of a weight file name: `bf16` in
/// `model.bf16-00001-of-00002.safetensors`, `diffusion_pytorch_model.bf16.safetensors`
/// and `model.safetensors.index.bf16.json`.
pub fn variant_of(name: &str) -> Option<String> {
    if !is_weight_file(name) {
        return None;
    }
    let v = if let Some(base) = name.strip_suffix(".json") {
        base.rsplit_once(".index.").map(|(_, v)| v)
    } else {
        let base = name.rsplit_once('.').map(|(b, _)| b).unwrap_or(name);
        // Strip a shard suffix `-00001-of-00002`.
        let base = match base.rsplit_once("-of-") {
            Some((head, _)) => head.rsplit_once('-').map(|(h, _)| h).unwrap_or(head),
            None => base,
        };
        base.rsplit_once('.').map(|(_, v)| v)
    };
    v.filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
}

/// The variants present in `dir`, sorted.
pub fn variants_in(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = file_names(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| variant_of(n))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Names of the entries directly in `dir` that are not folders, sorted
/// (special files included, so that opening one names what it is).
pub fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|e| CliError::io(dir, e))? {
        let item = item.map_err(|e| CliError::io(dir, e))?;
        if !item.path().is_dir() {
            out.push(item.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Names of the subdirectories of `dir`, sorted (hidden ones skipped).
pub fn subdir_names(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|e| CliError::io(dir, e))? {
        let item = item.map_err(|e| CliError::io(dir, e))?;
        let name = item.file_name().to_string_lossy().into_owned();
        if item.path().is_dir() && !name.starts_with('.') {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The checkpoint stored in a directory, as opened.
pub struct OpenedDir {
    pub checkpoint: Checkpoint,
    /// The index file, when the weights are sharded.
    pub index: Option<PathBuf>,
    /// The variant used (`bf16`), when the files carry one.
    pub variant: Option<String>,
}

/// Opens the weights of `dir`; `Ok(None)` when it holds no weight files.
///
/// Without an explicit `variant`, files without a variant are tried first;
/// if they do not open (Emu2-Gen ships a `model.safetensors.index.json` that
/// names fp32 shards it does not include, next to the bf16 ones), each
/// variant present is tried in turn, and the first error is reported if none
/// opens.
pub fn open_weights_dir(dir: &Path, variant: Option<&str>) -> Result<Option<OpenedDir>> {
    let names = file_names(dir)?;
    if !names.iter().any(|n| is_weight_file(n)) {
        return Ok(None);
    }
    let open = |v: Option<&str>| -> emu_core::Result<OpenedDir> {
        let files = open_dir_files(dir, v)?;
        let (ckpt, index) = match &files {
            CheckpointFiles::Index(p) => (Checkpoint::open(p)?, Some(p.clone())),
            CheckpointFiles::Single(p) => (Checkpoint::open(p)?, None),
        };
        let picked = match &files {
            CheckpointFiles::Index(p) | CheckpointFiles::Single(p) => p,
        };
        let name = picked.file_name().map(|n| n.to_string_lossy().into_owned());
        let used = name.and_then(|n| variant_of(&n));
        Ok(OpenedDir {
            checkpoint: ckpt,
            index,
            variant: v.map(str::to_string).or(used),
        })
    };
    if let Some(v) = variant {
        return Ok(Some(open(Some(v))?));
    }
    match open(None) {
        Ok(o) => Ok(Some(o)),
        Err(first) => {
            for v in variants_in(dir) {
                if let Ok(o) = open(Some(&v)) {
                    return Ok(Some(o));
                }
            }
            // Weight-looking files that are not a checkpoint (e.g. only shards
            // without their index) read better as "not a checkpoint".
            match first {
                emu_core::Error::CheckpointFormat { ref message, .. } if message.starts_with("no checkpoint files") => {
                    Err(CliError::NotACheckpoint {
                        path: dir.to_path_buf(),
                        hint: format!(
                            "{message}; shards are only read through their *.index.json, which must be in the same directory"
                        ),
                    })
                }
                other => Err(other.into()),
            }
        }
    }
}

/// Reads a JSON file of the layout (config.json, model_index.json).
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = emu_core::fs::read_limited(path, emu_core::fs::MAX_TEXT_FILE).map_err(|e| CliError::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| CliError::BadJson {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Checks that `path` exists, with the one-line error the CLI wants.
pub fn require_exists(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Err(CliError::NotFound {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_files() {
        for w in [
            "model.safetensors",
            "pytorch_model-00001-of-00015.bin",
            "model.safetensors.index.json",
            "model.safetensors.index.bf16.json",
            "pytorch_model.bin.index.json",
            "Emu2-Chat_pytorch_model.bf16.pth",
        ] {
            assert!(is_weight_file(w), "{w}");
        }
        for o in [
            "config.json",
            "tokenizer.json",
            "added_tokens.json",
            "tokenizer.model",
            "model_index.json",
            "modeling_emu.py",
        ] {
            assert!(!is_weight_file(o), "{o}");
        }
        assert_eq!(
            variant_of("model.bf16-00001-of-00008.safetensors").as_deref(),
            Some("bf16")
        );
        assert_eq!(variant_of("model.safetensors.index.bf16.json").as_deref(), Some("bf16"));
        assert_eq!(
            variant_of("diffusion_pytorch_model.fp16.safetensors").as_deref(),
            Some("fp16")
        );
        assert_eq!(variant_of("model-00001-of-00002.safetensors"), None);
        assert_eq!(variant_of("model.safetensors.index.json"), None);
        assert_eq!(variant_of("pytorch_model.bin"), None);
    }
}
