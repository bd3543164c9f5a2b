//! The EVA-CLIP vision transformer of Emu2 (SPEC §1.2), token pooling (§2.1)
//! and `project_up` (§2.2).

use crate::config::{EmuVisionConfig, EvaConfig};
use crate::error::{Result, VisionError};
use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::{Backend, BlockQuant, Conv2dParams, DType, LinearGroup, LinearWeight, Tensor};
use std::path::{Path, PathBuf};

/// Multi-head self-attention with one fused `qkv` projection. Its bias is
/// `concat(q_bias, 0, v_bias)`: EVA keeps no k bias (it would cancel in the
/// softmax), so the fused bias is built once at load time.
#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    qkv_weight: LinearWeight<B>,
    qkv_bias: Option<Tensor<B>>,
    proj_weight: LinearWeight<B>,
    proj_bias: Tensor<B>,
    num_heads: usize,
    head_dim: usize,
}

impl<B: Backend> Attention<B> {
    pub fn load(backend: &B, w: &Weights, cfg: &EvaConfig, dtype: DType, quant: BlockQuant) -> Result<Self> {
        let c = cfg.width;
        let q = quant.format(LinearGroup::Attention, c);
        let qkv_bias = if cfg.qkv_bias {
            let q = w.tensor(backend, "q_bias", &[c], dtype)?;
            let v = w.tensor(backend, "v_bias", &[c], dtype)?;
            let k = Tensor::zeros(backend, &[c], dtype)?;
            Some(Tensor::concat(&[&q, &k, &v], 0)?)
        } else {
            None
        };
        Ok(Self {
            qkv_weight: LinearWeight::load(backend, &w.pp("qkv"), 3 * c, c, dtype, q)?,
            qkv_bias,
            proj_weight: LinearWeight::load(backend, &w.pp("proj"), c, c, dtype, q)?,
            proj_bias: w.tensor(backend, "proj.bias", &[c], dtype)?,
            num_heads: cfg.num_heads(),
            head_dim: cfg.head_width,
        })
    }

    /// `x`: `[B, T, C]` -> `[B, T, C]`.
    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let (b, t) = (x.dim(0)?, x.dim(1)?);
        let (h, d) = (self.num_heads, self.head_dim);
        let qkv = self.qkv_weight.forward(x, self.qkv_bias.as_ref())?;
        // [B, T, 3, H, D] -> [3, B, H, T, D]
        let qkv = qkv.reshape(&[b, t, 3, h, d])?.permute(&[2, 0, 3, 1, 4])?;
        let q = qkv.narrow(0, 0, 1)?.reshape(&[b, h, t, d])?;
        let k = qkv.narrow(0, 1, 1)?.reshape(&[b, h, t, d])?;
        let v = qkv.narrow(0, 2, 1)?.reshape(&[b, h, t, d])?;
        let scale = (d as f64).powf(-0.5);
        let a = q.attention(&k, &v, None, None, scale)?;
        let a = a.permute(&[0, 2, 1, 3])?.reshape(&[b, t, h * d])?;
        Ok(self.proj_weight.forward(&a, Some(&self.proj_bias))?)
    }
}

/// `fc1 -> exact GELU -> fc2`, both with bias.
#[derive(Debug, Clone)]
pub struct Mlp<B: Backend> {
    fc1_weight: LinearWeight<B>,
    fc1_bias: Tensor<B>,
    fc2_weight: LinearWeight<B>,
    fc2_bias: Tensor<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn load(backend: &B, w: &Weights, cfg: &EvaConfig, dtype: DType, quant: BlockQuant) -> Result<Self> {
        let (c, hdim) = (cfg.width, cfg.mlp_hidden);
        let q = |inner| quant.format(LinearGroup::Mlp, inner);
        Ok(Self {
            fc1_weight: LinearWeight::load(backend, &w.pp("fc1"), hdim, c, dtype, q(c))?,
            fc1_bias: w.tensor(backend, "fc1.bias", &[hdim], dtype)?,
            fc2_weight: LinearWeight::load(backend, &w.pp("fc2"), c, hdim, dtype, q(hdim))?,
            fc2_bias: w.tensor(backend, "fc2.bias", &[c], dtype)?,
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let h = self.fc1_weight.forward(x, Some(&self.fc1_bias))?.gelu()?;
        Ok(self.fc2_weight.forward(&h, Some(&self.fc2_bias))?)
    }
}

/// LayerNorm with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm<B: Backend> {
    weight: Tensor<B>,
    bias: Tensor<B>,
    eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(backend: &B, w: &Weights, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(backend, "weight", &[dim], dtype)?,
            bias: w.tensor(backend, "bias", &[dim], dtype)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)?)
    }
}

