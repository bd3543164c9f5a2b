//! The benchmark configurations (`--size tiny|mid`) and the random models
//! and inputs built from them.
//!
//! Every model is written in its upstream layout (transformers' LLaMA,
//! Emu2's `model.visual.*`, diffusers folders), so the PyTorch scripts in
//! `tools/reference/bench_*.py` load exactly the weights Rust loads. Inputs
//! go to a separate `inputs.safetensors` beside them for the same reason.

use emu_core::testing::Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::Res;

/// `--size`: how big every component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Seconds in total on one core: for the test that keeps this code alive.
    Tiny,
    /// Shapes where the kernels, not the overheads, dominate (see [`Spec::mid`]).
    Mid,
    /// Single layers at Emu2's true dimensions (see [`super::real`]).
    Real,
}

/// The EVA ViT: `batch` images of `image`² pixels, pooled to `n_query` tokens.
#[derive(Debug, Clone)]
pub struct VisionSpec {
    pub image: usize,
    pub patch: usize,
    pub width: usize,
    pub layers: usize,
    pub head_width: usize,
    pub mlp: usize,
    pub n_query: usize,
    pub batch: usize,
}

/// The LLaMA decoder and its workload: prefill `prompt` tokens, decode `new`
/// more, and regress `regress` visual embeddings after `regress_prompt`.
#[derive(Debug, Clone)]
pub struct LlmSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub visual_dim: usize,
    pub prompt: usize,
    pub new: usize,
    pub regress_prompt: usize,
    pub regress: usize,
}

/// An SDXL-structured UNet (first level without attention, text_time
/// conditioning, linear projections; `heads` are head counts per level, as
/// Emu2-Gen's `attention_head_dim` reads) at `latent`² latents.
#[derive(Debug, Clone)]
pub struct UnetSpec {
    pub channels: Vec<usize>,
    pub layers: usize,
    pub transformer_layers: Vec<usize>,
    pub heads: Vec<usize>,
    pub cross_dim: usize,
    pub time_dim: usize,
    pub groups: usize,
    pub latent: usize,
    pub tokens: usize,
}

/// An AutoencoderKL decoding one `latent`² latent.
#[derive(Debug, Clone)]
pub struct VaeSpec {
    pub channels: Vec<usize>,
    pub layers: usize,
    pub groups: usize,
    pub latent: usize,
}

/// Single-op cases: `matmul` is `[n, n] x [n, n]`; the others are the
/// shapes a transformer of width `width` over `tokens` positions runs.
#[derive(Debug, Clone)]
pub struct OpsSpec {
    pub n: usize,
    pub tokens: usize,
    pub width: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub conv_channels: usize,
    pub conv_side: usize,
}

/// One configuration of every component.
#[derive(Debug, Clone)]
pub struct Spec {
    pub ops: OpsSpec,
    pub vision: VisionSpec,
    pub llm: LlmSpec,
    pub unet: UnetSpec,
    pub vae: VaeSpec,
}

impl Spec {
    pub fn new(size: Size) -> Self {
        match size {
            Size::Tiny => Self::tiny(),
            // `--size real` builds its own layers; its whole-model runs are mid-sized.
            Size::Mid | Size::Real => Self::mid(),
        }
    }

    /// A few kB per component.
    pub fn tiny() -> Self {
        Spec {
            ops: OpsSpec {
                n: 32,
                tokens: 8,
                width: 32,
                heads: 2,
                head_dim: 8,
                conv_channels: 8,
                conv_side: 8,
            },
            vision: VisionSpec {
                image: 28,
                patch: 7,
                width: 32,
                layers: 2,
                head_width: 8,
                mlp: 64,
                n_query: 4,
                batch: 2,
            },
            llm: LlmSpec {
                hidden: 32,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 64,
                vocab: 128,
                visual_dim: 24,
                prompt: 6,
                new: 3,
                regress_prompt: 4,
                regress: 3,
            },
            unet: UnetSpec {
                channels: vec![16, 32],
                layers: 1,
                transformer_layers: vec![1, 1],
                heads: vec![1, 2],
                cross_dim: 24,
                time_dim: 8,
                groups: 8,
                latent: 8,
                tokens: 4,
            },
            vae: VaeSpec {
                channels: vec![16, 32],
                layers: 1,
                groups: 8,
                latent: 8,
            },
        }
    }

