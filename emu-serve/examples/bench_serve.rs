//! Load benchmark of `emu serve` (not a test): starts the server in this
//! process on a loopback port and sends chat requests from 1, 8 and 32
//! concurrent clients, with batching off (`--max-batch 1`) and on. Bounded
//! in count (`--requests` per client) and time (`--seconds` per level).
//! Prints completed, rejected (429), lost (any other outcome; must be 0),
//! p50/p99 latency, generated tokens per second and the mean batch size.
//!
//! `--model tiny` is the built-in tiny Emu2-Chat; `--model mid` writes a
//! random Emu2-Chat of mid size to a temporary folder (the LLM of
//! `cargo xtask bench --size mid`: hidden 768, 12 layers, 12 heads, MLP
//! 2048, with the tiny model's vocabulary and vision tower) and serves it
//! in f32; any other value is a model folder.
//!
//! ```sh
//! cargo run --release -p emu-serve --example bench_serve -- --model mid --requests 4 --seconds 60 --max-batch 1,8
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use serde_json::{json, Value};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

struct Opts {
    model: String,
    requests: usize,
    seconds: u64,
    max_tokens: usize,
    queue_depth: usize,
    clients: Vec<usize>,
    max_batch: Vec<usize>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        model: "tiny".into(),
        requests: 4,
        seconds: 60,
        max_tokens: 16,
        queue_depth: 16,
        clients: vec![1, 8, 32],
        max_batch: vec![1, 8],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|_| format!("{a}: `{v}` is not a number"));
        let list = |v: String| v.split(',').map(|c| num(c.to_string())).collect::<Result<Vec<_>, _>>();
        match a.as_str() {
            "--model" => o.model = value()?,
            "--requests" => o.requests = num(value()?)?,
            "--seconds" => o.seconds = num(value()?)? as u64,
            "--max-tokens" => o.max_tokens = num(value()?)?,
            "--queue-depth" => o.queue_depth = num(value()?)?,
            "--clients" => o.clients = list(value()?)?,
            "--max-batch" => o.max_batch = list(value()?)?,
            other => return Err(format!("unknown option {other}; see the file's header")),
        }
    }
    Ok(o)
}

/// The mid-size LLM (that of `cargo xtask bench --size mid`).
const MID_HIDDEN: usize = 768;
const MID_LAYERS: usize = 12;
const MID_HEADS: usize = 12;
const MID_MLP: usize = 2048;

/// Writes a random Emu2-Chat with the mid-size LLM into `dir`: the tiny
/// chat model's tokenizer and vision tower, and its config with the LLM
/// fields replaced. Weights are uniform with standard deviation
/// `1/sqrt(fan_in)` (norms 1, embeddings 1), as the tiny model draws them.
fn write_mid(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    emu::tiny::write_model(dir, emu::tiny::TinyKind::Chat)?;
    let mut config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    config["hidden_size"] = json!(MID_HIDDEN);
    config["num_hidden_layers"] = json!(MID_LAYERS);
    config["num_attention_heads"] = json!(MID_HEADS);
    config["num_key_value_heads"] = json!(MID_HEADS);
    config["intermediate_size"] = json!(MID_MLP);
    let vocab = config["vocab_size"].as_u64().ok_or("no vocab_size")? as usize;
    let vc = &config["vision_config"];
    let field = |k: &str| {
        vc[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or(format!("no vision_config.{k}"))
    };
    let (width, layers, mlp, image, patch) = (
        field("width")?,
        field("layers")?,
        field("intermediate_size")?,
        field("image_size")?,
        field("patch_size")?,
    );
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    // (key, dims, std): std 0 means all ones; negative means 1/sqrt(fan_in).
    let mut t: Vec<(String, Vec<usize>, f32)> = Vec::new();
    let fan = -1.0;
    let v = "model.visual.";
    let grid = image / patch;
    t.push((format!("{v}cls_token"), vec![1, 1, width], 0.5));
    t.push((format!("{v}pos_embed"), vec![1, grid * grid + 1, width], 0.5));
    t.push((format!("{v}patch_embed.proj.weight"), vec![width, 3, patch, patch], 0.1));
    t.push((format!("{v}patch_embed.proj.bias"), vec![width], 0.02));
    for i in 0..layers {
        let b = format!("{v}blocks.{i}.");
        for norm in ["norm1", "norm2"] {
            t.push((format!("{b}{norm}.weight"), vec![width], 0.0));
            t.push((format!("{b}{norm}.bias"), vec![width], 0.02));
        }
        t.push((format!("{b}attn.qkv.weight"), vec![3 * width, width], fan));
        t.push((format!("{b}attn.q_bias"), vec![width], 0.02));
        t.push((format!("{b}attn.v_bias"), vec![width], 0.02));
        t.push((format!("{b}attn.proj.weight"), vec![width, width], fan));
        t.push((format!("{b}attn.proj.bias"), vec![width], 0.02));
        t.push((format!("{b}mlp.fc1.weight"), vec![mlp, width], fan));
        t.push((format!("{b}mlp.fc1.bias"), vec![mlp], 0.02));
        t.push((format!("{b}mlp.fc2.weight"), vec![width, mlp], fan));
        t.push((format!("{b}mlp.fc2.bias"), vec![width], 0.02));
    }
    let h = MID_HIDDEN;
    t.push(("project_up.weight".into(), vec![h, width], fan));
    t.push(("project_down.weight".into(), vec![width, h], fan));
    let lm = "model.decoder.lm.";
    t.push((format!("{lm}model.embed_tokens.weight"), vec![vocab, h], 1.0));
    for i in 0..MID_LAYERS {
        let l = format!("{lm}model.layers.{i}.");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.push((format!("{l}self_attn.{proj}.weight"), vec![h, h], fan));
        }
        t.push((format!("{l}mlp.gate_proj.weight"), vec![MID_MLP, h], fan));
        t.push((format!("{l}mlp.up_proj.weight"), vec![MID_MLP, h], fan));
        t.push((format!("{l}mlp.down_proj.weight"), vec![h, MID_MLP], fan));
        t.push((format!("{l}input_layernorm.weight"), vec![h], 0.0));
        t.push((format!("{l}post_attention_layernorm.weight"), vec![h], 0.0));
    }
    t.push((format!("{lm}model.norm.weight"), vec![h], 0.0));
    t.push((format!("{lm}lm_head.weight"), vec![vocab, h], fan));
    write_safetensors(&dir.join("model.safetensors"), &t)
}

