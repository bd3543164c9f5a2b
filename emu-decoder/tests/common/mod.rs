#![allow(dead_code)]

use emu_core::checkpoint::Checkpoint;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/decoder")
}

/// A fixture safetensors file of inputs and expected outputs.
pub fn load(name: &str) -> Checkpoint {
    Checkpoint::open(fixtures().join(name)).unwrap()
}

pub fn f32s(m: &Checkpoint, key: &str) -> Vec<f32> {
    m.get(key).unwrap().to_f32_vec().unwrap()
}

pub fn dims(m: &Checkpoint, key: &str) -> Vec<usize> {
    m.get(key).unwrap().dims().to_vec()
}

/// max|a - b| / max|b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12);
    num / den
}
