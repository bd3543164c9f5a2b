//! Prefill and decode throughput of the LLaMA decoder on the CPU backend, on
//! a randomly initialised model of a chosen size (not a test).
//!
//! ```text
//! cargo run --release -p emu-llm --example bench_llm -- \
//!     [--hidden 1024] [--layers 8] [--heads 16] [--kv-heads 16] [--intermediate 2816] \
//!     [--vocab 32000] [--prompt 128] [--new 32] [--dtype f32|bf16] [--save DIR]
//! ```
//!
//! `--save DIR` keeps the model as `DIR/config.json` + `DIR/model.safetensors`
//! (transformers' layout), so the same weights can be timed in PyTorch:
//!
//! ```text
//! import time, torch
//! from transformers import LlamaForCausalLM
//! m = LlamaForCausalLM.from_pretrained(DIR, dtype=torch.float32).eval()
//! x = torch.randn(1, PROMPT, m.config.hidden_size)
//! with torch.no_grad():
//!     t = time.perf_counter(); o = m(inputs_embeds=x, use_cache=True, logits_to_keep=1)
//!     prefill = time.perf_counter() - t; past = o.past_key_values
//!     tok = o.logits[:, -1].argmax(-1, keepdim=True); t = time.perf_counter()
//!     for _ in range(NEW):
//!         o = m(input_ids=tok, past_key_values=past, use_cache=True); past = o.past_key_values
//!         tok = o.logits[:, -1].argmax(-1, keepdim=True)
//!     decode = time.perf_counter() - t
//! print(PROMPT / prefill, "prefill tok/s;", NEW / decode, "decode tok/s")
//! ```

use emu_backend_cpu::CpuBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::{DType, Tensor};
use emu_llm::{Llama, LlamaConfig, Logits};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    prompt: usize,
    new: usize,
    dtype: DType,
    save: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        hidden: 1024,
        layers: 8,
        heads: 16,
        kv_heads: 16,
        intermediate: 2816,
        vocab: 32000,
        prompt: 128,
        new: 32,
        dtype: DType::F32,
        save: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || val.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--hidden" => a.hidden = num()?,
            "--layers" => a.layers = num()?,
            "--heads" => a.heads = num()?,
            "--kv-heads" => a.kv_heads = num()?,
            "--intermediate" => a.intermediate = num()?,
            "--vocab" => a.vocab = num()?,
            "--prompt" => a.prompt = num()?,
            "--new" => a.new = num()?,
            "--dtype" => a.dtype = val.parse().map_err(|e| format!("{e}"))?,
            "--save" => a.save = Some(PathBuf::from(val)),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// A cheap deterministic pseudo-normal stream (sum of uniforms).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        let mut s = 0f32;
        for _ in 0..4 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            s += (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        }
        (s - 2.0) * 1.732
    }

    fn fill(&mut self, n: usize, scale: f32) -> Vec<u8> {
        (0..n).flat_map(|_| (self.next() * scale).to_le_bytes()).collect()
    }
}

/// Writes f32 tensors as a safetensors file (8-byte header length, JSON
/// header, raw little-endian data).
fn write_safetensors(path: &std::path::Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<u8>)>) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, (dims, bytes)) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": dims, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() & 7 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for (_, bytes) in tensors.values() {
        f.write_all(bytes)?;
    }
    f.flush()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    let d = a.hidden / a.heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a.hidden, "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "max_position_embeddings": a.prompt + a.new + 1,
        "vocab_size": a.vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype": "float32",
    });
    let dir = match &a.save {
        Some(p) => p.clone(),
        None => std::env::temp_dir().join(format!("emu-llm-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;

    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![a.vocab, a.hidden]),
        ("model.norm.weight".into(), vec![a.hidden]),
        ("lm_head.weight".into(), vec![a.vocab, a.hidden]),
    ];
    for i in 0..a.layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj", vec![a.heads * d, a.hidden]),
            ("self_attn.k_proj", vec![a.kv_heads * d, a.hidden]),
            ("self_attn.v_proj", vec![a.kv_heads * d, a.hidden]),
            ("self_attn.o_proj", vec![a.hidden, a.heads * d]),
            ("mlp.gate_proj", vec![a.intermediate, a.hidden]),
            ("mlp.up_proj", vec![a.intermediate, a.hidden]),
            ("mlp.down_proj", vec![a.hidden, a.intermediate]),
            ("input_layernorm", vec![a.hidden]),
            ("post_attention_layernorm", vec![a.hidden]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), s));
        }
    }
    let mut noise = Noise(0x5eed);
    let data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let bytes = if s.len() == 1 {
                (0..n).flat_map(|_| 1f32.to_le_bytes()).collect()
            } else {
                noise.fill(n, 1.0 / (s[1] as f32).sqrt())
            };
            (k, (s, bytes))
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &data)?;
    drop(data);

    let backend = CpuBackend::new();
    let cfg = LlamaConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir.join("model.safetensors"))?;
    let t0 = Instant::now();
    let model = Llama::load(&backend, &emu_llm::lm_weights(&ckpt)?, &cfg, a.dtype)?;
    println!(
        "model: hidden {} x {} layers, {} heads ({} kv), vocab {}, {}; loaded in {:.2?}",
        a.hidden,
        a.layers,
        a.heads,
        a.kv_heads,
        a.vocab,
        a.dtype,
        t0.elapsed()
    );
    let prompt: Vec<f32> = (0..a.prompt * a.hidden).map(|_| noise.next()).collect();
    let x = Tensor::from_f32(&backend, &[1, a.prompt, a.hidden], prompt)?;
    let mut cache = model.new_cache(1, a.prompt + a.new + 1)?;
    let t0 = Instant::now();
    let out = model.forward_embeds(&x, &mut cache, Logits::Last)?;
    let mut logits = out.logits.ok_or("no logits")?.to_f32_vec()?;
    let prefill = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..a.new {
        let tok = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32;
        let e = model.embed(&[tok], 1)?;
        let o = model.forward_embeds(&e, &mut cache, Logits::Last)?;
        logits = o.logits.ok_or("no logits")?.to_f32_vec()?;
    }
    let decode = t0.elapsed().as_secs_f64();
    println!(
        "prefill: {} tokens in {:.3} s = {:.1} tok/s; decode: {} tokens in {:.3} s = {:.2} tok/s",
        a.prompt,
        prefill,
        a.prompt as f64 / prefill,
        a.new,
        decode,
        a.new as f64 / decode
    );
    if a.save.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
