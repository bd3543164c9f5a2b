//! The LLaMA decoder (transformers' `LlamaForCausalLM`) over any [`Backend`],
//! fed by input embeddings, with a preallocated KV cache.

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::quant::LlmQuant;
use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::{Backend, DType, HostTensor, LinearWeight, Tensor};

/// Token ids whose embeddings are replaced by visual embeddings
/// (SPEC §3.4). The defaults are Emu2's `<image>` and `[gIMG]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotIds {
    /// `<image>`: filled, in order, with projected image tokens.
    pub image: u32,
    /// `[gIMG]`: filled, in order, with projected video-frame tokens.
    pub video: u32,
}

impl Default for SlotIds {
    fn default() -> Self {
        Self {
            image: 32003,
            video: 32004,
        }
    }
}

/// A bias-free `nn.Linear`, with its weight on the device in the model dtype
/// or block-quantized (see [`emu_core::quant`]).
pub type Linear<B> = LinearWeight<B>;

/// `LlamaRMSNorm`.
#[derive(Debug, Clone)]
pub struct RmsNorm<B: Backend> {
    pub weight: Tensor<B>,
    eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    fn load(backend: &B, w: &Weights, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(backend, "weight", &[dim], dtype)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(x.rms_norm(&self.weight, self.eps)?)
    }
}

/// `LlamaAttention`: q/k/v/o projections, RoPE, grouped-query attention.
#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// `LlamaMLP`: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let g = self.gate_proj.forward(x, None)?.silu()?;
        let u = self.up_proj.forward(x, None)?;
        Ok(self.down_proj.forward(&g.mul(&u)?, None)?)
    }
}

/// `LlamaDecoderLayer` (pre-norm residual blocks).
#[derive(Debug, Clone)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

/// Which positions [`Llama::forward_embeds`] computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[B, T, V]`.
    All,
    /// The last position only: `[B, 1, V]` (generation).
    Last,
    /// None (the visual regression only needs hidden states).
    Skip,
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct LlamaOutput<B: Backend> {
    /// Last-layer hidden states after the final RMSNorm, `[B, T, H]`.
    pub hidden: Tensor<B>,
    /// `lm_head` outputs in the model dtype, as selected by [`Logits`].
    pub logits: Option<Tensor<B>>,
}

/// The per-layer key/value buffers of a batch of sequences.
///
/// Buffers are preallocated to `capacity` positions (`[B, Hkv, capacity, D]`)
/// and written in place; attention always runs over the whole buffer and
/// the causal mask hides the slots not written yet, so shapes stay fixed
/// from step to step. Left-padded batches carry an additive bias that hides
/// each sequence's padding slots, and per-sequence RoPE positions.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    k: Vec<Option<Tensor<B>>>,
    v: Vec<Option<Tensor<B>>>,
    len: usize,
    capacity: usize,
    pad: Vec<usize>,
    bias: Option<Tensor<B>>,
}

impl<B: Backend> KvCache<B> {
    /// Positions written so far (including left padding).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    /// Left-padding length of each sequence.
    pub fn padding(&self) -> &[usize] {
        &self.pad
    }

    /// Rebuilds the cache from the sequences `rows` (indices into the current
    /// batch, repeats allowed): beam-search reordering, or expanding one
    /// prompt into several beams.
    pub fn select(&mut self, rows: &[u32]) -> Result<()> {
        let n = self.batch();
        if rows.is_empty() {
            return Err(Error::Input("KvCache::select: no rows".into()));
        }
        if let Some(bad) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(Error::Input(format!("KvCache::select: row {bad} of a batch of {n}")));
        }
        let Some(first) = self.k.iter().flatten().next() else {
            return Err(Error::Input("KvCache::select on an empty model".into()));
        };
        let ids = Tensor::from_u32(first.backend(), &[rows.len()], rows.to_vec())?;
        for slot in self.k.iter_mut().chain(self.v.iter_mut()) {
            let t = slot
                .take()
                .ok_or_else(|| Error::Input("KvCache buffer missing".into()))?;
            *slot = Some(t.index_select(&ids, 0)?);
        }
        if let Some(b) = &self.bias {
            self.bias = Some(b.index_select(&ids, 0)?);
        }
        self.pad = rows.iter().map(|&r| self.pad[r as usize]).collect();
        Ok(())
    }
}