/// A safetensors file of f32 tensors drawn uniformly (the format: 8-byte
/// header length, JSON header, little-endian data).
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, f32)]) -> Result<(), Box<dyn std::error::Error>> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (key, dims, _) in tensors {
        let end = offset + 4 * dims.iter().product::<usize>();
        header.insert(
            key.clone(),
            json!({"dtype": "F32", "shape": dims, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    let mut rng = emu_core::testing::Rng::new(0x454D_5532_4D49_4421);
    for (_, dims, std) in tensors {
        let n: usize = dims.iter().product();
        let std = if *std < 0.0 {
            1.0 / (dims.iter().skip(1).product::<usize>().max(1) as f32).sqrt()
        } else {
            *std
        };
        // Uniform on [-a, a) has standard deviation a / sqrt(3).
        let a = (std * 3f32.sqrt()) as f64;
        for _ in 0..n {
            let x = if std == 0.0 { 1.0 } else { rng.uniform(-a, a) as f32 };
            f.write_all(&x.to_le_bytes())?;
        }
    }
    f.flush()?;
    Ok(())
}

#[derive(Default)]
struct Level {
    latencies: Vec<Duration>,
    rejected: usize,
    lost: usize,
    tokens: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn run_level(o: &Opts, addr: std::net::SocketAddr, image: &str, clients: usize) -> (Level, f64) {
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let body = json!({
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": format!("client {c}: what is in the picture?")}]}],
                "max_tokens": o.max_tokens,
            });
            let n = o.requests;
            std::thread::spawn(move || {
                let mut l = Level::default();
                for _ in 0..n {
                    if Instant::now() > deadline {
                        break;
                    }
                    let t = Instant::now();
                    let r = common::post(addr, "/v1/chat/completions", &body);
                    match r.status {
                        200 => {
                            l.latencies.push(t.elapsed());
                            l.tokens += r.json()["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                        }
                        429 => {
                            l.rejected += 1;
                            // Honour Retry-After, within the level's time.
                            let wait: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1);
                            std::thread::sleep(Duration::from_secs(wait.min(2)));
                        }
                        _ => l.lost += 1,
                    }
                }
                l
            })
        })
        .collect();
    let mut all = Level::default();
    for h in handles {
        match h.join() {
            Ok(l) => {
                all.latencies.extend(l.latencies);
                all.rejected += l.rejected;
                all.lost += l.lost;
                all.tokens += l.tokens;
            }
            Err(_) => all.lost += 1,
        }
    }
    (all, t0.elapsed().as_secs_f64())
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mid_dir = (o.model == "mid").then(|| {
        let dir = tempfile::Builder::new()
            .prefix("emu-bench-mid-")
            .tempdir()
            .expect("temp dir");
        eprintln!("writing the mid-size random model to {}", dir.path().display());
        write_mid(dir.path()).expect("mid model written");
        dir
    });
    let model = match &mid_dir {
        Some(d) => d.path().display().to_string(),
        None => o.model.clone(),
    };
    let image = common::data_uri(&common::png(64, 48));
    println!(
        "emu serve load benchmark: model {}, {} requests per client, max_tokens {}, queue depth {}",
        o.model, o.requests, o.max_tokens, o.queue_depth
    );
    println!(
        "{:>9} {:>7} {:>9} {:>8} {:>5} {:>9} {:>9} {:>9} {:>10}",
        "max-batch", "clients", "completed", "rejected", "lost", "p50 ms", "p99 ms", "tok/s", "mean batch"
    );
    for &max_batch in &o.max_batch {
        let mut args = emu_serve::ServeArgs::for_model(&model);
        args.queue_depth = o.queue_depth;
        args.max_batch = max_batch;
        if mid_dir.is_some() {
            args.dtype = Some("f32".into());
        }
        let server = common::start(&args);
        let addr = server.addr();
        for &clients in &o.clients {
            let runs0 = common::metric(addr, "emu_batch_size_count");
            let sum0 = common::metric(addr, "emu_batch_size_sum");
            let (mut all, wall) = run_level(&o, addr, &image, clients);
            let runs = common::metric(addr, "emu_batch_size_count") - runs0;
            let batched = common::metric(addr, "emu_batch_size_sum") - sum0;
            all.latencies.sort();
            println!(
                "{:>9} {:>7} {:>9} {:>8} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>10.2}",
                max_batch,
                clients,
                all.latencies.len(),
                all.rejected,
                all.lost,
                percentile(&all.latencies, 0.5),
                percentile(&all.latencies, 0.99),
                all.tokens as f64 / wall,
                if runs > 0.0 { batched / runs } else { f64::NAN }
            );
        }
    }
}
