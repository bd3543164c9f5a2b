//! Times the backend's `linear` against candle's gemm (`x @ w^T`) for a
//! few row counts, to place the half-precision small-batch threshold.
//!
//! `cargo run --release -p emu-backend-cpu --example bench_linear -- [threads]`

use candle_core::{DType, Device, Tensor};
use emu_backend_cpu::CpuBackend;
use emu_core::Backend;
use std::time::Instant;

fn time(f: impl Fn()) -> f64 {
    f();
    let iters = 20;
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / iters as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(0);
    emu_backend_cpu::set_num_threads(threads)?;
    let cpu = CpuBackend::new();
    let dev = Device::Cpu;
    let (k, n) = (768, 2048);
    println!(
        "linear [m, {k}] x [{n}, {k}]^T on {} threads",
        emu_backend_cpu::num_threads()
    );
    println!("dtype  m   backend ms  candle gemm ms");
    for dt in [DType::BF16, DType::F16, DType::F32] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dt)?;
        for m in [1, 2, 4, 8, 16, 32, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dt)?;
            let ours = time(|| {
                cpu.linear(&x, &w, None).unwrap();
            });
            let wt = w.t()?;
            let gemm = time(|| {
                x.matmul(&wt).unwrap();
            });
            println!("{:5} {m:3} {ours:10.3} {gemm:14.3}", format!("{dt:?}"));
        }
    }
    Ok(())
}
