//! diffusers' `UNet2DConditionModel` as configured by Emu2-Gen (SDXL
//! topology, 1792-wide cross-attention, "text_time" added conditioning).
//!
//! Every config value that Emu2-Gen's `unet/config.json` uses is implemented;
//! values that select other diffusers code paths are rejected by name at
//! load time rather than silently ignored.

use crate::error::{read_json, Error, Result};
use crate::nn::{
    from_tokens, hw, to_tokens, Attention, Conv2d, Downsample2D, GroupNorm, LayerNorm, Linear, ResnetBlock2D,
    ResnetCfg, Upsample2D,
};
use crate::weights::Vb;
use emu_core::{Backend, BlockQuant, DType, HostTensor, LinearGroup, Tensor, Weights};
use serde::Deserialize;
use std::path::Path;

const COMPONENT: &str = "UNet2DConditionModel";
/// Transformer2DModel's GroupNorm epsilon, hard-coded in diffusers.
const TRANSFORMER_GN_EPS: f64 = 1e-6;

/// A config value given either once for every block or per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    fn expand(&self, n: usize, field: &'static str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::unsupported(
                COMPONENT,
                field,
                format!("{v:?} (one value per down block expected, {n} blocks)"),
            )),
        }
    }
}

/// `transformer_layers_per_block`: per block, or per block and layer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TransformerLayers {
    Blocks(PerBlock<usize>),
    /// Per block and resnet (SDXL refiner style); not supported.
    PerLayer(Vec<Vec<usize>>),
}

/// `unet/config.json`. Field names and defaults as in diffusers 0.42.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_pb")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_32")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_tlpb")]
    pub transformer_layers_per_block: TransformerLayers,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// With `num_attention_heads: null` diffusers reads these as head counts.
    #[serde(default = "d_head")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_1f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// Only used by `addition_embed_type = "text"`; ignored here.
    #[serde(default)]
    pub addition_embed_type_num_heads: Option<usize>,
}

fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_1f() -> f64 {
    1.0
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_32() -> Option<usize> {
    Some(32)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_false_pb() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_head() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_tlpb() -> TransformerLayers {
    TransformerLayers::Blocks(PerBlock::One(1))
}
fn d_boc() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

/// The per-block values a config resolves to (diffusers' list expansion).
#[derive(Debug, Clone)]
struct Resolved {
    groups: usize,
    time_embed_dim: usize,
    layers: Vec<usize>,
    heads: Vec<usize>,
    cross_dims: Vec<usize>,
    transformer_layers: Vec<usize>,
    add_time_dim: Option<usize>,
    add_in_dim: usize,
}

impl UNet2DConditionConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg: Self = read_json(path.as_ref())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects, by config key, every value this port does not implement.
    pub fn validate(&self) -> Result<()> {
        self.resolve().map(|_| ())
    }

    /// Bytes of the largest attention buffers one forward pass holds at once
    /// for `batch` latents of `h`×`w`: the f32 scores and probabilities
    /// `[batch, heads, T, T]` of the self-attention with the most tokens `T`
    /// (they grow with the fourth power of the image side). For refusing
    /// sizes that cannot fit before computing (see `emu_core::memory`).
    pub fn attention_bytes(&self, batch: usize, h: usize, w: usize) -> Result<u64> {
        let r = self.resolve()?;
        let n = self.block_out_channels.len();
        let at_level = |level: usize| -> u64 {
            let tokens = ((h >> level) as u64).saturating_mul((w >> level) as u64);
            (batch as u64)
                .saturating_mul(r.heads[level] as u64)
                .saturating_mul(tokens)
                .saturating_mul(tokens)
                .saturating_mul(2 * 4)
        };
        let down = self.down_block_types.iter().enumerate();
        // Up block j runs at the resolution of down block n - 1 - j.
        let up = self.up_block_types.iter().enumerate().map(|(j, t)| (n - 1 - j, t));
        let blocks = down
            .chain(up)
            .filter(|(_, t)| t.starts_with("CrossAttn"))
            .map(|(level, _)| at_level(level));
        // The mid block (always cross-attention here) at the lowest resolution.
        Ok(blocks.chain([at_level(n - 1)]).max().unwrap_or(0))
    }

    fn resolve(&self) -> Result<Resolved> {
        let bad = |field: &'static str, value: &dyn std::fmt::Debug| Err(Error::unsupported(COMPONENT, field, value));
        if let Some(n) = &self.class_name {
            if n != COMPONENT {
                return bad("_class_name", n);
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::invalid(format!(
                "{COMPONENT} config: `block_out_channels` is empty; it needs one width per down block (SDXL: [320, 640, 1280])"
            )));
        }
        if n > crate::vae::MAX_LEVELS || self.block_out_channels.contains(&0) {
            return Err(Error::invalid(format!(
                "{COMPONENT} config: `block_out_channels` {:?} needs 1 to {} non-zero widths",
                self.block_out_channels,
                crate::vae::MAX_LEVELS
            )));
        }
        if self.down_block_types.len() != n {
            return bad("down_block_types", &self.down_block_types);
        }
        if self.up_block_types.len() != n {
            return bad("up_block_types", &self.up_block_types);
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| !matches!(t.as_str(), "DownBlock2D" | "CrossAttnDownBlock2D"))
        {
            return bad("down_block_types", t);
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| !matches!(t.as_str(), "UpBlock2D" | "CrossAttnUpBlock2D"))
        {
            return bad("up_block_types", t);
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return bad("mid_block_type", &self.mid_block_type);
        }
        if self.center_input_sample {
            return bad("center_input_sample", &true);
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            return bad("only_cross_attention", &self.only_cross_attention);
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return bad("mid_block_only_cross_attention", &true);
        }
        if self.act_fn != "silu" {
            return bad("act_fn", &self.act_fn);
        }
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            other => return bad("norm_num_groups", &other),
        };
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % groups != 0) {
            return bad("norm_num_groups", &format!("{groups} does not divide {c}"));
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return bad(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            );
        }
        let transformer_layers = match &self.transformer_layers_per_block {
            TransformerLayers::Blocks(b) => b.expand(n, "transformer_layers_per_block")?,
            other => return bad("transformer_layers_per_block", other),
        };
        if self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some() {
            return bad("encoder_hid_dim_type", &self.encoder_hid_dim_type);
        }
        if self.num_attention_heads.is_some() {
            // diffusers refuses this too (a naming issue it keeps for compatibility).
            return bad("num_attention_heads", &self.num_attention_heads);
        }
        if self.dual_cross_attention {
            return bad("dual_cross_attention", &true);
        }
        if !self.use_linear_projection {
            return bad("use_linear_projection", &false);
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return bad("class_embed_type", &self.class_embed_type);
        }
        if self.class_embeddings_concat {
            return bad("class_embeddings_concat", &true);
        }
        if self.upcast_attention == Some(true) {
            return bad("upcast_attention", &true);
        }
        if self.resnet_time_scale_shift != "default" {
            return bad("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        if self.resnet_skip_time_act {
            return bad("resnet_skip_time_act", &true);
        }
        if self.time_embedding_type != "positional" {
            return bad("time_embedding_type", &self.time_embedding_type);
        }
        if self.time_embedding_act_fn.is_some() {
            return bad("time_embedding_act_fn", &self.time_embedding_act_fn);
        }
        if self.timestep_post_act.is_some() {
            return bad("timestep_post_act", &self.timestep_post_act);
        }
        if self.time_cond_proj_dim.is_some() {
            return bad("time_cond_proj_dim", &self.time_cond_proj_dim);
        }
        if self.attention_type != "default" {
            return bad("attention_type", &self.attention_type);
        }
        if self.cross_attention_norm.is_some() {
            return bad("cross_attention_norm", &self.cross_attention_norm);
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return bad(field, &k);
            }
        }
        let (add_time_dim, add_in_dim) = match self.addition_embed_type.as_deref() {
            None => (None, 0),
            Some("text_time") => match (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
                (Some(t), Some(p)) if t > 0 && t % 2 == 0 => (Some(t), p),
                _ => return bad("addition_time_embed_dim", &self.addition_time_embed_dim),
            },
            Some(other) => return bad("addition_embed_type", &other),
        };
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        if heads.contains(&0) {
            return bad("attention_head_dim", &self.attention_head_dim);
        }
        let time_embed_dim = self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4);
        if !self.block_out_channels[0].is_multiple_of(2) {
            return bad("block_out_channels", &self.block_out_channels);
        }
        Ok(Resolved {
            groups,
            time_embed_dim,
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            heads,
            cross_dims: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
            transformer_layers,
            add_time_dim,
            add_in_dim,
        })
    }
}