/// transformers' `LlamaForCausalLM`.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    pub embed_tokens: Tensor<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    cfg: LlamaConfig,
    dtype: DType,
    backend: B,
    /// RoPE tables `[max_position_embeddings, head_dim / 2]` in the model
    /// dtype, computed once on the host like transformers' rotary embedding.
    cos: Tensor<B>,
    sin: Tensor<B>,
}

/// Where the LLaMA module sits in the known checkpoint layouts, in the order
/// they are tried: HF Emu2 (`EmuForCausalLM`), native Emu2, native Emu2-Gen,
/// and a plain `LlamaForCausalLM` save.
pub const LM_PREFIXES: [&str; 4] = ["model.decoder.lm.", "decoder.lm.", "multimodal_encoder.decoder.lm.", ""];

/// The view of `ckpt` rooted at the LLaMA module (the level that holds
/// `model.embed_tokens.weight` and `lm_head.weight`), found among
/// [`LM_PREFIXES`].
pub fn lm_weights(ckpt: &Checkpoint) -> Result<Weights> {
    Ok(Weights::resolve_prefix(
        ckpt,
        &LM_PREFIXES,
        "model.embed_tokens.weight",
    )?)
}

/// RoPE cos/sin tables as transformers computes them: `inv_freq` and the
/// angles in f32, then cos/sin (here in f64, rounded once to f32).
fn rope_tables(cfg: &LlamaConfig) -> Result<(HostTensor, HostTensor)> {
    let half = cfg.head_dim / 2;
    let n = cfg.max_position_embeddings;
    let base = cfg.rope_theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv_freq {
            let a = (p as f32 * f) as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        HostTensor::from_f32(&[n, half], cos)?,
        HostTensor::from_f32(&[n, half], sin)?,
    ))
}

impl<B: Backend> Llama<B> {
    /// Loads the weights under `weights` (see [`lm_weights`]),
    /// converted to `dtype`; every shape is checked against `cfg`.
    pub fn load(backend: &B, weights: &Weights, cfg: &LlamaConfig, dtype: DType) -> Result<Self> {
        Self::load_quantized(backend, weights, cfg, dtype, None)
    }

