//! Prefill and decode throughput, visual-regression time and the
//! memory-bandwidth floor of decode for the LLaMA decoder on the CPU backend,
//! on a randomly initialised model of a chosen size (not a test).
//!
//! ```text
//! cargo run --release -p emu-llm --example bench_llm -- \
//!     [--hidden 768] [--layers 12] [--heads 12] [--kv-heads 12] [--intermediate 2048] \
//!     [--vocab 32000] [--prompt 128] [--new 32] [--regress 64] [--regress-prompt 64] \
//!     [--visual-dim 1792] [--dtype f32|bf16] [--save DIR] [--torch PYTHON]
//! ```
//!
//! The defaults are a ~130M-parameter model (~85M without the embedding and
//! `lm_head`). The model is written as `DIR/config.json` +
//! `DIR/model.safetensors` (transformers' layout), with `visual.safetensors`
//! (Emu2's bias-free `project_up` / `project_down`) and
//! `regress_io.safetensors` (the regression prompt and Rust's 64 regressed
//! embeddings); `--save DIR` keeps them (default: a temporary directory).
//!
//! `--torch PYTHON` (a Python with torch, transformers and safetensors, e.g.
//! `/work/venv-ref/py/bin/python`) times the same weights in PyTorch with
//! `bench_llm_torch.py` (beside this file; also written to `DIR`), on as many
//! threads as the Rust side uses (rayon's pool: `RAYON_NUM_THREADS` or the
//! number of cores), and prints both sides together. The PyTorch regression is
//! upstream's `generate_image` (the whole sequence re-run for each of the 64
//! embeddings, no cache) and, for comparison, the same recurrence on
//! transformers' KV cache; Rust's embeddings are checked against upstream's.
//!
//! The decode floor is the bytes decode must read per token (all weights but
//! the embedding table, one embedding row, and the KV cache at the mean
//! position) divided by the measured host copy bandwidth (a 256 MiB buffer
//! copied on all threads, best of 5, counted as STREAM counts Copy: bytes
//! read + bytes written per second).

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
    regress: usize,
    regress_prompt: usize,
    visual_dim: usize,
    dtype: DType,
    save: Option<PathBuf>,
    torch: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        hidden: 768,
        layers: 12,
        heads: 12,
        kv_heads: 12,
        intermediate: 2048,
        vocab: 32000,
        prompt: 128,
        new: 32,
        regress: 64,
        regress_prompt: 64,
        visual_dim: 1792,
        dtype: DType::F32,
        save: None,
        torch: None,
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
            "--regress" => a.regress = num()?,
            "--regress-prompt" => a.regress_prompt = num()?,
            "--visual-dim" => a.visual_dim = num()?,
            "--save" => a.save = Some(PathBuf::from(val)),
            "--torch" => a.torch = Some(PathBuf::from(val)),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.heads == 0 || !a.hidden.is_multiple_of(a.heads) || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Err("--hidden must divide by --heads, and --heads by --kv-heads".into());
    }
    if a.prompt == 0 || a.regress == 0 || a.regress_prompt == 0 {
        return Err("--prompt, --regress and --regress-prompt must be at least 1".into());
    }
    Ok(a)
}