/// Which group of [`BlockQuant`] the UNet checkpoint tensor `key` belongs
/// to: a transformer block's `attn1`/`attn2` projections are attention, its
/// `ff.net.0.proj` and `ff.net.2` are MLP; `None` for everything else (the
/// VAE's attention has no `transformer_blocks`, so it is never selected).
pub fn linear_group(key: &str) -> Option<LinearGroup> {
    let rest = &key[key.find("transformer_blocks.")? + "transformer_blocks.".len()..];
    let (layer, module) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let attn = ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"];
    match module.split_once('.') {
        Some(("attn1" | "attn2", proj)) if attn.contains(&proj) => Some(LinearGroup::Attention),
        _ if module == "ff.net.0.proj.weight" || module == "ff.net.2.weight" => Some(LinearGroup::Mlp),
        _ => None,
    }
}

/// diffusers' `get_timestep_embedding` in float32 on the host: `[N, dim]`.
pub fn timestep_embedding(timesteps: &[f32], dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<HostTensor> {
    let half = dim / 2;
    let log_max = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_max * i as f32) / denom).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        let (first, second) = if flip_sin_to_cos { (cos, sin) } else { (sin, cos) };
        out.extend(first);
        out.extend(second);
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Ok(HostTensor::from_f32(&[timesteps.len(), dim], out)?)
}

/// `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Debug, Clone)]
struct TimestepEmbedding<B: Backend> {
    linear_1: Linear<B>,
    linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    fn load(vb: &Vb<B>, din: usize, dout: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&vb.pp("linear_1"), din, dout, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), dout, dout, true)?,
        })
    }

    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `FeedForward` with a GEGLU input projection (`ff.net.0.proj`, `ff.net.2`).
#[derive(Debug, Clone)]
struct GegluFeedForward<B: Backend> {
    proj: Linear<B>,
    out: Linear<B>,
    inner: usize,
}

impl<B: Backend> GegluFeedForward<B> {
    fn load(vb: &Vb<B>, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::load_in(&vb.pp("net").pp(0).pp("proj"), LinearGroup::Mlp, dim, 2 * inner, true)?,
            out: Linear::load_in(&vb.pp("net").pp(2), LinearGroup::Mlp, inner, dim, true)?,
            inner,
        })
    }

    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let h = self.proj.forward(x)?;
        let last = h.rank() - 1;
        let a = h.narrow(last, 0, self.inner)?;
        let gate = h.narrow(last, self.inner, self.inner)?;
        self.out.forward(&a.mul(&gate.gelu()?)?)
    }
}

