//! cuBLAS GEMMs on the layouts models produce: transposed weights (linear),
//! narrowed rows, broadcast and multi-dimensional batches, vectors, and
//! convolutions through im2col (groups, strides, padding, dilation, 1x1),
//! against the CPU backend.

mod common;

use common::{backend, rel_err, uniform};
use emu_backend_cpu::CpuBackend;
use emu_core::testing::Rng;
use emu_core::{Backend, Conv2dParams, DType};

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        _ => 1e-2,
    }
}

/// Runs `body` on the CPU backend and on `gpu` from the same host inputs
/// (rounded to `dt`) and compares the results.
macro_rules! on_both {
    ($gpu:expr, $what:expr, $dt:expr, [$($x:ident),*], |$be:ident| $body:expr) => {{
        let cpu = CpuBackend::new();
        let want = {
            let $be = &cpu;
            $(let $x = $be.upload(&$x.to_dtype($dt).unwrap()).unwrap();)*
            let y = $body;
            $be.download(&$be.cast(&y, DType::F32).unwrap()).unwrap()
        };
        let got = {
            let $be = $gpu;
            $(let $x = $be.upload(&$x.to_dtype($dt).unwrap()).unwrap();)*
            let y = $body;
            $be.download(&$be.cast(&y, DType::F32).unwrap()).unwrap()
        };
        let e = rel_err(&got, &want);
        assert!(e <= tol($dt), "{} {}: rel err {e:.2e}", $what, $dt);
    }};
}

#[test]
fn matmul_layouts_match_the_cpu_backend() {
    let Some(gpu) = backend() else { return };
    let gpu = &gpu;
    let mut rng = Rng::new(5);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let a = uniform(&mut rng, &[2, 3, 17, 33], -1.0, 1.0);
        let b = uniform(&mut rng, &[3, 33, 9], -1.0, 1.0);
        on_both!(gpu, "broadcast batch", dt, [a, b], |be| be.matmul(&a, &b).unwrap());
        let w = uniform(&mut rng, &[24, 33], -1.0, 1.0);
        let x = uniform(&mut rng, &[5, 7, 33], -1.0, 1.0);
        let bias = uniform(&mut rng, &[24], -1.0, 1.0);
        on_both!(gpu, "linear (transposed weight)", dt, [x, w, bias], |be| be
            .linear(&x, &w, Some(&bias))
            .unwrap());
        let v = uniform(&mut rng, &[1, 33], -1.0, 1.0);
        on_both!(gpu, "vector x transposed", dt, [v, w], |be| be
            .matmul(&v, &be.permute(&w, &[1, 0]).unwrap())
            .unwrap());
        let big = uniform(&mut rng, &[4, 40, 33], -1.0, 1.0);
        on_both!(gpu, "narrowed rows, permuted batch", dt, [big, b], |be| {
            let x = be.narrow(&big, 1, 5, 17).unwrap();
            let x = be.permute(&x, &[0, 1, 2]).unwrap();
            let bb = be.narrow(&b, 0, 1, 1).unwrap();
            be.matmul(&x, &bb).unwrap()
        });
        // Neither stride unit: every other column of a wider matrix.
        let wide = uniform(&mut rng, &[6, 66], -1.0, 1.0);
        let rhs = uniform(&mut rng, &[33, 4], -1.0, 1.0);
        on_both!(gpu, "strided columns", dt, [wide, rhs], |be| {
            let x = be.reshape(&wide, &[6, 33, 2]).unwrap();
            let x = be.narrow(&x, 2, 1, 1).unwrap();
            let x = be.reshape(&be.permute(&x, &[0, 2, 1]).unwrap(), &[6, 33]).unwrap();
            be.matmul(&x, &rhs).unwrap()
        });
        // Attention-style q k^T with k permuted, batch over [B, H].
        let q = uniform(&mut rng, &[2, 5, 3, 16], -1.0, 1.0);
        let k = uniform(&mut rng, &[2, 7, 3, 16], -1.0, 1.0);
        on_both!(gpu, "q k^T from [B, T, H, D] views", dt, [q, k], |be| {
            let qv = be.permute(&q, &[0, 2, 1, 3]).unwrap();
            let kt = be.permute(&k, &[0, 2, 3, 1]).unwrap();
            be.matmul(&qv, &kt).unwrap()
        });
    }
}

#[test]
fn conv2d_matches_the_cpu_backend() {
    let Some(gpu) = backend() else { return };
    let gpu = &gpu;
    let mut rng = Rng::new(9);
    let params = [
        (Conv2dParams::new(1, 1), 1, 3),
        (Conv2dParams::new(2, 1), 1, 3),
        (Conv2dParams::new(1, 0), 1, 1),
        (Conv2dParams::new(2, 0), 1, 1),
        (
            Conv2dParams {
                groups: 4,
                ..Conv2dParams::new(1, 1)
            },
            4,
            3,
        ),
        (
            Conv2dParams {
                dilation: (2, 2),
                ..Conv2dParams::new(1, 2)
            },
            1,
            3,
        ),
    ];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for (p, g, k) in params {
            let x = uniform(&mut rng, &[2, 8, 11, 9], -1.0, 1.0);
            let w = uniform(&mut rng, &[12, 8 / g, k, k], -0.5, 0.5);
            let b = uniform(&mut rng, &[12], -1.0, 1.0);
            on_both!(gpu, &format!("conv2d {p:?} k{k}"), dt, [x, w, b], |be| be
                .conv2d(&x, &w, Some(&b), p)
                .unwrap());
        }
    }
}
