//! The matmul kernels (64x64-tiled for M > 1, the 4-column matrix-vector
//! kernel for M = 1) against the CPU backend on shapes that are not
//! multiples of the tiles, batched and broadcast operands, transposed
//! views and half-precision storage.

use emu_backend_cpu::CpuBackend;
mod common;

use common::{backend, rel_err, uniform};
use emu_core::testing::Rng;
use emu_core::{Backend, DType, HostTensor};

fn random(rng: &mut Rng, dims: &[usize]) -> HostTensor {
    uniform(rng, dims, -1.0, 1.0)
}

/// `a x b` on `be`, where an operand given with `true` is stored with its
/// last two dims swapped and viewed back through `permute`.
fn run<B: Backend>(be: &B, dtype: DType, a: (&HostTensor, bool), b: (&HostTensor, bool)) -> HostTensor {
    let up = |(t, transposed): (&HostTensor, bool)| {
        let x = be.upload(&t.to_dtype(dtype).unwrap()).unwrap();
        if transposed {
            let r = t.dims().len();
            let mut p: Vec<usize> = (0..r).collect();
            p.swap(r - 2, r - 1);
            be.permute(&x, &p).unwrap()
        } else {
            x
        }
    };
    let y = be.matmul(&up(a), &up(b)).unwrap();
    be.download(&be.cast(&y, DType::F32).unwrap()).unwrap()
}

/// Stored dims of an operand whose logical dims are `dims`.
fn stored(dims: &[usize], transposed: bool) -> Vec<usize> {
    let mut d = dims.to_vec();
    if transposed {
        let r = d.len();
        d.swap(r - 2, r - 1);
    }
    d
}

#[test]
fn matmul_matches_the_cpu_backend_on_odd_batched_and_transposed_shapes() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(31);
    // (a dims, b dims, a transposed, b transposed)
    let cases: [(&[usize], &[usize], bool, bool); 9] = [
        (&[65, 17], &[17, 129], false, false),
        (&[70, 33], &[33, 61], true, true),
        (&[3, 1, 37, 19], &[2, 19, 66], false, true),
        (&[130, 200], &[4, 200, 3], false, false),
        // M = 1: N not a multiple of 4, K not a multiple of 64.
        (&[1, 100], &[100, 7], false, true),
        (&[1, 129], &[129, 130], false, false),
        (&[2, 3, 1, 70], &[3, 70, 5], false, true),
        (&[1, 1], &[1, 3], false, false),
        (&[2, 1, 9], &[2, 9, 1], true, false),
    ];
    for (ad, bd, at, bt) in cases {
        let a = random(&mut rng, &stored(ad, at));
        let b = random(&mut rng, &stored(bd, bt));
        for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 1e-2)] {
            let got = run(&gpu, dt, (&a, at), (&b, bt));
            let want = run(&cpu, dt, (&a, at), (&b, bt));
            let e = rel_err(&got, &want);
            assert!(e <= tol, "{ad:?} x {bd:?} ({at}, {bt}) {dt}: error {e:.2e}");
        }
    }
}