/// A post-norm block: the LayerNorms act on the sub-layer *outputs*, before
/// the residual add (`postnorm: true`); the sub-layer inputs are not normalised.
#[derive(Debug, Clone)]
pub struct Block<B: Backend> {
    norm1: LayerNorm<B>,
    attn: Attention<B>,
    norm2: LayerNorm<B>,
    mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    pub fn load(backend: &B, w: &Weights, cfg: &EvaConfig, dtype: DType, quant: BlockQuant) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            norm1: LayerNorm::load(backend, &w.pp("norm1"), cfg.width, eps, dtype)?,
            attn: Attention::load(backend, &w.pp("attn"), cfg, dtype, quant)?,
            norm2: LayerNorm::load(backend, &w.pp("norm2"), cfg.width, eps, dtype)?,
            mlp: Mlp::load(backend, &w.pp("mlp"), cfg, dtype, quant)?,
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let x = x.add(&self.norm1.forward(&self.attn.forward(x)?)?)?;
        Ok(x.add(&self.norm2.forward(&self.mlp.forward(&x)?)?)?)
    }
}

/// The EVA-CLIP ViT: patch embedding, CLS token, learned positions and
/// post-norm blocks, with no final norm or head.
#[derive(Debug, Clone)]
pub struct EvaVisionTransformer<B: Backend> {
    cfg: EvaConfig,
    patch_weight: Tensor<B>,
    patch_bias: Tensor<B>,
    cls_token: Tensor<B>,
    pos_embed: Tensor<B>,
    blocks: Vec<Block<B>>,
    dtype: DType,
}

impl<B: Backend> EvaVisionTransformer<B> {
    /// Loads the encoder from a view positioned at the `visual` module
    /// (keys `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`).
    pub fn load(backend: &B, w: &Weights, cfg: &EvaConfig, dtype: DType) -> Result<Self> {
        Self::load_quantized(backend, w, cfg, dtype, BlockQuant::default())
    }

    /// [`EvaVisionTransformer::load`] with the blocks' linears that `quant`
    /// selects block-quantized while loading (`attn.qkv`, `attn.proj`:
    /// attention; `mlp.fc1`, `mlp.fc2`: MLP). The patch embedding, the
    /// norms and the biases stay in `dtype`.
    pub fn load_quantized(backend: &B, w: &Weights, cfg: &EvaConfig, dtype: DType, quant: BlockQuant) -> Result<Self> {
        let (c, p) = (cfg.width, cfg.patch_size);
        let pe = w.pp("patch_embed").pp("proj");
        let bw = w.pp("blocks");
        bw.check_layer_count(cfg.layers, "vision_config.layers")?;
        let blocks = (0..cfg.layers)
            .map(|i| Block::load(backend, &bw.pp(i), cfg, dtype, quant))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight: pe.tensor(backend, "weight", &[c, 3, p, p], dtype)?,
            patch_bias: pe.tensor(backend, "bias", &[c], dtype)?,
            cls_token: w.tensor(backend, "cls_token", &[1, 1, c], dtype)?,
            pos_embed: w.tensor(backend, "pos_embed", &[1, cfg.num_patches() + 1, c], dtype)?,
            blocks,
            dtype,
        })
    }

    pub fn config(&self) -> &EvaConfig {
        &self.cfg
    }

    /// The dtype the weights were loaded in; inputs are cast to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `pixels` `[B, 3, S, S]` (normalised, `S = image_size`) -> the raw
    /// last-block output `[B, 1 + grid², width]`, CLS token first.
    pub fn forward(&self, pixels: &Tensor<B>) -> Result<Tensor<B>> {
        pixels.backend().run(|| self.forward_here(pixels))
    }

    fn forward_here(&self, pixels: &Tensor<B>) -> Result<Tensor<B>> {
        let s = self.cfg.image_size;
        let dims = pixels.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s {
            // Upstream's PatchEmbed asserts the size too: the position table has no interpolation.
            return Err(VisionError::InvalidArgument(format!(
                "expected pixels of shape [B, 3, {s}, {s}], found {dims:?}"
            )));
        }
        let b = dims[0];
        let (c, n) = (self.cfg.width, self.cfg.num_patches());
        let x = pixels.to_dtype(self.dtype)?;
        let p = self.cfg.patch_size;
        let t = x.conv2d(&self.patch_weight, Some(&self.patch_bias), Conv2dParams::new(p, 0))?;
        // Raster order of the patches: token k = row * grid + col.
        let t = t.reshape(&[b, c, n])?.permute(&[0, 2, 1])?;
        let cls = self.cls_token.broadcast_to(&[b, 1, c])?;
        let mut t = Tensor::concat(&[&cls, &t], 1)?.add(&self.pos_embed)?;
        for blk in &self.blocks {
            t = blk.forward(&t)?;
        }
        Ok(t)
    }

    /// Drops the CLS token and average-pools the patch grid to `n_query`
    /// tokens: `[B, 1 + grid², C]` -> `[B, n_query, C]`, raster order.
    pub fn pool(&self, features: &Tensor<B>, n_query: usize) -> Result<Tensor<B>> {
        let stride = self.cfg.pool_stride(n_query)?;
        let (g, n) = (self.cfg.grid_size(), self.cfg.num_patches());
        let dims = features.dims();
        if dims.len() != 3 || dims[1] != n + 1 {
            return Err(VisionError::InvalidArgument(format!(
                "expected features of shape [B, {}, C], found {dims:?}",
                n + 1
            )));
        }
        let (b, c) = (dims[0], dims[2]);
        let grid = features.narrow(1, 1, n)?.permute(&[0, 2, 1])?.reshape(&[b, c, g, g])?;
        let pooled = grid.avg_pool2d((stride, stride), (stride, stride))?;
        Ok(pooled.reshape(&[b, c, n_query])?.permute(&[0, 2, 1])?)
    }
}

