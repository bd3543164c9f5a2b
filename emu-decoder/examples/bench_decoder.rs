//! UNet step time (batch 2: the `[cond; uncond]` rows of a guided step) and
//! VAE decode time of a mid-size SDXL-structured config, emu-decoder on the
//! CPU backend against diffusers on the same machine.
//!
//! ```text
//! cargo run --release -p emu-decoder --example bench_decoder -- --torch /work/venv-ref/py/bin/python
//! ```
//!
//! With `--torch PYTHON`, `tools/reference/bench_decoder.py` builds the model
//! (random weights, `save_pretrained`) into `--dir` (default: a temporary
//! folder, removed afterwards) unless it already holds one, times diffusers
//! and writes its inputs and outputs; this program then loads the same folder
//! and times the same calls, checking its outputs against diffusers'.
//! Without `--torch`, `--dir` must name a diffusers folder with `unet/` and
//! `vae/` (e.g. one kept from an earlier run); only emu-decoder is timed.
//!
//! Options: `--dir D`, `--torch PYTHON`, `--warmup N` (1), `--iters N` (3),
//! `--latent N` (32: latents N×N, images 8N×8N), `--tokens N` (64),
//! `--bf16` (also time bf16 weights and activations).

use emu_backend_cpu::CpuBackend;
use emu_core::{Checkpoint, DType, Tensor};
use emu_decoder::unet::PerBlock;
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    dir: Option<PathBuf>,
    torch: Option<String>,
    warmup: usize,
    iters: usize,
    latent: usize,
    tokens: usize,
    bf16: bool,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        dir: None,
        torch: None,
        warmup: 1,
        iters: 3,
        latent: 32,
        tokens: 64,
        bf16: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => a.dir = Some(PathBuf::from(value()?)),
            "--torch" => a.torch = Some(value()?),
            "--warmup" => a.warmup = value()?.parse()?,
            "--iters" => a.iters = value()?.parse()?,
            "--latent" => a.latent = value()?.parse()?,
            "--tokens" => a.tokens = value()?.parse()?,
            "--bf16" => a.bf16 = true,
            "-h" | "--help" => {
                println!(
                    "bench_decoder [--torch PYTHON] [--dir DIR] [--warmup N] [--iters N] [--latent N] [--tokens N] [--bf16]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    Ok(a)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Median and minimum of timings in milliseconds.
fn stats(ms: &[f64]) -> (f64, f64) {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0])
}

/// Runs `f` `warmup` times untimed, then `iters` times timed; returns the
/// timings and the last output (read back to the host, which also makes sure
/// the work is finished inside the timed region).
fn timed(warmup: usize, iters: usize, mut f: impl FnMut() -> Res<Vec<f32>>) -> Res<(Vec<f64>, Vec<f32>)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters);
    let mut out = Vec::new();
    for _ in 0..iters {
        let t0 = Instant::now();
        out = f()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok((times, out))
}

/// max|a - b| / max|b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12);
    num / den
}

/// Deterministic standard-normal-ish values (Box–Muller over xorshift) for
/// runs without diffusers' inputs.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

/// The benchmark inputs, and diffusers' outputs when it ran.
struct Inputs {
    sample: Tensor<CpuBackend>,
    context: Tensor<CpuBackend>,
    text_embeds: Tensor<CpuBackend>,
    time_ids: Vec<[f32; 6]>,
    timestep: f32,
    z: Tensor<CpuBackend>,
    eps: Option<Vec<f32>>,
    decoded: Option<Vec<f32>>,
}

