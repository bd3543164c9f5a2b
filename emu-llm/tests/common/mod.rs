//! Shared helpers of the fixture tests (tests/fixtures/llm, made by
//! tools/reference/fixtures_llm.py).
#![allow(dead_code)]

use emu_backend_cpu::CpuBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::{DType, HostTensor, Tensor};
use emu_llm::{Llama, LlamaConfig, SlotIds};
use std::path::PathBuf;

pub const SLOTS: SlotIds = SlotIds { image: 390, video: 391 };

pub fn fixture_dir(set: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/llm")
        .join(set)
}

pub struct Fixture {
    pub model: Llama<CpuBackend>,
    pub cases: Checkpoint,
    pub backend: CpuBackend,
}

impl Fixture {
    pub fn load(set: &str, dtype: DType) -> Self {
        let dir = fixture_dir(set);
        let backend = CpuBackend::new();
        let cfg = LlamaConfig::from_file(dir.join("config.json")).unwrap();
        let ckpt = Checkpoint::open(dir.join("model.safetensors")).unwrap();
        let root = emu_llm::lm_weights(&ckpt).unwrap();
        let model = Llama::load(&backend, &root, &cfg, dtype).unwrap();
        let cases = Checkpoint::open(dir.join("cases.safetensors")).unwrap();
        Self { model, cases, backend }
    }

    pub fn host(&self, key: &str) -> HostTensor {
        self.cases.get(key).unwrap()
    }

    pub fn f32s(&self, key: &str) -> Vec<f32> {
        self.host(key).to_f32_vec().unwrap()
    }

    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.host(key)
            .to_i64_vec()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect()
    }

    /// A reference output: torch's f32 run for f32 models, its bf16 run for
    /// bf16 models (same weights and inputs rounded to bf16).
    /// An id tensor `[B, N]` as its `B` rows.
    pub fn rows(&self, key: &str) -> Vec<Vec<u32>> {
        let ids = self.ids(key);
        let b = self.host(key).dims()[0];
        ids.chunks(ids.len() / b).map(<[u32]>::to_vec).collect()
    }

    pub fn expected(&self, key: &str) -> Vec<f32> {
        match self.model.dtype() {
            DType::BF16 => self.f32s(&format!("bf16.{key}")),
            _ => self.f32s(key),
        }
    }

    /// A fixture tensor uploaded in the model's dtype.
    pub fn tensor(&self, key: &str) -> Tensor<CpuBackend> {
        let h = self.host(key).to_dtype(self.model.dtype()).unwrap();
        Tensor::from_host(&self.backend, &h).unwrap()
    }
}

/// max|a - b| / max|b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12);
    num / den
}

/// Tolerance of a dtype per the project's rules.
pub fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 2e-2,
    }
}

pub fn check(what: &str, got: &[f32], want: &[f32], dtype: DType) -> f32 {
    let e = rel_err(got, want);
    println!("{what} ({dtype}): rel err {e:.3e}");
    assert!(e <= tol(dtype), "{what} ({dtype}): rel err {e} > {}", tol(dtype));
    e
}

/// Writes f32 tensors as a safetensors file (8-byte header length, JSON
/// header, raw little-endian data), the format `Checkpoint::open` reads.
pub fn write_safetensors(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dims, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": dims, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() & 7 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// The `settings` of a fixture's generation.json (transformers `generate`
/// keyword arguments, greedy or beam search) as configs with the 5.x
/// defaults for whatever a setting leaves out.
pub fn generation_settings(path: &std::path::Path) -> Vec<(String, emu_llm::GenerationConfig)> {
    use emu_llm::{EarlyStopping, GenerationConfig};
    use serde_json::Value;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for (name, kw) in v["settings"].as_object().unwrap() {
        assert_ne!(
            kw.get("do_sample").and_then(Value::as_bool),
            Some(true),
            "{name}: sampling is seed-specific"
        );
        let f = |k: &str, d: f64| kw.get(k).and_then(Value::as_f64).unwrap_or(d);
        let cfg = GenerationConfig {
            max_new_tokens: kw["max_new_tokens"].as_u64().unwrap() as usize,
            min_new_tokens: f("min_new_tokens", 0.0) as usize,
            eos_token_ids: vec![kw["eos_token_id"].as_u64().unwrap() as u32],
            pad_token_id: kw["pad_token_id"].as_u64().map(|p| p as u32),
            bos_token_id: kw["bos_token_id"].as_u64().map(|p| p as u32),
            do_sample: false,
            num_beams: kw["num_beams"].as_u64().unwrap() as usize,
            length_penalty: f("length_penalty", 1.0) as f32,
            repetition_penalty: f("repetition_penalty", 1.0) as f32,
            early_stopping: match kw.get("early_stopping") {
                None | Some(Value::Bool(false)) => EarlyStopping::Heuristic,
                Some(Value::Bool(true)) => EarlyStopping::Yes,
                Some(Value::String(s)) if s == "never" => EarlyStopping::Never,
                other => panic!("unknown early_stopping {other:?}"),
            },
            ..Default::default()
        };
        out.push((name.clone(), cfg));
    }
    out
}