/// `BasicTransformerBlock` (layer_norm variant): self-attention,
/// cross-attention, GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
struct BasicTransformerBlock<B: Backend> {
    norm1: LayerNorm<B>,
    attn1: Attention<B>,
    norm2: LayerNorm<B>,
    attn2: Attention<B>,
    norm3: LayerNorm<B>,
    ff: GegluFeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    fn load(vb: &Vb<B>, dim: usize, heads: usize, head_dim: usize, cross_dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, eps)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, eps)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cross_dim, heads, head_dim, false)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, eps)?,
            ff: GegluFeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor<B>, context: &Tensor<B>) -> Result<Tensor<B>> {
        let x = self.attn1.forward(&self.norm1.forward(x)?, None)?.add(x)?;
        let x = self.attn2.forward(&self.norm2.forward(&x)?, Some(context))?.add(&x)?;
        Ok(self.ff.forward(&self.norm3.forward(&x)?)?.add(&x)?)
    }
}

/// `Transformer2DModel` with linear projections over spatial tokens.
#[derive(Debug, Clone)]
struct Transformer2D<B: Backend> {
    norm: GroupNorm<B>,
    proj_in: Linear<B>,
    blocks: Vec<BasicTransformerBlock<B>>,
    proj_out: Linear<B>,
}

impl<B: Backend> Transformer2D<B> {
    fn load(vb: &Vb<B>, channels: usize, heads: usize, layers: usize, cross_dim: usize, r: &Res) -> Result<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        if head_dim == 0 {
            return Err(Error::unsupported(
                COMPONENT,
                "attention_head_dim",
                format!("{heads} heads for {channels} channels"),
            ));
        }
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), r.groups, channels, TRANSFORMER_GN_EPS)?,
            proj_in: Linear::load(&vb.pp("proj_in"), channels, inner, true)?,
            blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &vb.pp("transformer_blocks").pp(i),
                        inner,
                        heads,
                        head_dim,
                        cross_dim,
                        r.eps,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: Linear::load(&vb.pp("proj_out"), inner, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor<B>, context: &Tensor<B>) -> Result<Tensor<B>> {
        let (h, w) = hw(x)?;
        let mut t = self.proj_in.forward(&to_tokens(&self.norm.forward(x)?)?)?;
        for b in &self.blocks {
            t = b.forward(&t, context)?;
        }
        Ok(from_tokens(&self.proj_out.forward(&t)?, h, w)?.add(x)?)
    }
}

/// Settings every block shares.
struct Res {
    groups: usize,
    eps: f64,
    temb: usize,
}

impl Res {
    fn resnet(&self, scale: f64) -> ResnetCfg {
        ResnetCfg {
            groups: self.groups,
            eps: self.eps,
            temb_channels: Some(self.temb),
            output_scale_factor: scale,
        }
    }
}

/// A down or up block: resnets, optional attentions after each resnet, and
/// an optional resampler. Up blocks concatenate one skip before each resnet.
#[derive(Debug, Clone)]
struct Block<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2D<B>>,
    downsampler: Option<Downsample2D<B>>,
    upsampler: Option<Upsample2D<B>>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Debug, Clone)]
struct MidBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2D<B>>,
}

/// Extra conditioning of `addition_embed_type = "text_time"` (SDXL, Emu2-Gen).
#[derive(Debug, Clone)]
pub struct TextTimeCond<B: Backend> {
    /// Pooled prompt embedding `[B, D]` (Emu2-Gen: the mean over the 64 tokens).
    pub text_embeds: Tensor<B>,
    /// Six values per batch row: original size, crop top-left, target size.
    pub time_ids: Vec<[f32; 6]>,
}

