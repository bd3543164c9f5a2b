//! The backend conformance suite on ONNX Runtime. Needs the library named by
//! `ORT_DYLIB_PATH` (`.ci/run` provides it); without it the tests say so and skip.

use emu_backend_onnx::OnnxBackend;
use emu_core::testing::{assert_error_suite_passes, assert_op_suite_passes};
use emu_core::DType;

fn backend() -> Option<OnnxBackend> {
    emu_core::testing::available(OnnxBackend::new())
}

fn assert_suite_passes(dtype: DType) {
    let Some(be) = backend() else { return };
    assert_op_suite_passes(&be, dtype);
}

#[test]
fn every_op_matches_the_f64_reference_in_f32() {
    assert_suite_passes(DType::F32);
}

#[test]
fn every_op_matches_the_f64_reference_in_bf16() {
    assert_suite_passes(DType::BF16);
}

#[test]
fn every_op_matches_the_f64_reference_in_f16() {
    assert_suite_passes(DType::F16);
}

#[test]
fn malformed_op_calls_are_errors() {
    let Some(be) = backend() else { return };
    assert_error_suite_passes(&be);
}
