//! Memory preflight of whole runs: before a model is loaded, and again
//! before each step whose size follows from the request, estimate what will
//! become resident and refuse with the numbers when it cannot fit. An
//! allocation that fails aborts a Rust process with no message we control
//! (`memory allocation of N bytes failed`); a refusal names what needs how
//! much, what is available, and what to change.
//!
//! What is counted:
//! * **weights** as they will be resident: checkpoints are memory-mapped
//!   and read one tensor at a time, converted to the compute dtype and
//!   copied to the backend, so a component holds its element count times
//!   its dtype's size (block bytes for quantized LLM linears, which stay on
//!   the host whatever the backend), plus the largest tensor twice while it
//!   is read and converted. The mapped file pages themselves are page cache
//!   the kernel can drop, so they are not counted.
//! * the LLM's **KV cache** (layers × 2 × beams × context × kv heads × head
//!   dim × dtype size) and its prefill **activations**, checked once the
//!   prompt's length is known;
//! * the vision encoder's activations per batch of pictures, and the
//!   decoder's attention matrices (`emu_decoder` estimates them).
//!
//! Weights are counted per component ([`Stage`]): all of them at once when
//! every component stays resident, each alone under `--offload sequential`
//! ([`crate::pipeline::Residency`]), where the peak is the largest stage
//! ([`check_stages`], [`peak`], [`load_peak`]).
//!
//! Each amount is compared with the memory of where it will live: the
//! host's available memory ([`host_available`]: `MemAvailable` and the
//! cgroup limit, or `EMU_MEMORY_AVAILABLE`), a CUDA device's free memory
//! (`emu_backend_cuda::preflight`), or nothing for a wgpu GPU, whose free
//! memory wgpu cannot report. Checks made after loading compare with what
//! is available then, so resident weights are already accounted for.
//! `emu --no-memory-check` or `EMU_NO_MEMORY_CHECK=1` turns every check off.

use crate::pipeline::{PipelineError, Residency, Result};
use emu_core::checkpoint::Checkpoint;
use emu_core::quant::QuantType;
use emu_core::{Backend, DType};
use emu_llm::{LlamaConfig, LlmQuant};
use emu_vision::EvaConfig;

/// `EMU_MEMORY_AVAILABLE=SIZE` (e.g. `24GiB`, `500MB`, bytes): the host
/// memory to assume available instead of reading it from the system, to
/// keep a run within a budget or where the system's figure misleads.
pub const AVAILABLE_ENV: &str = "EMU_MEMORY_AVAILABLE";
pub use emu_core::memory::NO_CHECK_ENV;

/// `bytes` for messages: GiB with one decimal from 1 GiB up (whatever the
/// size, so messages compare at a glance), MiB or KiB below.
pub fn size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        emu_core::memory::gib(bytes)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.1} KiB", b / KIB)
    }
}

/// Turns every memory check of this process off (`--no-memory-check`).
pub fn disable_checks() {
    emu_core::memory::set_enabled(false);
}

/// Host memory available to this run: `EMU_MEMORY_AVAILABLE` when set,
/// else [`emu_core::memory::available`]; `None` when unknown.
pub fn host_available() -> Result<Option<u64>> {
    match std::env::var(AVAILABLE_ENV) {
        Ok(v) => crate::units::parse_size(&v)
            .map(Some)
            .map_err(|e| PipelineError::Input(format!("{AVAILABLE_ENV}: {e}"))),
        Err(_) => Ok(emu_core::memory::available()),
    }
}

/// Where a backend keeps its tensors.
#[derive(Debug, Clone, PartialEq)]
pub enum Pool {
    /// Host memory (the CPU and ONNX Runtime backends, wgpu on a CPU adapter).
    Host,
    /// A CUDA device and its `(free, total)` bytes when the driver reports them.
    Cuda { name: String, mem: Option<(u64, u64)> },
    /// A GPU whose free memory cannot be queried (wgpu): not checked.
    Gpu { name: String },
}

