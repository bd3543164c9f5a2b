//! Finding a model: `tiny`, a local directory, a native single-file
//! checkpoint, or a repo id in the local Hugging Face cache (offline; nothing
//! is downloaded).

use super::error::{PipelineError, Result};
use crate::tiny::{TinyKind, TinyModel};
use emu_core::checkpoint::Checkpoint;
use serde_json::{json, Value};
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

/// A model ready to load: a directory in the Hugging Face layout of its
/// family, or one of upstream's native single-file checkpoints
/// (`Emu2-Chat_pytorch_model.bf16.bin`, `Emu2_pytorch_model.bf16.bin`: the
/// `EmuModel` state dict with `visual.*` and `decoder.lm.*` keys).
#[derive(Debug)]
pub struct ModelDir {
    root: PathBuf,
    family: ModelFamily,
    /// Keeps the tiny model's temporary directory alive while it is used.
    tiny: Option<TinyModel>,
    /// The native single file, when that is what was given (`root` is then its directory).
    native_file: Option<PathBuf>,
}

impl ModelDir {
    /// The directory given or found (for a native single file: the directory holding it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The native single-file checkpoint, when the model is one.
    pub fn native_file(&self) -> Option<&Path> {
        self.native_file.as_deref()
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

    /// The directory with the tokenizer files (`tokenizer/` in Emu2-Gen; for
    /// a native single file, the directory holding it).
    pub fn tokenizer_dir(&self) -> PathBuf {
        match self.family {
            ModelFamily::Emu2Gen if self.root.join("tokenizer").is_dir() => self.root.join("tokenizer"),
            ModelFamily::Emu2Gen => self.encoder_dir(),
            _ => self.root.clone(),
        }
    }

    /// The Emu2 `config.json` (LLaMA fields at the top level, EVA under
    /// `vision_config`) and where it came from. Native checkpoints ship
    /// without one: a `config.json` beside the weights is used when present
    /// (e.g. the Hugging Face one of the same model), otherwise upstream's
    /// configuration of the family (SPEC §1.1, §3.1), as upstream's own
    /// native loader builds it in code.
    pub fn emu_config(&self) -> Result<(Value, String)> {
        let path = self.encoder_dir().join("config.json");
        match emu_core::fs::read_text(&path) {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| PipelineError::Model(format!("{}: not valid JSON: {e}", path.display())))?;
                Ok((v, path.display().to_string()))
            }
            // Native checkpoints (a single file, or upstream's native Emu2-Gen
            // `multimodal_encoder/pytorch_model.bin`) come without one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((
                upstream_config(self.family),
                format!(
                    "upstream's {} configuration (no config.json beside the weights)",
                    self.family.repo_id()
                ),
            )),
            Err(e) => Err(PipelineError::Model(format!("{}: {e}", path.display()))),
        }
    }

    /// Opens the Emu2 weights (headers only): the native file, or the
    /// checkpoint of [`ModelDir::encoder_dir`]. In a directory, files without
    /// a variant are tried first, then each variant present: Emu2-Gen ships a
    /// `model.safetensors.index.json` naming fp32 shards it does not include,
    /// next to the `bf16` ones.
    pub fn open_encoder_weights(&self) -> Result<Checkpoint> {
        if let Some(file) = &self.native_file {
            return Ok(Checkpoint::open(file)?);
        }
        let dir = self.encoder_dir();
        match crate::layout::open_weights_dir(&dir, None) {
            Ok(Some(opened)) => Ok(opened.checkpoint),
            Ok(None) => Err(PipelineError::Model(format!(
                "`{}` holds no weight files (*.safetensors, *.bin and their *.index.json)",
                dir.display()
            ))),
            Err(crate::error::CliError::Core(e)) => Err(e.into()),
            Err(e) => Err(PipelineError::Model(e.to_string())),
        }
    }

    /// Builds the tiny model of `family`.
    pub fn tiny(family: ModelFamily) -> Result<Self> {
        let tiny = TinyModel::create(family.tiny_kind())?;
        Ok(Self {
            root: tiny.path().to_path_buf(),
            family,
            tiny: Some(tiny),
            native_file: None,
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
                return Self::native(path, want);
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
        check_family(&root, family, want)?;
        Ok(Self {
            root,
            family,
            tiny: None,
            native_file: None,
        })
    }

    /// A native single-file checkpoint: the `EmuModel` state dict of Emu2 or
    /// Emu2-Chat (`visual.*`, `decoder.lm.*`), whose family is read from its
    /// vocabulary size (32272 or 32274 rows).
    fn native(path: &Path, want: ModelFamily) -> Result<Self> {
        let not_native = |why: &str| {
            PipelineError::Model(format!(
                "--model `{}` is a file but {why}; give a model directory (the Hugging Face layout of {}) or one of upstream's native single files (Emu2-Chat_pytorch_model.bf16.bin, Emu2_pytorch_model.bf16.bin)",
                path.display(),
                want.repo_id()
            ))
        };
        let ckpt = Checkpoint::open(path).map_err(|e| not_native(&format!("not a checkpoint ({e})")))?;
        let has = |p: &str| ckpt.keys_with_prefix(p).next().is_some();
        if has("multimodal_encoder.") && has("unet.") {
            return Err(not_native(
                "a native Emu2-Gen file, which is not supported: use the BAAI/Emu2-Gen diffusers folder",
            ));
        }
        let embed = "decoder.lm.model.embed_tokens.weight";
        if !has("visual.") || !ckpt.contains(embed) {
            return Err(not_native("it has no native Emu2 weights (`visual.*`, `decoder.lm.*`)"));
        }
        let vocab = ckpt.info(embed)?.dims.first().copied().unwrap_or(0);
        let family = match vocab {
            32274 => ModelFamily::Emu2Chat,
            32272 => ModelFamily::Emu2,
            n => {
                return Err(not_native(&format!(
                    "its vocabulary has {n} tokens, neither Emu2's 32272 nor Emu2-Chat's 32274"
                )))
            }
        };
        let root = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        check_family(path, family, want)?;
        Ok(Self {
            root,
            family,
            tiny: None,
            native_file: Some(path.to_path_buf()),
        })
    }
}

/// The error for a checkpoint of the wrong family.
fn check_family(path: &Path, family: ModelFamily, want: ModelFamily) -> Result<()> {
    if family == want {
        return Ok(());
    }
    Err(PipelineError::Model(format!(
        "`{}` holds {} ({}), but this command needs {}; run `{}` with it or pass a {} checkpoint",
        path.display(),
        family.repo_id(),
        describe(family),
        want.repo_id(),
        family.command(),
        want.repo_id()
    )))
}

/// Upstream's Emu2 configuration of `family`, in the layout of the Hugging
/// Face `config.json` (SPEC §1.1, §3.1): EVA-CLIP-E/14-plus at 448 px and
/// LLaMA-33B; n_query 256 for Emu2-Chat, 64 otherwise.
pub fn upstream_config(family: ModelFamily) -> Value {
    let chat = family == ModelFamily::Emu2Chat;
    json!({
        "architectures": ["EmuForCausalLM"],
        "model_version": if chat { "chat" } else { "base" },
        "attention_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32000,
        "d_model": 1792,
        "hidden_act": "silu",
        "hidden_size": 6656,
        "intermediate_size": 17920,
        "max_position_embeddings": 2048,
        "num_attention_heads": 52,
        "num_hidden_layers": 60,
        "num_key_value_heads": 52,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "vocab_size": if chat { 32274 } else { 32272 },
        "vision_config": {
            "image_size": 448,
            "patch_size": 14,
            "width": 1792,
            "layers": 64,
            "head_width": 112,
            "mlp_ratio": 8.571428571428571,
            "intermediate_size": 15360,
            "layer_norm_eps": 1e-6,
            "n_query": if chat { 256 } else { 64 },
            "v_query": 64,
            "postnorm": true,
            "qkv_bias": true,
            "xattn": !chat
        }
    })
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
    let index = root.join("model_index.json");
    if std::fs::symlink_metadata(&index).is_ok() {
        // Read, not just seen: a model_index.json that is not JSON means a
        // broken download, which should not pass for a pipeline.
        let text =
            emu_core::fs::read_text(&index).map_err(|e| PipelineError::Model(format!("{}: {e}", index.display())))?;
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| PipelineError::Model(format!("{}: not valid JSON: {e}", index.display())))?;
        return Ok(ModelFamily::Emu2Gen);
    }
    if root.join("multimodal_encoder").join("config.json").is_file() {
        return Ok(ModelFamily::Emu2Gen);
    }
    let config = root.join("config.json");
    let text = emu_core::fs::read_text(&config).map_err(|e| {
        PipelineError::Model(if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "`{}` has no config.json (nor model_index.json); it is not an Emu2, Emu2-Chat or Emu2-Gen model directory",
                root.display()
            )
        } else {
            format!("{}: {e}", config.display())
        })
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
