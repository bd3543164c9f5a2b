//! diffusers' `AutoencoderKL` (the SDXL VAE of Emu2-Gen): encoder to a
//! diagonal Gaussian posterior, decoder from latents to pixels.

use crate::error::{read_json, Error, Result};
use crate::nn::{
    from_tokens, hw, to_tokens, Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, ResnetCfg, Upsample2D,
};
use crate::weights::Vb;
use emu_core::{Backend, DType, Tensor, Weights};
use serde::Deserialize;
use std::path::Path;

const COMPONENT: &str = "AutoencoderKL";
/// diffusers hard-codes this epsilon for every norm of the VAE.
const VAE_EPS: f64 = 1e-6;

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    /// Latents are divided by this before decoding (SDXL: 0.13025).
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
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
fn d_32() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_boc() -> Vec<usize> {
    vec![64]
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

/// Most resolution levels a VAE config may have (SDXL: 4); each halves the
/// latent side, so more would shrink any image to nothing.
pub const MAX_LEVELS: usize = 8;

impl AutoencoderKLConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg: Self = read_json(path.as_ref())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects, by config key, everything this port does not implement.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: &dyn std::fmt::Debug| Err(Error::unsupported(COMPONENT, field, value));
        if let Some(n) = &self.class_name {
            if n != COMPONENT {
                return bad("_class_name", n);
            }
        }
        if self.act_fn != "silu" {
            return bad("act_fn", &self.act_fn);
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return bad("down_block_types", t);
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad("up_block_types", t);
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::invalid(format!(
                "{COMPONENT} config: `block_out_channels` is empty; it needs one width per block (SDXL: [128, 256, 512, 512])"
            )));
        }
        if n > MAX_LEVELS || self.block_out_channels.contains(&0) {
            return Err(Error::invalid(format!(
                "{COMPONENT} config: `block_out_channels` {:?} needs 1 to {MAX_LEVELS} non-zero widths",
                self.block_out_channels
            )));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad("block_out_channels", &self.block_out_channels);
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(Error::invalid(format!(
                "{COMPONENT} config: `scaling_factor` {} must be a positive number (SDXL: 0.13025)",
                self.scaling_factor
            )));
        }
        if let Some(s) = self.shift_factor.filter(|s| !s.is_finite()) {
            return Err(Error::invalid(format!(
                "{COMPONENT} config: `shift_factor` {s} is not a finite number"
            )));
        }
        if self.latent_channels == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return Err(Error::invalid(format!(
                "{COMPONENT} config: `latent_channels`, `in_channels` and `out_channels` must be positive"
            )));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| self.norm_num_groups == 0 || *c % self.norm_num_groups != 0)
        {
            return bad(
                "norm_num_groups",
                &format!("{} does not divide {c}", self.norm_num_groups),
            );
        }
        Ok(())
    }

    /// Bytes of the largest attention buffers decoding one `h`×`w` latent
    /// holds at once: the f32 scores and probabilities of the mid block's
    /// single-head self-attention over all `h·w` latent cells (they grow with
    /// the fourth power of the image side; see `emu_core::memory`).
    pub fn attention_bytes(&self, h: usize, w: usize) -> u64 {
        if !self.mid_block_add_attention {
            return 0;
        }
        let tokens = (h as u64).saturating_mul(w as u64);
        tokens.saturating_mul(tokens).saturating_mul(2 * 4)
    }

    /// How much the VAE shrinks each spatial side (8 for SDXL).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn resnet_cfg(groups: usize) -> ResnetCfg {
    ResnetCfg {
        groups,
        eps: VAE_EPS,
        temb_channels: None,
        output_scale_factor: 1.0,
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, single-head spatial
/// self-attention (with its own GroupNorm and a residual), resnet.
#[derive(Debug, Clone)]
struct MidBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attn: Option<(GroupNorm<B>, Attention<B>)>,
}

