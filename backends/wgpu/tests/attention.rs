//! The fused attention kernel against the CPU backend (whose `attention`
//! is the primitives-only `default_attention`) on the cases the kernel
//! specialises: several key chunks, causal offsets, additive biases,
//! grouped-query heads, strided views, single-query decode steps and
//! half-precision storage.

use emu_backend_cpu::CpuBackend;
mod common;

use common::{backend, rel_err, uniform};
use emu_backend_wgpu::WgpuBackend;
use emu_core::backend::{default_attention, AttnMask, MASK_VALUE};
use emu_core::testing::Rng;
use emu_core::{Backend, DType, HostTensor};

fn random(rng: &mut Rng, dims: &[usize], amp: f64) -> HostTensor {
    uniform(rng, dims, -amp, amp)
}

/// One attention problem, given as host tensors in `[B, T, H, D]` layout
/// when `bthd` (then permuted to `[B, H, T, D]` views on the device, as
/// models do after their projections) or directly `[B, H, T, D]`.
struct Case {
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    bias: Option<HostTensor>,
    causal: Option<usize>,
    bthd: bool,
    scale: f64,
}

impl Case {
    fn new(seed: u64, b: usize, h: usize, hkv: usize, tq: usize, tk: usize, d: usize) -> Self {
        let mut rng = Rng::new(seed);
        Case {
            q: random(&mut rng, &[b, h, tq, d], 1.5),
            k: random(&mut rng, &[b, hkv, tk, d], 1.5),
            v: random(&mut rng, &[b, hkv, tk, d], 1.0),
            bias: None,
            causal: None,
            bthd: false,
            scale: 1.0 / (d as f64).sqrt(),
        }
    }

    /// The output of `be.attention`, or of `default_attention`, or (through
    /// `fused`) of a backend-specific entry point.
    fn run_with<B: Backend>(
        &self,
        be: &B,
        dtype: DType,
        op: impl Fn(&B::Tensor, &B::Tensor, &B::Tensor, &AttnMask<'_, B::Tensor>) -> emu_core::Result<B::Tensor>,
    ) -> HostTensor {
        let up = |t: &HostTensor| -> B::Tensor {
            let x = be.upload(&t.to_dtype(dtype).unwrap()).unwrap();
            if self.bthd {
                // Stored as [B, T, H, D], viewed as [B, H, T, D].
                be.permute(&x, &[0, 2, 1, 3]).unwrap()
            } else {
                x
            }
        };
        let (q, k, v) = (up(&self.q), up(&self.k), up(&self.v));
        let bias = self
            .bias
            .as_ref()
            .map(|b| be.upload(&b.to_dtype(dtype).unwrap()).unwrap());
        let mask = AttnMask {
            causal_offset: self.causal,
            bias: bias.as_ref(),
        };
        let y = op(&q, &k, &v, &mask).unwrap();
        be.download(&be.cast(&y, DType::F32).unwrap()).unwrap()
    }

    fn run<B: Backend>(&self, be: &B, dtype: DType, fused: bool) -> HostTensor {
        let s = self.scale;
        if fused {
            self.run_with(be, dtype, |q, k, v, m| be.attention(q, k, v, m, s))
        } else {
            self.run_with(be, dtype, |q, k, v, m| default_attention(be, q, k, v, m, s))
        }
    }

    /// The fused kernel whatever the number of queries.
    fn run_kernel(&self, gpu: &WgpuBackend, dtype: DType) -> HostTensor {
        let s = self.scale;
        self.run_with(gpu, dtype, |q, k, v, m| {
            Ok(gpu
                .fused_attention(q, k, v, m, s)?
                .expect("the fused kernel covers this case"))
        })
    }

    /// Checks the wgpu kernel and the backend's `attention` (kernel or
    /// composite, by shape) against the CPU backend and against the
    /// composite on the wgpu backend itself.
    fn check(&self, gpu: &WgpuBackend, dtype: DType, tol: f64) {
        let cpu = CpuBackend::new();
        let want = self.run(&cpu, dtype, false);
        let composite = self.run(gpu, dtype, false);
        for (what, got) in [
            ("kernel", self.run_kernel(gpu, dtype)),
            ("attention", self.run(gpu, dtype, true)),
        ] {
            let (e_cpu, e_comp) = (rel_err(&got, &want), rel_err(&got, &composite));
            assert!(
                e_cpu <= tol && e_comp <= tol,
                "{what} {dtype}: error {e_cpu:.2e} against cpu, {e_comp:.2e} against the composite (tolerance {tol:.0e})"
            );
        }
    }
}

const DTYPES: [(DType, f64); 3] = [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 1e-2)];

