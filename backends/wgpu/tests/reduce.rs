//! Reductions over axes longer than one shader invocation may loop
//! (lavapipe ends a shader invocation's loops after 65535 iterations in
//! all), in every position of the axis and every dtype, against the CPU
//! backend.

mod common;

use common::{backend, rel_err, uniform};
use emu_backend_cpu::CpuBackend;
use emu_core::backend::ReduceOp;
use emu_core::testing::Rng;
use emu_core::{Backend, DType, HostTensor};

fn run<B: Backend>(be: &B, x: &HostTensor, dtype: DType, op: ReduceOp, dim: usize, keepdim: bool) -> HostTensor {
    let t = be.upload(&x.to_dtype(dtype).unwrap()).unwrap();
    let y = be.reduce(op, &t, dim, keepdim).unwrap();
    be.download(&be.cast(&y, DType::F32).unwrap()).unwrap()
}

#[test]
fn long_axes_reduce_like_the_cpu_backend() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(7);
    // 2 * 16384 + 3 (chunks plus a remainder), 70001 (past lavapipe's loop
    // limit, prime), and the long axis in the middle of a strided view.
    let cases: [(&[usize], usize); 3] = [(&[2, 32771], 1), (&[70001], 0), (&[3, 70001, 2], 1)];
    for (dims, dim) in cases {
        // An offset keeps the mean far from 0, so a dropped chunk shows.
        let x = uniform(&mut rng, dims, 0.5, 1.5);
        for dtype in [DType::F32, DType::BF16] {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
                for keepdim in [false, true] {
                    let got = run(&gpu, &x, dtype, op, dim, keepdim);
                    let want = run(&cpu, &x, dtype, op, dim, keepdim);
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                    let e = rel_err(&got, &want);
                    assert!(
                        e <= tol,
                        "{op:?} over dim {dim} of {dims:?} {dtype} keepdim {keepdim}: rel err {e}"
                    );
                }
            }
        }
    }
}
