//! Loading from the checkpoint layouts Emu2 ships (the LLaMA under
//! `model.decoder.lm.`, `decoder.lm.` or `multimodal_encoder.decoder.lm.`),
//! and load errors that name the offending tensor.

mod common;

use common::{fixture_dir, rel_err, write_safetensors};
use emu_backend_cpu::CpuBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::DType;
use emu_llm::{Llama, LlamaConfig, Logits};
use std::path::{Path, PathBuf};

/// The mha fixture model re-saved with every key renamed by `rename`.
fn resave(dir: &Path, name: &str, rename: impl Fn(&str) -> Option<String>) -> PathBuf {
    let src = Checkpoint::open(fixture_dir("mha").join("model.safetensors")).unwrap();
    let mut owned = Vec::new();
    for k in src.keys() {
        if let Some(new) = rename(k) {
            let h = src.get(k).unwrap();
            owned.push((new, h.dims().to_vec(), h.as_bytes().to_vec()));
        }
    }
    let path = dir.join(name);
    write_safetensors(&path, &owned);
    path
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("emu-llm-load-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits_of(path: &Path) -> Vec<f32> {
    let cfg = LlamaConfig::from_file(fixture_dir("mha").join("config.json")).unwrap();
    logits_with(path, &cfg)
}

fn logits_with(path: &Path, cfg: &LlamaConfig) -> Vec<f32> {
    let backend = CpuBackend::new();
    let ckpt = Checkpoint::open(path).unwrap();
    let root = emu_llm::lm_weights(&ckpt).unwrap();
    let m = Llama::load(&backend, &root, cfg, DType::F32).unwrap();
    let x = m.embed(&[1, 5, 9, 300], 1).unwrap();
    let mut cache = m.new_cache(1, 4).unwrap();
    let o = m.forward_embeds(&x, &mut cache, Logits::All).unwrap();
    o.logits.unwrap().to_f32_vec().unwrap()
}

#[test]
fn emu2_layouts_load_the_same_model() {
    let dir = tmp_dir("layouts");
    let plain = logits_of(&fixture_dir("mha").join("model.safetensors"));
    for prefix in ["model.decoder.lm.", "decoder.lm.", "multimodal_encoder.decoder.lm."] {
        // Emu2 checkpoints hold other modules beside the LLaMA.
        let path = resave(&dir, &format!("{}.safetensors", prefix.replace('.', "_")), |k| {
            Some(format!("{prefix}{k}"))
        });
        let got = logits_of(&path);
        assert_eq!(rel_err(&got, &plain), 0.0, "{prefix}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let dir = tmp_dir("errors");
    let backend = CpuBackend::new();
    let cfg = LlamaConfig::from_file(fixture_dir("mha").join("config.json")).unwrap();
    let path = resave(&dir, "missing.safetensors", |k| {
        (k != "model.layers.1.mlp.up_proj.weight").then(|| k.to_string())
    });
    let ckpt = Checkpoint::open(&path).unwrap();
    let root = emu_llm::lm_weights(&ckpt).unwrap();
    let e = Llama::load(&backend, &root, &cfg, DType::F32).unwrap_err();
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    // A config that disagrees with the weights: the shape error names the tensor.
    let mut wide = cfg.clone();
    wide.intermediate_size = 96;
    let ckpt = Checkpoint::open(fixture_dir("mha").join("model.safetensors")).unwrap();
    let root = emu_llm::lm_weights(&ckpt).unwrap();
    let e = Llama::load(&backend, &root, &wide, DType::F32).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("96"),
        "{msg}"
    );
    // No LLaMA at all.
    let path = resave(&dir, "none.safetensors", |k| {
        k.starts_with("lm_head").then(|| format!("visual.{k}"))
    });
    let ckpt = Checkpoint::open(&path).unwrap();
    let e = emu_llm::lm_weights(&ckpt).unwrap_err();
    assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tied_embeddings_reuse_the_embedding_matrix() {
    let dir = tmp_dir("tied");
    // lm_head.weight replaced by a copy of the embedding matrix ...
    let src = Checkpoint::open(fixture_dir("mha").join("model.safetensors")).unwrap();
    let embed = src.get("model.embed_tokens.weight").unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = src
        .keys()
        .filter(|k| *k != "lm_head.weight")
        .map(|k| {
            let h = src.get(k).unwrap();
            (k.to_string(), h.dims().to_vec(), h.as_bytes().to_vec())
        })
        .collect();
    let tied_path = dir.join("tied.safetensors");
    write_safetensors(&tied_path, &owned);
    owned.push((
        "lm_head.weight".into(),
        embed.dims().to_vec(),
        embed.as_bytes().to_vec(),
    ));
    let copied_path = dir.join("copied.safetensors");
    write_safetensors(&copied_path, &owned);
    // ... gives what a tied config gives without any lm_head tensor.
    let mut cfg = LlamaConfig::from_file(fixture_dir("mha").join("config.json")).unwrap();
    let want = logits_with(&copied_path, &cfg);
    cfg.tie_word_embeddings = true;
    assert_eq!(rel_err(&logits_with(&tied_path, &cfg), &want), 0.0);
    // Untied, the missing lm_head is an error naming it.
    cfg.tie_word_embeddings = false;
    let ckpt = Checkpoint::open(&tied_path).unwrap();
    let e = Llama::load(
        &CpuBackend::new(),
        &emu_llm::lm_weights(&ckpt).unwrap(),
        &cfg,
        DType::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("lm_head.weight"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}