    /// The documented mid size: a ~110M-parameter LLaMA (hidden 768, 12
    /// layers, vocab 16384; prefill 128 tokens, decode 32, regress 16
    /// embeddings of width 1792), a 21M-parameter EVA ViT (width 384, 12
    /// layers, 224 px in 14 px patches, batch 2), Emu2-Gen's UNet topology
    /// at channels 64/128/256 (batch 2, 32x32 latents, 64 context tokens)
    /// and a 4-level VAE (32..128 channels, 32x32 latent to 256x256 px).
    pub fn mid() -> Self {
        Spec {
            ops: OpsSpec {
                n: 1024,
                tokens: 256,
                width: 2048,
                heads: 16,
                head_dim: 128,
                conv_channels: 128,
                conv_side: 64,
            },
            vision: VisionSpec {
                image: 224,
                patch: 14,
                width: 384,
                layers: 12,
                head_width: 64,
                mlp: 1536,
                n_query: 64,
                batch: 2,
            },
            llm: LlmSpec {
                hidden: 768,
                layers: 12,
                heads: 12,
                kv_heads: 12,
                intermediate: 2048,
                vocab: 16384,
                visual_dim: 1792,
                prompt: 128,
                new: 32,
                regress_prompt: 64,
                regress: 16,
            },
            unet: UnetSpec {
                channels: vec![64, 128, 256],
                layers: 2,
                transformer_layers: vec![1, 2, 2],
                heads: vec![2, 4, 8],
                cross_dim: 768,
                time_dim: 64,
                groups: 32,
                latent: 32,
                tokens: 64,
            },
            vae: VaeSpec {
                channels: vec![32, 64, 128, 128],
                layers: 2,
                groups: 32,
                latent: 32,
            },
        }
    }
}

/// How a parameter is drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    Ones,
    /// Uniform with this standard deviation.
    Std(f32),
    /// `1 +` uniform noise of this standard deviation (norm gains).
    AroundOne(f32),
    /// Standard deviation `1/sqrt(fan_in)` (fan_in: all dims but the
    /// first), which keeps activations of order one through a random net.
    FanIn,
}

/// Named f32 tensors of one safetensors file.
#[derive(Default)]
pub struct Tensors(BTreeMap<String, (Vec<usize>, Vec<f32>)>);

