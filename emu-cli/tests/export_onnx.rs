//! `emu export-onnx` on the tiny model: every component's file loads back
//! into ONNX Runtime (with the weights inline, and with external data forced)
//! and reproduces what the onnx backend computed in process (the LLM graphs at
//! a cache position, the UNet at a timestep and time ids, other than the ones
//! they were traced at); the manifest lists what the files declare.
//!
//! With `EMU_ONNX_EXPORT_DIR` set, the external-data export is kept in
//! `$EMU_ONNX_EXPORT_DIR/export-onnx`, and the Q4_K one in
//! `$EMU_ONNX_EXPORT_DIR/export-onnx-q4_k`, for `tools/onnx/check_export_onnx.py`.

use emu_backend_onnx::{run_model_file, OnnxBackend};
use emu_cli::commands::export_onnx::{run, ExportOnnxArgs};
use emu_core::{DType, HostTensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn args(out: &Path, component: &str, threshold: Option<u64>) -> ExportOnnxArgs {
    ExportOnnxArgs {
        model: "tiny".into(),
        component: component.into(),
        output: out.to_path_buf(),
        dtype: None,
        max_len: Some(24),
        prefill_len: Some(6),
        unet_batch: 2,
        image_size: None,
        context_len: 5,
        external_data_threshold: threshold,
        check_data: true,
        quantize: None,
        quantize_linears: "attn,mlp".into(),
        quantize_components: "llm".into(),
    }
}

/// Reads the `.npy` files the exporter writes (`<f4` or `<i8`, C order).
fn read_npy(path: &Path) -> HostTensor {
    let b = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    let shape_txt = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let dims: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let dtype = if header.contains("'<f4'") {
        DType::F32
    } else {
        DType::I64
    };
    HostTensor::from_bytes(&dims, dtype, b[10 + hlen..].to_vec()).unwrap()
}

fn rel_err(a: &HostTensor, b: &HostTensor) -> f64 {
    let (a, b) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
    assert_eq!(a.len(), b.len());
    let num = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    num / b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30)
}

/// Runs every file of the manifest in `out` on its check inputs; returns the
/// manifest.
fn check_files(out: &Path, expect_external: bool) -> Value {
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    for f in files {
        let file = f["file"].as_str().unwrap();
        let ext = f["external_data"].as_str();
        assert_eq!(ext.is_some(), expect_external, "{file}: external data {ext:?}");
        if let Some(e) = ext {
            assert!(out.join(e).is_file(), "{file}: {e} missing");
        }
        let check = out.join(f["check"].as_str().unwrap());
        let inputs: Vec<(String, HostTensor)> = f["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let name = p["name"].as_str().unwrap().to_string();
                let h = read_npy(&check.join(format!("{name}.npy")));
                let dims: Vec<usize> = p["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(h.dims(), dims, "{file}: input {name}");
                (name, h)
            })
            .collect();
        let feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, h)| (n.as_str(), h)).collect();
        let got = run_model_file(&out.join(file), &feeds).unwrap();
        let outputs = f["outputs"].as_array().unwrap();
        assert_eq!(got.len(), outputs.len(), "{file}: outputs");
        let mut worst = 0f64;
        for (g, p) in got.iter().zip(outputs) {
            let name = p["name"].as_str().unwrap();
            let want = read_npy(&check.join(format!("{name}.npy")));
            assert_eq!(g.dims(), want.dims(), "{file}: output {name}");
            let e = rel_err(g, &want);
            assert!(e <= 1e-4, "{file}: output {name} rel err {e:.2e}");
            worst = worst.max(e);
        }
        eprintln!(
            "{file}: {} outputs, worst rel err vs in-process {worst:.2e}",
            outputs.len()
        );
    }
    manifest
}

fn names(ports: &Value) -> Vec<String> {
    ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_component_exports_reloads_and_matches_in_process() {
    if let Err(e) = OnnxBackend::new() {
        return eprintln!("skipping: {e}");
    }
    let keep = std::env::var_os("EMU_ONNX_EXPORT_DIR").map(|d| PathBuf::from(d).join("export-onnx"));
    let out = keep
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("emu-export-onnx-ext-{}", std::process::id())));
    // External data forced: every weight of 1 KiB or more goes to <file>.data.
    run(&args(&out, "all", Some(0))).unwrap();
    let m = check_files(&out, true);
    let files = m["files"].as_array().unwrap();
    let by_name = |n: &str| {
        files
            .iter()
            .find(|f| f["file"] == n)
            .unwrap_or_else(|| panic!("{n} not exported"))
    };
    assert_eq!(m["opset"], 17);
    assert_eq!(names(&by_name("vision.onnx")["inputs"]), ["pixel_values"]);
    assert_eq!(names(&by_name("vision.onnx")["outputs"])[..2], ["features", "pooled"]);
    assert_eq!(names(&by_name("vae.onnx")["outputs"]), ["image"]);
    assert_eq!(names(&by_name("unet.onnx")["outputs"]), ["noise_pred"]);
    let mut unet_in = names(&by_name("unet.onnx")["inputs"]);
    unet_in.sort();
    // The tiny Emu2-Gen UNet has SDXL's text_time addition embedding.
    assert_eq!(
        unet_in,
        ["encoder_hidden_states", "sample", "text_embeds", "time_ids", "timestep"]
    );
    for g in ["llm_decode.onnx", "llm_prefill.onnx"] {
        let f = by_name(g);
        let ins = names(&f["inputs"]);
        assert_eq!(ins[..2], ["inputs_embeds", "position"], "{g}");
        assert!(ins.contains(&"past_key.0".to_string()) && ins.contains(&"past_value.1".to_string()));
        let outs = names(&f["outputs"]);
        assert_eq!(outs[0], "logits");
        assert_eq!(outs.len() + 1, ins.len(), "{g}: a present per past");
        assert_ne!(
            f["notes"]["traced_position"],
            read_npy(&out.join(f["check"].as_str().unwrap()).join("position.npy"))
                .to_i64_vec()
                .unwrap()[0],
            "{g}: checked at the traced position"
        );
    }
    if keep.is_none() {
        std::fs::remove_dir_all(&out).unwrap();
    }

    // Weights inline (the default threshold) for one component.
    let out = std::env::temp_dir().join(format!("emu-export-onnx-inline-{}", std::process::id()));
    run(&args(&out, "llm", None)).unwrap();
    check_files(&out, false);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn unknown_components_are_errors() {
    let out = std::env::temp_dir().join(format!("emu-export-onnx-bad-{}", std::process::id()));
    let e = run(&args(&out, "text", None)).unwrap_err();
    assert!(e.to_string().contains("vision, llm, unet, vae or all"), "{e}");
}