    /// [`Llama::load`], with the linears `quant` selects block-quantized
    /// while loading (tensor by tensor: the host holds one f32 tensor at a
    /// time). Embeddings and norms stay in `dtype`.
    pub fn load_quantized(
        backend: &B,
        weights: &Weights,
        cfg: &LlamaConfig,
        dtype: DType,
        quant: Option<&LlmQuant>,
    ) -> Result<Self> {
        let pick = |on: fn(&LlmQuant) -> bool| quant.filter(|q| on(q)).map(|q| q.qtype);
        let (qa, qm, qh) = (
            pick(|q| q.linears.attention),
            pick(|q| q.linears.mlp),
            pick(|q| q.linears.lm_head),
        );
        if !dtype.is_float() || !backend.supports(dtype) {
            return Err(Error::Input(format!(
                "cannot run the LLM in {dtype} on backend `{}`",
                backend.name()
            )));
        }
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let m = weights.pp("model");
        m.pp("layers")
            .check_layer_count(cfg.num_hidden_layers, "num_hidden_layers")?;
        let embed_tokens = m.tensor(backend, "embed_tokens.weight", &[cfg.vocab_size, h], dtype)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let mlp = l.pp("mlp");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: Linear::load(backend, &a.pp("q_proj"), nh * d, h, dtype, qa)?,
                    k_proj: Linear::load(backend, &a.pp("k_proj"), nkv * d, h, dtype, qa)?,
                    v_proj: Linear::load(backend, &a.pp("v_proj"), nkv * d, h, dtype, qa)?,
                    o_proj: Linear::load(backend, &a.pp("o_proj"), h, nh * d, dtype, qa)?,
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: d,
                },
                mlp: Mlp {
                    gate_proj: Linear::load(backend, &mlp.pp("gate_proj"), cfg.intermediate_size, h, dtype, qm)?,
                    up_proj: Linear::load(backend, &mlp.pp("up_proj"), cfg.intermediate_size, h, dtype, qm)?,
                    down_proj: Linear::load(backend, &mlp.pp("down_proj"), h, cfg.intermediate_size, dtype, qm)?,
                },
                input_layernorm: RmsNorm::load(backend, &l.pp("input_layernorm"), h, cfg.rms_norm_eps, dtype)?,
                post_attention_layernorm: RmsNorm::load(
                    backend,
                    &l.pp("post_attention_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                    dtype,
                )?,
            });
        }
        let norm = RmsNorm::load(backend, &m.pp("norm"), h, cfg.rms_norm_eps, dtype)?;
        let tied = cfg.tie_word_embeddings && !weights.contains("lm_head.weight");
        let lm_head = match (tied, qh) {
            (true, None) => Linear::Dense(embed_tokens.clone()),
            (true, Some(_)) => Linear::load(backend, &m.pp("embed_tokens"), cfg.vocab_size, h, dtype, qh)?,
            (false, _) => Linear::load(backend, &weights.pp("lm_head"), cfg.vocab_size, h, dtype, qh)?,
        };
        let (cos, sin) = rope_tables(cfg)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
            dtype,
            backend: backend.clone(),
            cos: Tensor::from_host(backend, &cos.to_dtype(dtype)?)?,
            sin: Tensor::from_host(backend, &sin.to_dtype(dtype)?)?,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Every linear layer, in load order (for reports of formats and memory).
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let mut v = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            v.extend([
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]);
        }
        v.push(&self.lm_head);
        v
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// An empty cache for `batch` unpadded sequences of up to `capacity`
    /// positions (at most `max_position_embeddings`).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache<B>> {
        self.new_cache_padded(&vec![0; batch], capacity)
    }

    /// An empty cache for a left-padded batch: sequence `b` starts with
    /// `padding[b]` padding positions, which no query attends to and which do
    /// not count towards the sequence's RoPE positions (transformers'
    /// `attention_mask` / `position_ids` for left padding).
    pub fn new_cache_padded(&self, padding: &[usize], capacity: usize) -> Result<KvCache<B>> {
        let batch = padding.len();
        if batch == 0 || capacity == 0 {
            return Err(Error::Input(format!(
                "a KV cache needs a batch and a capacity, got {batch} x {capacity}"
            )));
        }
        if capacity > self.cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                needed: capacity,
                capacity: self.cfg.max_position_embeddings,
            });
        }
        if let Some(&p) = padding.iter().find(|&&p| p >= capacity) {
            return Err(Error::Input(format!(
                "left padding of {p} does not fit a cache of {capacity}"
            )));
        }
        let dims = [batch, self.cfg.num_key_value_heads, capacity, self.cfg.head_dim];
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in 0..self.layers.len() {
            k.push(Some(Tensor::zeros(&self.backend, &dims, self.dtype)?));
            v.push(Some(Tensor::zeros(&self.backend, &dims, self.dtype)?));
        }
        let bias = if padding.iter().any(|&p| p > 0) {
            let mut b = vec![0f32; batch * capacity];
            for (row, &p) in padding.iter().enumerate() {
                for x in &mut b[row * capacity..row * capacity + p] {
                    *x = emu_core::backend::MASK_VALUE as f32;
                }
            }
            Some(Tensor::from_f32(&self.backend, &[batch, 1, 1, capacity], b)?)
        } else {
            None
        };
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
            pad: padding.to_vec(),
            bias,
        })
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Token embeddings of `ids` (row-major `[batch, ids.len() / batch]`),
    /// `[B, T, H]`.
    pub fn embed(&self, ids: &[u32], batch: usize) -> Result<Tensor<B>> {
        let t = seq_len(ids.len(), batch)?;
        self.check_ids(ids)?;
        let idx = Tensor::from_u32(&self.backend, &[ids.len()], ids.to_vec())?;
        let e = self.embed_tokens.index_select(&idx, 0)?;
        Ok(e.reshape(&[batch, t, self.cfg.hidden_size])?)
    }

    /// Token embeddings with the visual slots filled (SPEC §3.4): the rows
    /// whose id is `slots.image` take the rows of `image` (`[Ni, H]`) in
    /// sequence order (batch-major), those with `slots.video` the rows of
    /// `video`. The slot count must equal the number of rows given.
    /// Runs as one gather over `[embeddings; image; video]`.
    pub fn embed_with_visual(
        &self,
        ids: &[u32],
        batch: usize,
        image: Option<&Tensor<B>>,
        video: Option<&Tensor<B>>,
        slots: SlotIds,
    ) -> Result<Tensor<B>> {
        let t = seq_len(ids.len(), batch)?;
        self.check_ids(ids)?;
        let h = self.cfg.hidden_size;
        let rows = |x: Option<&Tensor<B>>, what: &str| -> Result<usize> {
            match x {
                None => Ok(0),
                Some(x) => match x.dims().as_slice() {
                    [n, w] if *w == h => Ok(*n),
                    d => Err(Error::Input(format!("{what} embeddings must be [N, {h}], found {d:?}"))),
                },
            }
        };
        let (ni, nv) = (rows(image, "image")?, rows(video, "video")?);
        let si = ids.iter().filter(|&&i| i == slots.image).count();
        let sv = ids.iter().filter(|&&i| i == slots.video).count();
        if si != ni {
            return Err(Error::SlotCount {
                what: "image",
                token_id: slots.image,
                slots: si,
                given: ni,
            });
        }
        if sv != nv {
            return Err(Error::SlotCount {
                what: "video",
                token_id: slots.video,
                slots: sv,
                given: nv,
            });
        }
        let n = ids.len();
        let idx = Tensor::from_u32(&self.backend, &[n], ids.to_vec())?;
        let text = self.embed_tokens.index_select(&idx, 0)?;
        if ni + nv == 0 {
            return Ok(text.reshape(&[batch, t, h])?);
        }
        let mut parts = vec![text];
        for x in [image, video].into_iter().flatten() {
            parts.push(x.to_dtype(self.dtype)?);
        }
        let refs: Vec<&Tensor<B>> = parts.iter().collect();
        let table = Tensor::concat(&refs, 0)?;
        let (mut next_i, mut next_v) = (n, n + ni);
        let gather: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(p, &id)| {
                let r = if id == slots.image {
                    next_i += 1;
                    next_i - 1
                } else if id == slots.video {
                    next_v += 1;
                    next_v - 1
                } else {
                    p
                };
                r as u32
            })
            .collect();
        let g = Tensor::from_u32(&self.backend, &[n], gather)?;
        Ok(table.index_select(&g, 0)?.reshape(&[batch, t, h])?)
    }

    /// Applies `lm_head` to hidden states `[.., H]`.
    pub fn logits(&self, hidden: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(self.lm_head.forward(hidden, None)?)
    }

    /// Runs `embeds` (`[B, T, H]`, the next `T` positions of every sequence)
    /// through the decoder, appending their keys/values to `cache`.
    pub fn forward_embeds(&self, embeds: &Tensor<B>, cache: &mut KvCache<B>, logits: Logits) -> Result<LlamaOutput<B>> {
        self.backend.run(|| self.forward_here(embeds, cache, logits))
    }

    fn forward_here(&self, embeds: &Tensor<B>, cache: &mut KvCache<B>, logits: Logits) -> Result<LlamaOutput<B>> {
        let (b, t) = self.embeds_shape(embeds)?;
        if b != cache.batch() {
            return Err(Error::Input(format!(
                "a batch of {b} sequences run on a cache of {}",
                cache.batch()
            )));
        }
        self.check_cache(cache, t)?;
        let start = cache.len;
        let (cos, sin) = self.rope_for(cache, t)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(layer, &x, &cos, &sin, cache, i, start)?;
        }
        cache.len = start + t;
        self.output(&x, t, logits)
    }

    /// `(B, T)` of decoder input embeddings `[B, T, H]`, `T > 0`.
    fn embeds_shape(&self, embeds: &Tensor<B>) -> Result<(usize, usize)> {
        match embeds.dims().as_slice() {
            [b, t, h] if *h == self.cfg.hidden_size && *t > 0 => Ok((*b, *t)),
            dims => Err(Error::Input(format!(
                "embeddings must be [B, T, {}] with T > 0, found {dims:?}",
                self.cfg.hidden_size
            ))),
        }
    }

    /// That `cache` belongs to this model and has room for `t` more positions.
    fn check_cache(&self, cache: &KvCache<B>, t: usize) -> Result<()> {
        if cache.k.len() != self.layers.len() {
            return Err(Error::Input(format!(
                "a cache of {} layers used with a model of {}",
                cache.k.len(),
                self.layers.len()
            )));
        }
        if cache.len + t > cache.capacity {
            return Err(Error::ContextOverflow {
                needed: cache.len + t,
                capacity: cache.capacity,
            });
        }
        Ok(())
    }

    /// The final norm of the last layer's output `x` (`T` positions), and
    /// the logits `logits` asks for.
    fn output(&self, x: &Tensor<B>, t: usize, logits: Logits) -> Result<LlamaOutput<B>> {
        let hidden = self.norm.forward(x)?;
        let logits = match logits {
            Logits::All => Some(self.logits(&hidden)?),
            Logits::Last => Some(self.logits(&hidden.narrow(1, t - 1, 1)?)?),
            Logits::Skip => None,
        };
        Ok(LlamaOutput { hidden, logits })
    }

    /// cos/sin for positions `len .. len + t`: a slice of the table, or, for
    /// padded batches, a gather of each sequence's own positions.
    fn rope_for(&self, cache: &KvCache<B>, t: usize) -> Result<(Tensor<B>, Tensor<B>)> {
        let start = cache.len;
        if cache.bias.is_none() {
            return Ok((self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?));
        }
        let b = cache.batch();
        let mut pos = Vec::with_capacity(b * t);
        for &p in &cache.pad {
            for s in start..start + t {
                // Padding slots get position 0; their keys are never attended to.
                pos.push(s.saturating_sub(p) as u32);
            }
        }
        let idx = Tensor::from_u32(&self.backend, &[b * t], pos)?;
        let half = self.cfg.head_dim / 2;
        Ok((
            self.cos.index_select(&idx, 0)?.reshape(&[b, t, half])?,
            self.sin.index_select(&idx, 0)?.reshape(&[b, t, half])?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &DecoderLayer<B>,
        x: &Tensor<B>,
        cos: &Tensor<B>,
        sin: &Tensor<B>,
        cache: &mut KvCache<B>,
        i: usize,
        start: usize,
    ) -> Result<Tensor<B>> {
        let a = &layer.self_attn;
        let h = layer.input_layernorm.forward(x)?;
        let (q, k, v) = (
            a.q_proj.forward(&h, None)?,
            a.k_proj.forward(&h, None)?,
            a.v_proj.forward(&h, None)?,
        );
        let attn = attend(a, &q, &k, &v, cos, sin, cache, i, start)?;
        layer_rest(layer, x, &attn)
    }

    /// Runs `embeds` (`[B, T, H]`) where row `r` continues `caches[r]`, a
    /// cache of one sequence of its own (lengths and capacities may differ).
    /// The linear layers see all rows at once; attention, RoPE and the cache
    /// writes run per row on that row's cache, exactly as
    /// [`Llama::forward_embeds`] runs them for the sequence alone. No row is
    /// padded, so on a backend whose `linear` computes each row the same
    /// whatever the other rows (the CPU backend's small-batch kernel does),
    /// every row's result is bit for bit its result alone.
    pub fn forward_rows(
        &self,
        embeds: &Tensor<B>,
        caches: &mut [&mut KvCache<B>],
        logits: Logits,
    ) -> Result<LlamaOutput<B>> {
        let (b, t) = self.embeds_shape(embeds)?;
        if b != caches.len() {
            return Err(Error::Input(format!("{b} sequences run on {} caches", caches.len())));
        }
        let mut ropes = Vec::with_capacity(b);
        for c in caches.iter() {
            if c.batch() != 1 {
                return Err(Error::Input(format!(
                    "forward_rows takes caches of one sequence, found one of {}",
                    c.batch()
                )));
            }
            self.check_cache(c, t)?;
            ropes.push(self.rope_for(c, t)?);
        }
        let mut x = embeds.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let h = layer.input_layernorm.forward(&x)?;
            let (q, k, v) = (
                a.q_proj.forward(&h, None)?,
                a.k_proj.forward(&h, None)?,
                a.v_proj.forward(&h, None)?,
            );
            let mut rows = Vec::with_capacity(b);
            for (r, (cache, (cos, sin))) in caches.iter_mut().zip(&ropes).enumerate() {
                let row = |y: &Tensor<B>| y.narrow(0, r, 1);
                let start = cache.len;
                rows.push(attend(a, &row(&q)?, &row(&k)?, &row(&v)?, cos, sin, cache, i, start)?);
            }
            let refs: Vec<&Tensor<B>> = rows.iter().collect();
            let attn = Tensor::concat(&refs, 0)?;
            x = layer_rest(layer, &x, &attn)?;
        }
        for c in caches.iter_mut() {
            c.len += t;
        }
        self.output(&x, t, logits)
    }
}

