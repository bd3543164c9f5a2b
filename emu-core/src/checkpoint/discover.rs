//! Which files of a directory make up its checkpoint (see
//! [`super::Checkpoint::open_dir`] for the precedence rules).

use super::format_err;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// What [`open_dir_files`] picked in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointFiles {
    /// A `*.index.json` / `*.index.<variant>.json` naming the shards.
    Index(PathBuf),
    /// One safetensors file or `torch.save` archive.
    Single(PathBuf),
}

/// Kinds of candidate, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    SafetensorsIndex,
    Safetensors,
    PickleIndex,
    Pickle,
    Gguf,
}

#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    name: String,
    kind: Kind,
    stem: String,
    variant: Option<String>,
}

/// Stems that win when several files of the same kind are present
/// (e.g. `pytorch_model.bin` next to `training_args.bin`).
const STANDARD_STEMS: [&str; 3] = ["model", "diffusion_pytorch_model", "pytorch_model"];

/// `name` ends like a shard: `...-00001-of-00002`.
fn is_shard(base: &str) -> bool {
    let Some((head, total)) = base.rsplit_once("-of-") else {
        return false;
    };
    let Some((_, part)) = head.rsplit_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(total) && digits(part)
}

/// Splits `stem.variant` (for `stem.variant.safetensors`-style names).
fn split_variant(base: &str) -> (String, Option<String>) {
    match base.rsplit_once('.') {
        Some((stem, v)) if !stem.is_empty() && !v.is_empty() => (stem.to_string(), Some(v.to_string())),
        _ => (base.to_string(), None),
    }
}

fn classify(name: &str) -> Option<(Kind, String, Option<String>)> {
    if let Some(base) = name.strip_suffix(".json") {
        for (marker, kind) in [
            (".safetensors.index", Kind::SafetensorsIndex),
            (".bin.index", Kind::PickleIndex),
        ] {
            if let Some(pos) = base.find(marker) {
                let stem = &base[..pos];
                let rest = &base[pos + marker.len()..];
                let variant = match rest.strip_prefix('.') {
                    None if rest.is_empty() => None,
                    Some(v) if !v.is_empty() && !v.contains('.') => Some(v.to_string()),
                    _ => return None,
                };
                return (!stem.is_empty()).then(|| (kind, stem.to_string(), variant));
            }
        }
        return None;
    }
    let (base, kind) = if let Some(b) = name.strip_suffix(".safetensors") {
        (b, Kind::Safetensors)
    } else if let Some(b) = name.strip_suffix(".gguf") {
        (b, Kind::Gguf)
    } else if let Some(b) = name
        .strip_suffix(".bin")
        .or_else(|| name.strip_suffix(".pth"))
        .or_else(|| name.strip_suffix(".pt"))
    {
        (b, Kind::Pickle)
    } else {
        return None;
    };
    if base.is_empty() || is_shard(base) {
        return None;
    }
    let (stem, variant) = split_variant(base);
    Some((kind, stem, variant))
}

/// Picks the checkpoint files of `dir` by the precedence documented on
/// [`super::Checkpoint::open_dir`], without opening them.
pub fn open_dir_files(dir: &Path, variant: Option<&str>) -> Result<CheckpointFiles> {
    let mut cands = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let item = item.map_err(|e| Error::io(dir, e))?;
        let path = item.path();
        // Only folders are skipped: a FIFO, device or symlink loop with a
        // weight file's name is picked and then refused by kind when opened,
        // rather than reported as missing.
        if path.is_dir() {
            continue;
        }
        let name = item.file_name().to_string_lossy().into_owned();
        if let Some((kind, stem, variant)) = classify(&name) {
            cands.push(Candidate {
                path,
                name,
                kind,
                stem,
                variant,
            });
        }
    }
    cands.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    let listing = |cs: &[Candidate]| cs.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
    let pool: Vec<Candidate> = match variant {
        Some(v) => {
            let pool: Vec<_> = cands
                .iter()
                .filter(|c| c.variant.as_deref() == Some(v))
                .cloned()
                .collect();
            if pool.is_empty() {
                return Err(format_err(
                    dir,
                    format!(
                        "no checkpoint files of variant `{v}` (found: {})",
                        if cands.is_empty() {
                            "none".to_string()
                        } else {
                            listing(&cands)
                        }
                    ),
                ));
            }
            pool
        }
        None => {
            let plain: Vec<_> = cands.iter().filter(|c| c.variant.is_none()).cloned().collect();
            if !plain.is_empty() {
                plain
            } else {
                let mut variants: Vec<&str> = cands.iter().filter_map(|c| c.variant.as_deref()).collect();
                variants.sort();
                variants.dedup();
                match variants.as_slice() {
                    [] => {
                        return Err(format_err(
                            dir,
                            "no checkpoint files (*.safetensors, *.safetensors.index.json, *.bin, \
                             *.bin.index.json, *.pth, *.pt, *.gguf)",
                        ))
                    }
                    [_] => cands.clone(),
                    several => {
                        return Err(format_err(
                            dir,
                            format!("several variants ({}): choose one", several.join(", ")),
                        ))
                    }
                }
            }
        }
    };
    let Some(best) = pool.iter().map(|c| c.kind).min() else {
        return Err(format_err(dir, "no checkpoint files"));
    };
    let mut top: Vec<&Candidate> = pool.iter().filter(|c| c.kind == best).collect();
    if top.len() > 1 {
        let standard: Vec<&Candidate> = top
            .iter()
            .copied()
            .filter(|c| STANDARD_STEMS.contains(&c.stem.as_str()))
            .collect();
        if standard.len() == 1 {
            top = standard;
        } else {
            let names: Vec<_> = top.iter().map(|c| c.name.as_str()).collect();
            return Err(format_err(
                dir,
                format!(
                    "ambiguous checkpoint: {} all qualify; open one of them directly",
                    names.join(", ")
                ),
            ));
        }
    }
    let c = top[0];
    Ok(match c.kind {
        Kind::SafetensorsIndex | Kind::PickleIndex => CheckpointFiles::Index(c.path.clone()),
        Kind::Safetensors | Kind::Pickle | Kind::Gguf => CheckpointFiles::Single(c.path.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified() {
        let k = classify;
        assert_eq!(k("model.safetensors"), Some((Kind::Safetensors, "model".into(), None)));
        assert_eq!(
            k("diffusion_pytorch_model.bf16.safetensors"),
            Some((Kind::Safetensors, "diffusion_pytorch_model".into(), Some("bf16".into())))
        );
        assert_eq!(k("model-00001-of-00002.safetensors"), None);
        assert_eq!(k("model.bf16-00001-of-00008.safetensors"), None);
        assert_eq!(k("pytorch_model-00001-of-00015.bin"), None);
        assert_eq!(
            k("model.safetensors.index.bf16.json"),
            Some((Kind::SafetensorsIndex, "model".into(), Some("bf16".into())))
        );
        assert_eq!(
            k("diffusion_pytorch_model.safetensors.index.json"),
            Some((Kind::SafetensorsIndex, "diffusion_pytorch_model".into(), None))
        );
        assert_eq!(
            k("pytorch_model.bin.index.json"),
            Some((Kind::PickleIndex, "pytorch_model".into(), None))
        );
        assert_eq!(
            k("Emu2_pytorch_model.bf16.bin"),
            Some((Kind::Pickle, "Emu2_pytorch_model".into(), Some("bf16".into())))
        );
        assert_eq!(k("config.json"), None);
        assert_eq!(k("tokenizer.model"), None);
    }
}
