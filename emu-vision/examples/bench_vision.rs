//! Throughput of the EVA encoder (images/s) on the CPU backend, on a randomly
//! initialised model of a chosen size, and of the preprocessing on a folder
//! of photos (not a test).
//!
//! ```text
//! cargo run --release -p emu-vision --example bench_vision -- \
//!     [--image 224] [--patch 14] [--width 768] [--layers 12] [--head-width 64] [--mlp 3072] \
//!     [--batch 4] [--iters 3] [--dtype f32|bf16] [--save DIR] [--photos DIR]
//! ```
//!
//! `--save DIR` keeps the model as `DIR/config.json` + `DIR/model.safetensors`
//! (the HF Emu2 layout), so the same weights can be timed with the PyTorch
//! transcription used for the fixtures (run from the repository root):
//!
//! ```text
//! import json, sys, time, torch
//! from safetensors.torch import load_file
//! sys.path.insert(0, "tools/reference"); from fixtures_vision import eva_forward, pool
//! cfg = json.load(open(DIR + "/config.json"))["vision_config"]
//! w = {k[13:]: v for k, v in load_file(DIR + "/model.safetensors").items() if k.startswith("model.visual.")}
//! x = torch.randn(BATCH, 3, cfg["image_size"], cfg["image_size"])
//! with torch.no_grad():
//!     eva_forward(w, cfg, x); t, c = time.perf_counter(), time.process_time()
//!     for _ in range(ITERS): pool(eva_forward(w, cfg, x), cfg["n_query"])
//! print(BATCH * ITERS / (time.perf_counter() - t), "images/s;", time.process_time() - c, "CPU s")
//! ```
//!
//! and for `--photos DIR`, PIL + torchvision:
//!
//! ```text
//! import glob, time; from PIL import Image; import torchvision.transforms as T
//! tf = T.Compose([T.Resize((448, 448), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
//!                 T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
//! files = sorted(glob.glob(DIR + "/*.jp*g") + glob.glob(DIR + "/*.png"))
//! t, c = time.perf_counter(), time.process_time()
//! for f in files: tf(Image.open(f).convert("RGB"))
//! print(len(files) / (time.perf_counter() - t), "images/s;", time.process_time() - c, "CPU s")
//! ```

// `usize::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use emu_backend_cpu::CpuBackend;
use emu_core::{DType, Tensor};
use emu_vision::{Preprocessor, VisionEncoder};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    image: usize,
    patch: usize,
    width: usize,
    layers: usize,
    head_width: usize,
    mlp: usize,
    batch: usize,
    iters: usize,
    dtype: DType,
    save: Option<PathBuf>,
    photos: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        image: 224,
        patch: 14,
        width: 768,
        layers: 12,
        head_width: 64,
        mlp: 3072,
        batch: 4,
        iters: 3,
        dtype: DType::F32,
        save: None,
        photos: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || val.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--image" => a.image = num()?,
            "--patch" => a.patch = num()?,
            "--width" => a.width = num()?,
            "--layers" => a.layers = num()?,
            "--head-width" => a.head_width = num()?,
            "--mlp" => a.mlp = num()?,
            "--batch" => a.batch = num()?,
            "--iters" => a.iters = num()?,
            "--dtype" => a.dtype = val.parse().map_err(|e| format!("{e}"))?,
            "--save" => a.save = Some(PathBuf::from(val)),
            "--photos" => a.photos = Some(PathBuf::from(val)),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// CPU seconds (user + system) used by this process so far, from
