//! Component times on ONNX Runtime against the CPU backend, in the same run
//! on the same weights:
//!
//! * LLaMA prefill and per-token decode on random weights (the decode loop
//!   of `emu_llm::generate`: one token's embedding, logits of the last
//!   position downloaded per step);
//! * the EVA vision encoder, one UNet call and one VAE decode, loaded from
//!   component folders (default: the reference fixtures under
//!   `tests/fixtures`; point them at real checkpoints for real numbers).
//!
//! ```text
//! ORT_DYLIB_PATH=.../libonnxruntime.so.1.32.0 \
//! cargo run --release -p emu-backend-onnx --example bench_onnx -- \
//!     [--hidden 256] [--layers 4] [--heads 4] [--kv-heads 4] [--intermediate 688] \
//!     [--vocab 1024] [--prompt 32] [--new 32] \
//!     [--vision DIR] [--unet DIR] [--vae DIR] [--latent 8] [--context 5] [--runs 3] \
//!     [--only llm|components]
//! ```
//!
//! Prints per backend: prefill milliseconds, decode tokens per second (the
//! first decode step, which compiles the decode graph on ONNX Runtime, is
//! reported separately), the number of compiled sessions, and for each
//! component the first call (graph compile on ONNX Runtime) and the mean of
//! `--runs` later calls.

use emu_backend_cpu::CpuBackend;
use emu_backend_onnx::OnnxBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::{Backend, DType, Tensor};
use emu_decoder::unet::PerBlock;
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use emu_llm::{Llama, LlamaConfig, Logits};
use emu_vision::VisionEncoder;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    only: Option<String>,
    vision: PathBuf,
    unet: PathBuf,
    vae: PathBuf,
    latent: usize,
    context: usize,
    runs: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    prompt: usize,
    new: usize,
}

// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#[allow(clippy::manual_is_multiple_of)]
fn parse_args() -> Result<Args, String> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut a = Args {
        only: None,
        vision: fixtures.join("vision/hf"),
        unet: fixtures.join("decoder/pipeline/unet"),
        vae: fixtures.join("decoder/pipeline/vae"),
        latent: 8,
        context: 5,
        runs: 3,
        hidden: 256,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        intermediate: 688,
        vocab: 1024,
        prompt: 32,
        new: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--only" => {
                a.only = Some(val);
                continue;
            }
            "--vision" | "--unet" | "--vae" => {
                let p = PathBuf::from(&val);
                match flag.as_str() {
                    "--vision" => a.vision = p,
                    "--unet" => a.unet = p,
                    _ => a.vae = p,
                }
                continue;
            }
            _ => {}
        }
        let n: usize = val.parse().map_err(|_| format!("{flag}: not a number: {val}"))?;
        match flag.as_str() {
            "--latent" => a.latent = n,
            "--context" => a.context = n,
            "--runs" => a.runs = n.max(1),
            "--hidden" => a.hidden = n,
            "--layers" => a.layers = n,
            "--heads" => a.heads = n,
            "--kv-heads" => a.kv_heads = n,
            "--intermediate" => a.intermediate = n,
            "--vocab" => a.vocab = n,
            "--prompt" => a.prompt = n,
            "--new" => a.new = n,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.heads == 0 || a.kv_heads == 0 || a.hidden % a.heads != 0 || a.heads % a.kv_heads != 0 {
        return Err("--hidden must divide by --heads, and --heads by --kv-heads".into());
    }
    if a.prompt == 0 || a.new < 2 {
        return Err("--prompt must be at least 1 and --new at least 2".into());
    }
    Ok(a)
}

/// Deterministic pseudo-random weights (xorshift, sum of four uniforms).
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
}

