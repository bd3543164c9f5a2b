//! `--model tiny`: a complete Emu2 model small enough to build on the fly.
//!
//! The tiny model has the architecture, special tokens, prompt templates and
//! checkpoint layouts of BAAI/Emu2, Emu2-Chat and Emu2-Gen, with small shapes
//! and **random weights** drawn from a fixed seed. Its answers and images are
//! meaningless; it exists so that every pipeline can run end to end on a
//! fresh machine with no download and no network, and so that tests exercise
//! the same code paths as real checkpoints.
//!
//! It is not special-cased anywhere: [`TinyModel::create`] writes a Hugging
//! Face–layout directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`; for Gen the diffusers folders) into a private temporary
//! directory, and the pipelines load it with the ordinary loaders. The
//! checkpoint loader memory-maps files, which is why the weights go through a
//! file rather than staying in memory.

mod diffusion;
mod rng;
mod vocab;

use crate::pipeline::{PipelineError, Result};
use emu_core::HostTensor;
use rng::{fnv1a, SplitMix64};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub use diffusion::TINY_GEN_SIZE;
pub use vocab::tokenizer_json;

/// The seed of every tiny weight. Changing it changes every tiny output.
pub const TINY_SEED: u64 = 0x454D_5532_5449_4E59; // "EMU2TINY"

/// What users are told whenever the tiny model runs.
pub const TINY_NOTICE: &str = "note: `--model tiny` is a built-in model with random weights; \
its answers and images are meaningless (it only shows that the pipeline runs)";

/// Which upstream model the tiny one imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyKind {
    /// BAAI/Emu2 (base): `model_version: "base"`, 32272 tokens, 4 visual tokens per image.
    Base,
    /// BAAI/Emu2-Chat: `model_version: "chat"`, 32274 tokens, 16 visual tokens per image.
    Chat,
    /// BAAI/Emu2-Gen: a diffusers pipeline folder with a base multimodal encoder.
    Gen,
}

/// Tiny EVA: 56-px images in 7-px patches, an 8×8 grid. Pooling it to 16
/// tokens (stride 2) and to 4 (stride 4) mirrors the real 32×32 grid pooled to
/// 256 (Emu2-Chat images) and to 64 (Emu2/Emu2-Gen images, video frames).
pub const TINY_IMAGE_SIZE: usize = 56;
const PATCH: usize = 7;
pub(crate) const VIS_WIDTH: usize = 16;
const VIS_LAYERS: usize = 2;
const VIS_HEAD_WIDTH: usize = 8;
const VIS_MLP: usize = 32;
/// Tiny LLaMA.
const HIDDEN: usize = 32;
const INTERMEDIATE: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const MAX_POSITIONS: usize = 1024;

impl TinyKind {
    fn vocab_size(self) -> usize {
        match self {
            TinyKind::Chat => 32274,
            TinyKind::Base | TinyKind::Gen => 32272,
        }
    }

    fn n_query(self) -> usize {
        match self {
            TinyKind::Chat => 16,
            TinyKind::Base | TinyKind::Gen => 4,
        }
    }

    /// The directory (relative to the model root) holding the Emu2 LLM part.
    pub fn encoder_subdir(self) -> &'static str {
        match self {
            TinyKind::Gen => "multimodal_encoder",
            TinyKind::Base | TinyKind::Chat => "",
        }
    }
}