impl Pool {
    /// Whether two pools are the same memory (a device queried twice may
    /// report different free bytes, so devices compare by name).
    fn same(&self, other: &Pool) -> bool {
        match (self, other) {
            (Pool::Host, Pool::Host) => true,
            (Pool::Cuda { name: a, .. }, Pool::Cuda { name: b, .. })
            | (Pool::Gpu { name: a }, Pool::Gpu { name: b }) => a == b,
            _ => false,
        }
    }
}

/// Where `backend` keeps its tensors. The GPU backends are recognised by
/// type, so the model crates' `Backend` trait needs no memory query.
pub fn pool_of<B: Backend>(backend: &B) -> Pool {
    let any = backend as &dyn std::any::Any;
    #[cfg(feature = "cuda")]
    if let Some(c) = any.downcast_ref::<emu_backend_cuda::CudaBackend>() {
        return Pool::Cuda {
            name: format!("device {} ({})", c.ordinal(), c.device_name()),
            mem: c.memory_info().ok().map(|m| (m.free, m.total)),
        };
    }
    #[cfg(feature = "wgpu")]
    if let Some(w) = any.downcast_ref::<emu_backend_wgpu::WgpuBackend>() {
        if !w.uses_host_memory() {
            return Pool::Gpu { name: w.adapter_name() };
        }
    }
    let _ = any;
    Pool::Host
}

/// Memory available in `pool` now (`None`: unknown, not checked).
pub fn available_in(pool: &Pool) -> Result<Option<u64>> {
    match pool {
        Pool::Host => host_available(),
        Pool::Cuda { mem, .. } => Ok(mem.map(|(free, _)| free)),
        Pool::Gpu { .. } => Ok(None),
    }
}

/// One amount of memory a run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    /// The component, as its placement flag names it (`vision`, `llm`, `decoder`).
    pub component: &'static str,
    /// What the bytes hold, for the message (`weights in bf16`, `KV cache (…)`).
    pub what: String,
    pub bytes: u64,
    /// The dtype of weights (`None` for caches and activations), so a
    /// device preflight can say what another dtype would need.
    pub dtype: Option<DType>,
    pub pool: Pool,
}

impl Need {
    fn line(&self) -> String {
        format!("{}: {} {}", self.component, size(self.bytes), self.what)
    }
}

/// Refuses `needs` when their sum in one pool exceeds what that pool has;
/// `what` names the step (`loading the model`), `advice` how to need less.
/// Weights bound for a CUDA device go through the backend's own preflight
/// (`emu_backend_cuda::preflight::check_fits`), which also keeps headroom
/// for the libraries' workspaces and says which `--dtype` or placement fits.
pub fn check(what: &str, needs: &[Need], advice: &str) -> Result<()> {
    if !emu_core::memory::enabled() {
        return Ok(());
    }
    let mut pools: Vec<&Pool> = Vec::new();
    for n in needs {
        if !pools.iter().any(|p| p.same(&n.pool)) {
            pools.push(&n.pool);
        }
    }
    let escape = format!("or if this estimate is wrong, run with --no-memory-check ({NO_CHECK_ENV}=1)");
    for pool in pools {
        let here: Vec<&Need> = needs.iter().filter(|n| n.pool.same(pool)).collect();
        #[cfg(feature = "cuda")]
        if let Pool::Cuda {
            name,
            mem: Some((free, total)),
        } = pool
        {
            let weights: Option<Vec<emu_backend_cuda::Component>> = here
                .iter()
                .map(|n| {
                    n.dtype.map(|d| {
                        let params = n.bytes / d.size_in_bytes() as u64;
                        emu_backend_cuda::Component::new(n.component, params, d)
                    })
                })
                .collect();
            if let Some(components) = weights {
                let mem = emu_backend_cuda::MemoryInfo {
                    free: *free,
                    total: *total,
                };
                emu_backend_cuda::preflight::check_fits(name, &components, mem)
                    .map_err(|e| PipelineError::Memory(format!("{what}: {e}; {escape}")))?;
                continue;
            }
        }
        let total = here.iter().fold(0u64, |a, n| a.saturating_add(n.bytes));
        let Some(have) = available_in(pool)? else {
            continue;
        };
        if total <= have {
            continue;
        }
        let place = match pool {
            Pool::Host => "memory".to_string(),
            Pool::Cuda { name, .. } | Pool::Gpu { name } => format!("memory on {name}"),
        };
        let parts: Vec<String> = here.iter().map(|n| n.line()).collect();
        return Err(PipelineError::Memory(format!(
            "not enough {place} for {what}: need about {} ({}), have {}; {advice}, {escape}",
            size(total),
            parts.join(", "),
            size(have),
        )));
    }
    Ok(())
}

