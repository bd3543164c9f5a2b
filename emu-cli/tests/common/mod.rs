//! Helpers shared by the `emu` binary tests: running the binary, locating
//! fixtures, and writing small safetensors checkpoints with the reference
//! `safetensors` crate (an independent writer, so the tests do not check the
//! tool against itself).

#![allow(dead_code)]

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn loader_fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/loader").join(name)
}

/// `../shared/reference/<rel>` if the reference material is beside the checkout.
pub fn shared_reference(rel: &str) -> Option<PathBuf> {
    let p = repo().join("../shared/reference").join(rel);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("skipping the part that needs {}: not present", p.display());
        None
    }
}

pub fn emu(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_emu"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("the emu binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `emu` and expects success; returns stdout.
pub fn emu_ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = emu(args);
    assert!(
        o.status.success(),
        "emu {:?} failed ({}): {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

/// Runs `emu`, expects a non-zero exit with a one-line `error` message and no
/// panic; returns the message.
pub fn emu_err(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = emu(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure, got success: {}", stdout(&o));
    assert!(o.status.code().is_some(), "killed by a signal: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("error"), "{err:?}");
    err
}

pub struct T {
    pub name: &'static str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl T {
    pub fn new(name: &'static str, dtype: Dtype, shape: &[usize]) -> T {
        T {
            name,
            dtype,
            shape: shape.to_vec(),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Writes `tensors` (deterministic, distinct byte patterns) to a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[T]) {
    let datas: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = t.numel() * t.dtype.bitsize() / 8;
            (0..n).map(|j| ((i * 31 + j * 7) % 61) as u8).collect()
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&datas)
        .map(|(t, d)| {
            (
                t.name.to_string(),
                TensorView::new(t.dtype, t.shape.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
