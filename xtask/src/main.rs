//! `cargo xtask <command>`: project automation that is not a unit test.
//!
//! * `test [--backend cpu|wgpu|onnx|cuda|all] [--dtype f32|bf16|f16|all]` — runs the backend
//!   conformance suite (every op against f64 references) on each selected
//!   backend and prints the measured error of every check; exits non-zero on
//!   any failure.
//! * `fixtures [SET ...]` — regenerates `tests/fixtures/` with the PyTorch
//!   reference (needs a venv with `tools/reference/requirements.txt`; set
//!   `EMU_REF_PYTHON` to its python, default `.venv-ref/bin/python`).
//! * `gpu-build [--profile release|dev] [--out DIR]` — builds what
//!   `tools/gpu/cuda-check.sh` runs on a GPU machine without Rust (this
//!   runner and bench, and the GPU backends' test binaries), stripped, into
//!   one folder (default `target/gpu-bundle`, under 60 MB); see [`gpu_build`].
//! * `bench [...]` — times every component (single ops, vision, LLM, UNet,
//!   VAE) on every available backend and, with `--torch PYTHON`, PyTorch,
//!   in one table with each output's error against the CPU backend; see
//!   [`bench`].

mod bench;
mod gpu_build;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use emu_core::testing::{format_checks, run_error_suite, run_op_suite};
use emu_core::{Backend, DType};

const USAGE: &str = "usage: cargo xtask test [--backend cpu|wgpu|onnx|cuda|all] [--dtype f32|bf16|f16|all]
       cargo xtask fixtures [SET ...]
       cargo xtask gpu-build [--profile release|dev] [--out DIR]
       ";

/// Backends this build knows about; each new backend crate adds itself here.
const BACKENDS: &[&str] = &["cpu", "wgpu", "onnx", "cuda"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => cmd_test(&args[1..]),
        Some("fixtures") => cmd_fixtures(&args[1..]),
        Some("bench") => bench::cmd_bench(&args[1..]).map_err(|e| e.to_string()),
        Some("gpu-build") => cmd_gpu_build(&args[1..]),
        _ => Err(format!("{USAGE}{}", bench::USAGE)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Result<Option<&'a str>, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .map(|s| Some(s.as_str()))
            .ok_or_else(|| format!("{name} needs a value\n{USAGE}")),
        None => Ok(None),
    }
}

fn cmd_test(args: &[String]) -> Result<(), String> {
    let backends: Vec<&str> = match flag(args, "--backend")?.unwrap_or("all") {
        "all" => BACKENDS.to_vec(),
        b if BACKENDS.contains(&b) => vec![b],
        b => return Err(format!("unknown backend `{b}`; this build has {BACKENDS:?}")),
    };
    let dtypes: Vec<DType> = match flag(args, "--dtype")?.unwrap_or("all") {
        "all" => vec![DType::F32, DType::BF16, DType::F16],
        d => vec![DType::parse(d)
            .filter(|d| d.is_float())
            .ok_or_else(|| format!("unknown dtype `{d}`"))?],
    };
    let mut failures = 0;
    for &name in &backends {
        failures += match name {
            "cpu" => run_suites(&emu_backend_cpu::CpuBackend::new(), &dtypes)?,
            // Without an adapter, `all` skips wgpu; asking for it by name fails.
            "wgpu" => match emu_backend_wgpu::WgpuBackend::new() {
                Ok(be) => run_suites(&be, &dtypes)?,
                Err(e) if backends.len() > 1 => {
                    println!("== wgpu: skipped: {e}");
                    0
                }
                Err(e) => return Err(e.to_string()),
            },
            // Without ONNX Runtime (ORT_DYLIB_PATH), `all` skips onnx; asking for it by name fails.
            "onnx" => match emu_backend_onnx::OnnxBackend::new() {
                Ok(be) => run_suites(&be, &dtypes)?,
                Err(e) if backends.len() > 1 => {
                    println!("== onnx: skipped: {e}");
                    0
                }
                Err(e) => return Err(e.to_string()),
            },
            // Without an NVIDIA driver and the CUDA libraries, `all` skips cuda;
            // asking for it by name fails.
            "cuda" => match emu_backend_cuda::CudaBackend::new() {
                Ok(be) => {
                    println!("== cuda device: {}", be.device_name());
                    run_suites(&be, &dtypes)?
                }
                Err(e) if backends.len() > 1 => {
                    println!("== cuda: skipped: {e}");
                    0
                }
                Err(e) => return Err(e.to_string()),
            },
            other => unreachable!("backend {other} listed but not wired"),
        };
    }
    if failures > 0 {
        return Err(format!("{failures} check(s) failed"));
    }
    Ok(())
}

fn run_suites<B: Backend>(be: &B, dtypes: &[DType]) -> Result<usize, String> {
    let mut failures = 0;
    for &dt in dtypes {
        if !be.supports(dt) {
            println!("== {} {dt}: not supported, skipped", be.name());
            continue;
        }
        let checks = run_op_suite(be, dt).map_err(|e| format!("{} {dt}: suite setup failed: {e}", be.name()))?;
        let failed = checks.iter().filter(|c| !c.passed()).count();
        let worst = checks
            .iter()
            .filter(|c| c.error.is_none())
            .map(|c| c.rel_err)
            .fold(0.0, f64::max);
        println!(
            "== {} {dt}: {} op checks, {failed} failed, worst relative error {worst:.2e}",
            be.name(),
            checks.len()
        );
        print!("{}", format_checks(&checks));
        failures += failed;
    }
    let wrongly_ok = run_error_suite(be).map_err(|e| e.to_string())?;
    println!(
        "== {} malformed calls: {} wrongly accepted {wrongly_ok:?}",
        be.name(),
        wrongly_ok.len()
    );
    Ok(failures + wrongly_ok.len())
}

fn cmd_gpu_build(args: &[String]) -> Result<(), String> {
    let profile = flag(args, "--profile")?.unwrap_or("release");
    let out = flag(args, "--out")?
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/gpu-bundle"));
    gpu_build::build(&workspace_root(), profile, &out)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cmd_fixtures(sets: &[String]) -> Result<(), String> {
    let root = workspace_root();
    let python = std::env::var_os("EMU_REF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv-ref/bin/python"));
    if !python.exists() {
        return Err(format!(
            "no reference python at {}: create a venv with `python3 -m venv .venv-ref && .venv-ref/bin/pip install -r tools/reference/requirements.txt`, or set EMU_REF_PYTHON",
            python.display()
        ));
    }
    let status = Command::new(&python)
        .arg(root.join("tools/reference/make_fixtures.py"))
        .args(sets)
        .current_dir(&root)
        .status()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    if !status.success() {
        return Err(format!("fixture generation failed ({status})"));
    }
    Ok(())
}
