//! The tiny Emu2-Gen diffusion decoder: an SDXL-topology UNet (text_time
//! conditioning, cross-attention on the tiny EVA width) and an AutoencoderKL,
//! in diffusers folders with diffusers key names, plus upstream's scheduler.

use super::{write_json, write_safetensors, Init, Params, TINY_SEED, VIS_WIDTH};
use crate::pipeline::Result;
use serde_json::{json, Value};
use std::path::Path;

const UNET_CHANNELS: [usize; 2] = [8, 16];
const UNET_HEADS: [usize; 2] = [2, 4];
const UNET_LAYERS: usize = 1;
const TIME_DIM: usize = 4;
const GROUPS: usize = 4;
const LATENT: usize = 4;
const VAE_CHANNELS: [usize; 2] = [8, 16];
const VAE_LAYERS: usize = 1;
/// Default output size of the tiny pipeline (VAE `sample_size`): a 16×16
/// latent, as 1024 px is a 128×128 latent for the real model.
pub const TINY_GEN_SIZE: usize = 32;

pub fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": TIME_DIM,
        "attention_head_dim": UNET_HEADS,
        "block_out_channels": UNET_CHANNELS,
        "center_input_sample": false,
        "class_embed_type": null,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": VIS_WIDTH,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": false,
        "encoder_hid_dim": null,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": LATENT,
        "layers_per_block": UNET_LAYERS,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-5,
        "norm_num_groups": GROUPS,
        "num_attention_heads": null,
        "only_cross_attention": false,
        "out_channels": LATENT,
        "projection_class_embeddings_input_dim": VIS_WIDTH + 6 * TIME_DIM,
        "resnet_time_scale_shift": "default",
        "sample_size": TINY_GEN_SIZE / 2,
        "time_embedding_type": "positional",
        "transformer_layers_per_block": [1, 1],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": null,
        "use_linear_projection": true
    })
}

pub fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": VAE_CHANNELS,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "force_upcast": true,
        "in_channels": 3,
        "latent_channels": LATENT,
        "layers_per_block": VAE_LAYERS,
        "norm_num_groups": GROUPS,
        "out_channels": 3,
        "sample_size": TINY_GEN_SIZE,
        "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]
    })
}

/// Upstream's `scheduler/scheduler_config.json` values (SPEC §4.3).
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "use_karras_sigmas": false
    })
}