impl Tensors {
    pub fn insert(&mut self, key: impl Into<String>, dims: &[usize], values: Vec<f32>) {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len());
        self.0.insert(key.into(), (dims.to_vec(), values));
    }

    /// The tensors by name: (dims, values).
    pub fn into_inner(self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        self.0
    }

    /// Total element count.
    pub fn numel(&self) -> usize {
        self.0.values().map(|(_, v)| v.len()).sum()
    }

    /// Writes the file (8-byte header length, JSON header, raw little-endian data).
    pub fn write(&self, path: &Path) -> Res<()> {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, (dims, v)) in &self.0 {
            let end = offset + 4 * v.len();
            header.insert(
                name.clone(),
                json!({"dtype": "F32", "shape": dims, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut h = serde_json::to_vec(&header)?;
        // Data aligned to 8 bytes, so the loader can map it in place.
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        for (_, v) in self.0.values() {
            for x in v {
                f.write_all(&x.to_le_bytes())?;
            }
        }
        f.flush()?;
        Ok(())
    }
}

/// Draws parameters from one seeded stream, in insertion order.
pub(crate) struct Params {
    rng: Rng,
    pub(crate) out: Tensors,
}

impl Params {
    pub(crate) fn new(seed: u64) -> Self {
        Params {
            rng: Rng::new(seed),
            out: Tensors::default(),
        }
    }

    fn add(&mut self, key: impl Into<String>, dims: &[usize], init: Init) {
        let n: usize = dims.iter().product();
        let (base, std) = match init {
            Init::Ones => (1.0, 0.0),
            Init::Std(s) => (0.0, s),
            Init::AroundOne(s) => (1.0, s),
            Init::FanIn => (0.0, 1.0 / (dims.iter().skip(1).product::<usize>().max(1) as f32).sqrt()),
        };
        self.out.insert(key, dims, uniform(&mut self.rng, n, base, std));
    }

    fn norm(&mut self, key: &str, c: usize) {
        self.add(format!("{key}.weight"), &[c], Init::AroundOne(0.1));
        self.add(format!("{key}.bias"), &[c], Init::Std(0.05));
    }

    fn linear(&mut self, key: &str, din: usize, dout: usize, bias: bool) {
        self.add(format!("{key}.weight"), &[dout, din], Init::FanIn);
        if bias {
            self.add(format!("{key}.bias"), &[dout], Init::Std(0.05));
        }
    }

    fn conv(&mut self, key: &str, cin: usize, cout: usize, k: usize) {
        self.add(format!("{key}.weight"), &[cout, cin, k, k], Init::FanIn);
        self.add(format!("{key}.bias"), &[cout], Init::Std(0.05));
    }

    /// diffusers `ResnetBlock2D` (`temb`: the time-embedding width, if any).
    pub(crate) fn resnet(&mut self, key: &str, cin: usize, cout: usize, temb: Option<usize>) {
        self.norm(&format!("{key}.norm1"), cin);
        self.conv(&format!("{key}.conv1"), cin, cout, 3);
        if let Some(t) = temb {
            self.linear(&format!("{key}.time_emb_proj"), t, cout, true);
        }
        self.norm(&format!("{key}.norm2"), cout);
        self.conv(&format!("{key}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{key}.conv_shortcut"), cin, cout, 1);
        }
    }

    /// diffusers `Attention` with query width `q` and context width `kv`.
    fn attention(&mut self, key: &str, q: usize, kv: usize, qkv_bias: bool) {
        self.linear(&format!("{key}.to_q"), q, q, qkv_bias);
        self.linear(&format!("{key}.to_k"), kv, q, qkv_bias);
        self.linear(&format!("{key}.to_v"), kv, q, qkv_bias);
        self.linear(&format!("{key}.to_out.0"), q, q, true);
    }

    /// diffusers `Transformer2DModel` (linear projections) with `depth`
    /// `BasicTransformerBlock`s: self-attention, cross-attention, GEGLU.
    pub(crate) fn transformer(&mut self, key: &str, c: usize, cross: usize, depth: usize) {
        self.norm(&format!("{key}.norm"), c);
        self.linear(&format!("{key}.proj_in"), c, c, true);
        for k in 0..depth {
            let b = format!("{key}.transformer_blocks.{k}");
            for n in ["norm1", "norm2", "norm3"] {
                self.norm(&format!("{b}.{n}"), c);
            }
            self.attention(&format!("{b}.attn1"), c, c, false);
            self.attention(&format!("{b}.attn2"), c, cross, false);
            self.linear(&format!("{b}.ff.net.0.proj"), c, 8 * c, true);
            self.linear(&format!("{b}.ff.net.2"), 4 * c, c, true);
        }
        self.linear(&format!("{key}.proj_out"), c, c, true);
    }

    /// The VAE's `UNetMidBlock2D`: resnet, single-head attention, resnet.
    fn vae_mid(&mut self, key: &str, c: usize) {
        self.resnet(&format!("{key}.resnets.0"), c, c, None);
        self.norm(&format!("{key}.attentions.0.group_norm"), c);
        self.attention(&format!("{key}.attentions.0"), c, c, true);
        self.resnet(&format!("{key}.resnets.1"), c, c, None);
    }
}

/// `n` values `base + u`, `u` uniform with standard deviation `std`.
fn uniform(rng: &mut Rng, n: usize, base: f32, std: f32) -> Vec<f32> {
    // A uniform variable on [-a, a) has standard deviation a / sqrt(3).
    let a = f64::from(std) * 3f64.sqrt();
    (0..n).map(|_| base + rng.uniform(-a, a) as f32).collect()
}

/// `n` standard-normal-scale inputs (uniform, unit variance).
pub fn inputs(seed: u64, n: usize, std: f32) -> Vec<f32> {
    uniform(&mut Rng::new(seed), n, 0.0, std)
}

fn write_json(path: &Path, v: &Value) -> Res<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)?;
    Ok(())
}

/// Writes the Emu2 layout EVA (`config.json` with `vision_config`,
/// `model.safetensors` with `model.visual.*`); returns the parameter count.
pub fn write_vision(s: &VisionSpec, dir: &Path) -> Res<usize> {
    let (c, p, m) = (s.width, s.patch, s.mlp);
    let n = (s.image / p).pow(2);
    let mut w = Params::new(7);
    let v = "model.visual.";
    w.add(format!("{v}cls_token"), &[1, 1, c], Init::Std(0.5));
    w.add(format!("{v}pos_embed"), &[1, n + 1, c], Init::Std(0.5));
    w.conv(&format!("{v}patch_embed.proj"), 3, c, p);
    for i in 0..s.layers {
        let b = format!("{v}blocks.{i}");
        w.norm(&format!("{b}.norm1"), c);
        w.add(format!("{b}.attn.qkv.weight"), &[3 * c, c], Init::FanIn);
        w.add(format!("{b}.attn.q_bias"), &[c], Init::Std(0.1));
        w.add(format!("{b}.attn.v_bias"), &[c], Init::Std(0.1));
        w.linear(&format!("{b}.attn.proj"), c, c, true);
        w.norm(&format!("{b}.norm2"), c);
        w.linear(&format!("{b}.mlp.fc1"), c, m, true);
        w.linear(&format!("{b}.mlp.fc2"), m, c, true);
    }
    w.out.write(&dir.join("model.safetensors"))?;
    write_json(
        &dir.join("config.json"),
        &json!({
            "architectures": ["EmuForCausalLM"],
            "d_model": c,
            "vision_config": {
                "image_size": s.image, "patch_size": p, "width": c, "layers": s.layers,
                "head_width": s.head_width, "mlp_ratio": m as f64 / c as f64, "intermediate_size": m,
                "layer_norm_eps": 1e-6, "n_query": s.n_query, "v_query": 1,
                "postnorm": true, "qkv_bias": true, "xattn": false
            }
        }),
    )?;
    Ok(w.out.numel())
}