/// What one component needs while it is loaded: its weights (on its
/// backend, and quantized linears on the host) and, while it loads, the
/// largest tensor read in f32 (see [`loading_need`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// The component (`vision`, `llm`, `unet`, `vae`).
    pub name: &'static str,
    pub needs: Vec<Need>,
    /// The largest tensor of its checkpoint in f32.
    pub largest_f32: u64,
}

impl Stage {
    /// The resident bytes of the stage's weights, every pool together.
    pub fn bytes(&self) -> u64 {
        self.needs.iter().fold(0u64, |a, n| a.saturating_add(n.bytes))
    }

    /// The needs of loading this stage alone.
    fn alone(&self) -> Vec<Need> {
        let mut needs = self.needs.clone();
        needs.push(loading_need("loading", self.largest_f32, Pool::Host));
        needs
    }
}

/// Peak weight memory of components of `bytes` each: their sum when all are
/// resident, the largest when they are loaded one stage at a time.
pub fn peak(bytes: &[u64], residency: Residency) -> u64 {
    match residency {
        Residency::All => bytes.iter().fold(0u64, |a, &b| a.saturating_add(b)),
        Residency::Sequential => bytes.iter().copied().max().unwrap_or(0),
    }
}

/// What loading `stages` needs at its peak, every pool together: all of
/// them with the largest tensor's loading transient, or the largest of
/// each stage alone with its own; the amounts [`check_stages`] compares.
pub fn load_peak(stages: &[Stage], residency: Residency) -> u64 {
    let sum = |needs: &[Need]| needs.iter().fold(0u64, |a, n| a.saturating_add(n.bytes));
    match residency {
        Residency::All => sum(&all_at_once(stages)),
        Residency::Sequential => stages.iter().map(|s| sum(&s.alone())).max().unwrap_or(0),
    }
}

/// Every stage resident at once: their needs (weights of one component in
/// one pool and dtype, e.g. the UNet's and the VAE's, merged into one line)
/// plus the largest tensor's loading transient.
fn all_at_once(stages: &[Stage]) -> Vec<Need> {
    let mut needs: Vec<Need> = Vec::new();
    for n in stages.iter().flat_map(|s| &s.needs) {
        let same = |m: &&mut Need| {
            m.component == n.component && m.pool.same(&n.pool) && m.dtype.is_some() && m.dtype == n.dtype
        };
        match needs.iter_mut().find(|m| same(m)) {
            Some(m) => {
                m.bytes = m.bytes.saturating_add(n.bytes);
                m.what = format!("{} + {}", m.what, n.what);
            }
            None => needs.push(n.clone()),
        }
    }
    let largest = stages.iter().map(|s| s.largest_f32).max().unwrap_or(0);
    needs.push(loading_need("loading", largest, Pool::Host));
    needs
}

/// The load-time check of a pipeline made of `stages`: with
/// [`Residency::All`] their sum against each pool; with
/// [`Residency::Sequential`] each stage alone (the peak is the largest
/// stage). When the sum does not fit but every stage alone would, the
/// refusal suggests `--offload sequential`.
pub fn check_stages(what: &str, stages: &[Stage], residency: Residency, advice: &str) -> Result<()> {
    match residency {
        Residency::All => match check(what, &all_at_once(stages), advice) {
            Err(PipelineError::Memory(_))
                if stages.len() > 1 && stages.iter().all(|s| check(what, &s.alone(), "").is_ok()) =>
            {
                let largest = stages.iter().max_by_key(|s| s.bytes()).map_or("", |s| s.name);
                let advice = format!(
                    "{advice}, or --offload sequential (one component in memory at a time; the largest, {largest}, fits)"
                );
                check(what, &all_at_once(stages), &advice)
            }
            other => other,
        },
        Residency::Sequential => {
            for s in stages {
                check(
                    &format!("{what}, {} stage (--offload sequential)", s.name),
                    &s.alone(),
                    advice,
                )?;
            }
            Ok(())
        }
    }
}

