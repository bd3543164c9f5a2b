//! Quantized linear on ONNX Runtime's `MatMulNBits`: against
//! dequantize-then-linear in f64, Q4_K sub-blocks whose
//! scale is 0 but not their minimum, and an exported graph that loads back
//! from a file with the contrib domain it needs.

use emu_backend_onnx::{run_model_file, OnnxBackend};
use emu_core::testing::{
    assert_linear_quant_cases, host_rel_err, linear_quant_reference, run_linear_quant, uniform_host, Rng,
};
use emu_core::{Backend, QuantTensor, QuantType};

fn backend() -> Option<OnnxBackend> {
    emu_core::testing::available(OnnxBackend::new())
}

#[test]
fn matmul_nbits_matches_dequantize_then_linear() {
    let Some(be) = backend() else { return };
    assert_linear_quant_cases(&be, 51, &[(1, 33, 512, false), (5, 17, 256, true), (3, 8, 768, true)]);
}

/// A Q4_K sub-block with scale 0 and a non-zero min (every weight `-dmin *
/// m`): the minima's own product carries it.
#[test]
fn q4_k_sub_blocks_without_a_scale_are_exact() {
    let Some(be) = backend() else { return };
    let mut rng = Rng::new(52);
    let w = QuantTensor::quantize(
        "t.weight",
        &uniform_host(&mut rng, &[4, 256], -1.0, 1.0),
        QuantType::Q4K,
    )
    .unwrap();
    let mut bytes = w.bytes().to_vec();
    // Row 0's first sub-block: 6-bit scale 0, min kept (scale byte 0's low
    // six bits).
    bytes[4] &= 0xC0;
    assert!(bytes[8] & 63 != 0 && bytes[2..4] != [0, 0], "the sub-block keeps a min");
    let w = QuantTensor::from_bytes("t.weight", QuantType::Q4K, &[4, 256], bytes).unwrap();
    let x = uniform_host(&mut rng, &[2, 256], -1.0, 1.0);
    let e = host_rel_err(
        &run_linear_quant(&be, &x, &w, None),
        &linear_quant_reference(&x, &w, None),
    );
    assert!(e <= 1e-6, "rel err {e:e}");
}

#[test]
fn exported_quantized_graphs_load_from_a_file() {
    let Some(be) = backend() else { return };
    let mut rng = Rng::new(53);
    let w = QuantTensor::quantize(
        "t.weight",
        &uniform_host(&mut rng, &[12, 256], -1.0, 1.0),
        QuantType::Q4K,
    )
    .unwrap();
    let x = uniform_host(&mut rng, &[3, 256], -1.0, 1.0);
    let xt = be.upload(&x).unwrap();
    let y = be.linear_quant(&xt, &w, None).unwrap();
    let model = be.export(&[("x", &xt)], &[("y", &y)], "quantized").unwrap();
    let dir = std::env::temp_dir().join(format!("emu-onnx-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("q.onnx");
    std::fs::write(&path, &model).unwrap();
    let outs = run_model_file(&path, &[("x", &x)]).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let e = host_rel_err(&outs[0], &linear_quant_reference(&x, &w, None));
    assert!(e <= 1e-5, "rel err {e:e}");
    let text = String::from_utf8_lossy(&model);
    assert!(text.contains("MatMulNBits") && text.contains("com.microsoft"));
}