fn inputs(
    be: &CpuBackend,
    dir: &Path,
    ucfg: &UNet2DConditionConfig,
    vcfg: &AutoencoderKLConfig,
    args: &Args,
) -> Res<Inputs> {
    let io_path = dir.join("bench_io.safetensors");
    if io_path.exists() {
        let io = Checkpoint::open(&io_path)?;
        let up = |k: &str| -> Res<Tensor<CpuBackend>> { Ok(Tensor::from_host(be, &io.get(k)?)?) };
        let ids = io.get("time_ids")?.to_f32_vec()?;
        return Ok(Inputs {
            sample: up("sample")?,
            context: up("context")?,
            text_embeds: up("text_embeds")?,
            time_ids: ids
                .chunks_exact(6)
                .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
                .collect(),
            timestep: io.get("timestep")?.to_f32_vec()?[0],
            z: up("z")?,
            eps: Some(io.get("eps")?.to_f32_vec()?),
            decoded: Some(io.get("decoded")?.to_f32_vec()?),
        });
    }
    let (h, w) = (args.latent, args.latent);
    let px = (h * vcfg.downscale_factor()) as f32;
    let sample_dims = [2, ucfg.in_channels, h, w];
    let width = match &ucfg.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Each(v) => *v.first().ok_or("empty cross_attention_dim")?,
    };
    let ctx_dims = [2, args.tokens, width];
    let context = Tensor::from_f32(be, &ctx_dims, randn(ctx_dims.iter().product(), 2))?;
    let z_dims = [1, vcfg.latent_channels, h, w];
    Ok(Inputs {
        sample: Tensor::from_f32(be, &sample_dims, randn(sample_dims.iter().product(), 1))?,
        text_embeds: context.mean(1, false)?,
        context,
        time_ids: vec![[px, px, 0.0, 0.0, px, px]; 2],
        timestep: 500.0,
        z: Tensor::from_f32(be, &z_dims, randn(z_dims.iter().product(), 3))?,
        eps: None,
        decoded: None,
    })
}

fn per_block(v: &PerBlock<usize>) -> String {
    match v {
        PerBlock::One(x) => x.to_string(),
        PerBlock::Each(v) => format!("{v:?}"),
    }
}