/// Bytes of `n` elements of a tensor stored as `stored` and loaded as
/// `dtype` (floats take the compute dtype; integer tensors keep theirs).
fn resident(n: u64, stored: DType, dtype: DType) -> u64 {
    let size = if stored.is_float() { dtype } else { stored };
    n.saturating_mul(size.size_in_bytes() as u64)
}

/// Block bytes of a `[out, inner]` weight in `q`.
fn quant_bytes(out: usize, inner: usize, q: QuantType) -> u64 {
    let blocks = (out as u64).saturating_mul((inner / q.block_size()) as u64);
    blocks.saturating_mul(q.type_size() as u64)
}

/// The LLaMA weights once loaded, split by where they live:
/// `(on the LLM's backend, on the host)`. The second is the block bytes of
/// quantized linears (`QuantTensor`s stay host-side on every backend).
/// `stored` says which checkpoint tensors (keys relative to the LLaMA
/// root, e.g. `model.layers.0.mlp.up_proj.weight`) are already blocks
/// (GGUF); `has_lm_head` whether the checkpoint has its own `lm_head`.
/// Mirrors `emu_llm::Llama::load_quantized`.
pub fn llm_weight_bytes(
    cfg: &LlamaConfig,
    dtype: DType,
    quant: Option<&LlmQuant>,
    stored: &dyn Fn(&str) -> Option<QuantType>,
    has_lm_head: bool,
) -> Result<(u64, u64)> {
    let ds = dtype.size_in_bytes() as u64;
    let (h, d, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let (mut dense, mut host) = (0u64, 0u64);
    let mut linear = |key: String, out: usize, inner: usize, q: Option<&LlmQuant>| -> Result<()> {
        let format = match (stored(&key), q) {
            (Some(s), _) => Some(s),
            (None, Some(q)) => Some(q.format_for(&key, inner)?),
            (None, None) => None,
        };
        match format {
            Some(f) => host = host.saturating_add(quant_bytes(out, inner, f)),
            None => dense = dense.saturating_add((out as u64).saturating_mul(inner as u64).saturating_mul(ds)),
        }
        Ok(())
    };
    let group = |on: fn(&LlmQuant) -> bool| quant.filter(|q| on(q));
    let (qa, qm, qh) = (
        group(|q| q.linears.attention),
        group(|q| q.linears.mlp),
        group(|q| q.linears.lm_head),
    );
    for i in 0..cfg.num_hidden_layers {
        let a = format!("model.layers.{i}.self_attn");
        linear(format!("{a}.q_proj.weight"), nh * d, h, qa)?;
        linear(format!("{a}.k_proj.weight"), nkv * d, h, qa)?;
        linear(format!("{a}.v_proj.weight"), nkv * d, h, qa)?;
        linear(format!("{a}.o_proj.weight"), h, nh * d, qa)?;
        let m = format!("model.layers.{i}.mlp");
        linear(format!("{m}.gate_proj.weight"), inter, h, qm)?;
        linear(format!("{m}.up_proj.weight"), inter, h, qm)?;
        linear(format!("{m}.down_proj.weight"), h, inter, qm)?;
    }
    // A tied head without a quantized copy shares the embedding's tensor.
    let tied = cfg.tie_word_embeddings && !has_lm_head;
    match (tied, qh) {
        (true, None) => {}
        (true, Some(_)) => linear("model.embed_tokens.weight".into(), cfg.vocab_size, h, qh)?,
        (false, _) => linear("lm_head.weight".into(), cfg.vocab_size, h, qh)?,
    }
    let embed = (cfg.vocab_size as u64).saturating_mul(h as u64);
    let norms = (2 * cfg.num_hidden_layers as u64 + 1).saturating_mul(h as u64);
    // RoPE cos and sin tables, [max positions, head_dim / 2] each.
    let rope = 2 * (cfg.max_position_embeddings as u64).saturating_mul((d / 2) as u64);
    dense = dense.saturating_add(embed.saturating_add(norms).saturating_add(rope).saturating_mul(ds));
    Ok((dense, host))
}

/// Bytes of a KV cache: layers × 2 (keys and values) × batch (beams) ×
/// context × kv heads × head dim × dtype size.
pub fn kv_cache_bytes(cfg: &LlamaConfig, batch: usize, context: usize, dtype: DType) -> u64 {
    [
        cfg.num_hidden_layers,
        2,
        batch,
        context,
        cfg.num_key_value_heads,
        cfg.head_dim,
        dtype.size_in_bytes(),
    ]
    .iter()
    .fold(1u64, |a, &x| a.saturating_mul(x as u64))
}

/// The largest buffers of one LLM forward over `tokens` positions of
/// `batch` sequences attending to `context` positions, held at once: f32
/// attention scores and probabilities, the MLP's gate/up/product, a few
/// hidden-state copies, and (for `batch` > 1, beam search) one layer's
/// cache while beams are reordered.
pub fn llm_activation_bytes(cfg: &LlamaConfig, batch: usize, tokens: usize, context: usize, dtype: DType) -> u64 {
    let m = |xs: &[usize]| xs.iter().fold(1u64, |a, &x| a.saturating_mul(x as u64));
    let f32s = 4;
    let scores = m(&[2, batch, cfg.num_attention_heads, tokens, context, f32s]);
    let mlp = m(&[3, batch, tokens, cfg.intermediate_size, f32s]);
    let hidden = m(&[4, batch, tokens, cfg.hidden_size, f32s]);
    let logits = m(&[batch, cfg.vocab_size, f32s]);
    let reorder = if batch > 1 {
        kv_cache_bytes(cfg, batch, context, dtype) / cfg.num_hidden_layers.max(1) as u64
    } else {
        0
    };
    [scores, mlp, hidden, logits, reorder]
        .iter()
        .fold(0u64, |a, &x| a.saturating_add(x))
}

/// The largest buffers of the EVA encoder over `images` pictures at once:
/// f32 attention scores and probabilities over every patch token (CLS
/// included), the MLP's hidden activations, and a few token-stream copies.
pub fn vision_activation_bytes(cfg: &EvaConfig, images: usize) -> u64 {
    let m = |xs: &[usize]| xs.iter().fold(1u64, |a, &x| a.saturating_mul(x as u64));
    let t = cfg.num_patches() + 1;
    let scores = m(&[2, images, cfg.num_heads(), t, t, 4]);
    let mlp = m(&[2, images, t, cfg.mlp_hidden, 4]);
    let stream = m(&[4, images, t, cfg.width, 4]);
    scores.saturating_add(mlp).saturating_add(stream)
}

/// Element counts of a checkpoint, read from its headers: `(bytes once
/// loaded in dtype, the largest tensor's bytes)` of the keys `keep` selects.
pub fn checkpoint_bytes(ckpt: &Checkpoint, dtype: DType, keep: &dyn Fn(&str) -> bool) -> Result<(u64, u64)> {
    let (mut total, mut largest) = (0u64, 0u64);
    for key in ckpt.keys().filter(|k| keep(k)) {
        let info = ckpt.info(key)?;
        let n = info.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
        let b = resident(n, info.dtype, dtype);
        total = total.saturating_add(b);
        largest = largest.max(b);
    }
    Ok((total, largest))
}

/// [`checkpoint_bytes`] of a component whose linears may be block-quantized:
/// `(dense bytes in dtype, block bytes kept on the host)`. A tensor the
/// checkpoint stores as blocks counts its blocks; one that `quantize` gives
/// a format (by key and shape) counts that format's blocks; the rest count
/// as [`checkpoint_bytes`] does.
pub fn component_bytes(
    ckpt: &Checkpoint,
    dtype: DType,
    keep: &dyn Fn(&str) -> bool,
    quantize: &dyn Fn(&str, &[usize]) -> Option<QuantType>,
) -> Result<(u64, u64)> {
    let (mut dense, mut host) = (0u64, 0u64);
    for key in ckpt.keys().filter(|k| keep(k)) {
        let info = ckpt.info(key)?;
        let format = ckpt.quant_type(key)?.or_else(|| quantize(key, &info.dims));
        match (format, info.dims.as_slice()) {
            (Some(q), [out, inner]) => host = host.saturating_add(quant_bytes(*out, *inner, q)),
            _ => {
                let n = info.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
                dense = dense.saturating_add(resident(n, info.dtype, dtype));
            }
        }
    }
    Ok((dense, host))
}

/// The transient of loading: the largest tensor read in f32 and converted
/// (twice its f32 size covers source and converted copy).
pub fn loading_need(component: &'static str, largest_f32: u64, pool: Pool) -> Need {
    Need {
        component,
        what: "for the largest tensor while it is read and converted".into(),
        bytes: largest_f32.saturating_mul(2),
        dtype: None,
        pool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `../shared/reference/hf-configs/Emu2-Chat.config.json`'s LLaMA half,
    /// written out so the test needs no file.
    fn emu2_chat() -> LlamaConfig {
        LlamaConfig::from_json_value(serde_json::json!({
            "hidden_size": 6656, "intermediate_size": 17920, "num_hidden_layers": 60,
            "num_attention_heads": 52, "num_key_value_heads": 52, "max_position_embeddings": 2048,
            "vocab_size": 32274, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000
        }))
        .unwrap()
    }

    #[test]
    fn the_reference_config_matches_the_hand_computed_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/reference/hf-configs/Emu2-Chat.config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipping: {} is not present", path.display());
            return;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(LlamaConfig::from_json_value(v).unwrap(), emu2_chat());
    }

    #[test]
    fn emu2_chat_kv_cache_by_hand() {
        let c = emu2_chat();
        // 60 layers x 2 x 5 beams x 2048 positions x 52 heads x 128 x 2 bytes.
        assert_eq!(kv_cache_bytes(&c, 5, 2048, DType::BF16), 16_357_785_600);
        // Greedy, a 400-token context, f32: 60 x 2 x 400 x 6656 x 4.
        assert_eq!(kv_cache_bytes(&c, 1, 400, DType::F32), 1_277_952_000);
        assert_eq!(kv_cache_bytes(&c, usize::MAX, usize::MAX, DType::F32), u64::MAX);
    }

    #[test]
    fn emu2_chat_weights_by_hand() {
        let c = emu2_chat();
        let none = |_: &str| None;
        // Per layer: 4 x 6656^2 (attention) + 3 x 6656 x 17920 (MLP) = 535,035,904
        // linear weights; 60 layers = 32,102,154,240. Embedding and lm_head
        // 32274 x 6656 = 214,815,744 each; 121 norms x 6656 = 805,376; RoPE
        // 2 x 2048 x 64 = 262,144. Sum: 32,532,853,248 elements.
        let (dense, host) = llm_weight_bytes(&c, DType::BF16, None, &none, true).unwrap();
        assert_eq!((dense, host), (32_532_853_248 * 2, 0));
        // Q4_K on attention and MLP: rows of 6656 are 26 super-blocks of 256
        // (144 bytes each), down_proj's rows of 17920 are 70. Per layer:
        // 4 x 6656 rows x 26 x 144 + 2 x 17920 x 26 x 144 + 6656 x 70 x 144.
        let q4 = LlmQuant::new(QuantType::Q4K);
        let (dense, host) = llm_weight_bytes(&c, DType::BF16, Some(&q4), &none, true).unwrap();
        let per_layer: u64 = 4 * 6656 * 26 * 144 + 2 * 17920 * 26 * 144 + 6656 * 70 * 144;
        assert_eq!(per_layer, 300_957_696);
        // With the bf16 embeddings, lm_head and norms: the README's 18.9 GB.
        assert_eq!(host + dense - 262_144 * 2, 18_918_335_488);
        assert_eq!(host, 60 * per_layer);
        assert_eq!(dense, (2 * 214_815_744 + 805_376 + 262_144) * 2);
        // Q8_0: 34 bytes per 32 weights.
        let q8 = LlmQuant::new(QuantType::Q8_0);
        let (_, host) = llm_weight_bytes(&c, DType::BF16, Some(&q8), &none, true).unwrap();
        assert_eq!(host, 32_102_154_240 / 32 * 34);
        // A GGUF checkpoint's stored blocks count whatever was asked.
        let stored = |k: &str| k.ends_with("up_proj.weight").then_some(QuantType::Q8_0);
        let (dense, host) = llm_weight_bytes(&c, DType::F32, None, &stored, true).unwrap();
        assert_eq!(host, 60 * 17920 * 6656 / 32 * 34);
        assert_eq!(dense, (32_532_853_248 - 60 * 17920 * 6656) * 4);
    }

    #[test]
    fn activations_grow_with_context_and_images() {
        let c = emu2_chat();
        let short = llm_activation_bytes(&c, 1, 400, 400, DType::BF16);
        // 2 x 52 x 400^2 x 4 (scores) + 3 x 400 x 17920 x 4 + 4 x 400 x 6656 x 4 + 32274 x 4.
        assert_eq!(short, 66_560_000 + 86_016_000 + 42_598_400 + 129_096);
        assert!(llm_activation_bytes(&c, 5, 1, 2048, DType::BF16) > kv_cache_bytes(&c, 5, 2048, DType::BF16) / 60);
        let eva = emu_vision::EmuVisionConfig::from_value(&serde_json::json!({
            "d_model": 1792, "hidden_size": 6656,
            "vision_config": {"image_size": 448, "patch_size": 14, "width": 1792, "layers": 64,
                "head_width": 112, "mlp_ratio": 8.571428571428571, "intermediate_size": 15360,
                "n_query": 256, "v_query": 64, "qkv_bias": true}
        }))
        .unwrap();
        // 1025 tokens, 16 heads: 2 x 16 x 1025^2 x 4 + 2 x 1025 x 15360 x 4 + 4 x 1025 x 1792 x 4.
        assert_eq!(
            vision_activation_bytes(&eva.vision, 1),
            134_480_000 + 125_952_000 + 29_388_800
        );
        assert_eq!(
            vision_activation_bytes(&eva.vision, 3),
            3 * vision_activation_bytes(&eva.vision, 1)
        );
    }

    #[test]
    fn refusals_name_every_part_and_both_numbers() {
        let needs = [
            Need {
                component: "vision",
                what: "weights in bf16".into(),
                bytes: 3 << 30,
                dtype: Some(DType::BF16),
                pool: Pool::Host,
            },
            Need {
                component: "llm",
                what: "weights in bf16".into(),
                bytes: 5 << 30,
                dtype: Some(DType::BF16),
                pool: Pool::Host,
            },
            // Unknown free memory is not checked.
            Need {
                component: "decoder",
                what: "weights".into(),
                bytes: u64::MAX,
                dtype: None,
                pool: Pool::Gpu { name: "gpu".into() },
            },
        ];
        // Host memory here is whatever the machine has; a device pool with a
        // known amount makes the arithmetic deterministic.
        let dev = |bytes, free| Need {
            component: "llm",
            what: "KV cache".into(),
            bytes,
            dtype: None,
            pool: Pool::Cuda {
                name: "device 0".into(),
                mem: Some((free, 2 * free)),
            },
        };
        check("x", &[dev(1 << 30, 1 << 30)], "").unwrap();
        let e = check(
            "answering",
            &[dev(3 << 30, 1 << 30), needs[2].clone()],
            "use fewer beams",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not enough memory on device 0 for answering: need about 3.0 GiB (llm: 3.0 GiB KV cache), have 1.0 GiB; use fewer beams"),
            "{e}"
        );
        assert!(e.contains("--no-memory-check"), "{e}");
        assert_eq!(needs[0].line(), "vision: 3.0 GiB weights in bf16");
        assert_eq!(size(3 << 20), "3.0 MiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(5 << 40), "5120.0 GiB");
    }

    /// A stage of `mib` MiB (no dtype, so the generic check runs whatever
    /// the features) on a device with a known amount free, and a largest
    /// tensor of `largest` KiB.
    fn stage(name: &'static str, mib: u64, largest_kib: u64, pool: &Pool) -> Stage {
        Stage {
            name,
            needs: vec![Need {
                component: name,
                what: "weights".into(),
                bytes: mib << 20,
                dtype: None,
                pool: pool.clone(),
            }],
            largest_f32: largest_kib << 10,
        }
    }

    #[test]
    fn sequential_peaks_at_the_largest_stage_all_at_the_sum() {
        assert_eq!(peak(&[3, 9, 4], Residency::All), 16);
        assert_eq!(peak(&[3, 9, 4], Residency::Sequential), 9);
        assert_eq!(peak(&[], Residency::Sequential), 0);
        assert_eq!(peak(&[u64::MAX, 1], Residency::All), u64::MAX);
        let host = Pool::Host;
        let stages = [
            stage("vision", 3, 64, &host),
            stage("llm", 9, 512, &host),
            stage("unet", 4, 1024, &host),
        ];
        // All: the sum plus the largest tensor of any (1 MiB, twice);
        // sequential: the largest stage with its own largest tensor.
        assert_eq!(load_peak(&stages, Residency::All), (16 << 20) + (2 << 20));
        assert_eq!(load_peak(&stages, Residency::Sequential), (9 << 20) + (1 << 20));
        assert_eq!(stages[1].bytes(), 9 << 20);
    }

    #[test]
    fn the_sequential_check_takes_each_stage_alone_and_all_suggests_it() {
        let dev = |free_mib: u64| Pool::Cuda {
            name: "device 0".into(),
            mem: Some((free_mib << 20, 64 << 30)),
        };
        let stages = |pool: &Pool| {
            [
                stage("vision", 3, 0, pool),
                stage("llm", 9, 0, pool),
                stage("unet", 4, 0, pool),
            ]
        };
        // 12 MiB: the largest stage fits, the sum (16 MiB) does not.
        let pool = dev(12);
        check_stages("loading the model", &stages(&pool), Residency::Sequential, "").unwrap();
        let e = check_stages("loading the model", &stages(&pool), Residency::All, "try --dtype bf16")
            .unwrap_err()
            .to_string();
        for part in [
            "not enough memory on device 0 for loading the model: need about 16.0 MiB",
            "have 12.0 MiB; try --dtype bf16, or --offload sequential (one component in memory at a time; the largest, llm, fits)",
        ] {
            assert!(e.contains(part), "`{part}` not in: {e}");
        }
        // 8 MiB: not even the LLM alone fits; sequential names its stage and
        // all-resident does not suggest sequential.
        let pool = dev(8);
        let e = check_stages("loading the model", &stages(&pool), Residency::Sequential, "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loading the model, llm stage (--offload sequential): need about 9.0 MiB"),
            "{e}"
        );
        let e = check_stages("loading the model", &stages(&pool), Residency::All, "")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("--offload"), "{e}");
        // 16 MiB: everything fits both ways.
        let pool = dev(16);
        check_stages("loading the model", &stages(&pool), Residency::All, "").unwrap();
    }

    #[test]
    fn offload_values() {
        assert_eq!(Residency::parse_offload("none").unwrap(), Residency::All);
        assert_eq!(Residency::parse_offload("sequential").unwrap(), Residency::Sequential);
        let e = Residency::parse_offload("foo").unwrap_err().to_string();
        assert!(
            e.contains("--offload `foo`") && e.contains("none (") && e.contains("sequential ("),
            "{e}"
        );
        assert_eq!(Residency::default().offload_name(), "none");
    }

    /// Weights bound for a CUDA device go through the CUDA backend's own
    /// preflight, whose message adds headroom and the flags that would fit.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_weights_use_the_backends_preflight() {
        const GIB: u64 = 1 << 30;
        let pool = Pool::Cuda {
            name: "device 0 (H100)".into(),
            mem: Some((40 * GIB, 80 * GIB)),
        };
        let w = |component, gib: u64| Need {
            component,
            what: "weights in f32".into(),
            bytes: gib * GIB,
            dtype: Some(DType::F32),
            pool: pool.clone(),
        };
        check("loading", &[w("vision", 16), w("llm", 20)], "").unwrap();
        let e = check("loading the model", &[w("vision", 16), w("llm", 50)], "")
            .unwrap_err()
            .to_string();
        for part in [
            "loading the model: backend `cuda`: not enough memory on device 0 (H100)",
            "the weights take 66.0 GiB",
            "40.0 GiB of 80.0 GiB is free",
            "--dtype bf16 (needs 36.3 GiB, fits)",
            "--no-memory-check",
        ] {
            assert!(e.contains(part), "`{part}` not in: {e}");
        }
    }
}