/// The number of threads candle's CPU kernels run on (gemm and candle use
/// rayon's global pool), so PyTorch can be given the same.
fn rust_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Host copy bandwidth in bytes/s, counted as STREAM's Copy does (bytes read
/// plus bytes written): a `bytes`-sized buffer copied in `threads` chunks at
/// once, best of `reps` (both buffers are touched first so page faults are
/// not timed).
fn copy_bandwidth(bytes: usize, threads: usize, reps: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dst = vec![1u8; bytes];
    let chunk = bytes.div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    // Keeps the copy observable so it cannot be elided.
    assert_eq!(dst[bytes / 2], src[bytes / 2]);
    2.0 * bytes as f64 / best
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
        "num_key_value_heads": a.kv_heads, "max_position_embeddings": (a.prompt + a.new).max(a.regress_prompt + a.regress) + 1,
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
    let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let embed_params = a.vocab * a.hidden;
    // Decode reads every weight once per token except the embedding table,
    // of which it reads one row.
    let decode_weight_elems = params - embed_params + a.hidden;
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
    let (dv, h) = (a.visual_dim, a.hidden);
    let up_bytes = noise.fill(h * dv, 1.0 / (dv as f32).sqrt());
    let down_bytes = noise.fill(dv * h, 1.0 / (h as f32).sqrt());
    let as_f32 = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (up_f32, down_f32) = (as_f32(&up_bytes), as_f32(&down_bytes));
    let visual: BTreeMap<String, (Vec<usize>, Vec<u8>)> = [
        ("project_up.weight".to_string(), (vec![h, dv], up_bytes)),
        ("project_down.weight".to_string(), (vec![dv, h], down_bytes)),
    ]
    .into_iter()
    .collect();
    write_safetensors(&dir.join("visual.safetensors"), &visual)?;
    drop(visual);

    let threads = rust_threads();
    let backend = CpuBackend::new();
    let cfg = LlamaConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir.join("model.safetensors"))?;
    let t0 = Instant::now();
    let model = Llama::load(&backend, &emu_llm::lm_weights(&ckpt)?, &cfg, a.dtype)?;
    println!(
        "model: hidden {} x {} layers, {} heads ({} kv), intermediate {}, vocab {}, {}; \
         {:.1}M parameters ({:.1}M without embedding and lm_head) + {:.1}M in project_up/down; \
         loaded in {:.2?}; {} threads",
        a.hidden,
        a.layers,
        a.heads,
        a.kv_heads,
        a.intermediate,
        a.vocab,
        a.dtype,
        params as f64 / 1e6,
        (params - 2 * embed_params) as f64 / 1e6,
        (2 * h * dv) as f64 / 1e6,
        t0.elapsed(),
        threads
    );
    let prompt: Vec<f32> = (0..a.prompt * a.hidden).map(|_| noise.next()).collect();
    let x = Tensor::from_f32(&backend, &[1, a.prompt, a.hidden], prompt)?;
    // Warm-up (first-touch of the weights, allocator), as on the PyTorch side.
    let mut cache = model.new_cache(1, a.prompt + a.new + 1)?;
    model.forward_embeds(&x, &mut cache, Logits::Last)?;
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

    // Prompt embeddings at the scale of token embeddings (unit-variance rows
    // after the first RMSNorm either way).
    let rprompt: Vec<f32> = (0..a.regress_prompt * h).map(|_| noise.next()).collect();
    let rx = Tensor::from_f32(&backend, &[1, a.regress_prompt, h], rprompt.clone())?;
    let up = Tensor::from_f32(&backend, &[h, dv], up_f32)?;
    let down = Tensor::from_f32(&backend, &[dv, h], down_f32)?;
    let t0 = Instant::now();
    let regressed = emu_llm::regress_visual(&model, &rx, &[], &up, &down, a.regress)?.to_f32_vec()?;
    let regress = t0.elapsed().as_secs_f64();
    let to_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let io: BTreeMap<String, (Vec<usize>, Vec<u8>)> = [
        ("prompt".to_string(), (vec![1, a.regress_prompt, h], to_bytes(&rprompt))),
        ("rust_out".to_string(), (vec![1, a.regress, dv], to_bytes(&regressed))),
    ]
    .into_iter()
    .collect();
    write_safetensors(&dir.join("regress_io.safetensors"), &io)?;

    let bw = copy_bandwidth(256 << 20, threads, 5);
    let elem = a.dtype.size_in_bytes();
    let weight_bytes = decode_weight_elems * elem;
    // K and V of every layer at the mean position of the timed decode steps.
    let mean_pos = a.prompt + a.new.div_ceil(2);
    let kv_bytes = 2 * a.layers * a.kv_heads * d * mean_pos * elem;
    let floor_ms = (weight_bytes + kv_bytes) as f64 / bw * 1e3;

    let torch = match &a.torch {
        Some(py) => Some(run_torch(py, &dir, &a, threads)?),
        None => None,
    };
    let t = |k: &str| torch.as_ref().and_then(|j| j[k].as_f64());
    let col = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    println!(
        "host copy bandwidth: {:.2} GB/s read+written ({} threads, 256 MiB, best of 5)",
        bw / 1e9,
        threads
    );
    println!(
        "decode reads {:.1} MB of weights + {:.1} MB of KV cache per token -> floor {:.2} ms/token ({:.1} tok/s)",
        weight_bytes as f64 / 1e6,
        kv_bytes as f64 / 1e6,
        floor_ms,
        1e3 / floor_ms
    );
    println!("{:<44} {:>14} {:>14}", "", "emu-llm", "PyTorch");
    let row = |name: &str, r: String, p: String| println!("{name:<44} {r:>14} {p:>14}");
    let tps = |n: usize| move |s: f64| format!("{:.1} tok/s", n as f64 / s);
    row(
        &format!("prefill ({} tokens)", a.prompt),
        tps(a.prompt)(prefill),
        col(t("prefill_s"), &tps(a.prompt)),
    );
    row(
        &format!("decode ({} tokens)", a.new),
        tps(a.new)(decode),
        col(t("decode_s"), &tps(a.new)),
    );
    let ms = |n: usize| move |s: f64| format!("{:.2} ms/tok", s * 1e3 / n as f64);
    row(
        &format!("decode ms/token (floor {floor_ms:.2})"),
        ms(a.new)(decode),
        col(t("decode_s"), &ms(a.new)),
    );
    let secs = |s: f64| format!("{s:.3} s");
    row(
        &format!("regress {} after {} tokens, KV cache", a.regress, a.regress_prompt),
        secs(regress),
        col(t("regress_cached_s"), &secs),
    );
    row(
        &format!("regress {} after {} tokens, upstream", a.regress, a.regress_prompt),
        "-".into(),
        col(t("regress_upstream_s"), &secs),
    );
    if let Some(j) = &torch {
        println!(
            "PyTorch: torch {}, {} threads",
            j["torch"].as_str().unwrap_or("?"),
            j["threads"]
        );
        // A random model's regression is chaotic (rounding differences grow
        // a few-fold per step), so the error is shown per embedding, with
        // PyTorch's own cached run as the yardstick.
        let errs = |k: &str| -> Vec<f64> {
            j[k].as_array()
                .map(|v| v.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
                .unwrap_or_default()
        };
        let (r, c) = (errs("rust_vs_upstream_rel"), errs("torch_cached_vs_upstream_rel"));
        println!("rel. error of embedding k vs upstream (no cache):   emu-llm   PyTorch cached");
        for k in [0, 1, 3, 7, 15, 31, 63]
            .into_iter()
            .filter(|&k| k < r.len().min(c.len()))
        {
            println!("  k = {k:>2} {:>45.2e} {:>16.2e}", r[k], c[k]);
        }
    }
    if a.save.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// Runs `bench_llm_torch.py` (written into `dir`) with `python` on the saved
/// model and returns its JSON line.
fn run_torch(
    python: &std::path::Path,
    dir: &std::path::Path,
    a: &Args,
    threads: usize,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let script = dir.join("bench_llm_torch.py");
    std::fs::write(&script, include_str!("bench_llm_torch.py"))?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(dir)
        .args([a.prompt, a.new, a.regress, threads].map(|n| n.to_string()))
        .arg(a.dtype.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("{} {} failed: {}", python.display(), script.display(), out.status).into());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().ok_or("the PyTorch script printed nothing")?;
    Ok(serde_json::from_str(last)?)
}
