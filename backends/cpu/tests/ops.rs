//! The backend conformance suite on the CPU backend, plus the trait's default
//! composites run through a wrapper that only forwards the primitives.

use emu_backend_cpu::CpuBackend;
use emu_core::testing::{format_checks, run_error_suite, run_op_suite};
use emu_core::DType;

fn assert_suite_passes(dtype: DType) {
    let checks = run_op_suite(&CpuBackend::new(), dtype).expect("suite setup");
    assert!(checks.len() > 80, "suite ran only {} checks", checks.len());
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).cloned().collect();
    assert!(
        failed.is_empty(),
        "{dtype} op checks failed:\n{}",
        format_checks(&failed)
    );
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
    let wrongly_ok = run_error_suite(&CpuBackend::new()).expect("suite setup");
    assert!(wrongly_ok.is_empty(), "these calls should have failed: {wrongly_ok:?}");
}
