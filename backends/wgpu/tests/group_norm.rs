//! The fused group norm kernel against the CPU backend (candle's
//! group norm statistics, the composite's rounding steps) on odd shapes,
//! strided inputs, missing affine parts and half-precision storage.

use emu_backend_cpu::CpuBackend;
mod common;

use common::{backend, rel_err, uniform as random};
use emu_core::testing::Rng;
use emu_core::{Backend, DType, HostTensor};

/// Group norm of `x` (permuted by `perm` on the device first) on `be`.
fn run<B: Backend>(
    be: &B,
    dtype: DType,
    x: &HostTensor,
    perm: Option<&[usize]>,
    groups: usize,
    wb: Option<(&HostTensor, &HostTensor)>,
) -> HostTensor {
    let up = |t: &HostTensor| be.upload(&t.to_dtype(dtype).unwrap()).unwrap();
    let mut xt = up(x);
    if let Some(p) = perm {
        xt = be.permute(&xt, p).unwrap();
    }
    let (w, b) = match wb {
        Some((w, b)) => (Some(up(w)), Some(up(b))),
        None => (None, None),
    };
    let y = be.group_norm(&xt, groups, w.as_ref(), b.as_ref(), 1e-5).unwrap();
    be.download(&be.cast(&y, DType::F32).unwrap()).unwrap()
}

/// Input dims, groups, a permutation of the uploaded buffer, with affine.
type GnCase<'a> = (&'a [usize], usize, Option<&'a [usize]>, bool);

#[test]
fn group_norm_matches_the_cpu_backend() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(21);
    let cases: [GnCase; 5] = [
        (&[2, 12, 5, 7], 3, None, true),
        (&[2, 12, 5, 7], 4, None, false),
        // An NHWC buffer viewed as NCHW: the kernel reads a strided input.
        (&[2, 5, 7, 6], 2, Some(&[0, 3, 1, 2]), true),
        (&[3, 10, 9], 5, None, true),
        (&[4, 6], 3, None, true),
    ];
    for (dims, groups, perm, affine) in cases {
        let x = random(&mut rng, dims, -2.0, 3.0);
        let c = match perm {
            Some(p) => dims[p[1]],
            None => dims[1],
        };
        let w = random(&mut rng, &[c], 0.5, 1.5);
        let b = random(&mut rng, &[c], -0.5, 0.5);
        let wb = affine.then_some((&w, &b));
        for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 1e-2)] {
            let got = run(&gpu, dt, &x, perm, groups, wb);
            let want = run(&cpu, dt, &x, perm, groups, wb);
            let e = rel_err(&got, &want);
            assert!(e <= tol, "{dims:?} {groups} groups {dt}: error {e:.2e}");
        }
    }
}

/// Large groups (a VAE's 32 groups of a 64-channel 64x64 map: 8192
/// elements per row) keep f32 statistics accurate to the f64 reference.
#[test]
fn large_groups_keep_accurate_statistics() {
    let Some(gpu) = backend() else { return };
    let dims = [1, 64, 64, 64];
    let x = random(&mut Rng::new(22), &dims, 0.0, 2.0);
    let got = run(&gpu, DType::F32, &x, None, 32, None).to_f32_vec().unwrap();
    let xs = x.to_f32_vec().unwrap();
    let n = xs.len() / 32;
    let mut err = 0f64;
    for g in 0..32 {
        let row = &xs[g * n..(g + 1) * n];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        for (i, &v) in row.iter().enumerate() {
            err = err.max(((v as f64 - mean) * rstd - got[g * n + i] as f64).abs());
        }
    }
    // Normalised values are O(1), so this is a relative error.
    assert!(err < 2e-5, "error {err:.2e}");
}
