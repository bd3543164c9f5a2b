//! The quantized linear kernel (weights kept in their GGUF blocks on the
//! device, dequantized in the kernel) against dequantize-then-f32-linear on
//! the CPU backend: row counts around the kernel's 4-row groups, biases,
//! and the device copy of a weight following the tensor it belongs to.

mod common;

use common::{backend, rel_err, uniform};
use emu_core::testing::{linear_quant_reference, run_linear_quant, Rng};
use emu_core::{QuantTensor, QuantType};

fn quantized(rng: &mut Rng, n: usize, k: usize, q: QuantType) -> QuantTensor {
    QuantTensor::quantize("test.weight", &uniform(rng, &[n, k], -1.0, 1.0), q).unwrap()
}

#[test]
fn quantized_linear_matches_dequantize_then_linear() {
    let Some(be) = backend() else { return };
    let mut rng = Rng::new(41);
    for q in [QuantType::Q8_0, QuantType::Q4K] {
        for &(m, n, k, bias) in &[
            (1, 33, 512, false),
            (5, 17, 256, true),
            (9, 8, 768, true),
            (4, 65, 256, false),
        ] {
            let w = quantized(&mut rng, n, k, q);
            let x = uniform(&mut rng, &[m, k], -1.0, 1.0);
            let b = bias.then(|| uniform(&mut rng, &[n], -1.0, 1.0));
            let got = run_linear_quant(&be, &x, &w, b.as_ref());
            let want = linear_quant_reference(&x, &w, b.as_ref());
            assert_eq!(got.dims(), [m, n]);
            let e = rel_err(&got, &want);
            assert!(e <= 1e-5, "{q} {m}x{k} -> {n}: rel err {e:e}");
        }
    }
}

#[test]
fn device_copies_follow_their_tensors() {
    let Some(be) = backend() else { return };
    let mut rng = Rng::new(42);
    let x = uniform(&mut rng, &[2, 256], -1.0, 1.0);
    for round in 0..3 {
        // A new tensor each round, possibly at a freed one's address: its
        // own bytes must be used, not a stale device copy.
        let w = quantized(&mut rng, 24, 256, QuantType::Q4K);
        let want = linear_quant_reference(&x, &w, None);
        let first = run_linear_quant(&be, &x, &w, None);
        let again = run_linear_quant(&be, &x, &w.clone(), None);
        assert!(rel_err(&first, &want) <= 1e-5, "round {round}");
        assert_eq!(first.to_f64_vec().unwrap(), again.to_f64_vec().unwrap());
        drop(w);
    }
}
