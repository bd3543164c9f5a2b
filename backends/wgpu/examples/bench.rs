//! Matmul throughput and a few op timings on the wgpu adapter against the CPU
//! backend, in the same run: `cargo run -p emu-backend-wgpu --example bench`
//! (dependencies are optimised in the dev profile; `--release` also works).
//!
//! An optional argument keeps only the cases whose name contains it.
//!
//! Times are wall-clock per call after a warm-up, with the device drained
//! (`synchronize`) before the clock stops, so they include submission cost.

use std::time::Instant;

use emu_backend_cpu::CpuBackend;
use emu_backend_wgpu::WgpuBackend;
use emu_core::backend::{AttnMask, Conv2dParams};
use emu_core::testing::Rng;
use emu_core::{Backend, HostTensor, Result};

fn random(rng: &mut Rng, dims: &[usize]) -> Result<HostTensor> {
    let n = dims.iter().product();
    HostTensor::from_f32(dims, (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect())
}

/// Seconds per call of `f`, which returns a tensor that is kept until the
/// clock stops (so lazy work is not dropped unmeasured).
fn time<B: Backend>(
    be: &B,
    sync: &dyn Fn() -> Result<()>,
    reps: usize,
    f: &dyn Fn() -> Result<B::Tensor>,
) -> Result<f64> {
    let _ = be;
    drop(f()?);
    sync()?;
    let t0 = Instant::now();
    let mut keep = Vec::with_capacity(reps);
    for _ in 0..reps {
        keep.push(f()?);
    }
    sync()?;
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

fn run<B: Backend>(be: &B, sync: &dyn Fn() -> Result<()>, case: &str, hosts: &[HostTensor], flops: f64) -> Result<f64> {
    let ts: Vec<B::Tensor> = hosts.iter().map(|h| be.upload(h)).collect::<Result<_>>()?;
    let reps = if flops > 1e9 { 3 } else { 10 };
    let f = || -> Result<B::Tensor> {
        match case {
            "matmul" => be.matmul(&ts[0], &ts[1]),
            "linear" => be.linear(&ts[0], &ts[1], None),
            "attention" => be.attention(&ts[0], &ts[1], &ts[2], &AttnMask::causal(0), 0.125),
            "conv2d" => be.conv2d(&ts[0], &ts[1], None, Conv2dParams::new(1, 1)),
            "softmax" => be.softmax_last_dim(&ts[0]),
            "layer_norm" => be.layer_norm(&ts[0], None, None, 1e-5),
            _ => unreachable!(),
        }
    };
    time(be, sync, reps, &f)
}

fn main() -> Result<()> {
    let gpu = match WgpuBackend::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no wgpu adapter: {e}");
            return Ok(());
        }
    };
    let cpu = CpuBackend::new();
    println!("wgpu adapter: {}", gpu.adapter_name());
    let mut rng = Rng::new(1);
    let mut cases: Vec<(String, &str, Vec<HostTensor>, f64)> = Vec::new();
    for n in [256usize, 512, 1024, 2048] {
        cases.push((
            format!("matmul {n}x{n}x{n}"),
            "matmul",
            vec![random(&mut rng, &[n, n])?, random(&mut rng, &[n, n])?],
            2.0 * (n * n * n) as f64,
        ));
    }
    // Mid-size transformer shapes: a 2048-wide projection of 256 tokens, one
    // decode step of it, causal attention over 256 positions with 16 heads.
    cases.push((
        "linear [256,2048]x[2048,2048]^T".into(),
        "linear",
        vec![random(&mut rng, &[256, 2048])?, random(&mut rng, &[2048, 2048])?],
        2.0 * 256.0 * 2048.0 * 2048.0,
    ));
    cases.push((
        "linear decode [1,2048]x[2048,2048]^T".into(),
        "linear",
        vec![random(&mut rng, &[1, 2048])?, random(&mut rng, &[2048, 2048])?],
        2.0 * 2048.0 * 2048.0,
    ));
    cases.push((
        "attention [1,16,256,128] causal".into(),
        "attention",
        vec![
            random(&mut rng, &[1, 16, 256, 128])?,
            random(&mut rng, &[1, 16, 256, 128])?,
            random(&mut rng, &[1, 16, 256, 128])?,
        ],
        4.0 * 16.0 * 256.0 * 256.0 * 128.0,
    ));
    cases.push((
        "conv2d [1,128,64,64]*[128,128,3,3]".into(),
        "conv2d",
        vec![
            random(&mut rng, &[1, 128, 64, 64])?,
            random(&mut rng, &[128, 128, 3, 3])?,
        ],
        2.0 * 128.0 * 128.0 * 9.0 * 64.0 * 64.0,
    ));
    cases.push((
        "softmax [4096,1024]".into(),
        "softmax",
        vec![random(&mut rng, &[4096, 1024])?],
        0.0,
    ));
    cases.push((
        "layer_norm [4096,1024]".into(),
        "layer_norm",
        vec![random(&mut rng, &[4096, 1024])?],
        0.0,
    ));
    println!(
        "{:<40} {:>12} {:>12} {:>10} {:>10}",
        "op", "wgpu ms", "cpu ms", "wgpu GF/s", "cpu GF/s"
    );
    let gsync = || gpu.synchronize();
    let csync = || Ok(());
    let filter = std::env::args().nth(1).unwrap_or_default();
    for (name, case, hosts, flops) in cases.iter().filter(|c| c.0.contains(&filter)) {
        let g = run(&gpu, &gsync, case, hosts, *flops)?;
        let c = run(&cpu, &csync, case, hosts, *flops)?;
        let gf = |t: f64| {
            if *flops > 0.0 {
                format!("{:.1}", flops / t / 1e9)
            } else {
                "-".into()
            }
        };
        println!(
            "{name:<40} {:>12.3} {:>12.3} {:>10} {:>10}",
            g * 1e3,
            c * 1e3,
            gf(g),
            gf(c)
        );
    }
    Ok(())
}
