//! Finding a model: `tiny`, a local directory, or a repo id in the local
//! Hugging Face cache (offline; nothing is downloaded).

use super::error::{PipelineError, Result};
use crate::tiny::{TinyKind, TinyModel};
use std::path::{Path, PathBuf};

/// The three Emu2 checkpoints; each pipeline needs one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// BAAI/Emu2, the pretrained base model (few-shot completion).
    Emu2,
    /// BAAI/Emu2-Chat (questions about images and videos, grounding).
    Emu2Chat,
    /// BAAI/Emu2-Gen (image generation), a diffusers pipeline folder.
    Emu2Gen,
}

impl ModelFamily {
    pub fn repo_id(self) -> &'static str {
        match self {
            ModelFamily::Emu2 => "BAAI/Emu2",
            ModelFamily::Emu2Chat => "BAAI/Emu2-Chat",
            ModelFamily::Emu2Gen => "BAAI/Emu2-Gen",
        }
    }

    /// The subcommand that runs this family.
    pub fn command(self) -> &'static str {
        match self {
            ModelFamily::Emu2 => "emu complete",
            ModelFamily::Emu2Chat => "emu chat",
            ModelFamily::Emu2Gen => "emu generate",
        }
    }

    fn tiny_kind(self) -> TinyKind {
        match self {
            ModelFamily::Emu2 => TinyKind::Base,
            ModelFamily::Emu2Chat => TinyKind::Chat,
            ModelFamily::Emu2Gen => TinyKind::Gen,
        }
    }
}

/// A model directory ready to load, in the Hugging Face layout of its family.
#[derive(Debug)]
pub struct ModelDir {
    root: PathBuf,
    family: ModelFamily,
    /// Keeps the tiny model's temporary directory alive while it is used.
    tiny: Option<TinyModel>,
}

impl ModelDir {
    /// The directory given or found.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Whether this is the built-in tiny model (whose outputs are meaningless).
    pub fn is_tiny(&self) -> bool {
        self.tiny.is_some()
    }

    /// The directory with the Emu2 `config.json` and weights: the root, or
    /// `multimodal_encoder/` of an Emu2-Gen pipeline folder.
    pub fn encoder_dir(&self) -> PathBuf {
        match self.family {
            ModelFamily::Emu2Gen => self.root.join("multimodal_encoder"),
            _ => self.root.clone(),
        }
    }

    /// The directory with the tokenizer files (`tokenizer/` in Emu2-Gen).
    pub fn tokenizer_dir(&self) -> PathBuf {
        match self.family {
            ModelFamily::Emu2Gen if self.root.join("tokenizer").is_dir() => self.root.join("tokenizer"),
            ModelFamily::Emu2Gen => self.encoder_dir(),
            _ => self.root.clone(),
        }
    }

    /// Builds the tiny model of `family`.
    pub fn tiny(family: ModelFamily) -> Result<Self> {
        let tiny = TinyModel::create(family.tiny_kind())?;
        Ok(Self {
            root: tiny.path().to_path_buf(),
            family,
            tiny: Some(tiny),
        })
    }

    /// Resolves `spec` like [`ModelDir::resolve`] but accepts any of the three
    /// families; `tiny` builds the tiny model of `tiny_family`.
    pub fn resolve_any(spec: &str, tiny_family: ModelFamily) -> Result<Self> {
        if spec == "tiny" {
            return Self::tiny(tiny_family);
        }
        let probe = Self::resolve(spec, tiny_family);
        match probe {
            Err(PipelineError::Model(_)) => {
                for f in [ModelFamily::Emu2Chat, ModelFamily::Emu2, ModelFamily::Emu2Gen] {
                    if let Ok(d) = Self::resolve(spec, f) {
                        return Ok(d);
                    }
                }
                probe
            }
            other => other,
        }
    }