/// The `config.json` of the Emu2 part (LLaMA fields at the top level, EVA
/// under `vision_config`), in the layout of the upstream Hugging Face files.
pub fn emu_config(kind: TinyKind) -> Value {
    json!({
        "architectures": ["EmuForCausalLM"],
        "model_version": if kind == TinyKind::Chat { "chat" } else { "base" },
        "attention_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32000,
        "d_model": VIS_WIDTH,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "vocab_size": kind.vocab_size(),
        "vision_config": {
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": PATCH,
            "width": VIS_WIDTH,
            "layers": VIS_LAYERS,
            "head_width": VIS_HEAD_WIDTH,
            "mlp_ratio": VIS_MLP as f64 / VIS_WIDTH as f64,
            "intermediate_size": VIS_MLP,
            "layer_norm_eps": 1e-6,
            "n_query": kind.n_query(),
            "v_query": 4,
            "postnorm": true,
            "qkv_bias": true,
            "xattn": false
        }
    })
}

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    Ones,
    /// Uniform with this standard deviation.
    Std(f32),
    /// Uniform with standard deviation `1/sqrt(fan_in)`, fan_in = the
    /// product of all dims but the first (keeps activations of order one
    /// through the random network).
    FanIn,
}

/// The parameters of one safetensors file, by full key.
#[derive(Default)]
pub(crate) struct Params(Vec<(String, Vec<usize>, Init)>);

impl Params {
    pub(crate) fn add(&mut self, key: impl Into<String>, dims: &[usize], init: Init) {
        self.0.push((key.into(), dims.to_vec(), init));
    }

    pub(crate) fn host(&self, seed: u64) -> Result<Vec<(String, HostTensor)>> {
        self.0
            .iter()
            .map(|(key, dims, init)| Ok((key.clone(), random_tensor(seed, key, dims, *init)?)))
            .collect()
    }
}

fn random_tensor(seed: u64, key: &str, dims: &[usize], init: Init) -> Result<HostTensor> {
    let n: usize = dims.iter().product();
    let values = match init {
        Init::Ones => vec![1.0f32; n],
        Init::Std(_) | Init::FanIn => {
            let std = match init {
                Init::Std(s) => s,
                // Linear [out, in] and conv [out, in, kh, kw] weights alike.
                _ => 1.0 / (dims.iter().skip(1).product::<usize>().max(1) as f32).sqrt(),
            };
            // A uniform variable on [-a, a) has standard deviation a / sqrt(3).
            let a = std * 3f32.sqrt();
            let mut rng = SplitMix64::new(seed ^ fnv1a(key));
            (0..n).map(|_| a * rng.next_signed_unit()).collect()
        }
    };
    Ok(HostTensor::from_f32(dims, values)?)
}

/// The EmuForCausalLM parameters (HF layout: `model.visual.*`,
/// `model.decoder.lm.*`, `project_up`, `project_down`).
fn emu_params(kind: TinyKind) -> Params {
    let mut p = Params::default();
    let v = "model.visual.";
    let c = VIS_WIDTH;
    let grid = TINY_IMAGE_SIZE / PATCH;
    p.add(format!("{v}cls_token"), &[1, 1, c], Init::Std(0.5));
    p.add(format!("{v}pos_embed"), &[1, grid * grid + 1, c], Init::Std(0.5));
    p.add(
        format!("{v}patch_embed.proj.weight"),
        &[c, 3, PATCH, PATCH],
        Init::Std(0.1),
    );
    p.add(format!("{v}patch_embed.proj.bias"), &[c], Init::Std(0.02));
    for i in 0..VIS_LAYERS {
        let b = format!("{v}blocks.{i}.");
        for norm in ["norm1", "norm2"] {
            p.add(format!("{b}{norm}.weight"), &[c], Init::Ones);
            p.add(format!("{b}{norm}.bias"), &[c], Init::Std(0.02));
        }
        p.add(format!("{b}attn.qkv.weight"), &[3 * c, c], Init::FanIn);
        p.add(format!("{b}attn.q_bias"), &[c], Init::Std(0.02));
        p.add(format!("{b}attn.v_bias"), &[c], Init::Std(0.02));
        p.add(format!("{b}attn.proj.weight"), &[c, c], Init::FanIn);
        p.add(format!("{b}attn.proj.bias"), &[c], Init::Std(0.02));
        p.add(format!("{b}mlp.fc1.weight"), &[VIS_MLP, c], Init::FanIn);
        p.add(format!("{b}mlp.fc1.bias"), &[VIS_MLP], Init::Std(0.02));
        p.add(format!("{b}mlp.fc2.weight"), &[c, VIS_MLP], Init::FanIn);
        p.add(format!("{b}mlp.fc2.bias"), &[c], Init::Std(0.02));
    }
    p.add("project_up.weight", &[HIDDEN, c], Init::FanIn);
    p.add("project_down.weight", &[c, HIDDEN], Init::FanIn);
    let lm = "model.decoder.lm.";
    let (h, vocab) = (HIDDEN, kind.vocab_size());
    p.add(format!("{lm}model.embed_tokens.weight"), &[vocab, h], Init::Std(1.0));
    for i in 0..LAYERS {
        let l = format!("{lm}model.layers.{i}.");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            p.add(format!("{l}self_attn.{proj}.weight"), &[h, h], Init::FanIn);
        }
        p.add(format!("{l}mlp.gate_proj.weight"), &[INTERMEDIATE, h], Init::FanIn);
        p.add(format!("{l}mlp.up_proj.weight"), &[INTERMEDIATE, h], Init::FanIn);
        p.add(format!("{l}mlp.down_proj.weight"), &[h, INTERMEDIATE], Init::FanIn);
        p.add(format!("{l}input_layernorm.weight"), &[h], Init::Ones);
        p.add(format!("{l}post_attention_layernorm.weight"), &[h], Init::Ones);
    }
    p.add(format!("{lm}model.norm.weight"), &[h], Init::Ones);
    p.add(format!("{lm}lm_head.weight"), &[vocab, h], Init::FanIn);
    p
}