/// The UNet. `forward` predicts noise (or whatever the scheduler's
/// `prediction_type` says) for latents at one timestep.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel<B: Backend> {
    conv_in: Conv2d<B>,
    time_embedding: TimestepEmbedding<B>,
    add_embedding: Option<TimestepEmbedding<B>>,
    down_blocks: Vec<Block<B>>,
    mid_block: MidBlock<B>,
    up_blocks: Vec<Block<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    config: UNet2DConditionConfig,
    add_time_dim: Option<usize>,
    backend: B,
    dtype: DType,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Loads every module from `weights` (a view at the model root, diffusers
    /// key names), uploading parameters to `backend` in `dtype`.
    pub fn load(backend: &B, weights: &Weights, cfg: &UNet2DConditionConfig, dtype: DType) -> Result<Self> {
        Self::load_quantized(backend, weights, cfg, dtype, BlockQuant::default())
    }

    /// [`UNet2DConditionModel::load`] with the transformer blocks' linears
    /// that `quant` selects block-quantized while loading (`attn1`/`attn2`
    /// `to_q`, `to_k`, `to_v`, `to_out.0`: attention; `ff.net.0.proj`,
    /// `ff.net.2`: MLP). Convolutions, norms, the time embeddings and the
    /// transformers' `proj_in`/`proj_out` stay in `dtype`.
    pub fn load_quantized(
        backend: &B,
        weights: &Weights,
        cfg: &UNet2DConditionConfig,
        dtype: DType,
        quant: BlockQuant,
    ) -> Result<Self> {
        let vb = &Vb::new(weights, backend, dtype).with_quant(quant);
        let rv = cfg.resolve()?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let r = Res {
            groups: rv.groups,
            eps: cfg.norm_eps,
            temb: rv.time_embed_dim,
        };
        let rc = r.resnet(cfg.resnet_out_scale_factor);
        let mut down_blocks = Vec::with_capacity(n);
        let mut out = boc[0];
        for (i, &cout) in boc.iter().enumerate() {
            let cin = out;
            out = cout;
            let vb = vb.pp("down_blocks").pp(i);
            let cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..rv.layers[i] {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock2D::load(&vb.pp("resnets").pp(j), c, cout, &rc)?);
                if cross {
                    attentions.push(Transformer2D::load(
                        &vb.pp("attentions").pp(j),
                        cout,
                        rv.heads[i],
                        rv.transformer_layers[i],
                        rv.cross_dims[i],
                        &r,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::load(
                    &vb.pp("downsamplers").pp(0),
                    cout,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(Block {
                resnets,
                attentions,
                downsampler,
                upsampler: None,
            });
        }

        let top = boc[n - 1];
        let mvb = vb.pp("mid_block");
        let mrc = r.resnet(cfg.mid_block_scale_factor);
        let mid_block = MidBlock {
            resnets: (0..2)
                .map(|j| ResnetBlock2D::load(&mvb.pp("resnets").pp(j), top, top, &mrc))
                .collect::<Result<_>>()?,
            attentions: vec![Transformer2D::load(
                &mvb.pp("attentions").pp(0),
                top,
                rv.heads[n - 1],
                rv.transformer_layers[n - 1],
                rv.cross_dims[n - 1],
                &r,
            )?],
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut out = boc[n - 1];
        for i in 0..n {
            let ri = n - 1 - i;
            let prev = out;
            out = boc[ri];
            let skip_in = boc[ri.saturating_sub(1)];
            let vb = vb.pp("up_blocks").pp(i);
            let cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
            let num = rv.layers[ri] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num {
                let skip = if j == num - 1 { skip_in } else { out };
                let c = if j == 0 { prev } else { out };
                resnets.push(ResnetBlock2D::load(&vb.pp("resnets").pp(j), c + skip, out, &rc)?);
                if cross {
                    attentions.push(Transformer2D::load(
                        &vb.pp("attentions").pp(j),
                        out,
                        rv.heads[ri],
                        rv.transformer_layers[ri],
                        rv.cross_dims[ri],
                        &r,
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::load(&vb.pp("upsamplers").pp(0), out)?)
            } else {
                None
            };
            up_blocks.push(Block {
                resnets,
                attentions,
                downsampler: None,
                upsampler,
            });
        }

        let (kin, kout) = (cfg.conv_in_kernel, cfg.conv_out_kernel);
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, boc[0], kin, 1, (kin - 1) / 2)?,
            time_embedding: TimestepEmbedding::load(&vb.pp("time_embedding"), boc[0], rv.time_embed_dim)?,
            add_embedding: match rv.add_time_dim {
                Some(_) => Some(TimestepEmbedding::load(
                    &vb.pp("add_embedding"),
                    rv.add_in_dim,
                    rv.time_embed_dim,
                )?),
                None => None,
            },
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), rv.groups, boc[0], cfg.norm_eps)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), boc[0], cfg.out_channels, kout, 1, (kout - 1) / 2)?,
            config: cfg.clone(),
            add_time_dim: rv.add_time_dim,
            backend: vb.backend().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The dtype the parameters were loaded in (and the model computes in).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The time embedding (plus the text_time embedding) for a batch.
    fn embedding(&self, batch: usize, timestep: f32, added: Option<&TextTimeCond<B>>) -> Result<Tensor<B>> {
        let (be, dtype) = (&self.backend, self.dtype);
        let c0 = self.config.block_out_channels[0];
        let (flip, shift) = (self.config.flip_sin_to_cos, self.config.freq_shift);
        let t = timestep_embedding(&vec![timestep; batch], c0, flip, shift)?;
        let emb = self
            .time_embedding
            .forward(&Tensor::from_host(be, &t.to_dtype(dtype)?)?)?;
        let (Some(add), Some(dim)) = (&self.add_embedding, self.add_time_dim) else {
            return Ok(emb);
        };
        let added = added.ok_or_else(|| {
            Error::invalid("addition_embed_type \"text_time\" needs text_embeds and time_ids".to_string())
        })?;
        if added.time_ids.len() != batch || added.text_embeds.dims().first() != Some(&batch) {
            return Err(Error::invalid(format!(
                "text_time conditioning for {} / {:?} rows, batch is {batch}",
                added.time_ids.len(),
                added.text_embeds.dims()
            )));
        }
        let flat: Vec<f32> = added.time_ids.iter().flatten().copied().collect();
        let te = timestep_embedding(&flat, dim, flip, shift)?.reshape(&[batch, 6 * dim])?;
        let te = Tensor::from_host(be, &te.to_dtype(dtype)?)?;
        let add_in = Tensor::concat(&[&added.text_embeds.to_dtype(dtype)?, &te], 1)?;
        Ok(emb.add(&add.forward(&add_in)?)?)
    }

    /// Predicts for `sample` `[B, in_channels, h, w]` at `timestep`, attending
    /// to `encoder_hidden_states` `[B, S, cross_attention_dim]`.
    pub fn forward(
        &self,
        sample: &Tensor<B>,
        timestep: f32,
        encoder_hidden_states: &Tensor<B>,
        added: Option<&TextTimeCond<B>>,
    ) -> Result<Tensor<B>> {
        self.backend
            .run(|| self.forward_here(sample, timestep, encoder_hidden_states, added))
    }

    fn forward_here(
        &self,
        sample: &Tensor<B>,
        timestep: f32,
        encoder_hidden_states: &Tensor<B>,
        added: Option<&TextTimeCond<B>>,
    ) -> Result<Tensor<B>> {
        let batch = sample.dim(0)?;
        if encoder_hidden_states.dims().first() != Some(&batch) {
            return Err(Error::invalid(format!(
                "encoder_hidden_states {:?} for a batch of {batch}",
                encoder_hidden_states.dims()
            )));
        }
        let emb = self.embedding(batch, timestep, added)?;
        let ctx = encoder_hidden_states;

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for b in &self.down_blocks {
            for (j, r) in b.resnets.iter().enumerate() {
                h = r.forward(&h, Some(&emb))?;
                if let Some(a) = b.attentions.get(j) {
                    h = a.forward(&h, ctx)?;
                }
                skips.push(h.clone());
            }
            if let Some(d) = &b.downsampler {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }

        h = self.mid_block.resnets[0].forward(&h, Some(&emb))?;
        for (a, r) in self.mid_block.attentions.iter().zip(&self.mid_block.resnets[1..]) {
            h = r.forward(&a.forward(&h, ctx)?, Some(&emb))?;
        }

        for b in &self.up_blocks {
            for (j, r) in b.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::invalid("UNet skip connections exhausted".to_string()))?;
                h = r.forward(&Tensor::concat(&[&h, &skip], 1)?, Some(&emb))?;
                if let Some(a) = b.attentions.get(j) {
                    h = a.forward(&h, ctx)?;
                }
            }
            if let Some(u) = &b.upsampler {
                // Resize to the skip this feeds next (diffusers' forwarded
                // upsample size), which is twice the size unless the input
                // side was odd somewhere.
                let size = match skips.last() {
                    Some(s) => Some(hw(s)?),
                    None => None,
                };
                h = u.forward(&h, size)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

/// One `Transformer2DModel` of the UNet on its own, as `cfg` configures the
/// blocks of down level `level` but with `layers` transformer layers: for
/// benchmarks that time single blocks at Emu2-Gen's real widths
/// (`cargo xtask bench --size real`) without building the whole UNet.
#[derive(Debug, Clone)]
pub struct UNetTransformerBlock<B: Backend>(Transformer2D<B>);

impl<B: Backend> UNetTransformerBlock<B> {
    /// `weights`: a view at the block (`norm`, `proj_in`, `transformer_blocks.*`, `proj_out`).
    pub fn load(
        backend: &B,
        weights: &Weights,
        cfg: &UNet2DConditionConfig,
        level: usize,
        layers: usize,
        dtype: DType,
    ) -> Result<Self> {
        let rv = cfg.resolve()?;
        let (Some(&channels), Some(&heads), Some(&cross)) = (
            cfg.block_out_channels.get(level),
            rv.heads.get(level),
            rv.cross_dims.get(level),
        ) else {
            return Err(Error::unsupported(COMPONENT, "level", level));
        };
        let r = Res {
            groups: rv.groups,
            eps: cfg.norm_eps,
            temb: rv.time_embed_dim,
        };
        let vb = Vb::new(weights, backend, dtype);
        Ok(Self(Transformer2D::load(&vb, channels, heads, layers, cross, &r)?))
    }

    /// `x`: `[B, C, H, W]`; `context`: `[B, T, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor<B>, context: &Tensor<B>) -> Result<Tensor<B>> {
        self.0.forward(x, context)
    }
}

/// One `ResnetBlock2D` of the UNet on its own (`cin` to `cout` channels,
/// with the time-embedding projection), as `cfg` configures them; see
/// [`UNetTransformerBlock`].
#[derive(Debug, Clone)]
pub struct UNetResnetBlock<B: Backend>(ResnetBlock2D<B>);

impl<B: Backend> UNetResnetBlock<B> {
    pub fn load(
        backend: &B,
        weights: &Weights,
        cfg: &UNet2DConditionConfig,
        cin: usize,
        cout: usize,
        dtype: DType,
    ) -> Result<Self> {
        let rv = cfg.resolve()?;
        let r = Res {
            groups: rv.groups,
            eps: cfg.norm_eps,
            temb: rv.time_embed_dim,
        };
        let vb = Vb::new(weights, backend, dtype);
        Ok(Self(ResnetBlock2D::load(
            &vb,
            cin,
            cout,
            &r.resnet(cfg.resnet_out_scale_factor),
        )?))
    }

    /// `temb`: the `[B, time_embed_dim]` time embedding.
    pub fn forward(&self, x: &Tensor<B>, temb: &Tensor<B>) -> Result<Tensor<B>> {
        self.0.forward(x, Some(temb))
    }

    /// The time-embedding width the block projects from.
    pub fn time_embed_dim(cfg: &UNet2DConditionConfig) -> Result<usize> {
        Ok(cfg.resolve()?.time_embed_dim)
    }
}