    /// Resolves `spec` (`tiny`, a directory, or a repo id such as
    /// `BAAI/Emu2-Chat` found in the local Hugging Face cache) and checks
    /// that it holds a model of family `want`.
    pub fn resolve(spec: &str, want: ModelFamily) -> Result<Self> {
        if spec == "tiny" {
            return Self::tiny(want);
        }
        let path = Path::new(spec);
        let root = if path.exists() {
            if !path.is_dir() {
                return Err(PipelineError::Model(format!(
                    "--model `{spec}` is a file; give the model directory (the Hugging Face layout of {})",
                    want.repo_id()
                )));
            }
            path.to_path_buf()
        } else if looks_like_repo_id(spec) {
            hf_cache_snapshot(spec)?
        } else {
            return Err(PipelineError::Model(format!(
                "--model `{spec}` does not exist; give `tiny`, a model directory, or a repo id such as {} that is in the local Hugging Face cache",
                want.repo_id()
            )));
        };
        let family = detect_family(&root)?;
        if family != want {
            return Err(PipelineError::Model(format!(
                "`{}` holds {} ({}), but this command needs {}; run `{}` with it or pass a {} checkpoint",
                root.display(),
                family.repo_id(),
                describe(family),
                want.repo_id(),
                family.command(),
                want.repo_id()
            )));
        }
        Ok(Self {
            root,
            family,
            tiny: None,
        })
    }
}

fn describe(f: ModelFamily) -> &'static str {
    match f {
        ModelFamily::Emu2 => "the base model",
        ModelFamily::Emu2Chat => "the chat model",
        ModelFamily::Emu2Gen => "the image generation pipeline",
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Which Emu2 family a directory holds, from its config files.
pub fn detect_family(root: &Path) -> Result<ModelFamily> {
    if root.join("model_index.json").is_file() || root.join("multimodal_encoder").join("config.json").is_file() {
        return Ok(ModelFamily::Emu2Gen);
    }
    let config = root.join("config.json");
    let text = std::fs::read_to_string(&config).map_err(|_| {
        PipelineError::Model(format!(
            "`{}` has no config.json (nor model_index.json); it is not an Emu2, Emu2-Chat or Emu2-Gen model directory",
            root.display()
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PipelineError::Model(format!("{}: not valid JSON: {e}", config.display())))?;
    if v.get("vision_config").is_none() {
        return Err(PipelineError::Model(format!(
            "{}: no `vision_config`; this is not an Emu2 model (a component folder such as unet/ or vae/ cannot be run on its own)",
            config.display()
        )));
    }
    // Emu2-Chat says `model_version: "chat"` and has the two chat tokens.
    let chat = v.get("model_version").and_then(|m| m.as_str()) == Some("chat")
        || v.get("vocab_size").and_then(|n| n.as_u64()) == Some(32274);
    Ok(if chat { ModelFamily::Emu2Chat } else { ModelFamily::Emu2 })
}

/// The Hugging Face hub cache directories, in the order the hub library uses.
fn hf_cache_roots() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut roots = Vec::new();
    if let Some(p) = env("HF_HUB_CACHE") {
        roots.push(p);
    }
    if let Some(p) = env("HF_HOME") {
        roots.push(p.join("hub"));
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        roots.push(p.join("huggingface").join("hub"));
    }
    if let Some(p) = env("HOME") {
        roots.push(p.join(".cache").join("huggingface").join("hub"));
    }
    roots
}

/// `<cache>/models--{owner}--{name}/snapshots/<refs/main>`.
fn hf_cache_snapshot(repo_id: &str) -> Result<PathBuf> {
    let folder = format!("models--{}", repo_id.replace('/', "--"));
    let roots = hf_cache_roots();
    for root in &roots {
        let repo = root.join(&folder);
        if !repo.is_dir() {
            continue;
        }
        let snapshots = repo.join("snapshots");
        if let Ok(hash) = std::fs::read_to_string(repo.join("refs").join("main")) {
            let snap = snapshots.join(hash.trim());
            if snap.is_dir() {
                return Ok(snap);
            }
        }
        // No usable refs/main: accept a single snapshot, refuse to guess among several.
        let mut snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        snaps.sort();
        match snaps.len() {
            1 => return Ok(snaps.remove(0)),
            0 => {}
            n => {
                return Err(PipelineError::Model(format!(
                    "`{}` has {n} snapshots and no refs/main; pass the snapshot directory you want as --model",
                    repo.display()
                )))
            }
        }
    }
    let looked: Vec<String> = roots.iter().map(|r| r.join(&folder).display().to_string()).collect();
    Err(PipelineError::Model(format!(
        "`{repo_id}` is not in the local Hugging Face cache (looked in {}); download it first (e.g. `huggingface-cli download {repo_id}`) or pass its directory",
        if looked.is_empty() { "no cache directory: HOME is not set".to_string() } else { looked.join(", ") }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("BAAI/Emu2-Chat"));
        assert!(!looks_like_repo_id("BAAI"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
    }
}
