//! The encoder against the PyTorch reference (tools/reference/fixtures_vision.py):
//! a tiny EVA ViT with random weights in the HF, native and Emu2-Gen layouts.

use emu_backend_cpu::CpuBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::{DType, Tensor};
use emu_vision::{VisionEncoder, VisionError};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vision")
}

fn expected(key: &str) -> (Vec<usize>, Vec<f32>) {
    let ckpt = Checkpoint::open(fixtures().join("expected_model.safetensors")).unwrap();
    let t = ckpt.get_as(key, DType::F32).unwrap();
    (t.dims().to_vec(), t.to_f32_vec().unwrap())
}

/// max|a - b| / max|b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| (*y as f64).abs()).fold(1e-30, f64::max);
    num / den
}

fn check(name: &str, got: &Tensor<CpuBackend>, key: &str, tol: f64) -> f64 {
    let (dims, want) = expected(key);
    assert_eq!(got.dims(), dims, "{name}: {key} shape");
    let e = rel_err(&got.to_f32_vec().unwrap(), &want);
    println!("{name}: {key} rel err {e:.3e}");
    assert!(e <= tol, "{name}: {key} rel err {e:.3e} > {tol:.0e}");
    e
}

fn pixels(cpu: &CpuBackend) -> Tensor<CpuBackend> {
    let (dims, v) = expected("pixels");
    Tensor::from_f32(cpu, &dims, v).unwrap()
}

fn run_all(name: &str, enc: &VisionEncoder<CpuBackend>, tol: f64) {
    let cpu = CpuBackend::new();
    let feats = enc.encode(&pixels(&cpu)).unwrap();
    check(name, &feats, "features", tol);
    for nq in [1, 4, 16] {
        let pooled = enc.pool(&feats, nq).unwrap();
        check(name, &pooled, &format!("pooled_{nq}"), tol);
        let projected = enc.project(&pooled).unwrap();
        check(name, &projected, &format!("projected_{nq}"), tol);
    }
    let n_query = enc.config().vision.n_query;
    let direct = enc.embed_images(&pixels(&cpu), n_query).unwrap();
    check(name, &direct, &format!("projected_{n_query}"), tol);
}

#[test]
fn f32_matches_reference_in_every_layout() {
    let cpu = CpuBackend::new();
    for layout in ["hf", "native", "gen_native"] {
        let enc = VisionEncoder::from_dir(&cpu, fixtures().join(layout), DType::F32).unwrap();
        assert_eq!(enc.vit().config().mlp_hidden, 80);
        run_all(&format!("f32/{layout}"), &enc, 1e-4);
    }
}

#[test]
fn bf16_matches_reference() {
    let cpu = CpuBackend::new();
    let enc = VisionEncoder::from_dir(&cpu, fixtures().join("hf"), DType::BF16).unwrap();
    let feats = enc.encode(&pixels(&cpu)).unwrap();
    assert_eq!(feats.dtype(), DType::BF16);
    run_all("bf16/hf", &enc, 2e-2);
}

#[test]
fn gen_pipeline_root_resolves_to_multimodal_encoder() {
    let root = std::env::temp_dir().join(format!("emu-vision-gen-root-{}", std::process::id()));
    let sub = root.join("multimodal_encoder");
    std::fs::create_dir_all(&sub).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("hf").join(f), sub.join(f)).unwrap();
    }
    let cpu = CpuBackend::new();
    let enc = VisionEncoder::from_dir(&cpu, &root, DType::F32);
    std::fs::remove_dir_all(&root).unwrap();
    run_all("f32/gen_pipeline", &enc.unwrap(), 1e-4);
}

#[test]
fn wrong_inputs_are_errors_not_panics() {
    let cpu = CpuBackend::new();
    let enc = VisionEncoder::from_dir(&cpu, fixtures().join("hf"), DType::F32).unwrap();
    let bad = Tensor::zeros(&cpu, &[1, 3, 27, 28], DType::F32).unwrap();
    assert!(matches!(enc.encode(&bad), Err(VisionError::InvalidArgument(_))));
    let feats = enc.encode(&pixels(&cpu)).unwrap();
    for nq in [0, 2, 9, 64] {
        assert!(
            matches!(enc.pool(&feats, nq), Err(VisionError::InvalidArgument(_))),
            "n_query {nq}"
        );
    }
    // A checkpoint without any vision encoder names the prefixes it tried.
    let err = VisionEncoder::from_dir(&cpu, fixtures().join("preprocess"), DType::F32).unwrap_err();
    assert!(
        matches!(err, VisionError::Io { .. } | VisionError::Config { .. }),
        "{err}"
    );
}

#[test]
fn photo_end_to_end_matches_pil_torchvision_and_reference() {
    let cpu = CpuBackend::new();
    let enc = VisionEncoder::from_dir(&cpu, fixtures().join("hf"), DType::F32).unwrap();
    let pre = emu_vision::Preprocessor::for_config(&enc.config().vision).unwrap();
    let photo = fixtures().join("preprocess/coffee_q90.jpg");
    let pixels = pre.batch_from_paths(&cpu, &[photo]).unwrap();
    check("e2e", &enc.encode(&pixels).unwrap(), "e2e_features", 1e-4);
    let n_query = enc.config().vision.n_query;
    check(
        "e2e",
        &enc.embed_images(&pixels, n_query).unwrap(),
        "e2e_projected",
        1e-4,
    );
}

