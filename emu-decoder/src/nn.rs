//! Layers shared by the UNet and the VAE, named after their diffusers /
//! PyTorch modules so that `Vb` paths read like the checkpoint keys.

use crate::error::Result;
use crate::weights::Vb;
use emu_core::{Backend, Conv2dParams, LinearGroup, LinearWeight, Tensor};

/// `nn.Conv2d` with square kernels, stride and padding.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d<B: Backend> {
    weight: Tensor<B>,
    bias: Option<Tensor<B>>,
    params: Conv2dParams,
}

impl<B: Backend> Conv2d<B> {
    pub fn load(vb: &Vb<B>, cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[cout, cin, kernel, kernel])?,
            bias: Some(vb.get("bias", &[cout])?),
            params: Conv2dParams::new(stride, padding),
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(x.conv2d(&self.weight, self.bias.as_ref(), self.params)?)
    }
}

/// `nn.Linear`, its weight dense or block-quantized.
#[derive(Debug, Clone)]
pub(crate) struct Linear<B: Backend> {
    weight: LinearWeight<B>,
    bias: Option<Tensor<B>>,
}

impl<B: Backend> Linear<B> {
    /// A linear kept in the view's dtype (unless the checkpoint stores blocks).
    pub fn load(vb: &Vb<B>, din: usize, dout: usize, bias: bool) -> Result<Self> {
        Self::load_with(vb, din, dout, bias, None)
    }

    /// A linear of `group`, quantized as the view's [`emu_core::BlockQuant`] asks.
    pub fn load_in(vb: &Vb<B>, group: LinearGroup, din: usize, dout: usize, bias: bool) -> Result<Self> {
        Self::load_with(vb, din, dout, bias, vb.quant().format(group, din))
    }

    fn load_with(vb: &Vb<B>, din: usize, dout: usize, bias: bool, quant: Option<emu_core::QuantType>) -> Result<Self> {
        Ok(Self {
            weight: LinearWeight::load(vb.backend(), vb.weights(), dout, din, vb.dtype(), quant)?,
            bias: if bias { Some(vb.get("bias", &[dout])?) } else { None },
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(self.weight.forward(x, self.bias.as_ref())?)
    }
}

const ATTN: LinearGroup = LinearGroup::Attention;

/// `nn.GroupNorm` with affine parameters.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm<B: Backend> {
    groups: usize,
    eps: f64,
    weight: Tensor<B>,
    bias: Tensor<B>,
}

impl<B: Backend> GroupNorm<B> {
    pub fn load(vb: &Vb<B>, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::invalid(format!(
                "GroupNorm: {groups} groups do not divide {channels} channels"
            )));
        }
        Ok(Self {
            groups,
            eps,
            weight: vb.get("weight", &[channels])?,
            bias: vb.get("bias", &[channels])?,
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps)?)
    }
}

/// `nn.LayerNorm` over the last dimension, with affine parameters.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm<B: Backend> {
    eps: f64,
    weight: Tensor<B>,
    bias: Tensor<B>,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(vb: &Vb<B>, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            eps,
            weight: vb.get("weight", &[dim])?,
            bias: vb.get("bias", &[dim])?,
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)?)
    }
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"`: two
/// GroupNorm-SiLU-Conv stages, the projected time embedding added in
/// between, and a 1x1 `conv_shortcut` when the channel count changes.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_emb_proj: Option<Linear<B>>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    conv_shortcut: Option<Conv2d<B>>,
    output_scale_factor: f64,
}

