//! The fused attention kernels against the trait's composite on the CPU
//! backend, on the cases the kernels specialise: several key tiles and
//! chunks, causal offsets (prefill and decode), additive biases (f32 and
//! the query dtype), grouped-query heads, permuted views and half storage.

mod common;

use common::{backend, rel_err, uniform};
use emu_backend_cpu::CpuBackend;
use emu_core::backend::{AttnMask, MASK_VALUE};
use emu_core::testing::Rng;
use emu_core::{Backend, DType, HostTensor};

struct Case {
    b: usize,
    h: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: Option<usize>,
    bias: bool,
    /// q, k, v stored as [B, T, H, D] and viewed as [B, H, T, D].
    bthd: bool,
}

fn run<B: Backend>(be: &B, c: &Case, dtype: DType, bias_dtype: DType, seed: u64) -> HostTensor {
    let mut rng = Rng::new(seed);
    let layout = |h: usize, t: usize| if c.bthd { [c.b, t, h, c.d] } else { [c.b, h, t, c.d] };
    let up = |t: HostTensor| {
        let x = be.upload(&t.to_dtype(dtype).unwrap()).unwrap();
        if c.bthd {
            be.permute(&x, &[0, 2, 1, 3]).unwrap()
        } else {
            x
        }
    };
    let q = up(uniform(&mut rng, &layout(c.h, c.tq), -1.5, 1.5));
    let k = up(uniform(&mut rng, &layout(c.hkv, c.tk), -1.5, 1.5));
    let v = up(uniform(&mut rng, &layout(c.hkv, c.tk), -1.0, 1.0));
    // A left-padding bias [B, 1, 1, Tk]: the first `b + 1` keys of batch b dropped.
    let bias = c.bias.then(|| {
        let mut m = vec![0f32; c.b * c.tk];
        for bi in 0..c.b {
            for j in 0..(bi + 1).min(c.tk - 1) {
                m[bi * c.tk + j] = MASK_VALUE as f32;
            }
        }
        be.upload(
            &HostTensor::from_f32(&[c.b, 1, 1, c.tk], m)
                .unwrap()
                .to_dtype(bias_dtype)
                .unwrap(),
        )
        .unwrap()
    });
    let mask = AttnMask {
        causal_offset: c.causal,
        bias: bias.as_ref(),
    };
    let y = be.attention(&q, &k, &v, &mask, 1.0 / (c.d as f64).sqrt()).unwrap();
    be.download(&be.cast(&y, DType::F32).unwrap()).unwrap()
}

fn cases() -> Vec<Case> {
    let base = Case {
        b: 2,
        h: 4,
        hkv: 4,
        tq: 5,
        tk: 5,
        d: 32,
        causal: None,
        bias: false,
        bthd: false,
    };
    vec![
        Case { ..base },
        Case {
            causal: Some(0),
            ..base
        },
        // Prefill over several key tiles (128 keys each).
        Case {
            tq: 300,
            tk: 300,
            causal: Some(0),
            d: 64,
            ..base
        },
        // Decode: one query over a long cache (many chunks), slots past the position unused.
        Case {
            tq: 1,
            tk: 1000,
            causal: Some(700),
            d: 128,
            ..base
        },
        Case {
            tq: 1,
            tk: 1000,
            causal: Some(700),
            bias: true,
            ..base
        },
        Case {
            tq: 3,
            tk: 260,
            causal: Some(257),
            bias: true,
            hkv: 2,
            ..base
        },
        Case {
            hkv: 1,
            tq: 7,
            tk: 9,
            bthd: true,
            causal: Some(2),
            ..base
        },
        Case {
            d: 256,
            tq: 2,
            tk: 140,
            ..base
        },
        Case {
            d: 80,
            tq: 4,
            tk: 33,
            bias: true,
            ..base
        },
    ]
}

#[test]
fn fused_attention_matches_the_composite() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    for (i, c) in cases().iter().enumerate() {
        for (dt, bias_dt, tol) in [
            (DType::F32, DType::F32, 1e-5),
            (DType::BF16, DType::BF16, 2e-2),
            (DType::F16, DType::F16, 5e-3),
            (DType::BF16, DType::F32, 2e-2),
        ] {
            let want = run(&cpu, c, dt, bias_dt, i as u64);
            let got = run(&gpu, c, dt, bias_dt, i as u64);
            let e = rel_err(&got, &want);
            assert!(
                e <= tol,
                "case {i} (B{} H{}/{} Tq{} Tk{} D{} causal {:?} bias {} bthd {}) {dt}/{bias_dt}: rel err {e:.2e}",
                c.b,
                c.h,
                c.hkv,
                c.tq,
                c.tk,
                c.d,
                c.causal,
                c.bias,
                c.bthd
            );
        }
    }
}

#[test]
fn a_fully_masked_row_is_uniform_not_nan() {
    let Some(gpu) = backend() else { return };
    let (tk, d) = (4, 8);
    let mut rng = Rng::new(3);
    let q = gpu.upload(&uniform(&mut rng, &[1, 1, 1, d], -1.0, 1.0)).unwrap();
    let k = gpu.upload(&uniform(&mut rng, &[1, 1, tk, d], -1.0, 1.0)).unwrap();
    let vh = uniform(&mut rng, &[1, 1, tk, d], -1.0, 1.0);
    let v = gpu.upload(&vh).unwrap();
    let bias = gpu.full(&[1, 1, 1, tk], f64::NEG_INFINITY, DType::F32).unwrap();
    let mask = AttnMask {
        causal_offset: None,
        bias: Some(&bias),
    };
    let y = gpu
        .download(&gpu.attention(&q, &k, &v, &mask, 0.5).unwrap())
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let vv = vh.to_f32_vec().unwrap();
    for j in 0..d {
        let mean: f32 = (0..tk).map(|t| vv[t * d + j]).sum::<f32>() / tk as f32;
        assert!((y[j] - mean).abs() < 1e-5, "dim {j}: {} vs mean {mean}", y[j]);
    }
}