#[test]
fn gen_bf16_variant_beside_a_dangling_plain_index_loads() {
    // Emu2-Gen's multimodal_encoder/: model.bf16-0000N-of-0000M.safetensors with
    // model.safetensors.index.bf16.json, plus a plain index whose shards are absent.
    let dir = std::env::temp_dir().join(format!("emu-vision-gen-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hf = fixtures().join("hf");
    std::fs::copy(hf.join("config.json"), dir.join("config.json")).unwrap();
    let shard = "model.bf16-00001-of-00001.safetensors";
    std::fs::copy(hf.join("model.safetensors"), dir.join(shard)).unwrap();
    let keys: Vec<String> = Checkpoint::open(hf.join("model.safetensors"))
        .unwrap()
        .keys()
        .map(str::to_string)
        .collect();
    let index = |file: &str| {
        let map: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| (k.clone(), serde_json::Value::from(file)))
            .collect();
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string()
    };
    std::fs::write(dir.join("model.safetensors.index.bf16.json"), index(shard)).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        index("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    // The plain layout alone does not open: the fallback is what makes this load.
    let plain = Checkpoint::open_dir(&dir, None);
    let cpu = CpuBackend::new();
    let enc = VisionEncoder::from_dir(&cpu, &dir, DType::F32);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(plain.is_err());
    run_all("f32/gen_bf16_variant", &enc.unwrap(), 1e-4);
}

#[test]
fn native_single_file_with_an_explicit_config() {
    let cpu = CpuBackend::new();
    let dir = fixtures().join("gen_native");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = emu_vision::EmuVisionConfig::from_json_str(&text).unwrap();
    let enc = VisionEncoder::from_checkpoint(&cpu, dir.join("model.safetensors"), config, DType::F32).unwrap();
    run_all("f32/native_file", &enc, 1e-4);
    // The Emu2 preset describes the real encoder, not this tiny one: shapes must be refused by name.
    let real = emu_vision::EmuVisionConfig::emu2(64).unwrap();
    let err = VisionEncoder::from_checkpoint(&cpu, dir.join("model.safetensors"), real, DType::F32).unwrap_err();
    assert!(err.to_string().contains("multimodal_encoder.visual."), "{err}");
}

/// Upstream's native Emu2/Emu2-Chat files keep the projection inside the
/// language model (`decoder.lm.project_up.weight`, upstream `lm.py`); the
/// fixture's native file is rewritten with that key and must load the same.
#[test]
fn native_file_with_the_projection_under_decoder_lm() {
    use safetensors::tensor::TensorView;
    let src = std::fs::read(fixtures().join("native/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let tensors: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let k = if k == "project_up.weight" {
                "decoder.lm.project_up.weight".to_string()
            } else {
                k
            };
            (k, v)
        })
        .collect();
    assert!(tensors.iter().any(|(k, _)| k == "decoder.lm.project_up.weight"));
    let dir = std::env::temp_dir().join(format!("emu-vision-native-lm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("native/config.json"), dir.join("config.json")).unwrap();
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
    let cpu = CpuBackend::new();
    let enc = VisionEncoder::from_dir(&cpu, &dir, DType::F32);
    std::fs::remove_dir_all(&dir).unwrap();
    run_all("f32/native_decoder_lm", &enc.unwrap(), 1e-4);
}

/// `load_quantized` against a dense encoder whose selected linears hold
/// their quantize-then-dequantize round trip. The fixture's MLP width (80)
/// is not a whole number of Q8_0 blocks, so `fc2` stays dense on both sides.
#[test]
fn quantized_blocks_match_their_dequantized_weights() {
    use emu_core::{BlockQuant, QuantType, Weights};
    let cpu = CpuBackend::new();
    let hf = fixtures().join("hf");
    let config = emu_vision::EmuVisionConfig::from_file(hf.join("config.json")).unwrap();
    let src = Checkpoint::open_dir(&hf, None).unwrap();
    let px = pixels(&cpu);
    let original = VisionEncoder::from_dir(&cpu, &hf, DType::F32)
        .unwrap()
        .encode(&px)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let attention_only = BlockQuant {
        attention: Some(QuantType::Q4K),
        mlp: None,
    };
    for (i, (quant, expected)) in [
        (BlockQuant::all(QuantType::Q8_0), 6),
        (BlockQuant::all(QuantType::Q4K), 6),
        (attention_only, 4),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = std::env::temp_dir().join(format!("emu-vision-quant-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(hf.join("config.json"), dir.join("config.json")).unwrap();
        let select = |k: &str, d: &[usize]| quant.format(emu_vision::linear_group(k)?, *d.last()?);
        let replaced =
            emu_core::testing::write_dequantized_copy(&src, &dir.join("model.safetensors"), &select).unwrap();
        let dense = VisionEncoder::from_dir(&cpu, &dir, DType::F32);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(replaced, expected, "{quant:?}: linears with whole blocks");
        let want = dense.unwrap().encode(&px).unwrap().to_f32_vec().unwrap();
        let q = VisionEncoder::load_quantized(&cpu, &Weights::new(&src), config.clone(), DType::F32, quant).unwrap();
        let got = q.encode(&px).unwrap().to_f32_vec().unwrap();
        let (e, moved) = (rel_err(&got, &want), rel_err(&want, &original));
        println!("vision {quant:?}: vs dequantized weights {e:.2e}, quantization moved the output {moved:.2e}");
        assert!(e <= 1e-5, "{quant:?}: rel err {e:.2e}");
        assert!(
            moved > 1e-4,
            "{quant:?}: quantization left the output unchanged ({moved:.2e})"
        );
    }
}