/// The rest of a decoder layer after attention: `o_proj` and the residual,
/// then the MLP block and its residual.
fn layer_rest<B: Backend>(layer: &DecoderLayer<B>, x: &Tensor<B>, attn: &Tensor<B>) -> Result<Tensor<B>> {
    let a = &layer.self_attn;
    let x = x.add(&a.o_proj.forward(attn, None)?)?;
    let h = layer.post_attention_layernorm.forward(&x)?;
    Ok(x.add(&layer.mlp.forward(&h)?)?)
}

/// Self-attention of projected `q`, `k`, `v` (`[B, T, heads * D]`) over
/// `cache` (layer `i`), whose next free position is `start`; writes the new
/// keys and values into the cache. Returns `[B, T, heads * D]`.
#[allow(clippy::too_many_arguments)]
fn attend<B: Backend>(
    a: &Attention<B>,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    cos: &Tensor<B>,
    sin: &Tensor<B>,
    cache: &mut KvCache<B>,
    i: usize,
    start: usize,
) -> Result<Tensor<B>> {
    let dims = q.dims();
    let (b, t) = (dims[0], dims[1]);
    let heads = |y: &Tensor<B>, n: usize| -> Result<Tensor<B>> {
        Ok(y.reshape(&[b, t, n, a.head_dim])?.permute(&[0, 2, 1, 3])?)
    };
    let q = heads(q, a.num_heads)?.rope(cos, sin)?;
    let k = heads(k, a.num_kv_heads)?.rope(cos, sin)?;
    let v = heads(v, a.num_kv_heads)?;
    let missing = || Error::Input("KvCache buffer missing".into());
    let kc = cache.k[i].take().ok_or_else(missing)?.slice_set(&k, 2, start)?;
    let vc = cache.v[i].take().ok_or_else(missing)?.slice_set(&v, 2, start)?;
    let scale = 1.0 / (a.head_dim as f64).sqrt();
    let attn = q.attention(&kc, &vc, Some(start), cache.bias.as_ref(), scale);
    cache.k[i] = Some(kc);
    cache.v[i] = Some(vc);
    Ok(attn?
        .permute(&[0, 2, 1, 3])?
        .reshape(&[b, t, a.num_heads * a.head_dim])?)
}

// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#[allow(clippy::manual_is_multiple_of)]
fn seq_len(n: usize, batch: usize) -> Result<usize> {
    if batch == 0 || n == 0 || n % batch != 0 {
        return Err(Error::Input(format!(
            "{n} token ids do not form a batch of {batch} non-empty sequences"
        )));
    }
    Ok(n / batch)
}