/// Key prefixes of the `visual` module in the known checkpoint layouts, and
/// where the `project_up` weight that goes with each may be (first found wins).
const LAYOUTS: &[(&str, &[&str])] = &[
    // Hugging Face EmuForCausalLM (Emu2, Emu2-Chat, Emu2-Gen's multimodal_encoder/).
    ("model.visual.", &["project_up.weight"]),
    // Native EmuModel state dicts (Emu2 / Emu2-Chat .bin/.pth): upstream's
    // `lm.py` keeps the projections inside the language model.
    ("visual.", &["decoder.lm.project_up.weight", "project_up.weight"]),
    // Native Emu2-Gen single file (EmuVisualGeneration).
    (
        "multimodal_encoder.visual.",
        &[
            "multimodal_encoder.decoder.lm.project_up.weight",
            "multimodal_encoder.project_up.weight",
        ],
    ),
];

/// The Emu2 vision side as a unit: the ViT plus `project_up`, with the
/// pooling the LLM expects. Usable on its own (e.g. to embed images).
#[derive(Debug, Clone)]
pub struct VisionEncoder<B: Backend> {
    config: EmuVisionConfig,
    vit: EvaVisionTransformer<B>,
    project_up: Option<Tensor<B>>,
}

impl<B: Backend> VisionEncoder<B> {
    /// Loads from a checkpoint directory holding `config.json` and weights
    /// (anything [`Checkpoint::open_dir`] reads). An Emu2-Gen pipeline root
    /// is accepted too: its `multimodal_encoder/` folder is used. When the
    /// plain files cannot be opened but a `bf16` variant can, the variant is
    /// used: Emu2-Gen ships only `model.bf16-*` shards, beside a plain index
    /// whose shards are absent.
    pub fn from_dir(backend: &B, dir: impl AsRef<Path>, dtype: DType) -> Result<Self> {
        let dir = resolve_dir(dir.as_ref());
        let config = EmuVisionConfig::from_file(dir.join("config.json"))?;
        let ckpt = match Checkpoint::open_dir(&dir, None) {
            Ok(c) => c,
            Err(plain) => Checkpoint::open_dir(&dir, Some("bf16")).map_err(|_| plain)?,
        };
        Self::load(backend, &Weights::new(&ckpt), config, dtype)
    }

