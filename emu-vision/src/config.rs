//! The EVA encoder's hyper-parameters, read from the `vision_config` of an
//! Emu2 `config.json` (Hugging Face layout: LLaMA fields at the top level,
//! `d_model`, and the encoder under `vision_config`).

use crate::error::{Result, VisionError};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// Hyper-parameters of the EVA-CLIP vision transformer (`vision_config`).
///
/// Only the architecture Emu2 uses is supported: post-norm blocks, learned
/// absolute position embeddings, a plain GELU MLP, no sub-LN, no RoPE, no
/// layer scale. Configs asking for anything else are rejected at load time,
/// naming the field, rather than silently computing something else.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaConfig {
    pub image_size: usize,
    pub patch_size: usize,
    /// Token width (1792 for EVA-CLIP-E/14-plus).
    pub width: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Width of one attention head; heads = `width / head_width`.
    pub head_width: usize,
    pub mlp_ratio: f64,
    /// MLP hidden width: `intermediate_size` when present, else `int(width * mlp_ratio)`.
    pub mlp_hidden: usize,
    pub layer_norm_eps: f64,
    /// Visual tokens per image after pooling (64 for Emu2/Emu2-Gen, 256 for Emu2-Chat).
    pub n_query: usize,
    /// Visual tokens per video frame after pooling.
    pub v_query: usize,
    /// Whether the qkv projection has the `q_bias`/`v_bias` parameters.
    pub qkv_bias: bool,
}

/// The parts of the top-level `config.json` the vision side needs.
#[derive(Debug, Clone, PartialEq)]
pub struct EmuVisionConfig {
    pub vision: EvaConfig,
    /// Width of the visual features that `project_up` consumes (`d_model`).
    pub d_model: usize,
    /// Width of the LLM input embeddings that `project_up` produces
    /// (`hidden_size`); absent in encoder-only configs.
    pub hidden_size: Option<usize>,
}

#[derive(Deserialize)]
struct RawEva {
    image_size: usize,
    patch_size: usize,
    width: usize,
    layers: usize,
    head_width: usize,
    mlp_ratio: f64,
    #[serde(default)]
    intermediate_size: Option<usize>,
    #[serde(default)]
    layer_norm_eps: Option<f64>,
    #[serde(default)]
    n_query: Option<usize>,
    #[serde(default)]
    v_query: Option<usize>,
    #[serde(default)]
    qkv_bias: Option<bool>,
    #[serde(default)]
    postnorm: Option<bool>,
}

/// Boolean flags that switch on EVA variants this encoder does not implement.
const UNSUPPORTED_FLAGS: &[(&str, &str)] = &[
    (
        "rope",
        "rotary position embeddings (EVA-02) are not implemented; Emu2's encoder uses learned absolute positions",
    ),
    ("subln", "sub-LayerNorm blocks (EVA-02) are not implemented"),
    (
        "naiveswiglu",
        "SwiGLU MLPs (EVA-02) are not implemented; Emu2's encoder uses fc1 -> GELU -> fc2",
    ),
    (
        "swiglu",
        "SwiGLU MLPs (EVA-02) are not implemented; Emu2's encoder uses fc1 -> GELU -> fc2",
    ),
    ("use_rel_pos_bias", "relative position bias is not implemented"),
    ("use_shared_rel_pos_bias", "relative position bias is not implemented"),
    ("attentional_pool", "attentional pooling heads are not implemented"),
];

/// Fields whose non-null, non-zero value enables layer scale (gamma_1/gamma_2).
const LAYER_SCALE_FIELDS: &[&str] = &["init_values", "ls_init_value", "layer_scale_init_value"];

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

