//! The quantized linear on the device (GGUF blocks uploaded once, read in
//! place by the matvec kernels for up to 8 rows, dequantized for cuBLAS
//! beyond) against dequantize-then-f32-linear on the host: row counts on
//! both sides of the switch, biases, every float dtype, and the device copy
//! of a weight following the tensor it belongs to. Skips without a GPU.

mod common;

use common::{backend, rel_err, uniform};
use emu_core::testing::{
    assert_linear_quant_cases, assert_quant_copies_follow_tensors, linear_quant_reference, quantized_uniform,
    run_linear_quant, Rng,
};
use emu_core::{Backend, DType, HostTensor, QuantType};

/// Row counts on both sides of the matvec kernels' 8-row limit.
#[test]
fn quantized_linear_matches_dequantize_then_linear() {
    let Some(be) = backend() else { return };
    assert_linear_quant_cases(
        &be,
        41,
        &[
            (1, 33, 512, false),
            (5, 17, 256, true),
            (8, 8, 768, true),
            (9, 8, 768, true),
            (40, 65, 256, false),
        ],
    );
}

/// In bf16 and f16 the kernels read rounded inputs and round the output; the
/// error is that of the output's rounding plus the inputs', nothing more.
#[test]
fn half_precision_inputs_stay_within_their_rounding() {
    let Some(be) = backend() else { return };
    let mut rng = Rng::new(43);
    for dt in [DType::BF16, DType::F16] {
        for q in [QuantType::Q8_0, QuantType::Q4K] {
            for m in [1, 3, 12] {
                let w = quantized_uniform(&mut rng, 24, 512, q);
                let x = uniform(&mut rng, &[m, 512], -1.0, 1.0).to_dtype(dt).unwrap();
                let b = uniform(&mut rng, &[24], -1.0, 1.0).to_dtype(dt).unwrap();
                let got = run_linear_quant(&be, &x, &w, Some(&b));
                let xf = x.to_dtype(DType::F32).unwrap();
                let bf = b.to_dtype(DType::F32).unwrap();
                let want = linear_quant_reference(&xf, &w, Some(&bf));
                let e = rel_err(&got, &want);
                // The conformance suite's tolerances of the two dtypes.
                let tol = if dt == DType::BF16 { 1e-2 } else { 5e-3 };
                assert!(e <= tol, "{dt} {q} m={m}: rel err {e:e}");
            }
        }
    }
}

#[test]
fn device_copies_follow_their_tensors() {
    let Some(be) = backend() else { return };
    // A round's device copy stops counting once its tensor is gone.
    assert_quant_copies_follow_tensors(&be, |round| {
        assert_eq!(be.quantized_weights_resident(), 0, "round {round}");
    });
}

#[test]
fn a_weight_that_does_not_fit_the_input_is_an_error() {
    let Some(be) = backend() else { return };
    let mut rng = Rng::new(44);
    let w = quantized_uniform(&mut rng, 8, 256, QuantType::Q8_0);
    let x = be.upload(&HostTensor::zeros(&[2, 512], DType::F32).unwrap()).unwrap();
    let e = be.linear_quant(&x, &w, None).unwrap_err().to_string();
    assert!(e.contains("test.weight"), "{e}");
}