/// Writes transformers' `LlamaForCausalLM` layout; returns the parameter count.
pub fn write_llm(s: &LlmSpec, dir: &Path) -> Res<usize> {
    let d = s.hidden / s.heads;
    let (h, i) = (s.hidden, s.intermediate);
    let mut w = Params::new(11);
    w.add("model.embed_tokens.weight", &[s.vocab, h], Init::Std(1.0));
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        w.add(format!("{p}.input_layernorm.weight"), &[h], Init::AroundOne(0.1));
        w.linear(&format!("{p}.self_attn.q_proj"), h, s.heads * d, false);
        w.linear(&format!("{p}.self_attn.k_proj"), h, s.kv_heads * d, false);
        w.linear(&format!("{p}.self_attn.v_proj"), h, s.kv_heads * d, false);
        w.linear(&format!("{p}.self_attn.o_proj"), s.heads * d, h, false);
        w.add(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            Init::AroundOne(0.1),
        );
        w.linear(&format!("{p}.mlp.gate_proj"), h, i, false);
        w.linear(&format!("{p}.mlp.up_proj"), h, i, false);
        w.linear(&format!("{p}.mlp.down_proj"), i, h, false);
    }
    w.add("model.norm.weight", &[h], Init::Ones);
    w.linear("lm_head", h, s.vocab, false);
    w.out.write(&dir.join("model.safetensors"))?;
    write_json(
        &dir.join("config.json"),
        &json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "max_position_embeddings": (s.prompt + s.new).max(s.regress_prompt + s.regress) + 1,
            "vocab_size": s.vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype": "float32",
        }),
    )?;
    Ok(w.out.numel())
}

/// Emu2's bias-free `project_up` `[H, Dv]` and `project_down` `[Dv, H]`.
pub fn llm_projections(s: &LlmSpec, out: &mut Tensors) {
    let mut w = Params::new(13);
    w.linear("project_up", s.visual_dim, s.hidden, false);
    w.linear("project_down", s.hidden, s.visual_dim, false);
    for (k, v) in w.out.0 {
        out.0.insert(k.trim_end_matches(".weight").to_string(), v);
    }
}