impl EvaConfig {
    /// Parses and validates a `vision_config` JSON object.
    pub fn from_value(v: &Value) -> Result<Self> {
        let map: &Map<String, Value> = v
            .as_object()
            .ok_or_else(|| VisionError::InvalidConfig("vision_config is not an object".into()))?;
        for (flag, reason) in UNSUPPORTED_FLAGS {
            if map.get(*flag).is_some_and(truthy) {
                return Err(VisionError::UnsupportedFeature {
                    feature: flag,
                    reason: (*reason).to_string(),
                });
            }
        }
        for field in LAYER_SCALE_FIELDS {
            if map.get(*field).is_some_and(truthy) {
                return Err(VisionError::UnsupportedFeature {
                    feature: field,
                    reason: "layer scale (gamma_1/gamma_2) is not implemented; Emu2's encoder has none".into(),
                });
            }
        }
        if map.get("use_abs_pos_emb").is_some_and(|v| v == &Value::Bool(false)) {
            return Err(VisionError::UnsupportedFeature {
                feature: "use_abs_pos_emb",
                reason: "an encoder without absolute position embeddings is not implemented".into(),
            });
        }
        let raw: RawEva =
            serde_json::from_value(v.clone()).map_err(|e| VisionError::InvalidConfig(format!("vision_config: {e}")))?;
        // Emu2's configs all say `postnorm: true`; a pre-norm EVA is a different network.
        if raw.postnorm == Some(false) {
            return Err(VisionError::UnsupportedFeature {
                feature: "postnorm",
                reason: "pre-norm blocks (`postnorm: false`) are not implemented; Emu2's encoder is post-norm".into(),
            });
        }
        let mlp_hidden = match raw.intermediate_size {
            Some(n) => n,
            // Python's int() truncates toward zero; the ratio is positive here.
            None => (raw.width as f64 * raw.mlp_ratio) as usize,
        };
        let cfg = EvaConfig {
            image_size: raw.image_size,
            patch_size: raw.patch_size,
            width: raw.width,
            layers: raw.layers,
            head_width: raw.head_width,
            mlp_ratio: raw.mlp_ratio,
            mlp_hidden,
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-6),
            n_query: raw.n_query.unwrap_or(64),
            v_query: raw.v_query.unwrap_or(64),
            qkv_bias: raw.qkv_bias.unwrap_or(true),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VisionError::InvalidConfig(m));
        if self.patch_size == 0 || self.image_size == 0 || self.image_size % self.patch_size != 0 {
            return bad(format!(
                "patch_size {} does not divide image_size {}",
                self.patch_size, self.image_size
            ));
        }
        if self.head_width == 0 || self.width == 0 || self.width % self.head_width != 0 {
            return bad(format!(
                "head_width {} does not divide width {}",
                self.head_width, self.width
            ));
        }
        if self.mlp_hidden == 0 {
            return bad("the MLP hidden width is zero".into());
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return bad(format!("layer_norm_eps {} is not a valid epsilon", self.layer_norm_eps));
        }
        self.pool_stride(self.n_query)?;
        self.pool_stride(self.v_query)?;
        Ok(())
    }

    /// Patches per side (32 for 448 / 14).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens per image, without the CLS token.
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    pub fn num_heads(&self) -> usize {
        self.width / self.head_width
    }

    /// The avg-pool kernel/stride that turns the patch grid into `n_query`
    /// tokens: `n_query` must be a square whose side divides the grid side.
    pub fn pool_stride(&self, n_query: usize) -> Result<usize> {
        let grid = self.grid_size();
        let side = (n_query as f64).sqrt().round() as usize;
        if n_query == 0 || side * side != n_query || grid % side != 0 {
            return Err(VisionError::InvalidArgument(format!(
                "n_query {n_query} is not a square whose side divides the {grid}x{grid} patch grid"
            )));
        }
        Ok(grid / side)
    }
}

impl EmuVisionConfig {
    /// The configuration of every released Emu2 model (SPEC §1.1), for native
    /// checkpoints that come without a `config.json`: EVA-CLIP-E/14-plus at
    /// 448 px, `d_model` 1792, LLM width 6656. `n_query` is 64 for Emu2 and
    /// Emu2-Gen, 256 for Emu2-Chat images.
    pub fn emu2(n_query: usize) -> Result<Self> {
        let vision = EvaConfig {
            image_size: 448,
            patch_size: 14,
            width: 1792,
            layers: 64,
            head_width: 112,
            mlp_ratio: 8.571428571428571,
            mlp_hidden: 15360,
            layer_norm_eps: 1e-6,
            n_query,
            v_query: 64,
            qkv_bias: true,
        };
        vision.validate()?;
        Ok(Self {
            vision,
            d_model: 1792,
            hidden_size: Some(6656),
        })
    }

