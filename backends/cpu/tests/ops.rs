//! The backend conformance suite on the CPU backend, plus the trait's default
//! composites run through a wrapper that only forwards the primitives.

use emu_backend_cpu::CpuBackend;
use emu_core::testing::{assert_error_suite_passes, assert_op_suite_passes};
use emu_core::DType;

fn assert_suite_passes(dtype: DType) {
    assert_op_suite_passes(&CpuBackend::new(), dtype);
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
    assert_error_suite_passes(&CpuBackend::new());
}