/// Writes a diffusers `UNet2DConditionModel` folder; returns the parameter count.
pub fn write_unet(s: &UnetSpec, dir: &Path) -> Res<usize> {
    let ch = &s.channels;
    let levels = ch.len();
    let last = levels - 1;
    let temb = 4 * ch[0];
    let add_in = s.cross_dim + 6 * s.time_dim;
    let mut w = Params::new(17);
    w.conv("conv_in", 4, ch[0], 3);
    w.linear("time_embedding.linear_1", ch[0], temb, true);
    w.linear("time_embedding.linear_2", temb, temb, true);
    w.linear("add_embedding.linear_1", add_in, temb, true);
    w.linear("add_embedding.linear_2", temb, temb, true);
    for i in 0..levels {
        let cin = if i == 0 { ch[0] } else { ch[i - 1] };
        for j in 0..s.layers {
            let key = format!("down_blocks.{i}");
            w.resnet(
                &format!("{key}.resnets.{j}"),
                if j == 0 { cin } else { ch[i] },
                ch[i],
                Some(temb),
            );
            if i > 0 {
                w.transformer(
                    &format!("{key}.attentions.{j}"),
                    ch[i],
                    s.cross_dim,
                    s.transformer_layers[i],
                );
            }
        }
        if i < last {
            w.conv(&format!("down_blocks.{i}.downsamplers.0.conv"), ch[i], ch[i], 3);
        }
    }
    w.resnet("mid_block.resnets.0", ch[last], ch[last], Some(temb));
    w.transformer(
        "mid_block.attentions.0",
        ch[last],
        s.cross_dim,
        s.transformer_layers[last],
    );
    w.resnet("mid_block.resnets.1", ch[last], ch[last], Some(temb));
    // diffusers' up path: level i works at rev[i] and takes skips from the
    // down path in reverse; the last skip of a level comes from one level up.
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let rev_depth: Vec<usize> = s.transformer_layers.iter().rev().copied().collect();
    for i in 0..levels {
        let prev = if i == 0 { rev[0] } else { rev[i - 1] };
        let out = rev[i];
        let input = rev[(i + 1).min(last)];
        let n = s.layers + 1;
        for j in 0..n {
            let skip = if j == n - 1 { input } else { out };
            let rin = if j == 0 { prev } else { out };
            w.resnet(&format!("up_blocks.{i}.resnets.{j}"), rin + skip, out, Some(temb));
            if i < last {
                w.transformer(&format!("up_blocks.{i}.attentions.{j}"), out, s.cross_dim, rev_depth[i]);
            }
        }
        if i < last {
            w.conv(&format!("up_blocks.{i}.upsamplers.0.conv"), out, out, 3);
        }
    }
    w.norm("conv_norm_out", ch[0]);
    w.conv("conv_out", ch[0], 4, 3);
    w.out.write(&dir.join("diffusion_pytorch_model.safetensors"))?;
    let mut down = vec!["DownBlock2D"];
    down.extend(std::iter::repeat_n("CrossAttnDownBlock2D", last));
    let mut up = vec!["CrossAttnUpBlock2D"; last];
    up.push("UpBlock2D");
    write_json(
        &dir.join("config.json"),
        &json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": s.time_dim,
            "attention_head_dim": s.heads,
            "block_out_channels": ch,
            "cross_attention_dim": s.cross_dim,
            "down_block_types": down,
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": s.layers,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-5,
            "norm_num_groups": s.groups,
            "num_attention_heads": null,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": add_in,
            "sample_size": s.latent,
            "transformer_layers_per_block": s.transformer_layers,
            "up_block_types": up,
            "use_linear_projection": true
        }),
    )?;
    Ok(w.out.numel())
}

/// Writes a diffusers `AutoencoderKL` folder (4 latent channels); returns
/// the parameter count of the decoder side (`post_quant_conv` + `decoder`).
pub fn write_vae(s: &VaeSpec, dir: &Path) -> Res<usize> {
    let ch = &s.channels;
    let last = ch.len() - 1;
    let mut w = Params::new(19);
    w.conv("encoder.conv_in", 3, ch[0], 3);
    for i in 0..=last {
        let cin = if i == 0 { ch[0] } else { ch[i - 1] };
        for j in 0..s.layers {
            w.resnet(
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                if j == 0 { cin } else { ch[i] },
                ch[i],
                None,
            );
        }
        if i < last {
            w.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), ch[i], ch[i], 3);
        }
    }
    w.vae_mid("encoder.mid_block", ch[last]);
    w.norm("encoder.conv_norm_out", ch[last]);
    w.conv("encoder.conv_out", ch[last], 8, 3);
    w.conv("quant_conv", 8, 8, 1);
    let encoder = w.out.numel();
    w.conv("post_quant_conv", 4, 4, 1);
    w.conv("decoder.conv_in", 4, ch[last], 3);
    w.vae_mid("decoder.mid_block", ch[last]);
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    for i in 0..=last {
        let prev = if i == 0 { rev[0] } else { rev[i - 1] };
        for j in 0..=s.layers {
            w.resnet(
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                if j == 0 { prev } else { rev[i] },
                rev[i],
                None,
            );
        }
        if i < last {
            w.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), rev[i], rev[i], 3);
        }
    }
    w.norm("decoder.conv_norm_out", ch[0]);
    w.conv("decoder.conv_out", ch[0], 3, 3);
    w.out.write(&dir.join("diffusion_pytorch_model.safetensors"))?;
    write_json(
        &dir.join("config.json"),
        &json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": ch,
            "down_block_types": vec!["DownEncoderBlock2D"; ch.len()],
            "force_upcast": true,
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": s.layers,
            "norm_num_groups": s.groups,
            "out_channels": 3,
            "sample_size": s.latent << last,
            "scaling_factor": 0.13025,
            "up_block_types": vec!["UpDecoderBlock2D"; ch.len()]
        }),
    )?;
    Ok(w.out.numel() - encoder)
}