pub(crate) struct ResnetCfg {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl<B: Backend> ResnetBlock2D<B> {
    pub fn load(vb: &Vb<B>, cin: usize, cout: usize, cfg: &ResnetCfg) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match cfg.temb_channels {
                Some(t) => Some(Linear::load(&vb.pp("time_emb_proj"), t, cout, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(&vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is the `[B, T]` time embedding (before the block's SiLU).
    pub fn forward(&self, x: &Tensor<B>, temb: Option<&Tensor<B>>) -> Result<Tensor<B>> {
        let mut h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?;
            let (b, c) = (t.dim(0)?, t.dim(1)?);
            h = h.add(&t.reshape(&[b, c, 1, 1])?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = skip.add(&h)?;
        Ok(if self.output_scale_factor != 1.0 {
            out.affine(1.0 / self.output_scale_factor, 0.0)?
        } else {
            out
        })
    }
}

/// diffusers' `Attention` with the default processor (no masks): multi-head
/// scaled dot-product attention over `[B, T, C]` tokens, with optional
/// cross-attention context.
#[derive(Debug, Clone)]
pub(crate) struct Attention<B: Backend> {
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
    heads: usize,
    head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// `query_dim` wide queries; keys and values from `context_dim` wide
    /// tokens; `heads * head_dim` inner width; `qkv_bias` as diffusers' `bias`.
    pub fn load(
        vb: &Vb<B>,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load_in(&vb.pp("to_q"), ATTN, query_dim, inner, qkv_bias)?,
            to_k: Linear::load_in(&vb.pp("to_k"), ATTN, context_dim, inner, qkv_bias)?,
            to_v: Linear::load_in(&vb.pp("to_v"), ATTN, context_dim, inner, qkv_bias)?,
            to_out: Linear::load_in(&vb.pp("to_out").pp(0), ATTN, inner, query_dim, true)?,
            heads,
            head_dim,
        })
    }

    /// `x` `[B, T, C]`; `context` `[B, S, Cc]` or `None` for self-attention.
    pub fn forward(&self, x: &Tensor<B>, context: Option<&Tensor<B>>) -> Result<Tensor<B>> {
        let ctx = context.unwrap_or(x);
        let (b, t) = (x.dim(0)?, x.dim(1)?);
        let s = ctx.dim(1)?;
        let split = |y: Tensor<B>, len: usize| -> Result<Tensor<B>> {
            Ok(y.reshape(&[b, len, self.heads, self.head_dim])?
                .permute(&[0, 2, 1, 3])?)
        };
        let q = split(self.to_q.forward(x)?, t)?;
        let k = split(self.to_k.forward(ctx)?, s)?;
        let v = split(self.to_v.forward(ctx)?, s)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let o = q.attention(&k, &v, None, None, scale)?;
        let o = o.permute(&[0, 2, 1, 3])?.reshape(&[b, t, self.heads * self.head_dim])?;
        self.to_out.forward(&o)
    }
}

/// `[B, C, H, W]` -> `[B, H*W, C]`.
pub(crate) fn to_tokens<B: Backend>(x: &Tensor<B>) -> Result<Tensor<B>> {
    let d = x.dims();
    Ok(x.reshape(&[d[0], d[1], d[2] * d[3]])?.permute(&[0, 2, 1])?)
}

/// `[B, H*W, C]` -> `[B, C, H, W]`.
pub(crate) fn from_tokens<B: Backend>(x: &Tensor<B>, h: usize, w: usize) -> Result<Tensor<B>> {
    let d = x.dims();
    Ok(x.permute(&[0, 2, 1])?.reshape(&[d[0], d[2], h, w])?)
}

/// Spatial size of an NCHW tensor.
pub(crate) fn hw<B: Backend>(x: &Tensor<B>) -> Result<(usize, usize)> {
    let d = x.dims();
    if d.len() != 4 {
        return Err(crate::Error::invalid(format!(
            "expected an NCHW tensor, found shape {d:?}"
        )));
    }
    Ok((d[2], d[3]))
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour resize (to
/// twice the size, or to the size of the skip connection it will meet),
/// then a 3x3 conv.
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D<B: Backend> {
    conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub fn load(vb: &Vb<B>, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor<B>, size: Option<(usize, usize)>) -> Result<Tensor<B>> {
        let (h, w) = hw(x)?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

/// diffusers' `Downsample2D(use_conv=True)`: a stride-2 3x3 conv. With
/// `padding = 0` (the VAE encoder) the input is first padded by one pixel on
/// the right and bottom only, as diffusers does.
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D<B: Backend> {
    conv: Conv2d<B>,
    asymmetric_pad: bool,
}

impl<B: Backend> Downsample2D<B> {
    pub fn load(vb: &Vb<B>, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, padding)?,
            asymmetric_pad: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        if !self.asymmetric_pad {
            return self.conv.forward(x);
        }
        let d = x.dims();
        let (n, c, h, w) = (d[0], d[1], d[2], d[3]);
        let col = Tensor::zeros(x.backend(), &[n, c, h, 1], x.dtype())?;
        let x = Tensor::concat(&[x, &col], 3)?;
        let row = Tensor::zeros(x.backend(), &[n, c, 1, w + 1], x.dtype())?;
        let x = Tensor::concat(&[&x, &row], 2)?;
        self.conv.forward(&x)
    }
}