struct Row {
    ms: Vec<f64>,
    err: Option<f32>,
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("cores: {cores}, load average at start: {}", load_average());

    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None if args.torch.is_some() => (
            std::env::temp_dir().join(format!("emu-bench-decoder-{}", std::process::id())),
            true,
        ),
        None => {
            return Err(
                "without --torch there are no weights to build: pass --dir with a diffusers folder \
                        (unet/, vae/), or --torch PYTHON to build one with diffusers"
                    .into(),
            )
        }
    };

    let torch: Option<serde_json::Value> = match &args.torch {
        Some(python) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference/bench_decoder.py");
            println!("diffusers: {} {} {}", python, script.display(), dir.display());
            let status = Command::new(python)
                .arg(&script)
                .arg(&dir)
                .args(["--warmup", &args.warmup.to_string()])
                .args(["--iters", &args.iters.to_string()])
                .args(["--latent", &args.latent.to_string()])
                .args(["--tokens", &args.tokens.to_string()])
                .status()?;
            if !status.success() {
                return Err(format!("{script:?} failed: {status}").into());
            }
            Some(serde_json::from_str(&std::fs::read_to_string(
                dir.join("bench_torch.json"),
            )?)?)
        }
        None => {
            println!("note: no --torch given, timing emu-decoder only");
            None
        }
    };

    let be = CpuBackend::new();
    let ucfg = UNet2DConditionConfig::from_file(dir.join("unet/config.json"))?;
    let vcfg = AutoencoderKLConfig::from_file(dir.join("vae/config.json"))?;
    let inp = inputs(&be, &dir, &ucfg, &vcfg, &args)?;
    let unet_ckpt = Checkpoint::open_dir(dir.join("unet"), None)?;
    let vae_ckpt = Checkpoint::open_dir(dir.join("vae"), None)?;

    let mut dtypes = vec![DType::F32];
    if args.bf16 {
        dtypes.push(DType::BF16);
    }
    let mut results = Vec::new();
    for &dtype in &dtypes {
        let unet = UNet2DConditionModel::load(&be, &unet_ckpt.weights(), &ucfg, dtype)?;
        let vae = AutoencoderKL::load(&be, &vae_ckpt.weights(), &vcfg, dtype)?;
        let sample = inp.sample.to_dtype(dtype)?;
        let context = inp.context.to_dtype(dtype)?;
        let cond = TextTimeCond {
            text_embeds: inp.text_embeds.to_dtype(dtype)?,
            time_ids: inp.time_ids.clone(),
        };
        let z = inp.z.to_dtype(dtype)?;
        let (ums, eps) = timed(args.warmup, args.iters, || {
            Ok(unet
                .forward(&sample, inp.timestep, &context, Some(&cond))?
                .to_f32_vec()?)
        })?;
        let (vms, dec) = timed(args.warmup, args.iters, || Ok(vae.decode(&z)?.to_f32_vec()?))?;
        let unet_row = Row {
            ms: ums,
            err: inp.eps.as_ref().map(|e| rel_err(&eps, e)),
        };
        let vae_row = Row {
            ms: vms,
            err: inp.decoded.as_ref().map(|d| rel_err(&dec, d)),
        };
        results.push((dtype, unet_row, vae_row));
    }

    let ms_of = |key: &str| -> Option<Vec<f64>> {
        torch
            .as_ref()?
            .get(key)?
            .as_array()?
            .iter()
            .map(|v| v.as_f64())
            .collect()
    };
    let (t_unet, t_vae) = (ms_of("unet_ms"), ms_of("vae_ms"));
    let f = vcfg.downscale_factor();
    println!();
    println!(
        "config: UNet block_out_channels {:?}, layers_per_block {}, cross_attention_dim {}; \
         VAE block_out_channels {:?}",
        ucfg.block_out_channels,
        per_block(&ucfg.layers_per_block),
        per_block(&ucfg.cross_attention_dim),
        vcfg.block_out_channels
    );
    if let Some(t) = &torch {
        println!(
            "diffusers {} / torch {} ({} threads); UNet params {}, VAE decoder params {}",
            t["diffusers"].as_str().unwrap_or("?"),
            t["torch"].as_str().unwrap_or("?"),
            t["threads"],
            t["unet_params"],
            t["vae_decoder_params"]
        );
    }
    println!(
        "emu-decoder CPU backend, {cores} cores; warmup {}, {} timed iterations; median (min) ms; ratio of medians (of minimums)",
        args.warmup, args.iters
    );
    println!();
    let (h, w) = (inp.sample.dim(2)?, inp.sample.dim(3)?);
    let calls = [
        (
            format!(
                "UNet step, batch 2 (guided), {h}x{w} latents, {} tokens",
                inp.context.dim(1)?
            ),
            &t_unet,
        ),
        (format!("VAE decode, 1 latent -> {}x{} px", h * f, w * f), &t_vae),
    ];
    println!(
        "{:<56} {:>5} {:>18} {:>18} {:>15} {:>9}",
        "call", "dtype", "diffusers f32", "emu-decoder", "emu/diffusers", "rel err"
    );
    for (i, (name, torch_ms)) in calls.iter().enumerate() {
        for (dtype, unet_row, vae_row) in &results {
            let row = if i == 0 { unet_row } else { vae_row };
            let (m, lo) = stats(&row.ms);
            let (tcol, ratio) = match torch_ms {
                Some(t) => {
                    let (tm, tlo) = stats(t);
                    (
                        format!("{tm:.1} ({tlo:.1})"),
                        format!("{:.2}x ({:.2}x)", m / tm, lo / tlo),
                    )
                }
                None => ("-".into(), "-".into()),
            };
            let err = row.err.map(|e| format!("{e:.2e}")).unwrap_or_else(|| "-".into());
            println!(
                "{:<56} {:>5} {:>18} {:>18} {:>15} {:>9}",
                name,
                format!("{dtype:?}"),
                tcol,
                format!("{m:.1} ({lo:.1})"),
                ratio,
                err
            );
        }
    }
    println!();
    println!("load average at end: {}", load_average());
    if temporary {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