/// `/proc/self/stat`; `None` off Linux. On a shared machine, wall time
/// measures the neighbours too, CPU time does not.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Uniform values in [-scale, scale) from a splitmix64 stream.
fn random(n: usize, scale: f32, state: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn write_model(a: &Args, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let (c, p, m) = (a.width, a.patch, a.mlp);
    let n = (a.image / a.patch).pow(2);
    let mut shapes: Vec<(String, Vec<usize>, f32)> = vec![
        ("cls_token".into(), vec![1, 1, c], 0.5),
        ("pos_embed".into(), vec![1, n + 1, c], 0.5),
        (
            "patch_embed.proj.weight".into(),
            vec![c, 3, p, p],
            (3.0 * (p * p) as f32).powf(-0.5),
        ),
        ("patch_embed.proj.bias".into(), vec![c], 0.1),
    ];
    for i in 0..a.layers {
        let b = format!("blocks.{i}.");
        let s = (c as f32).powf(-0.5);
        for (name, dims, scale) in [
            ("norm1.weight", vec![c], 0.2),
            ("norm1.bias", vec![c], 0.2),
            ("attn.qkv.weight", vec![3 * c, c], s),
            ("attn.q_bias", vec![c], 0.2),
            ("attn.v_bias", vec![c], 0.2),
            ("attn.proj.weight", vec![c, c], s),
            ("attn.proj.bias", vec![c], 0.1),
            ("norm2.weight", vec![c], 0.2),
            ("norm2.bias", vec![c], 0.2),
            ("mlp.fc1.weight", vec![m, c], s),
            ("mlp.fc1.bias", vec![m], 0.1),
            ("mlp.fc2.weight", vec![c, m], (m as f32).powf(-0.5)),
            ("mlp.fc2.bias", vec![c], 0.1),
        ] {
            shapes.push((format!("{b}{name}"), dims, scale));
        }
    }
    let mut state = 7u64;
    let mut bytes: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, dims, scale) in shapes {
        let mut v = random(dims.iter().product(), scale, &mut state);
        if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        bytes.insert(format!("model.visual.{name}"), (dims, b));
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, (d, b))| Ok((k.clone(), TensorView::new(Dtype::F32, d.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    let grid = a.image / a.patch;
    let cfg = serde_json::json!({
        "architectures": ["EmuForCausalLM"],
        "d_model": c,
        "vision_config": {
            "image_size": a.image, "patch_size": a.patch, "width": c, "layers": a.layers,
            "head_width": a.head_width, "mlp_ratio": m as f64 / c as f64, "intermediate_size": m,
            "layer_norm_eps": 1e-6, "n_query": if grid % 4 == 0 { 16 } else { 1 }, "v_query": 1,
            "postnorm": true, "qkv_bias": true, "xattn": false
        }
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    let cpu = CpuBackend::new();
    let dir = a
        .save
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("emu-vision-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    write_model(&a, &dir)?;
    let enc = VisionEncoder::from_dir(&cpu, &dir, a.dtype)?;
    if a.save.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    let s = a.image;
    let n_query = enc.config().vision.n_query;
    let mut state = 1u64;
    let x = Tensor::from_f32(&cpu, &[a.batch, 3, s, s], random(a.batch * 3 * s * s, 2.0, &mut state))?;
    // Warm-up, then timed runs; the download forces any lazy work to finish.
    enc.pool(&enc.encode(&x)?, n_query)?.to_f32_vec()?;
    let (t, cpu0) = (Instant::now(), cpu_seconds());
    for _ in 0..a.iters {
        enc.pool(&enc.encode(&x)?, n_query)?.to_f32_vec()?;
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a).unwrap_or(f64::NAN);
    println!(
        "encoder: image {s}, patch {}, width {}, {} layers, mlp {}, {}: batch {} x {} iters in {secs:.3} s wall \
         ({cpu:.2} CPU s) = {:.2} images/s",
        a.patch,
        a.width,
        a.layers,
        a.mlp,
        a.dtype,
        a.batch,
        a.iters,
        (a.batch * a.iters) as f64 / secs
    );
    if let Some(photos) = &a.photos {
        let mut files: Vec<PathBuf> = std::fs::read_dir(photos)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
            })
            .collect();
        files.sort();
        let pre = Preprocessor::new(448);
        let (t, cpu0) = (Instant::now(), cpu_seconds());
        for f in &files {
            pre.process_path(f)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a).unwrap_or(f64::NAN);
        println!(
            "preprocessing to 448: {} photos in {secs:.3} s wall ({cpu:.2} CPU s) = {:.2} images/s",
            files.len(),
            files.len() as f64 / secs
        );
    }
    Ok(())
}