    /// Parses a whole Emu2 `config.json` (text).
    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| VisionError::InvalidConfig(format!("not valid JSON: {e}")))?;
        Self::from_value(&v)
    }

    /// Parses a whole Emu2 `config.json` (parsed JSON).
    pub fn from_value(v: &Value) -> Result<Self> {
        let vc = v
            .get("vision_config")
            .ok_or_else(|| VisionError::InvalidConfig("missing `vision_config`".into()))?;
        let vision = EvaConfig::from_value(vc)?;
        // Upstream's configs say "base" (Emu2, Emu2-Gen) or "chat" (Emu2-Chat);
        // anything else is a model this code was not checked against.
        match v.get("model_version") {
            None | Some(Value::Null) => {}
            Some(Value::String(m)) if m == "base" || m == "chat" => {}
            Some(other) => {
                return Err(VisionError::InvalidConfig(format!(
                    "unknown `model_version` {other}; Emu2 configs say \"base\" or \"chat\""
                )))
            }
        }
        let usize_field = |name: &str| -> Result<Option<usize>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| VisionError::InvalidConfig(format!("`{name}` is not a non-negative integer"))),
            }
        };
        let d_model = usize_field("d_model")?.unwrap_or(vision.width);
        if d_model != vision.width {
            return Err(VisionError::InvalidConfig(format!(
                "d_model {d_model} differs from vision_config.width {}",
                vision.width
            )));
        }
        Ok(Self {
            vision,
            d_model,
            hidden_size: usize_field("hidden_size")?,
        })
    }

    /// Reads `config.json` from a file path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = emu_core::fs::read_text(path).map_err(|e| VisionError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            VisionError::InvalidConfig(message) => VisionError::Config {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_config(name: &str) -> Option<String> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/reference/hf-configs")
            .join(name);
        match std::fs::read_to_string(&p) {
            Ok(s) => Some(s),
            Err(_) => {
                eprintln!("note: {} not found, skipping", p.display());
                None
            }
        }
    }

    #[test]
    fn parses_the_three_upstream_configs() {
        for (name, n_query) in [
            ("Emu2.config.json", 64),
            ("Emu2-Chat.config.json", 256),
            ("Emu2-Gen.multimodal_encoder.config.json", 64),
        ] {
            let Some(text) = reference_config(name) else {
                continue;
            };
            let c = EmuVisionConfig::from_json_str(&text).unwrap();
            let v = &c.vision;
            assert_eq!((v.image_size, v.patch_size, v.width, v.layers), (448, 14, 1792, 64));
            assert_eq!((v.num_heads(), v.mlp_hidden, v.grid_size()), (16, 15360, 32));
            assert_eq!(v.layer_norm_eps, 1e-6);
            assert_eq!((v.n_query, v.v_query), (n_query, 64));
            assert_eq!(v.pool_stride(v.n_query).unwrap(), if n_query == 64 { 4 } else { 2 });
            assert_eq!((c.d_model, c.hidden_size), (1792, Some(6656)));
            assert_eq!(c, EmuVisionConfig::emu2(n_query).unwrap());
        }
        assert!(EmuVisionConfig::emu2(48).is_err());
    }

    fn base() -> Value {
        serde_json::json!({
            "d_model": 32, "hidden_size": 48,
            "vision_config": {
                "image_size": 28, "patch_size": 7, "width": 32, "layers": 2, "head_width": 8,
                "mlp_ratio": 2.6, "n_query": 4, "v_query": 16, "postnorm": true, "qkv_bias": true
            }
        })
    }

    #[test]
    fn mlp_hidden_truncates_like_python_int_or_uses_intermediate_size() {
        let c = EmuVisionConfig::from_value(&base()).unwrap();
        assert_eq!(c.vision.mlp_hidden, 83); // int(32 * 2.6) = int(83.2)
        let mut v = base();
        v["vision_config"]["intermediate_size"] = 100.into();
        assert_eq!(EmuVisionConfig::from_value(&v).unwrap().vision.mlp_hidden, 100);
        // The real ratio without intermediate_size: int(1792 * 8.571428571428571) = 15360.
        let mut v = base();
        v["vision_config"]["width"] = 1792.into();
        v["vision_config"]["head_width"] = 112.into();
        v["vision_config"]["mlp_ratio"] = 8.571428571428571.into();
        v["d_model"] = 1792.into();
        let c = EmuVisionConfig::from_value(&v).unwrap();
        assert_eq!(c.vision.mlp_hidden, 15360);
    }

    #[test]
    fn unsupported_features_are_rejected_by_name() {
        for (field, value) in [
            ("rope", Value::Bool(true)),
            ("subln", Value::Bool(true)),
            ("naiveswiglu", Value::Bool(true)),
            ("swiglu", Value::Bool(true)),
            ("init_values", serde_json::json!(0.1)),
            ("ls_init_value", serde_json::json!(1e-5)),
            ("postnorm", Value::Bool(false)),
        ] {
            let mut v = base();
            v["vision_config"][field] = value;
            let err = EmuVisionConfig::from_value(&v).unwrap_err();
            assert!(
                matches!(&err, VisionError::UnsupportedFeature { feature, .. } if *feature == field),
                "{field}: {err}"
            );
            assert!(err.to_string().contains(field));
        }
        // Explicitly disabled features are fine.
        let mut v = base();
        v["vision_config"]["rope"] = Value::Bool(false);
        v["vision_config"]["init_values"] = Value::Null;
        assert!(EmuVisionConfig::from_value(&v).is_ok());
    }

    #[test]
    fn inconsistent_configs_are_rejected() {
        for (field, value) in [
            ("patch_size", 5),
            ("head_width", 7),
            ("n_query", 9), // side 3 does not divide the 4x4 grid
            ("n_query", 8), // not a square
        ] {
            let mut v = base();
            v["vision_config"][field] = value.into();
            assert!(EmuVisionConfig::from_value(&v).is_err(), "{field}={value}");
        }
        let mut v = base();
        v["d_model"] = 64.into();
        assert!(EmuVisionConfig::from_value(&v).is_err());
        let mut v = base();
        v["vision_config"].as_object_mut().unwrap().remove("width");
        let e = EmuVisionConfig::from_value(&v).unwrap_err();
        assert!(e.to_string().contains("width"), "{e}");
        assert!(EmuVisionConfig::from_json_str("{}").is_err());
    }
}