impl<B: Backend> MidBlock<B> {
    fn load(vb: &Vb<B>, channels: usize, groups: usize, with_attn: bool) -> Result<Self> {
        let rc = resnet_cfg(groups);
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::load(&vb.pp("resnets").pp(i), channels, channels, &rc))
            .collect::<Result<_>>()?;
        let attn = if with_attn {
            let a = vb.pp("attentions").pp(0);
            Some((
                GroupNorm::load(&a.pp("group_norm"), groups, channels, VAE_EPS)?,
                // diffusers: heads = channels / attention_head_dim with attention_head_dim = channels.
                Attention::load(&a, channels, channels, 1, channels, true)?,
            ))
        } else {
            None
        };
        Ok(Self { resnets, attn })
    }

    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some((norm, attn)) = &self.attn {
            let (hh, ww) = hw(&h)?;
            let a = attn.forward(&to_tokens(&norm.forward(&h)?)?, None)?;
            h = from_tokens(&a, hh, ww)?.add(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// `UpDecoderBlock2D`: resnets, then an optional upsampler.
type UpBlock<B> = (Vec<ResnetBlock2D<B>>, Option<Upsample2D<B>>);
/// `DownEncoderBlock2D`: resnets, then an optional downsampler.
type DownBlock<B> = (Vec<ResnetBlock2D<B>>, Option<Downsample2D<B>>);

/// The VAE decoder (`decoder.*`).
#[derive(Debug, Clone)]
pub struct Decoder<B: Backend> {
    conv_in: Conv2d<B>,
    mid_block: MidBlock<B>,
    up_blocks: Vec<UpBlock<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    fn load(vb: &Vb<B>, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let top = *boc.last().expect("validated non-empty");
        let rc = resnet_cfg(g);
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &out) in boc.iter().rev().enumerate() {
            let ub = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock2D::load(&ub.pp("resnets").pp(j), if j == 0 { prev } else { out }, out, &rc))
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < boc.len() {
                Some(Upsample2D::load(&ub.pp("upsamplers").pp(0), out)?)
            } else {
                None
            };
            up_blocks.push((resnets, up));
            prev = out;
        }
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.latent_channels, top, 3, 1, 1)?,
            mid_block: MidBlock::load(&vb.pp("mid_block"), top, g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, boc[0], VAE_EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor<B>) -> Result<Tensor<B>> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for (resnets, up) in &self.up_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(up) = up {
                h = up.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

/// The VAE encoder (`encoder.*`), producing mean and log-variance channels.
#[derive(Debug, Clone)]
pub struct Encoder<B: Backend> {
    conv_in: Conv2d<B>,
    down_blocks: Vec<DownBlock<B>>,
    mid_block: MidBlock<B>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    fn load(vb: &Vb<B>, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let top = *boc.last().expect("validated non-empty");
        let rc = resnet_cfg(g);
        let mut down_blocks = Vec::new();
        let mut prev = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let db = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock2D::load(&db.pp("resnets").pp(j), if j == 0 { prev } else { out }, out, &rc))
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < boc.len() {
                Some(Downsample2D::load(&db.pp("downsamplers").pp(0), out, 0)?)
            } else {
                None
            };
            down_blocks.push((resnets, down));
            prev = out;
        }
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::load(&vb.pp("mid_block"), top, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, top, VAE_EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), top, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.down_blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

/// The posterior `N(mean, exp(logvar))` of the encoder.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    pub mean: Tensor<B>,
    /// Clamped to `[-30, 20]` as in diffusers.
    pub logvar: Tensor<B>,
}

/// `AutoencoderKL`: `encoder`, `quant_conv`, `post_quant_conv`, `decoder`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL<B: Backend> {
    encoder: Encoder<B>,
    decoder: Decoder<B>,
    quant_conv: Option<Conv2d<B>>,
    post_quant_conv: Option<Conv2d<B>>,
    config: AutoencoderKLConfig,
    dtype: DType,
}

impl<B: Backend> AutoencoderKL<B> {
    /// Loads every module from `weights` (a view at the model root, diffusers
    /// key names), uploading parameters to `backend` in `dtype`.
    pub fn load(backend: &B, weights: &Weights, cfg: &AutoencoderKLConfig, dtype: DType) -> Result<Self> {
        let vb = &Vb::new(weights, backend, dtype);
        cfg.validate()?;
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::load(&vb.pp("encoder"), cfg)?,
            decoder: Decoder::load(&vb.pp("decoder"), cfg)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::load(&vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::load(&vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
            } else {
                None
            },
            config: cfg.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The dtype the parameters were loaded in (and the model computes in).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `vae.decode(z).sample`: latents `[B, latent_channels, h, w]` (already
    /// divided by `scaling_factor`) to images `[B, out_channels, 8h, 8w]` in
    /// about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor<B>) -> Result<Tensor<B>> {
        z.backend().run(|| {
            let z = match &self.post_quant_conv {
                Some(c) => c.forward(z)?,
                None => z.clone(),
            };
            self.decoder.forward(&z)
        })
    }

    /// `vae.encode(x).latent_dist`: images in `[-1, 1]` to the posterior.
    pub fn encode(&self, x: &Tensor<B>) -> Result<DiagonalGaussian<B>> {
        x.backend().run(|| self.encode_here(x))
    }

    fn encode_here(&self, x: &Tensor<B>) -> Result<DiagonalGaussian<B>> {
        let h = self.encoder.forward(x)?;
        let m = match &self.quant_conv {
            Some(c) => c.forward(&h)?,
            None => h,
        };
        let l = self.config.latent_channels;
        let mean = m.narrow(1, 0, l)?;
        let logvar = m.narrow(1, l, l)?;
        let dims = vec![1usize; logvar.rank()];
        let lo = Tensor::full(logvar.backend(), &dims, -30.0, logvar.dtype())?;
        let hi = Tensor::full(logvar.backend(), &dims, 20.0, logvar.dtype())?;
        let logvar = logvar.maximum(&lo)?.minimum(&hi)?;
        Ok(DiagonalGaussian { mean, logvar })
    }
}