/// Writes f32 tensors as safetensors (8-byte header length, JSON header, data).
fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> std::io::Result<()> {
    let mut header = String::from("{");
    let mut offset = 0usize;
    for (i, (name, (dims, data))) in tensors.iter().enumerate() {
        let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        let end = offset + data.len() * 4;
        header.push_str(&format!(
            "{}\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            if i > 0 { "," } else { "" },
            shape.join(",")
        ));
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for (_, data) in tensors.values() {
        for x in data {
            f.write_all(&x.to_le_bytes())?;
        }
    }
    f.flush()
}

fn write_model(a: &Args, dir: &Path) -> std::io::Result<()> {
    let d = a.hidden / a.heads;
    let config = format!(
        "{{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":{},\
         \"intermediate_size\":{},\"num_hidden_layers\":{},\"num_attention_heads\":{},\
         \"num_key_value_heads\":{},\"max_position_embeddings\":{},\"vocab_size\":{},\
         \"rms_norm_eps\":1e-6,\"rope_theta\":10000.0,\"hidden_act\":\"silu\",\
         \"tie_word_embeddings\":false,\"torch_dtype\":\"float32\"}}",
        a.hidden,
        a.intermediate,
        a.layers,
        a.heads,
        a.kv_heads,
        a.prompt + a.new + 1,
        a.vocab
    );
    std::fs::write(dir.join("config.json"), config)?;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![a.vocab, a.hidden]),
        ("model.norm.weight".into(), vec![a.hidden]),
        ("lm_head.weight".into(), vec![a.vocab, a.hidden]),
    ];
    for i in 0..a.layers {
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
            shapes.push((format!("model.layers.{i}.{n}.weight"), s));
        }
    }
    let mut noise = Noise(0x5eed);
    let tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = shapes
        .into_iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let data = if s.len() == 1 {
                vec![1.0; n]
            } else {
                let scale = 1.0 / (s[1] as f32).sqrt();
                (0..n).map(|_| noise.next() * scale).collect()
            };
            (k, (s, data))
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)
}

struct Timing {
    prefill_ms: f64,
    first_decode_ms: f64,
    decode_tok_s: f64,
    tokens: Vec<u32>,
}

/// Prefill on a fixed prompt, then greedy decoding of `new` tokens.
fn run<B: Backend>(be: &B, a: &Args, dir: &Path) -> Result<Timing, Box<dyn std::error::Error>> {
    let cfg = LlamaConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir.join("model.safetensors"))?;
    let m = Llama::load(be, &emu_llm::lm_weights(&ckpt)?, &cfg, DType::F32)?;
    let prompt: Vec<u32> = (0..a.prompt).map(|i| ((i * 7919) % a.vocab) as u32).collect();
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |best, (i, &x)| if x > best.1 { (i, x) } else { best },
            )
            .0 as u32
    };
    let mut cache = m.new_cache(1, a.prompt + a.new)?;
    let t = Instant::now();
    let out = m.forward_embeds(&m.embed(&prompt, 1)?, &mut cache, Logits::Last)?;
    let mut next = argmax(&out.logits.ok_or("no logits")?.to_f32_vec()?);
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut tokens = vec![next];
    let mut first_decode_ms = 0.0;
    let t_rest = Instant::now();
    for step in 0..a.new - 1 {
        let t = Instant::now();
        let out = m.forward_embeds(&m.embed(&[next], 1)?, &mut cache, Logits::Last)?;
        next = argmax(&out.logits.ok_or("no logits")?.to_f32_vec()?);
        tokens.push(next);
        if step == 0 {
            first_decode_ms = t.elapsed().as_secs_f64() * 1e3;
        }
    }
    let rest = t_rest.elapsed().as_secs_f64() * 1e3 - first_decode_ms;
    Ok(Timing {
        prefill_ms,
        first_decode_ms,
        decode_tok_s: (a.new - 2) as f64 / (rest / 1e3),
        tokens,
    })
}

/// First call and mean of `runs` later calls of `f`, in milliseconds.
fn time_calls(
    runs: usize,
    mut f: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let t = Instant::now();
    f()?;
    let first = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for _ in 0..runs {
        f()?;
    }
    Ok((first, t.elapsed().as_secs_f64() * 1e3 / runs as f64))
}

/// A component's name, first call and mean later call (ms).
type Row = (String, f64, f64);