fn contrib(file: &Value, op: &str) -> u64 {
    file["contrib_ops"][op].as_u64().unwrap_or(0)
}

/// `--quantize q4_k --quantize-components all`: the quantized linears are
/// ONNX Runtime's `MatMulNBits` nodes in the vision, LLM and UNet files (the
/// VAE has none), every file reloads and reproduces the in-process run, and
/// quantization moved the numbers away from the float export's. A folder
/// written by `emu convert --quantize` exports its stored blocks the same
/// way, without the flag.
#[test]
fn quantized_linears_export_as_matmulnbits() {
    if let Err(e) = OnnxBackend::new() {
        return eprintln!("skipping: {e}");
    }
    let tmp = tempfile::tempdir().unwrap();
    // Kept for tools/onnx/check_export_onnx.py as the float export is.
    let keep = std::env::var_os("EMU_ONNX_EXPORT_DIR").map(|d| PathBuf::from(d).join("export-onnx-q4_k"));
    let q = keep.unwrap_or_else(|| tmp.path().join("q"));
    let mut a = args(&q, "all", None);
    a.quantize = Some("q4_k".into());
    a.quantize_components = "all".into();
    run(&a).unwrap();
    let m = check_files(&q, false);
    assert_eq!(m["quantize"]["type"], "q4_k");
    assert_eq!(m["quantize"]["components"], "all");
    for f in m["files"].as_array().unwrap() {
        let n = contrib(f, "MatMulNBits");
        match f["component"].as_str().unwrap() {
            "vae" => assert_eq!(f["contrib_ops"], serde_json::json!({}), "the VAE stays dense"),
            c => assert!(n > 0, "{c}: no MatMulNBits in {}", f["file"]),
        }
    }
    let dense = tmp.path().join("dense");
    run(&args(&dense, "vision", None)).unwrap();
    let dm = check_files(&dense, false);
    assert_eq!(dm["quantize"], Value::Null);
    assert_eq!(dm["files"][0]["contrib_ops"], serde_json::json!({}));
    let features = |d: &Path| read_npy(&d.join("check/vision/features.npy"));
    let moved = rel_err(&features(&q), &features(&dense));
    eprintln!("q4_k EVA features vs float: rel err {moved:.2e}");
    assert!(moved > 1e-6, "quantizing the EVA linears changed nothing ({moved:.2e})");
    assert!(
        moved < 0.05,
        "quantized EVA features far from the float ones ({moved:.2e})"
    );

    let src = tmp.path().join("gen");
    emu::tiny::write_model(&src, emu::tiny::TinyKind::Gen).unwrap();
    let converted = tmp.path().join("converted");
    let opts = emu::convert::ConvertOptions {
        dtype: DType::F32,
        shard_size: 5_000_000_000,
        force: false,
        variant: None,
        quantize: Some(emu_llm::LlmQuant {
            qtype: emu_core::QuantType::Q8_0,
            linears: emu_llm::QuantLinears::parse("attn,mlp").unwrap(),
        }),
        quantize_components: emu::pipeline::QuantComponents::default(),
    };
    emu::convert::convert(&src, &converted, &opts, &mut |_| {}).unwrap();
    let out = tmp.path().join("from-converted");
    let mut a = args(&out, "llm", None);
    a.model = converted.display().to_string();
    run(&a).unwrap();
    let m = check_files(&out, false);
    assert_eq!(m["quantize"], Value::Null);
    for f in m["files"].as_array().unwrap() {
        assert!(
            contrib(f, "MatMulNBits") > 0,
            "{}: stored blocks exported dense",
            f["file"]
        );
    }
}

/// `--quantize` that reaches no exported component, and the component list
/// without `--quantize`, are errors before anything is loaded or written.
#[test]
fn quantize_flags_that_change_nothing_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let mut a = args(&out, "vae", None);
    a.quantize = Some("q8_0".into());
    a.quantize_components = "all".into();
    let e = run(&a).unwrap_err().to_string();
    assert!(e.contains("exports none of them"), "{e}");
    let mut a = args(&out, "llm", None);
    a.quantize_components = "vision".into();
    let e = run(&a).unwrap_err().to_string();
    assert!(e.contains("add --quantize"), "{e}");
    let mut a = args(&out, "llm", None);
    a.quantize = Some("q5_k".into());
    assert!(run(&a).is_err());
    assert!(!out.exists(), "a refused export left {}", out.display());
}