    /// Loads from a checkpoint file or directory without a `config.json`,
    /// such as the native `Emu2_pytorch_model.bf16.bin` or
    /// `Emu2-Gen_pytorch_model.bf16.safetensors`, with the given config
    /// (usually [`EmuVisionConfig::emu2`]).
    pub fn from_checkpoint(backend: &B, path: impl AsRef<Path>, config: EmuVisionConfig, dtype: DType) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        Self::load(backend, &Weights::new(&ckpt), config, dtype)
    }

    /// Loads from a checkpoint view at its root, finding which key layout it uses.
    pub fn load(backend: &B, root: &Weights, config: EmuVisionConfig, dtype: DType) -> Result<Self> {
        Self::load_quantized(backend, root, config, dtype, BlockQuant::default())
    }

    /// [`VisionEncoder::load`] with the ViT blocks' linears that `quant`
    /// selects block-quantized (see [`EvaVisionTransformer::load_quantized`]);
    /// `project_up` stays in `dtype`, as the LLM's embeddings do.
    pub fn load_quantized(
        backend: &B,
        root: &Weights,
        config: EmuVisionConfig,
        dtype: DType,
        quant: BlockQuant,
    ) -> Result<Self> {
        let (prefix, up_keys) = LAYOUTS
            .iter()
            .find(|(prefix, _)| root.contains(&format!("{prefix}cls_token")))
            .ok_or_else(|| VisionError::NoVisionWeights {
                location: root.checkpoint().origin().display().to_string(),
                tried: LAYOUTS.iter().map(|(p, _)| format!("{}{p}", root.prefix())).collect(),
            })?;
        let visual = Weights::with_prefix(root.checkpoint(), format!("{}{prefix}", root.prefix()));
        let vit = EvaVisionTransformer::load_quantized(backend, &visual, &config.vision, dtype, quant)?;
        // project_up is optional so that encoder-only checkpoints load; its
        // output width comes from the config when known, else from the tensor.
        let project_up = if let Some(up_key) = up_keys.iter().copied().find(|k| root.contains(k)) {
            // The config's hidden_size when given (checked against the tensor), else the tensor's.
            let out = match config.hidden_size {
                Some(h) => h,
                None => root.info(up_key)?.dims.first().copied().unwrap_or(0),
            };
            Some(root.tensor(backend, up_key, &[out, config.d_model], dtype)?)
        } else {
            None
        };
        Ok(Self {
            config,
            vit,
            project_up,
        })
    }

    pub fn config(&self) -> &EmuVisionConfig {
        &self.config
    }

    pub fn vit(&self) -> &EvaVisionTransformer<B> {
        &self.vit
    }

    /// Raw ViT features `[B, 1 + grid², d_model]` (CLS first) of normalised pixels.
    pub fn encode(&self, pixels: &Tensor<B>) -> Result<Tensor<B>> {
        self.vit.forward(pixels)
    }

    /// CLS dropped, grid average-pooled to `n_query` tokens.
    pub fn pool(&self, features: &Tensor<B>, n_query: usize) -> Result<Tensor<B>> {
        self.vit.pool(features, n_query)
    }

    /// `project_up`: `[.., d_model]` -> `[.., hidden_size]`.
    pub fn project(&self, tokens: &Tensor<B>) -> Result<Tensor<B>> {
        let w = self
            .project_up
            .as_ref()
            .ok_or_else(|| VisionError::InvalidArgument("this checkpoint has no project_up weight".into()))?;
        Ok(tokens.linear(w, None)?)
    }

    /// Pixels to LLM input embeddings: encode, pool to `n_query`, project.
    pub fn embed_images(&self, pixels: &Tensor<B>, n_query: usize) -> Result<Tensor<B>> {
        self.project(&self.pool(&self.encode(pixels)?, n_query)?)
    }
}

/// Which group of [`BlockQuant`] the checkpoint tensor `key` belongs to,
/// when it is a linear weight of an EVA block in any of the known layouts
/// (`…visual.blocks.N.attn.qkv.weight` is attention, `….mlp.fc1.weight`
/// MLP); `None` for everything else, the LLM's tensors included.
pub fn linear_group(key: &str) -> Option<LinearGroup> {
    let rest = &key[key.find("visual.blocks.")? + "visual.blocks.".len()..];
    let (layer, module) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    match module {
        "attn.qkv.weight" | "attn.proj.weight" => Some(LinearGroup::Attention),
        "mlp.fc1.weight" | "mlp.fc2.weight" => Some(LinearGroup::Mlp),
        _ => None,
    }
}

fn resolve_dir(dir: &Path) -> PathBuf {
    let sub = dir.join("multimodal_encoder");
    if !dir.join("config.json").exists() && sub.join("config.json").exists() {
        sub
    } else {
        dir.to_path_buf()
    }
}