/// Vision encoder, UNet and VAE times on one backend.
fn components<B: Backend>(be: &B, a: &Args) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    let mut noise = Noise(7);
    let mut rand = |dims: &[usize]| -> Result<Tensor<B>, Box<dyn std::error::Error>> {
        let n = dims.iter().product();
        Ok(Tensor::from_f32(
            be,
            dims,
            (0..n).map(|_| noise.next() * 0.5).collect(),
        )?)
    };
    if a.vision.is_dir() {
        let enc = VisionEncoder::from_dir(be, &a.vision, DType::F32)?;
        let s = enc.config().vision.image_size;
        let px = rand(&[1, 3, s, s])?;
        let (first, mean) = time_calls(a.runs, || {
            enc.encode(&px)?.to_f32_vec()?;
            Ok(())
        })?;
        rows.push((format!("vision encoder 1x{s}x{s}"), first, mean));
    }
    if a.unet.is_dir() {
        let cfg = UNet2DConditionConfig::from_file(a.unet.join("config.json"))?;
        let unet = UNet2DConditionModel::load(be, &Checkpoint::open(&a.unet)?.weights(), &cfg, DType::F32)?;
        let cross = match &cfg.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.first().copied().unwrap_or(0),
        };
        let (b, l) = (2, a.latent);
        let sample = rand(&[b, cfg.in_channels, l, l])?;
        let ctx = rand(&[b, a.context, cross])?;
        let cond = match (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) {
            (Some(td), Some(pd)) => Some(TextTimeCond {
                text_embeds: rand(&[b, pd.saturating_sub(6 * td)])?,
                time_ids: vec![[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]; b],
            }),
            _ => None,
        };
        let mut step = 0;
        let (first, mean) = time_calls(a.runs, || {
            step += 1;
            // A new timestep per call, as in a sampling loop.
            unet.forward(&sample, 999.0 - step as f32 * 37.0, &ctx, cond.as_ref())?
                .to_f32_vec()?;
            Ok(())
        })?;
        rows.push((format!("unet batch {b} latent {l}x{l}"), first, mean));
    }
    if a.vae.is_dir() {
        let cfg = AutoencoderKLConfig::from_file(a.vae.join("config.json"))?;
        let vae = AutoencoderKL::load(be, &Checkpoint::open(&a.vae)?.weights(), &cfg, DType::F32)?;
        let z = rand(&[1, cfg.latent_channels, a.latent, a.latent])?;
        let (first, mean) = time_calls(a.runs, || {
            vae.decode(&z)?.to_f32_vec()?;
            Ok(())
        })?;
        rows.push((format!("vae decode latent {0}x{0}", a.latent), first, mean));
    }
    Ok(rows)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    if a.only.as_deref() != Some("llm") {
        let onnx = OnnxBackend::new()?;
        let cpu = components(&CpuBackend::new(), &a)?;
        let ort = components(&onnx, &a)?;
        println!("component (f32)                     cpu first / mean ms     onnx first / mean ms");
        for ((name, f0, m0), (_, f1, m1)) in cpu.iter().zip(&ort) {
            println!("{name:<34} {f0:>9.1} / {m0:>8.1}     {f1:>9.1} / {m1:>8.1}");
        }
        if a.only.as_deref() == Some("components") {
            return Ok(());
        }
    }
    let dir = std::env::temp_dir().join(format!("emu-onnx-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    write_model(&a, &dir)?;
    println!(
        "llama hidden {} layers {} heads {}/{} intermediate {} vocab {}; prompt {} tokens, {} new (f32)",
        a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.vocab, a.prompt, a.new
    );
    let cpu = run(&CpuBackend::new(), &a, &dir)?;
    println!(
        "cpu : prefill {:8.1} ms, first decode step {:7.1} ms, decode {:8.1} tok/s",
        cpu.prefill_ms, cpu.first_decode_ms, cpu.decode_tok_s
    );
    let onnx = OnnxBackend::new()?;
    let o = run(&onnx, &a, &dir)?;
    println!(
        "onnx: prefill {:8.1} ms, first decode step {:7.1} ms, decode {:8.1} tok/s, {} sessions compiled",
        o.prefill_ms,
        o.first_decode_ms,
        o.decode_tok_s,
        onnx.cached_sessions()
    );
    println!(
        "greedy tokens {}",
        if o.tokens == cpu.tokens { "equal" } else { "DIFFER" }
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
