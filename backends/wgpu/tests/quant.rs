//! The quantized linear kernel (weights kept in their GGUF blocks on the
//! device, dequantized in the kernel) against dequantize-then-f32-linear on
//! the CPU backend: row counts around the kernel's 4-row groups, biases,
//! and the device copy of a weight following the tensor it belongs to.

mod common;

use common::{backend, rel_err, uniform};
use emu_backend_cpu::CpuBackend;
use emu_core::testing::Rng;
use emu_core::{Backend, DType, HostTensor, QuantTensor, QuantType};

fn quantized(rng: &mut Rng, n: usize, k: usize, q: QuantType) -> QuantTensor {
    QuantTensor::quantize("test.weight", &uniform(rng, &[n, k], -1.0, 1.0), q).unwrap()
}

fn reference(x: &HostTensor, w: &QuantTensor, b: Option<&HostTensor>) -> HostTensor {
    let cpu = CpuBackend::new();
    let wd = cpu.upload(&w.dequantize().unwrap()).unwrap();
    let y = cpu
        .linear(&cpu.upload(x).unwrap(), &wd, b.map(|b| cpu.upload(b).unwrap()).as_ref())
        .unwrap();
    cpu.download(&y).unwrap()
}

fn run<B: Backend>(be: &B, x: &HostTensor, w: &QuantTensor, b: Option<&HostTensor>) -> HostTensor {
    let y = be
        .linear_quant(&be.upload(x).unwrap(), w, b.map(|b| be.upload(b).unwrap()).as_ref())
        .unwrap();
    be.download(&be.cast(&y, DType::F32).unwrap()).unwrap()
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
            let got = run(&be, &x, &w, b.as_ref());
            let want = reference(&x, &w, b.as_ref());
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
        let want = reference(&x, &w, None);
        let first = run(&be, &x, &w, None);
        let again = run(&be, &x, &w.clone(), None);
        assert!(rel_err(&first, &want) <= 1e-5, "round {round}");
        assert_eq!(first.to_f64_vec().unwrap(), again.to_f64_vec().unwrap());
        drop(w);
    }
}
