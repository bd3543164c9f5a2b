//! The backend conformance suite on the CUDA backend. Without an NVIDIA
//! driver, device or the CUDA libraries the tests say so and skip.

mod common;

use common::backend;
use emu_core::testing::{assert_error_suite_passes, assert_op_suite_passes, Rng};
use emu_core::{Backend, DType, HostTensor};

#[test]
fn every_op_matches_the_f64_reference_in_f32() {
    let Some(be) = backend() else { return };
    assert_op_suite_passes(&be, DType::F32);
}

#[test]
fn every_op_matches_the_f64_reference_in_bf16() {
    let Some(be) = backend() else { return };
    assert_op_suite_passes(&be, DType::BF16);
}

#[test]
fn every_op_matches_the_f64_reference_in_f16() {
    let Some(be) = backend() else { return };
    assert_op_suite_passes(&be, DType::F16);
}

#[test]
fn malformed_op_calls_are_errors() {
    let Some(be) = backend() else { return };
    assert_error_suite_passes(&be);
}

/// The kernels convert f32 to f16 (PTX `cvt.rn`) and bf16 (bit operations)
/// themselves; both must round exactly like the host's `half` crate (nearest
/// even, subnormals, overflow to infinity).
#[test]
fn device_rounding_to_half_matches_the_host_bit_for_bit() {
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
        let x = f32::from_bits(rng.next_u64() as u32);
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
        let bad = (0..n)
            .filter(|&i| got.as_bytes()[2 * i..2 * i + 2] != want.as_bytes()[2 * i..2 * i + 2])
            .count();
        assert_eq!(bad, 0, "{dt}: {bad} of {n} values rounded differently from the host");
        // And back to f32 exactly.
        let back = be
            .download(&be.cast(&be.upload(&want).unwrap(), DType::F32).unwrap())
            .unwrap();
        assert_eq!(back, want.to_dtype(DType::F32).unwrap(), "{dt} -> f32");
    }
}

/// The KV-cache write happens in place: the returned tensor shares the
/// destination's storage, and repeated writes accumulate.
#[test]
fn slice_set_writes_into_the_cache_in_place() {
    let Some(be) = backend() else { return };
    let cache = be.full(&[1, 2, 6, 4], 0.0, DType::F32).unwrap();
    let step = |c, t: usize, val: f32| {
        let src = be
            .upload(&HostTensor::from_f32(&[1, 2, 1, 4], vec![val; 8]).unwrap())
            .unwrap();
        be.slice_set(c, &src, 2, t).unwrap()
    };
    let c = step(cache, 0, 1.0);
    let c = step(c, 3, 2.0);
    let got = be.download(&c).unwrap().to_f32_vec().unwrap();
    for h in 0..2 {
        for t in 0..6 {
            let want = match t {
                0 => 1.0,
                3 => 2.0,
                _ => 0.0,
            };
            assert!(
                got[(h * 6 + t) * 4..(h * 6 + t + 1) * 4].iter().all(|&x| x == want),
                "h{h} t{t}"
            );
        }
    }
}
