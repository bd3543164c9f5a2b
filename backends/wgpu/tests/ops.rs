//! The backend conformance suite on the wgpu backend. Without a usable
//! adapter (no GPU, no Vulkan driver) the tests say so and skip; CI installs
//! Mesa's lavapipe so they run there.

mod common;

use common::backend;
use emu_core::testing::{assert_error_suite_passes, assert_op_suite_passes};
use emu_core::DType;

fn assert_suite_passes(dtype: DType) {
    let Some(be) = backend() else { return };
    assert_op_suite_passes(&be, dtype);
}

#[test]
fn every_op_matches_the_f64_reference_in_f32() {
    assert_suite_passes(DType::F32);
}

#[test]
fn malformed_op_calls_are_errors() {
    let Some(be) = backend() else { return };
    assert_error_suite_passes(&be);
}

#[test]
fn every_op_matches_the_f64_reference_in_bf16() {
    assert_suite_passes(DType::BF16);
}

#[test]
fn every_op_matches_the_f64_reference_in_f16() {
    assert_suite_passes(DType::F16);
}

/// Half-precision tensors are held as f32 words rounded by the kernels; the
/// rounding must be bit-identical to the host's (round to nearest even,
/// subnormals, overflow to infinity, NaN preserved).
#[test]
fn device_rounding_to_half_matches_the_host_bit_for_bit() {
    use emu_core::testing::Rng;
    use emu_core::{Backend, HostTensor};
    let Some(be) = backend() else { return };
    let mut rng = Rng::new(11);
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.0,
        65520.0,
        -70000.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        1.0 + 1.0 / 256.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        6.1e-5,
        5.96e-8,
        2.98e-8,
        2.99e-8,
        1e-9,
        -3.0e-6,
        3.3895314e38,
        3.4e38,
    ];
    for _ in 0..4000 {
        let bits = rng.next_u64() as u32;
        let x = f32::from_bits(bits);
        if !x.is_nan() {
            v.push(x);
        }
        v.push(rng.uniform(-2.0, 2.0) as f32 * 10f32.powi(rng.below(20) as i32 - 10));
    }
    let n = v.len();
    let host = HostTensor::from_f32(&[n], v).unwrap();
    let x = be.upload(&host).unwrap();
    for dt in [DType::BF16, DType::F16] {
        let got = be.download(&be.cast(&x, dt).unwrap()).unwrap();
        let want = host.to_dtype(dt).unwrap();
        let (g, w) = (got.as_bytes(), want.as_bytes());
        let bad: Vec<usize> = (0..n).filter(|&i| g[2 * i..2 * i + 2] != w[2 * i..2 * i + 2]).collect();
        assert!(
            bad.is_empty(),
            "{dt}: {} of {n} values rounded differently, e.g. {:?}",
            bad.len(),
            bad.iter()
                .take(5)
                .map(|&i| host.to_f32_vec().unwrap()[i])
                .collect::<Vec<_>>()
        );
    }
}