/// Serialises host tensors as one safetensors file.
pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(k, t)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.dims().to_vec(), t.as_bytes())
                .map_err(|e| PipelineError::Tiny(format!("tensor `{k}`: {e}")))?;
            Ok((k.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, None).map_err(|e| PipelineError::Tiny(e.to_string()))?;
    write_file(path, &bytes)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| emu_core::Error::io(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| emu_core::Error::io(path, e).into())
}

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| PipelineError::Tiny(e.to_string()))?;
    write_file(path, text.as_bytes())
}

/// Writes the tiny model of `kind` into `dir` in the Hugging Face layout of
/// its upstream model. Deterministic: the same bytes on every call.
pub fn write_model(dir: &Path, kind: TinyKind) -> Result<()> {
    let enc = dir.join(kind.encoder_subdir());
    write_json(&enc.join("config.json"), &emu_config(kind))?;
    write_safetensors(&enc.join("model.safetensors"), &emu_params(kind).host(TINY_SEED)?)?;
    let tok_dir = match kind {
        TinyKind::Gen => dir.join("tokenizer"),
        TinyKind::Base | TinyKind::Chat => dir.to_path_buf(),
    };
    write_json(&tok_dir.join("tokenizer.json"), &tokenizer_json())?;
    if kind == TinyKind::Gen {
        diffusion::write(dir)?;
    }
    Ok(())
}

/// A tiny model written to a private temporary directory, removed on drop.
#[derive(Debug)]
pub struct TinyModel {
    dir: tempfile::TempDir,
    kind: TinyKind,
}

impl TinyModel {
    /// Builds the tiny model of `kind` (a few MB, well under a second).
    pub fn create(kind: TinyKind) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("emu-tiny-")
            .tempdir()
            .map_err(|e| emu_core::Error::io(std::env::temp_dir(), e))?;
        write_model(dir.path(), kind)?;
        Ok(Self { dir, kind })
    }

    /// The model root (what `--model <dir>` would be for a real checkpoint).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn kind(&self) -> TinyKind {
        self.kind
    }

    /// The directory of the Emu2 part (the root, or `multimodal_encoder/`).
    pub fn encoder_dir(&self) -> PathBuf {
        self.dir.path().join(self.kind.encoder_subdir())
    }
}