#[test]
fn prefill_with_causal_offset_over_several_key_chunks() {
    let Some(gpu) = backend() else { return };
    // 150 keys = three chunks, the last one partial; queries at 145..150.
    let mut c = Case::new(1, 2, 3, 3, 5, 150, 40);
    c.causal = Some(145);
    for (dt, tol) in DTYPES {
        c.check(&gpu, dt, tol);
    }
    // Offset 0 with as many queries as keys: the usual prompt prefill.
    let mut c = Case::new(2, 1, 2, 2, 70, 70, 16);
    c.causal = Some(0);
    c.check(&gpu, DType::F32, 1e-5);
}

#[test]
fn grouped_query_heads_with_a_padding_bias_and_strided_views() {
    let Some(gpu) = backend() else { return };
    let (b, h, hkv, tq, tk, d) = (2, 6, 2, 7, 90, 24);
    let mut c = Case::new(3, b, h, hkv, tq, tk, d);
    c.q = random(&mut Rng::new(4), &[b, tq, h, d], 1.5);
    c.k = random(&mut Rng::new(5), &[b, tk, hkv, d], 1.5);
    c.v = random(&mut Rng::new(6), &[b, tk, hkv, d], 1.0);
    c.bthd = true;
    // Left padding: the first 3 (first batch) / 40 (second) keys are hidden.
    let mut pad = vec![0f32; b * tk];
    pad[..3].fill(MASK_VALUE as f32);
    pad[tk..tk + 40].fill(MASK_VALUE as f32);
    c.bias = Some(HostTensor::from_f32(&[b, 1, 1, tk], pad).unwrap());
    c.causal = Some(tk - tq);
    for (dt, tol) in DTYPES {
        c.check(&gpu, dt, tol);
    }
}

#[test]
fn a_full_bias_and_fully_masked_rows_stay_finite() {
    let Some(gpu) = backend() else { return };
    let (b, h, tq, tk, d) = (1, 2, 3, 70, 8);
    let mut c = Case::new(7, b, h, h, tq, tk, d);
    let mut bias = random(&mut Rng::new(8), &[b, h, tq, tk], 2.0).to_f32_vec().unwrap();
    // Query 1 of head 0 sees nothing: its output is the mean of v.
    for j in 0..tk {
        bias[tk + j] = MASK_VALUE as f32;
    }
    c.bias = Some(HostTensor::from_f32(&[b, h, tq, tk], bias).unwrap());
    for (dt, tol) in DTYPES {
        c.check(&gpu, dt, tol);
    }
    let got = c.run_kernel(&gpu, DType::F32).to_f32_vec().unwrap();
    assert!(got.iter().all(|x| x.is_finite()));
    let v = c.v.to_f32_vec().unwrap();
    for e in 0..d {
        let mean = (0..tk).map(|j| v[j * d + e] as f64).sum::<f64>() / tk as f64;
        assert!(
            (got[d + e] as f64 - mean).abs() < 1e-5,
            "fully masked row is not uniform"
        );
    }
}

#[test]
fn decode_steps_over_a_long_preallocated_cache() {
    let Some(gpu) = backend() else { return };
    // One query at position 150 of a 200-slot cache: slots after it are hidden.
    let mut c = Case::new(9, 2, 4, 2, 1, 200, 64);
    c.causal = Some(150);
    for (dt, tol) in DTYPES {
        c.check(&gpu, dt, tol);
    }
    // Head sizes beyond one accumulator per invocation.
    let mut c = Case::new(10, 1, 2, 1, 1, 65, 200);
    c.causal = Some(64);
    c.check(&gpu, DType::F32, 1e-5);
}

#[test]
fn calls_the_kernel_does_not_cover_go_through_the_composite() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    // Past the kernel's head size limit.
    let mut c = Case::new(11, 1, 2, 1, 1, 65, 300);
    c.causal = Some(64);
    let kernel = c.run_with(&gpu, DType::F32, |q, k, v, m| {
        assert!(gpu.fused_attention(q, k, v, m, c.scale)?.is_none());
        Ok(q.clone())
    });
    assert_eq!(kernel.dims(), &[1, 2, 1, 300]);
    assert!(rel_err(&c.run(&gpu, DType::F32, true), &c.run(&cpu, DType::F32, false)) <= 1e-5);
    // A bias with a larger batch than the queries broadcasts the scores.
    let mut c = Case::new(12, 1, 2, 2, 3, 5, 8);
    c.bias = Some(random(&mut Rng::new(13), &[2, 2, 3, 5], 1.0));
    let (got, want) = (c.run(&gpu, DType::F32, true), c.run(&cpu, DType::F32, false));
    assert_eq!(got.dims(), &[2, 2, 3, 8]);
    assert!(rel_err(&got, &want) <= 1e-5);
}
