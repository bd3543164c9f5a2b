//! The backend conformance suite on ONNX Runtime. Needs the library named by
//! `ORT_DYLIB_PATH` (`.ci/run` provides it); without it the tests say so and skip.

use emu_backend_onnx::OnnxBackend;
use emu_core::testing::{format_checks, run_error_suite, run_op_suite};
use emu_core::{DType, Error};

fn backend() -> Option<OnnxBackend> {
    match OnnxBackend::new() {
        Ok(b) => Some(b),
        Err(e @ Error::BackendUnavailable { .. }) => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("unexpected error creating the onnx backend: {e}"),
    }
}

fn assert_suite_passes(dtype: DType) {
    let Some(be) = backend() else { return };
    let checks = run_op_suite(&be, dtype).expect("suite setup");
    assert!(checks.len() > 80, "suite ran only {} checks", checks.len());
    let worst = checks
        .iter()
        .filter(|c| c.error.is_none())
        .map(|c| c.rel_err)
        .fold(0f64, f64::max);
    eprintln!("{dtype}: {} checks, worst rel err {worst:.2e}", checks.len());
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
    let Some(be) = backend() else { return };
    let wrongly_ok = run_error_suite(&be).expect("suite setup");
    assert!(wrongly_ok.is_empty(), "these calls should have failed: {wrongly_ok:?}");
}
