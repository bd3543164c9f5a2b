//! The LLaMA hyper-parameters, read from a Hugging Face `config.json`.
//!
//! Accepted layouts:
//! * a plain transformers `LlamaConfig` (4.x with top-level `rope_theta` /
//!   `rope_scaling`, or 5.x with `rope_parameters`);
//! * the original LLaMA-1 `llama_config/config.json` of Emu2 (no
//!   `num_key_value_heads`, no `rope_theta`: the defaults apply);
//! * the HF Emu2 / Emu2-Chat / Emu2-Gen `config.json` (`EmuConfig`): the LLaMA
//!   fields are at the top level beside `d_model`, `model_version` and
//!   `vision_config`, which are ignored here;
//! * any of the above nested under `text_config` (the transformers convention
//!   for multimodal configs).

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// LLaMA decoder hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (`gate_proj` / `up_proj` outputs).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads; fewer than `num_attention_heads` means grouped-query
    /// attention. Defaults to `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE base; defaults to 10000.
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    /// Whether `lm_head` shares the token-embedding matrix.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (HF allows one id or a list).
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Every field is optional here so that missing ones can be reported by name
/// and defaulted the way transformers does.
#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    vocab_size: Option<usize>,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    text_config: Option<Value>,
}

fn required(v: Option<usize>, field: &str) -> Result<usize> {
    match v {
        None => Err(Error::config(field, "missing")),
        Some(0) => Err(Error::config(field, "must be positive, found 0")),
        Some(n) => Ok(n),
    }
}

fn token_ids(v: &Option<Value>, field: &str) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::config(field, format!("expected a token id, found {x}")))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(xs)) => xs.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// Reads the RoPE type and base from `rope_scaling` (transformers 4.x) or
/// `rope_parameters` (5.x); anything but plain RoPE is refused.
fn rope_theta_from(raw: &RawConfig) -> Result<Option<f64>> {
    for (field, v) in [
        ("rope_scaling", &raw.rope_scaling),
        ("rope_parameters", &raw.rope_parameters),
    ] {
        let obj = match v {
            None | Some(Value::Null) => continue,
            Some(Value::Object(o)) => o,
            Some(other) => {
                return Err(Error::config(
                    field,
                    format!("expected an object or null, found {other}"),
                ))
            }
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(Error::config(
                field,
                format!("RoPE type `{kind}` is not supported (only plain RoPE)"),
            ));
        }
        if let Some(f) = obj.get("factor") {
            if f.as_f64() != Some(1.0) {
                return Err(Error::config(
                    field,
                    format!("RoPE scaling factor {f} is not supported"),
                ));
            }
        }
        if let Some(t) = obj.get("rope_theta") {
            let t = t
                .as_f64()
                .ok_or_else(|| Error::config(field, format!("rope_theta must be a number, found {t}")))?;
            return Ok(Some(t));
        }
    }
    Ok(None)
}

impl LlamaConfig {
    /// Parses a `config.json` text (see the module docs for the layouts).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            field: "<json>".into(),
            message: e.to_string(),
        })?;
        Self::from_json_value(value)
    }

    /// Reads and parses a `config.json` file; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = emu_core::fs::read_text(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Parses an already-decoded JSON value.
    pub fn from_json_value(value: Value) -> Result<Self> {
        let raw: RawConfig = serde_json::from_value(value).map_err(|e| Error::Config {
            field: "<json>".into(),
            message: e.to_string(),
        })?;
        if raw.hidden_size.is_none() {
            if let Some(inner) = raw.text_config {
                return Self::from_json_value(inner);
            }
        }
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let max_position_embeddings = required(raw.max_position_embeddings, "max_position_embeddings")?;
        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        let num_key_value_heads = match raw.num_key_value_heads {
            None => num_attention_heads,
            v => required(v, "num_key_value_heads")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => required(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::config(
                        "num_attention_heads",
                        format!("{num_attention_heads} heads do not divide hidden_size = {hidden_size}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(
                "head_dim",
                format!("RoPE needs an even head width, found {head_dim}"),
            ));
        }
        let act = raw.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(Error::config(
                "hidden_act",
                format!("`{act}` is not supported (only `silu`)"),
            ));
        }
        if raw.attention_bias == Some(true) {
            return Err(Error::config(
                "attention_bias",
                "biased attention projections are not supported",
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err(Error::config("mlp_bias", "biased MLP projections are not supported"));
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            return Err(Error::config(
                "rms_norm_eps",
                format!("must be positive, found {rms_norm_eps}"),
            ));
        }
        let rope_theta = match (raw.rope_theta, rope_theta_from(&raw)?) {
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => 10000.0,
        };
        if !(rope_theta > 0.0 && rope_theta.is_finite()) {
            return Err(Error::config(
                "rope_theta",
                format!("must be positive, found {rope_theta}"),
            ));
        }
        Ok(Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_ids(&raw.bos_token_id, "bos_token_id")?.first().copied(),
            eos_token_id: token_ids(&raw.eos_token_id, "eos_token_id")?,
            pad_token_id: token_ids(&raw.pad_token_id, "pad_token_id")?.first().copied(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Map<String, Value> {
        let v = serde_json::json!({
            "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 128, "vocab_size": 400,
            "rms_norm_eps": 1e-5, "hidden_act": "silu"
        });
        v.as_object().unwrap().clone()
    }

    fn parse(m: serde_json::Map<String, Value>) -> Result<LlamaConfig> {
        LlamaConfig::from_json_value(Value::Object(m))
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Config { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(base()).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
        assert!(c.eos_token_id.is_empty());
    }

    #[test]
    fn rope_theta_from_rope_parameters_and_gqa() {
        let mut m = base();
        m.insert("num_key_value_heads".into(), 2.into());
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 500000.0, "rope_type": "default"}),
        );
        m.insert("eos_token_id".into(), serde_json::json!([2, 7]));
        let c = parse(m).unwrap();
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.eos_token_id, vec![2, 7]);
    }

    #[test]
    fn unsupported_values_are_rejected_by_name() {
        let cases: Vec<(&str, Value)> = vec![
            ("hidden_act", "gelu".into()),
            ("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0})),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "llama3", "rope_theta": 1.0}),
            ),
            ("attention_bias", true.into()),
            ("mlp_bias", true.into()),
            ("num_key_value_heads", 3.into()),
            ("head_dim", 15.into()),
        ];
        for (field, value) in cases {
            let mut m = base();
            m.insert(field.into(), value);
            assert_eq!(field_of(parse(m).unwrap_err()), field);
        }
        let mut m = base();
        m.remove("vocab_size");
        assert_eq!(field_of(parse(m).unwrap_err()), "vocab_size");
        let mut m = base();
        m.insert("num_attention_heads".into(), 5.into());
        assert_eq!(field_of(parse(m).unwrap_err()), "num_attention_heads");
    }

    #[test]
    fn nested_text_config() {
        let mut outer = serde_json::Map::new();
        outer.insert("model_type".into(), "something".into());
        outer.insert("text_config".into(), Value::Object(base()));
        assert_eq!(parse(outer).unwrap().hidden_size, 64);
    }
}
