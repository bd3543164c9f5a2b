//! The quantized linear kernel (weights kept in their GGUF blocks on the
//! device, dequantized in the kernel) against dequantize-then-f32-linear on
//! the CPU backend: row counts around the kernel's 4-row groups, biases,
//! and the device copy of a weight following the tensor it belongs to.

mod common;

use common::backend;
use emu_core::testing::{assert_linear_quant_cases, assert_quant_copies_follow_tensors};

#[test]
fn quantized_linear_matches_dequantize_then_linear() {
    let Some(be) = backend() else { return };
    assert_linear_quant_cases(
        &be,
        41,
        &[
            (1, 33, 512, false),
            (5, 17, 256, true),
            (9, 8, 768, true),
            (4, 65, 256, false),
        ],
    );
}

#[test]
fn device_copies_follow_their_tensors() {
    let Some(be) = backend() else { return };
    assert_quant_copies_follow_tensors(&be, |_| {});
}