fn model_index() -> Value {
    json!({
        "_class_name": "EmuVisualGenerationPipeline",
        "multimodal_encoder": ["transformers_modules.modeling_emu", "EmuForCausalLM"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "LlamaTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

fn norm(p: &mut Params, key: &str, c: usize) {
    p.add(format!("{key}.weight"), &[c], Init::Ones);
    p.add(format!("{key}.bias"), &[c], Init::Std(0.02));
}

fn linear(p: &mut Params, key: &str, din: usize, dout: usize, bias: bool) {
    p.add(format!("{key}.weight"), &[dout, din], Init::FanIn);
    if bias {
        p.add(format!("{key}.bias"), &[dout], Init::Std(0.02));
    }
}

fn conv(p: &mut Params, key: &str, cin: usize, cout: usize, k: usize) {
    p.add(format!("{key}.weight"), &[cout, cin, k, k], Init::FanIn);
    p.add(format!("{key}.bias"), &[cout], Init::Std(0.02));
}

/// diffusers `ResnetBlock2D`.
fn resnet(p: &mut Params, key: &str, cin: usize, cout: usize, temb: Option<usize>) {
    norm(p, &format!("{key}.norm1"), cin);
    conv(p, &format!("{key}.conv1"), cin, cout, 3);
    if let Some(t) = temb {
        linear(p, &format!("{key}.time_emb_proj"), t, cout, true);
    }
    norm(p, &format!("{key}.norm2"), cout);
    conv(p, &format!("{key}.conv2"), cout, cout, 3);
    if cin != cout {
        conv(p, &format!("{key}.conv_shortcut"), cin, cout, 1);
    }
}

/// diffusers `Attention` (bias-free q/k/v unless `qkv_bias`).
fn attention(p: &mut Params, key: &str, query: usize, context: usize, inner: usize, qkv_bias: bool) {
    linear(p, &format!("{key}.to_q"), query, inner, qkv_bias);
    linear(p, &format!("{key}.to_k"), context, inner, qkv_bias);
    linear(p, &format!("{key}.to_v"), context, inner, qkv_bias);
    linear(p, &format!("{key}.to_out.0"), inner, query, true);
}

/// diffusers `Transformer2DModel` with linear projections and one
/// `BasicTransformerBlock` (self-attention, cross-attention, GEGLU).
fn transformer(p: &mut Params, key: &str, ch: usize, cross: usize) {
    norm(p, &format!("{key}.norm"), ch);
    linear(p, &format!("{key}.proj_in"), ch, ch, true);
    let b = format!("{key}.transformer_blocks.0");
    for n in ["norm1", "norm2", "norm3"] {
        norm(p, &format!("{b}.{n}"), ch);
    }
    attention(p, &format!("{b}.attn1"), ch, ch, ch, false);
    attention(p, &format!("{b}.attn2"), ch, cross, ch, false);
    linear(p, &format!("{b}.ff.net.0.proj"), ch, 8 * ch, true);
    linear(p, &format!("{b}.ff.net.2"), 4 * ch, ch, true);
    linear(p, &format!("{key}.proj_out"), ch, ch, true);
}

/// The UNet's parameters, following diffusers' `UNet2DConditionModel`
/// for the config of [`unet_config`] (one resnet per down block, two per up block).
fn unet_params() -> Params {
    let mut p = Params::default();
    let [c0, c1] = UNET_CHANNELS;
    let temb = 4 * c0;
    conv(&mut p, "conv_in", LATENT, c0, 3);
    linear(&mut p, "time_embedding.linear_1", c0, temb, true);
    linear(&mut p, "time_embedding.linear_2", temb, temb, true);
    linear(&mut p, "add_embedding.linear_1", VIS_WIDTH + 6 * TIME_DIM, temb, true);
    linear(&mut p, "add_embedding.linear_2", temb, temb, true);
    // down_blocks.0: DownBlock2D c0 -> c0, with a downsampler.
    resnet(&mut p, "down_blocks.0.resnets.0", c0, c0, Some(temb));
    conv(&mut p, "down_blocks.0.downsamplers.0.conv", c0, c0, 3);
    // down_blocks.1: CrossAttnDownBlock2D c0 -> c1, last level.
    resnet(&mut p, "down_blocks.1.resnets.0", c0, c1, Some(temb));
    transformer(&mut p, "down_blocks.1.attentions.0", c1, VIS_WIDTH);
    resnet(&mut p, "mid_block.resnets.0", c1, c1, Some(temb));
    transformer(&mut p, "mid_block.attentions.0", c1, VIS_WIDTH);
    resnet(&mut p, "mid_block.resnets.1", c1, c1, Some(temb));
    // up_blocks.0: CrossAttnUpBlock2D at c1; skips c1, c1, then c0.
    resnet(&mut p, "up_blocks.0.resnets.0", c1 + c1, c1, Some(temb));
    transformer(&mut p, "up_blocks.0.attentions.0", c1, VIS_WIDTH);
    resnet(&mut p, "up_blocks.0.resnets.1", c1 + c0, c1, Some(temb));
    transformer(&mut p, "up_blocks.0.attentions.1", c1, VIS_WIDTH);
    conv(&mut p, "up_blocks.0.upsamplers.0.conv", c1, c1, 3);
    // up_blocks.1: UpBlock2D at c0; skips c0, c0.
    resnet(&mut p, "up_blocks.1.resnets.0", c1 + c0, c0, Some(temb));
    resnet(&mut p, "up_blocks.1.resnets.1", c0 + c0, c0, Some(temb));
    norm(&mut p, "conv_norm_out", c0);
    conv(&mut p, "conv_out", c0, LATENT, 3);
    p
}

/// diffusers `UNetMidBlock2D` of the VAE: two resnets around one
/// single-head self-attention with biases.
fn vae_mid(p: &mut Params, key: &str, c: usize) {
    resnet(p, &format!("{key}.resnets.0"), c, c, None);
    norm(p, &format!("{key}.attentions.0.group_norm"), c);
    attention(p, &format!("{key}.attentions.0"), c, c, c, true);
    resnet(p, &format!("{key}.resnets.1"), c, c, None);
}

/// The AutoencoderKL's parameters for the config of [`vae_config`].
fn vae_params() -> Params {
    let mut p = Params::default();
    let [c0, c1] = VAE_CHANNELS;
    conv(&mut p, "encoder.conv_in", 3, c0, 3);
    resnet(&mut p, "encoder.down_blocks.0.resnets.0", c0, c0, None);
    conv(&mut p, "encoder.down_blocks.0.downsamplers.0.conv", c0, c0, 3);
    resnet(&mut p, "encoder.down_blocks.1.resnets.0", c0, c1, None);
    vae_mid(&mut p, "encoder.mid_block", c1);
    norm(&mut p, "encoder.conv_norm_out", c1);
    conv(&mut p, "encoder.conv_out", c1, 2 * LATENT, 3);
    conv(&mut p, "quant_conv", 2 * LATENT, 2 * LATENT, 1);
    conv(&mut p, "post_quant_conv", LATENT, LATENT, 1);
    conv(&mut p, "decoder.conv_in", LATENT, c1, 3);
    vae_mid(&mut p, "decoder.mid_block", c1);
    for j in 0..=VAE_LAYERS {
        resnet(&mut p, &format!("decoder.up_blocks.0.resnets.{j}"), c1, c1, None);
    }
    conv(&mut p, "decoder.up_blocks.0.upsamplers.0.conv", c1, c1, 3);
    for j in 0..=VAE_LAYERS {
        let cin = if j == 0 { c1 } else { c0 };
        resnet(&mut p, &format!("decoder.up_blocks.1.resnets.{j}"), cin, c0, None);
    }
    norm(&mut p, "decoder.conv_norm_out", c0);
    conv(&mut p, "decoder.conv_out", c0, 3, 3);
    p
}

/// Writes `unet/`, `vae/`, `scheduler/` and `model_index.json` under `dir`.
pub(super) fn write(dir: &Path) -> Result<()> {
    write_json(&dir.join("model_index.json"), &model_index())?;
    write_json(
        &dir.join("scheduler").join("scheduler_config.json"),
        &scheduler_config(),
    )?;
    write_json(&dir.join("unet").join("config.json"), &unet_config())?;
    write_safetensors(
        &dir.join("unet").join("diffusion_pytorch_model.safetensors"),
        &unet_params().host(TINY_SEED)?,
    )?;
    write_json(&dir.join("vae").join("config.json"), &vae_config())?;
    write_safetensors(
        &dir.join("vae").join("diffusion_pytorch_model.safetensors"),
        &vae_params().host(TINY_SEED)?,
    )?;
    Ok(())
}
