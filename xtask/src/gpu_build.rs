//! `cargo xtask gpu-build`: the binaries that `tools/gpu/cuda-check.sh` runs
//! on a machine with an NVIDIA GPU and no Rust toolchain, built here,
//! stripped, in one folder:
//!
//! * `bin/xtask` — `test` (the conformance suite) and `bench`;
//! * `tests/<crate>-<test>` — the CUDA backend's test binaries (op suite,
//!   fused attention, GEMM layouts, components against the reference
//!   fixtures) and the wgpu backend's op suite and components;
//! * `build-root.txt` — the workspace path baked into the test binaries
//!   (they find `tests/fixtures` through it; the script links it to the
//!   checkout it runs in);
//! * `cuda-check.sh` — a copy of the script.
//!
//! The folder must stay under [`MAX_BYTES`] so it travels with a checkout.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Size limit of the bundle.
pub const MAX_BYTES: u64 = 60_000_000;

/// `(package, test target)` pairs bundled as `tests/<package>-<test>`.
pub const TESTS: &[(&str, &str)] = &[
    ("emu-backend-cuda", "ops"),
    ("emu-backend-cuda", "attention"),
    ("emu-backend-cuda", "matmul"),
    ("emu-backend-cuda", "startup"),
    ("emu-backend-cuda", "components"),
    ("emu-backend-cuda", "quant"),
    ("emu-backend-wgpu", "components"),
];

/// Executables that one `cargo` invocation built: `(target name, path)`.
fn cargo_executables(root: &Path, args: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    eprintln!("gpu-build: cargo {}", args.join(" "));
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo {} failed ({})", args.join(" "), out.status));
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str()) {
            exes.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

/// Copies `src` to `dst` and strips its symbols (with the system's `strip`
/// where there is one; unstripped otherwise, which the size check catches).
fn install(src: &Path, dst: &Path) -> Result<u64, String> {
    std::fs::copy(src, dst).map_err(|e| format!("copying {} to {}: {e}", src.display(), dst.display()))?;
    match Command::new("strip").arg("--strip-all").arg(dst).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("gpu-build: strip {} failed ({s}); kept unstripped", dst.display()),
        Err(e) => eprintln!("gpu-build: no `strip` ({e}); {} kept unstripped", dst.display()),
    }
    Ok(std::fs::metadata(dst).map_err(|e| e.to_string())?.len())
}

pub fn build(root: &Path, profile: &str, out: &Path) -> Result<(), String> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| format!("clearing {}: {e}", out.display()))?;
    }
    for d in ["bin", "tests"] {
        std::fs::create_dir_all(out.join(d)).map_err(|e| format!("creating {}: {e}", out.display()))?;
    }
    let mut total = 0u64;
    let mut listing = Vec::new();
    let xtask = cargo_executables(root, &["build", "--profile", profile, "-p", "xtask"])?
        .into_iter()
        .find(|(n, _)| n == "xtask")
        .ok_or("cargo built no xtask binary")?;
    let n = install(&xtask.1, &out.join("bin/xtask"))?;
    total += n;
    listing.push(format!("{n:>12} bin/xtask"));
    for (pkg, test) in TESTS {
        let exes = cargo_executables(
            root,
            &["test", "--profile", profile, "--no-run", "-p", pkg, "--test", test],
        )?;
        let (_, exe) = exes
            .into_iter()
            .find(|(n, _)| n == test)
            .ok_or_else(|| format!("cargo built no `{test}` test of {pkg}"))?;
        let rel = format!("tests/{pkg}-{test}");
        let n = install(&exe, &out.join(&rel))?;
        total += n;
        listing.push(format!("{n:>12} {rel}"));
    }
    let script = root.join("tools/gpu/cuda-check.sh");
    std::fs::copy(&script, out.join("cuda-check.sh")).map_err(|e| format!("copying {}: {e}", script.display()))?;
    std::fs::write(out.join("build-root.txt"), format!("{}\n", root.display()))
        .map_err(|e| format!("writing build-root.txt: {e}"))?;
    listing.push(format!("{total:>12} total ({profile} profile)"));
    std::fs::write(out.join("MANIFEST.txt"), listing.join("\n") + "\n").map_err(|e| e.to_string())?;
    println!("{}", listing.join("\n"));
    if total > MAX_BYTES {
        return Err(format!(
            "the bundle in {} is {total} bytes, over the {MAX_BYTES} limit",
            out.display()
        ));
    }
    println!(
        "gpu-build: {} ready; run `bash {}/cuda-check.sh` on the GPU machine",
        out.display(),
        out.display()
    );
    Ok(())
}
