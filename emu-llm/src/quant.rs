//! Which linear layers of the LLM are block-quantized at load time.
//!
//! llama.cpp's usual practice is followed: the token embeddings, the final
//! `lm_head` and the RMSNorm weights stay in the model dtype (they are a
//! small share of a 32B-parameter model and the most sensitive to rounding);
//! the attention projections and the MLP, 98% of LLaMA-33B's weights, are
//! quantized. `lm_head` can be added on request.

use crate::error::{Error, Result};
use emu_core::quant::QuantType;

/// The groups of linear layers that can be quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantLinears {
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj` of every layer.
    pub attention: bool,
    /// `gate_proj`, `up_proj`, `down_proj` of every layer.
    pub mlp: bool,
    /// The output projection to the vocabulary.
    pub lm_head: bool,
}

impl Default for QuantLinears {
    fn default() -> Self {
        Self {
            attention: true,
            mlp: true,
            lm_head: false,
        }
    }
}

impl QuantLinears {
    /// Parses a comma list of `attn`, `mlp`, `lm_head` (or `all`).
    pub fn parse(s: &str) -> Result<Self> {
        let mut q = Self {
            attention: false,
            mlp: false,
            lm_head: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "attn" | "attention" => q.attention = true,
                "mlp" => q.mlp = true,
                "lm_head" => q.lm_head = true,
                "all" => {
                    q = Self {
                        attention: true,
                        mlp: true,
                        lm_head: true,
                    }
                }
                _ => {
                    return Err(Error::Input(format!(
                        "unknown group of linears `{part}` (expected attn, mlp, lm_head or all)"
                    )))
                }
            }
        }
        Ok(q)
    }
}

/// A load-time quantization request for the LLM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmQuant {
    pub qtype: QuantType,
    pub linears: QuantLinears,
}

impl LlmQuant {
    /// `qtype` on the default groups (attention and MLP).
    pub fn new(qtype: QuantType) -> Self {
        Self {
            qtype,
            linears: QuantLinears::default(),
        }
    }

    /// The format a weight with `inner` input features gets (see
    /// [`emu_core::linear::block_format`]).
    pub fn format_for(&self, tensor: &str, inner: usize) -> Result<QuantType> {
        Ok(emu_core::linear::block_format(self.qtype, tensor, inner)?)
    }

    /// The same request for another transformer's blocks (the EVA encoder's,
    /// the UNet's): its attention and MLP linears as `linears` says.
    pub fn blocks(&self) -> emu_core::BlockQuant {
        emu_core::BlockQuant {
            attention: self.linears.attention.then_some(self.qtype),
            mlp: self.linears.mlp.then_some(self.qtype),
        }
    }
}

impl LlmQuant {
    /// Whether the checkpoint tensor `key` is one of the linears this
    /// request quantizes (by its LLaMA module name, whatever the prefix).
    pub fn selects(&self, key: &str) -> bool {
        let Some(module) = key.strip_suffix(".weight") else {
            return false;
        };
        let l = &self.linears;
        let attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .any(|p| module.ends_with(&format!(".self_attn.{p}")));
        let mlp = ["gate_proj", "up_proj", "down_proj"]
            .iter()
            .any(|p| module.ends_with(&format!(".mlp.{p}")));
        let head = module == "lm_head" || module.ends_with(".lm_head");
        (l.attention && attn) || (l.mlp && mlp) || (l.lm_head && head)
    }

    /// For `emu convert --quantize`: the format of checkpoint tensor `key`
    /// of shape `dims`, or `None` to keep it in floats.
    pub fn convert_format(&self, key: &str, dims: &[usize]) -> Result<Option<QuantType>> {
        match dims {
            [_, inner] if self.selects(key) => self.format_for(key, *inner).map(Some),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_the_llama_linears_under_any_prefix() {
        let q = LlmQuant::new(QuantType::Q4K);
        assert!(q.selects("model.decoder.lm.model.layers.3.self_attn.q_proj.weight"));
        assert!(q.selects("model.layers.0.mlp.down_proj.weight"));
        assert!(!q.selects("model.decoder.lm.lm_head.weight"));
        assert!(!q.selects("model.layers.0.input_layernorm.weight"));
        assert!(!q.selects("model.embed_tokens.weight"));
        assert!(!q.selects("visual.blocks.0.mlp.fc1.weight"));
        assert!(!q.selects("model.layers.0.self_attn.q_proj.bias"));
        let all = LlmQuant {
            qtype: QuantType::Q8_0,
            linears: QuantLinears::parse("all").unwrap(),
        };
        assert!(all.selects("model.decoder.lm.lm_head.weight"));
        assert_eq!(
            q.convert_format("model.layers.0.mlp.up_proj.weight", &[128, 64])
                .unwrap(),
            Some(QuantType::Q8_0)
        );
        assert_eq!(
            q.convert_format("model.layers.0.mlp.up_proj.weight", &[128, 512])
                .unwrap(),
            Some(QuantType::Q4K)
        );
        assert!(q
            .convert_format("model.layers.0.mlp.up_proj.weight", &[128, 40])
            .is_err());
    }
}
