//! The backend conformance suite: every op of [`Backend`] checked against a
//! straightforward f64 reference on random inputs, including odd shapes.
//!
//! Every backend runs the same suite (`cargo xtask test --backend <name>`),
//! so "passes the suite" means "computes what the CPU backend computes".
//! Inputs are rounded to the dtype under test before the reference sees them,
//! so the measured error is the op's own error, not the input rounding.
//!
//! ```
//! # // The suite runs on any backend; see the CPU backend's tests for real use.
//! use emu_core::testing::{reference, Rng};
//! let mut rng = Rng::new(7);
//! let a = reference::RefTensor::random(&mut rng, &[2, 3], -1.0, 1.0);
//! let s = reference::softmax_last(&a);
//! assert!((s.data[0] + s.data[1] + s.data[2] - 1.0).abs() < 1e-12);
//! ```

use crate::backend::{AttnMask, Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp};
use crate::quant::{QuantTensor, QuantType};
use crate::{DType, Error, HostTensor, Result};

/// A small deterministic generator (splitmix64), so fixtures and suites do not
/// depend on a `rand` version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Plain f64 implementations of every op, written for obviousness.
pub mod reference {
    use super::Rng;
    use crate::backend::{BinaryOp, Conv2dParams, ReduceOp, UnaryOp};

    /// A row-major f64 tensor.
    #[derive(Debug, Clone, PartialEq)]
    pub struct RefTensor {
        pub dims: Vec<usize>,
        pub data: Vec<f64>,
    }

    pub fn strides(dims: &[usize]) -> Vec<usize> {
        let mut s = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1];
        }
        s
    }

    fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; dims.len()];
        for d in (0..dims.len()).rev() {
            idx[d] = i % dims[d];
            i /= dims[d];
        }
        idx
    }

    impl RefTensor {
        pub fn new(dims: &[usize], data: Vec<f64>) -> Self {
            assert_eq!(dims.iter().product::<usize>(), data.len(), "reference tensor {dims:?}");
            Self {
                dims: dims.to_vec(),
                data,
            }
        }

        pub fn random(rng: &mut Rng, dims: &[usize], lo: f64, hi: f64) -> Self {
            let n = dims.iter().product();
            Self::new(dims, (0..n).map(|_| rng.uniform(lo, hi)).collect())
        }

        pub fn numel(&self) -> usize {
            self.data.len()
        }

        /// Element at a multi-index.
        pub fn at(&self, idx: &[usize]) -> f64 {
            let s = strides(&self.dims);
            self.data[idx.iter().zip(&s).map(|(i, s)| i * s).sum::<usize>()]
        }

        /// Element at an index of a broadcast shape `out` (NumPy rules).
        fn at_broadcast(&self, idx: &[usize]) -> f64 {
            let off = idx.len() - self.dims.len();
            let own: Vec<usize> = self
                .dims
                .iter()
                .enumerate()
                .map(|(d, &n)| if n == 1 { 0 } else { idx[off + d] })
                .collect();
            self.at(&own)
        }

        pub fn map(&self, f: impl Fn(f64) -> f64) -> Self {
            Self::new(&self.dims, self.data.iter().map(|&x| f(x)).collect())
        }
    }

    pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
        let n = a.len().max(b.len());
        (0..n)
            .map(|i| {
                let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
                let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
                da.max(db)
            })
            .collect()
    }

    /// Error function, accurate to ~1e-14 (Taylor series near 0, continued fraction beyond).
    pub fn erf(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = a;
            for k in (1..=80).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
        };
        r.copysign(x)
    }

    pub fn unary(op: UnaryOp, t: &RefTensor) -> RefTensor {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        t.map(|x| match op {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Sqr => x * x,
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => sig(x),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Silu => x * sig(x),
            UnaryOp::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::GeluTanh => {
                0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
            }
        })
    }

    pub fn binary(op: BinaryOp, a: &RefTensor, b: &RefTensor) -> RefTensor {
        let dims = broadcast_shape(&a.dims, &b.dims);
        let n = dims.iter().product();
        let data = (0..n)
            .map(|i| {
                let idx = unravel(i, &dims);
                let (x, y) = (a.at_broadcast(&idx), b.at_broadcast(&idx));
                match op {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div => x / y,
                    BinaryOp::Maximum => x.max(y),
                    BinaryOp::Minimum => x.min(y),
                }
            })
            .collect();
        RefTensor::new(&dims, data)
    }

    pub fn broadcast_to(t: &RefTensor, dims: &[usize]) -> RefTensor {
        let n = dims.iter().product();
        RefTensor::new(dims, (0..n).map(|i| t.at_broadcast(&unravel(i, dims))).collect())
    }

    pub fn permute(t: &RefTensor, perm: &[usize]) -> RefTensor {
        let dims: Vec<usize> = perm.iter().map(|&p| t.dims[p]).collect();
        let n = t.numel();
        let data = (0..n)
            .map(|i| {
                let idx = unravel(i, &dims);
                let mut src = vec![0; idx.len()];
                for (o, &p) in perm.iter().enumerate() {
                    src[p] = idx[o];
                }
                t.at(&src)
            })
            .collect();
        RefTensor::new(&dims, data)
    }

    pub fn narrow(t: &RefTensor, dim: usize, start: usize, len: usize) -> RefTensor {
        let mut dims = t.dims.clone();
        dims[dim] = len;
        let n = dims.iter().product();
        let data = (0..n)
            .map(|i| {
                let mut idx = unravel(i, &dims);
                idx[dim] += start;
                t.at(&idx)
            })
            .collect();
        RefTensor::new(&dims, data)
    }

    pub fn concat(ts: &[&RefTensor], dim: usize) -> RefTensor {
        let mut dims = ts[0].dims.clone();
        dims[dim] = ts.iter().map(|t| t.dims[dim]).sum();
        let n = dims.iter().product();
        let data = (0..n)
            .map(|i| {
                let mut idx = unravel(i, &dims);
                for t in ts {
                    if idx[dim] < t.dims[dim] {
                        return t.at(&idx);
                    }
                    idx[dim] -= t.dims[dim];
                }
                unreachable!()
            })
            .collect();
        RefTensor::new(&dims, data)
    }

    pub fn slice_set(dst: &RefTensor, src: &RefTensor, dim: usize, start: usize) -> RefTensor {
        let data = (0..dst.numel())
            .map(|i| {
                let mut idx = unravel(i, &dst.dims);
                if idx[dim] >= start && idx[dim] < start + src.dims[dim] {
                    idx[dim] -= start;
                    src.at(&idx)
                } else {
                    dst.data[i]
                }
            })
            .collect();
        RefTensor::new(&dst.dims, data)
    }

    pub fn index_select(t: &RefTensor, ids: &[usize], dim: usize) -> RefTensor {
        let mut dims = t.dims.clone();
        dims[dim] = ids.len();
        let n = dims.iter().product();
        let data = (0..n)
            .map(|i| {
                let mut idx = unravel(i, &dims);
                idx[dim] = ids[idx[dim]];
                t.at(&idx)
            })
            .collect();
        RefTensor::new(&dims, data)
    }

    pub fn reduce(op: ReduceOp, t: &RefTensor, dim: usize, keepdim: bool) -> RefTensor {
        let mut kd = t.dims.clone();
        kd[dim] = 1;
        let n = kd.iter().product();
        let data = (0..n)
            .map(|i| {
                let mut idx = unravel(i, &kd);
                let vals: Vec<f64> = (0..t.dims[dim])
                    .map(|j| {
                        idx[dim] = j;
                        t.at(&idx)
                    })
                    .collect();
                match op {
                    ReduceOp::Sum => vals.iter().sum(),
                    ReduceOp::Mean => vals.iter().sum::<f64>() / vals.len() as f64,
                    ReduceOp::Max => vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                    ReduceOp::Min => vals.iter().cloned().fold(f64::INFINITY, f64::min),
                }
            })
            .collect();
        let mut out = RefTensor::new(&kd, data);
        if !keepdim {
            out.dims.remove(dim);
        }
        out
    }

    pub fn argmax(t: &RefTensor, dim: usize) -> Vec<usize> {
        let mut kd = t.dims.clone();
        kd[dim] = 1;
        let n = kd.iter().product();
        (0..n)
            .map(|i| {
                let mut idx = unravel(i, &kd);
                let mut best = (0, f64::NEG_INFINITY);
                for j in 0..t.dims[dim] {
                    idx[dim] = j;
                    let v = t.at(&idx);
                    if v > best.1 {
                        best = (j, v);
                    }
                }
                best.0
            })
            .collect()
    }

    /// Batched matmul with broadcast batch dims.
    pub fn matmul(a: &RefTensor, b: &RefTensor) -> RefTensor {
        let (ar, br) = (a.dims.len(), b.dims.len());
        let (m, k, n) = (a.dims[ar - 2], a.dims[ar - 1], b.dims[br - 1]);
        let batch = broadcast_shape(&a.dims[..ar - 2], &b.dims[..br - 2]);
        let mut dims = batch.clone();
        dims.extend([m, n]);
        let total = dims.iter().product();
        let data = (0..total)
            .map(|i| {
                let idx = unravel(i, &dims);
                let nb = idx.len() - 2;
                let (r, c) = (idx[nb], idx[nb + 1]);
                let pick = |t: &RefTensor, x: usize, y: usize| {
                    let off = nb - (t.dims.len() - 2);
                    let mut ti: Vec<usize> = (0..t.dims.len() - 2)
                        .map(|d| if t.dims[d] == 1 { 0 } else { idx[off + d] })
                        .collect();
                    ti.extend([x, y]);
                    t.at(&ti)
                };
                (0..k).map(|j| pick(a, r, j) * pick(b, j, c)).sum()
            })
            .collect();
        RefTensor::new(&dims, data)
    }

    pub fn linear(x: &RefTensor, w: &RefTensor, b: Option<&RefTensor>) -> RefTensor {
        let y = matmul(x, &permute(w, &[1, 0]));
        match b {
            Some(b) => binary(BinaryOp::Add, &y, b),
            None => y,
        }
    }

    fn rows(t: &RefTensor) -> impl Iterator<Item = &[f64]> {
        t.data.chunks(*t.dims.last().unwrap())
    }

    pub fn softmax_last(t: &RefTensor) -> RefTensor {
        let data = rows(t)
            .flat_map(|r| {
                let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = r.iter().map(|x| (x - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |x| x / s)
            })
            .collect();
        RefTensor::new(&t.dims, data)
    }

    pub fn layer_norm(t: &RefTensor, w: Option<&RefTensor>, b: Option<&RefTensor>, eps: f64) -> RefTensor {
        let data = rows(t)
            .flat_map(|r| {
                let n = r.len() as f64;
                let mean = r.iter().sum::<f64>() / n;
                let var = r.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
                r.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        let y = (x - mean) / (var + eps).sqrt();
                        y * w.map_or(1.0, |w| w.data[i]) + b.map_or(0.0, |b| b.data[i])
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        RefTensor::new(&t.dims, data)
    }

    pub fn rms_norm(t: &RefTensor, w: &RefTensor, eps: f64) -> RefTensor {
        let data = rows(t)
            .flat_map(|r| {
                let ms = r.iter().map(|x| x * x).sum::<f64>() / r.len() as f64;
                r.iter()
                    .enumerate()
                    .map(|(i, x)| x / (ms + eps).sqrt() * w.data[i])
                    .collect::<Vec<_>>()
            })
            .collect();
        RefTensor::new(&t.dims, data)
    }

    pub fn group_norm(t: &RefTensor, groups: usize, w: &RefTensor, b: &RefTensor, eps: f64) -> RefTensor {
        let (n, c) = (t.dims[0], t.dims[1]);
        let per_c: usize = t.dims[2..].iter().product();
        let per_g = c / groups * per_c;
        let mut data = t.data.clone();
        for i in 0..n {
            for g in 0..groups {
                let s = &mut data[(i * groups + g) * per_g..(i * groups + g + 1) * per_g];
                let mean = s.iter().sum::<f64>() / per_g as f64;
                let var = s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / per_g as f64;
                for (j, x) in s.iter_mut().enumerate() {
                    let ch = g * (c / groups) + j / per_c;
                    *x = (*x - mean) / (var + eps).sqrt() * w.data[ch] + b.data[ch];
                }
            }
        }
        RefTensor::new(&t.dims, data)
    }

    /// Rotate-half RoPE; `cos`/`sin` are `[T, D/2]` or `[B, T, D/2]`.
    pub fn rope(x: &RefTensor, cos: &RefTensor, sin: &RefTensor) -> RefTensor {
        let (b, h, t, d) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        let half = d / 2;
        let mut out = x.data.clone();
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let base = ((bi * h + hi) * t + ti) * d;
                    for j in 0..half {
                        let ci = if cos.dims.len() == 3 {
                            (bi * t + ti) * half + j
                        } else {
                            ti * half + j
                        };
                        let (c, s) = (cos.data[ci], sin.data[ci]);
                        let (x1, x2) = (x.data[base + j], x.data[base + half + j]);
                        out[base + j] = x1 * c - x2 * s;
                        out[base + half + j] = x2 * c + x1 * s;
                    }
                }
            }
        }
        RefTensor::new(&x.dims, out)
    }

    /// Attention with optional causal offset, additive bias and grouped KV heads.
    pub fn attention(
        q: &RefTensor,
        k: &RefTensor,
        v: &RefTensor,
        causal_offset: Option<usize>,
        bias: Option<&RefTensor>,
        scale: f64,
    ) -> RefTensor {
        let (b, h, tq, d) = (q.dims[0], q.dims[1], q.dims[2], q.dims[3]);
        let (hkv, tk) = (k.dims[1], k.dims[2]);
        let mut out = vec![0.0; b * h * tq * d];
        for bi in 0..b {
            for hi in 0..h {
                let kh = hi / (h / hkv);
                for i in 0..tq {
                    let mut s: Vec<f64> = (0..tk)
                        .map(|j| {
                            let dot: f64 = (0..d).map(|e| q.at(&[bi, hi, i, e]) * k.at(&[bi, kh, j, e])).sum();
                            let mut x = dot * scale;
                            if let Some(bias) = bias {
                                x += bias.at_broadcast(&[bi, hi, i, j]);
                            }
                            if causal_offset.is_some_and(|o| j > o + i) {
                                x = f64::NEG_INFINITY;
                            }
                            x
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = s.iter().sum();
                    for e in 0..d {
                        out[((bi * h + hi) * tq + i) * d + e] = (0..tk).map(|j| s[j] / z * v.at(&[bi, kh, j, e])).sum();
                    }
                }
            }
        }
        RefTensor::new(&q.dims, out)
    }

    pub fn conv2d(x: &RefTensor, w: &RefTensor, b: Option<&RefTensor>, p: Conv2dParams) -> RefTensor {
        let (n, c, h, wi) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        let (o, cg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        let (oh, ow) = p.output_hw((h, wi), (kh, kw)).unwrap();
        let og = o / p.groups;
        let _ = c;
        let mut out = vec![0.0; n * o * oh * ow];
        for ni in 0..n {
            for oc in 0..o {
                let g = oc / og;
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = b.map_or(0.0, |b| b.data[oc]);
                        for ic in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (y * p.stride.0 + ky * p.dilation.0) as isize - p.padding.0 as isize;
                                    let ix = (xx * p.stride.1 + kx * p.dilation.1) as isize - p.padding.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wi as isize {
                                        continue;
                                    }
                                    acc += x.at(&[ni, g * cg + ic, iy as usize, ix as usize]) * w.at(&[oc, ic, ky, kx]);
                                }
                            }
                        }
                        out[((ni * o + oc) * oh + y) * ow + xx] = acc;
                    }
                }
            }
        }
        RefTensor::new(&[n, o, oh, ow], out)
    }

    pub fn avg_pool2d(x: &RefTensor, k: (usize, usize), s: (usize, usize)) -> RefTensor {
        let (n, c, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        let (oh, ow) = ((h - k.0) / s.0 + 1, (w - k.1) / s.1 + 1);
        let mut out = Vec::with_capacity(n * c * oh * ow);
        for ni in 0..n {
            for ci in 0..c {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = 0.0;
                        for ky in 0..k.0 {
                            for kx in 0..k.1 {
                                acc += x.at(&[ni, ci, y * s.0 + ky, xx * s.1 + kx]);
                            }
                        }
                        out.push(acc / (k.0 * k.1) as f64);
                    }
                }
            }
        }
        RefTensor::new(&[n, c, oh, ow], out)
    }

    /// PyTorch's `interpolate(mode="nearest")`: `src = min(floor(dst * in / out), in - 1)`.
    pub fn upsample_nearest2d(x: &RefTensor, oh: usize, ow: usize) -> RefTensor {
        let (n, c, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        let src = |d: usize, i: usize, o: usize| (((d as f32) * (i as f32 / o as f32)).floor() as usize).min(i - 1);
        let mut out = Vec::with_capacity(n * c * oh * ow);
        for ni in 0..n {
            for ci in 0..c {
                for y in 0..oh {
                    for xx in 0..ow {
                        out.push(x.at(&[ni, ci, src(y, h, oh), src(xx, w, ow)]));
                    }
                }
            }
        }
        RefTensor::new(&[n, c, oh, ow], out)
    }
}

use reference::RefTensor;

/// The outcome of one check of the suite.
#[derive(Debug, Clone)]
pub struct OpCheck {
    /// Op and case, e.g. `matmul [3,5,7]x[7,2]`.
    pub name: String,
    /// `max |backend - reference| / max |reference|`.
    pub rel_err: f64,
    /// The tolerance for this dtype.
    pub tol: f64,
    /// An error the backend returned instead of a value.
    pub error: Option<String>,
}

impl OpCheck {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.rel_err <= self.tol
    }
}

/// A backend for a test, or `None` where this machine cannot run it (no GPU
/// adapter, no ONNX Runtime library): the test then says it skips and
/// returns. Any other failure to start the backend fails the test.
pub fn available<B>(created: Result<B>) -> Option<B> {
    match created {
        Ok(b) => Some(b),
        Err(e @ Error::BackendUnavailable { .. }) => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("creating the backend: {e}"),
    }
}

/// An f32 host tensor of `dims` with values uniform in `[lo, hi)` (what
/// backend test binaries upload).
pub fn uniform_host(rng: &mut Rng, dims: &[usize], lo: f64, hi: f64) -> HostTensor {
    let n = dims.iter().product();
    HostTensor::from_f32(dims, (0..n).map(|_| rng.uniform(lo, hi) as f32).collect())
        .expect("dims and values agree by construction")
}

/// `be.linear_quant(x, w, b)` on host data, read back as f32 (what the
/// backends' quantized-kernel tests compare).
pub fn run_linear_quant<B: Backend>(be: &B, x: &HostTensor, w: &QuantTensor, b: Option<&HostTensor>) -> HostTensor {
    let up = |t: &HostTensor| be.upload(t).expect("upload");
    let y = be.linear_quant(&up(x), w, b.map(up).as_ref()).expect("linear_quant");
    be.download(&be.cast(&y, DType::F32).expect("cast")).expect("download")
}

/// Dequantize-then-linear in f64: the reference of a quantized kernel that
/// keeps its inputs f32, as an f32 host tensor.
pub fn linear_quant_reference(x: &HostTensor, w: &QuantTensor, b: Option<&HostTensor>) -> HostTensor {
    let rt = |t: &HostTensor| RefTensor::new(t.dims(), t.to_f64_vec().expect("float tensor"));
    let wd = rt(&w.dequantize().expect("dequantize"));
    let y = reference::linear(&rt(x), &wd, b.map(rt).as_ref());
    HostTensor::from_f64(&y.dims, y.data)
        .and_then(|h| h.to_dtype(DType::F32))
        .expect("dims and values agree by construction")
}

/// Random `[n, k]` weights in `[-1, 1)` quantized to `q`, named `test.weight`.
pub fn quantized_uniform(rng: &mut Rng, n: usize, k: usize, q: QuantType) -> QuantTensor {
    QuantTensor::quantize("test.weight", &uniform_host(rng, &[n, k], -1.0, 1.0), q)
        .expect("k is a whole number of blocks")
}

/// A backend's quantized linear against dequantize-then-linear in f64, for
/// both formats and every `(rows, out features, in features, bias)` case,
/// at 1e-5 relative (the kernels keep f32 inputs and f32 sums).
pub fn assert_linear_quant_cases<B: Backend>(be: &B, seed: u64, cases: &[(usize, usize, usize, bool)]) {
    let mut rng = Rng::new(seed);
    for q in [QuantType::Q8_0, QuantType::Q4K] {
        for &(m, n, k, bias) in cases {
            let w = quantized_uniform(&mut rng, n, k, q);
            let x = uniform_host(&mut rng, &[m, k], -1.0, 1.0);
            let b = bias.then(|| uniform_host(&mut rng, &[n], -1.0, 1.0));
            let got = run_linear_quant(be, &x, &w, b.as_ref());
            let want = linear_quant_reference(&x, &w, b.as_ref());
            assert_eq!(got.dims(), [m, n], "{q} {m}x{k} -> {n}");
            let e = host_rel_err(&got, &want);
            assert!(e <= 1e-5, "{q} {m}x{k} -> {n}: rel err {e:e}");
        }
    }
}

/// A backend that keeps device copies of quantized weights uses each
/// tensor's own bytes: a new tensor each round (possibly at a freed one's
/// address) never reads a stale copy, and a clone shares its copy.
/// `after_drop` runs once each round's tensor is gone.
pub fn assert_quant_copies_follow_tensors<B: Backend>(be: &B, mut after_drop: impl FnMut(usize)) {
    let mut rng = Rng::new(42);
    let x = uniform_host(&mut rng, &[2, 256], -1.0, 1.0);
    for round in 0..3 {
        let w = quantized_uniform(&mut rng, 24, 256, QuantType::Q4K);
        let want = linear_quant_reference(&x, &w, None);
        let first = run_linear_quant(be, &x, &w, None);
        let again = run_linear_quant(be, &x, &w.clone(), None);
        assert!(host_rel_err(&first, &want) <= 1e-5, "round {round}");
        assert_eq!(first.to_f64_vec().ok(), again.to_f64_vec().ok(), "round {round}");
        drop(w);
        after_drop(round);
    }
}

/// [`rel_err`] of two host tensors of the same shape; a shape mismatch or a
/// dtype that cannot be read as f32 is infinitely wrong.
pub fn host_rel_err(got: &HostTensor, want: &HostTensor) -> f64 {
    let f64s = |t: &HostTensor| {
        t.to_f32_vec()
            .map(|v| v.into_iter().map(f64::from).collect::<Vec<f64>>())
    };
    match (got.dims() == want.dims(), f64s(got), f64s(want)) {
        (true, Ok(g), Ok(w)) => rel_err(&g, &w),
        _ => f64::INFINITY,
    }
}

/// Relative error as used across the project: `max|a-b| / max(max|b|, 1e-30)`.
pub fn rel_err(actual: &[f64], expected: &[f64]) -> f64 {
    if actual.len() != expected.len() {
        return f64::INFINITY;
    }
    let scale = expected.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    actual.iter().zip(expected).fold(0f64, |m, (a, b)| {
        if a.is_nan() {
            f64::INFINITY
        } else {
            m.max((a - b).abs())
        }
    }) / scale
}

/// Default per-dtype tolerance of the op suite (f32 1e-5, f16 5e-3, bf16 1e-2).
pub fn op_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        _ => 1e-2,
    }
}

struct Suite<'a, B: Backend> {
    be: &'a B,
    dtype: DType,
    rng: Rng,
    checks: Vec<OpCheck>,
}

impl<B: Backend> Suite<'_, B> {
    /// A random input rounded to the dtype under test, on the device and as the reference sees it.
    fn input(&mut self, dims: &[usize], lo: f64, hi: f64) -> Result<(B::Tensor, RefTensor)> {
        let r = RefTensor::random(&mut self.rng, dims, lo, hi);
        let host = HostTensor::from_f64(dims, r.data)?.to_dtype(self.dtype)?;
        let rounded = RefTensor::new(dims, host.to_f64_vec()?);
        Ok((self.be.upload(&host)?, rounded))
    }

    fn record(&mut self, name: String, got: Result<B::Tensor>, want: &RefTensor) {
        let check = match got.and_then(|t| {
            let dims = self.be.dims(&t);
            let host = self.be.download(&t)?;
            Ok((dims, host))
        }) {
            Ok((dims, _)) if dims != want.dims => OpCheck {
                name,
                rel_err: f64::INFINITY,
                tol: 0.0,
                error: Some(format!("shape {dims:?}, expected {:?}", want.dims)),
            },
            Ok((_, host)) if host.dtype() != self.dtype && host.dtype().is_float() => OpCheck {
                name,
                rel_err: f64::INFINITY,
                tol: 0.0,
                error: Some(format!("dtype {}, expected {}", host.dtype(), self.dtype)),
            },
            Ok((_, host)) => {
                let tol = if host.dtype().is_float() {
                    op_tolerance(self.dtype)
                } else {
                    0.0
                };
                match host.to_f64_vec() {
                    Ok(v) => OpCheck {
                        name,
                        rel_err: rel_err(&v, &want.data),
                        tol,
                        error: None,
                    },
                    Err(e) => OpCheck {
                        name,
                        rel_err: f64::INFINITY,
                        tol,
                        error: Some(e.to_string()),
                    },
                }
            }
            Err(e) => OpCheck {
                name,
                rel_err: f64::INFINITY,
                tol: 0.0,
                error: Some(e.to_string()),
            },
        };
        self.checks.push(check);
    }

    fn ids(&mut self, n: usize, below: usize) -> Result<(B::Tensor, Vec<usize>)> {
        let ids: Vec<usize> = (0..n).map(|_| self.rng.below(below)).collect();
        let host = HostTensor::from_u32(&[n], ids.iter().map(|&i| i as u32).collect())?;
        Ok((self.be.upload(&host)?, ids))
    }

    fn run(&mut self) -> Result<()> {
        let be = self.be;
        let dt = self.dtype;

        // Elementwise.
        let unaries = [
            (UnaryOp::Neg, -3.0, 3.0),
            (UnaryOp::Abs, -3.0, 3.0),
            (UnaryOp::Exp, -3.0, 3.0),
            (UnaryOp::Log, 0.1, 4.0),
            (UnaryOp::Sqrt, 0.01, 4.0),
            (UnaryOp::Sqr, -3.0, 3.0),
            (UnaryOp::Recip, 0.2, 3.0),
            (UnaryOp::Tanh, -3.0, 3.0),
            (UnaryOp::Sigmoid, -5.0, 5.0),
            (UnaryOp::Sin, -3.0, 3.0),
            (UnaryOp::Cos, -3.0, 3.0),
            (UnaryOp::Relu, -3.0, 3.0),
            (UnaryOp::Silu, -5.0, 5.0),
            (UnaryOp::Gelu, -5.0, 5.0),
            (UnaryOp::GeluTanh, -5.0, 5.0),
        ];
        for (op, lo, hi) in unaries {
            let (x, xr) = self.input(&[3, 17, 5], lo, hi)?;
            // Ops whose output can be ~0 where the input is not are compared on
            // the same scale as the input so the relative error stays meaningful.
            let want = reference::unary(op, &xr);
            self.record(format!("unary {op:?} [3,17,5]"), be.unary(op, &x), &want);
        }
        let bin_shapes: [(&[usize], &[usize]); 4] = [
            (&[4, 7], &[4, 7]),
            (&[2, 3, 5], &[5]),
            (&[2, 1, 5], &[3, 1]),
            (&[1], &[3, 2, 9]),
        ];
        for op in BinaryOp::ALL {
            for (sa, sb) in bin_shapes {
                let (a, ar) = self.input(sa, -2.0, 2.0)?;
                let (b, br) = if op == BinaryOp::Div {
                    self.input(sb, 0.5, 2.0)?
                } else {
                    self.input(sb, -2.0, 2.0)?
                };
                let want = reference::binary(op, &ar, &br);
                self.record(format!("binary {op:?} {sa:?} {sb:?}"), be.binary(op, &a, &b), &want);
            }
        }
        let (x, xr) = self.input(&[5, 3], -2.0, 2.0)?;
        self.record(
            "affine [5,3]".into(),
            be.affine(&x, -1.5, 0.25),
            &xr.map(|v| v * -1.5 + 0.25),
        );

        // Creation, casts, layout.
        let filled = RefTensor::new(&[2, 3], vec![0.75; 6]);
        self.record("full [2,3]".into(), be.full(&[2, 3], 0.75, dt), &filled);
        let (x, xr) = self.input(&[4, 6], -3.0, 3.0)?;
        let back = be.cast(&x, DType::F32).and_then(|y| be.cast(&y, dt));
        self.record("cast round trip".into(), back, &xr);
        self.record(
            "reshape [4,6]->[2,3,4]".into(),
            be.reshape(&x, &[2, 3, 4]),
            &RefTensor::new(&[2, 3, 4], xr.data.clone()),
        );
        let (x, xr) = self.input(&[2, 3, 4, 5], -1.0, 1.0)?;
        for perm in [[0, 2, 1, 3], [3, 1, 0, 2], [0, 1, 3, 2]] {
            self.record(
                format!("permute {perm:?}"),
                be.permute(&x, &perm),
                &reference::permute(&xr, &perm),
            );
        }
        // A non-contiguous input feeding every later kind of op is the common case in models.
        let xt = be.permute(&x, &[0, 2, 1, 3])?;
        let xtr = reference::permute(&xr, &[0, 2, 1, 3]);
        self.record(
            "reshape of a permuted view".into(),
            be.reshape(&xt, &[8, 15]),
            &RefTensor::new(&[8, 15], xtr.data.clone()),
        );
        self.record(
            "narrow dim 2".into(),
            be.narrow(&x, 2, 1, 2),
            &reference::narrow(&xr, 2, 1, 2),
        );
        self.record(
            "narrow dim 3 of a view".into(),
            be.narrow(&xt, 3, 2, 3),
            &reference::narrow(&xtr, 3, 2, 3),
        );
        let (y, yr) = self.input(&[2, 3, 1, 5], -1.0, 1.0)?;
        let (z, zr) = self.input(&[2, 3, 7, 5], -1.0, 1.0)?;
        self.record(
            "concat dim 2".into(),
            be.concat(&[&x, &y, &z], 2),
            &reference::concat(&[&xr, &yr, &zr], 2),
        );
        let (w, wr) = self.input(&[2, 3, 4, 2], -1.0, 1.0)?;
        self.record(
            "concat dim 3".into(),
            be.concat(&[&x, &w], 3),
            &reference::concat(&[&xr, &wr], 3),
        );
        let (cache, cr) = self.input(&[2, 3, 11, 5], -1.0, 1.0)?;
        let (src, sr) = self.input(&[2, 3, 3, 5], -1.0, 1.0)?;
        self.record(
            "slice_set dim 2".into(),
            be.slice_set(cache, &src, 2, 7),
            &reference::slice_set(&cr, &sr, 2, 7),
        );
        let (table, tr) = self.input(&[13, 6], -1.0, 1.0)?;
        let (ids, idr) = self.ids(9, 13)?;
        self.record(
            "index_select dim 0".into(),
            be.index_select(&table, &ids, 0),
            &reference::index_select(&tr, &idr, 0),
        );
        let (ids, idr) = self.ids(4, 6)?;
        self.record(
            "index_select dim 1".into(),
            be.index_select(&table, &ids, 1),
            &reference::index_select(&tr, &idr, 1),
        );
        let (x1, x1r) = self.input(&[3, 1, 5], -1.0, 1.0)?;
        self.record(
            "broadcast_to [3,1,5]->[2,3,4,5]".into(),
            be.broadcast_to(&x1, &[2, 3, 4, 5]),
            &reference::broadcast_to(&x1r, &[2, 3, 4, 5]),
        );

        // Reductions.
        let (x, xr) = self.input(&[3, 7, 5], -2.0, 2.0)?;
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
            for dim in 0..3 {
                let keep = dim % 2 == 0;
                self.record(
                    format!("reduce {op:?} dim {dim}"),
                    be.reduce(op, &x, dim, keep),
                    &reference::reduce(op, &xr, dim, keep),
                );
            }
        }
        let am = reference::argmax(&xr, 1);
        let am = RefTensor::new(&[3, 5], am.into_iter().map(|i| i as f64).collect());
        self.record("argmax dim 1".into(), be.argmax(&x, 1), &am);

        // Linear algebra.
        let mm: [(&[usize], &[usize]); 5] = [
            (&[3, 5], &[5, 7]),
            (&[1, 33], &[33, 65]),
            (&[2, 3, 5, 7], &[2, 3, 7, 4]),
            (&[2, 1, 6, 3], &[4, 3, 2]),
            (&[37, 19], &[19, 23]),
        ];
        for (sa, sb) in mm {
            let (a, ar) = self.input(sa, -1.0, 1.0)?;
            let (b, br) = self.input(sb, -1.0, 1.0)?;
            self.record(
                format!("matmul {sa:?}x{sb:?}"),
                be.matmul(&a, &b),
                &reference::matmul(&ar, &br),
            );
        }
        let (a, ar) = self.input(&[4, 7], -1.0, 1.0)?;
        let (b, br) = self.input(&[5, 4], -1.0, 1.0)?;
        let at = be.permute(&a, &[1, 0])?;
        self.record(
            "matmul of transposed views".into(),
            be.matmul(&at, &be.permute(&b, &[1, 0])?),
            &reference::matmul(&reference::permute(&ar, &[1, 0]), &reference::permute(&br, &[1, 0])),
        );
        let (x, xr) = self.input(&[2, 3, 11], -1.0, 1.0)?;
        let (w, wr) = self.input(&[13, 11], -1.0, 1.0)?;
        let (bias, brr) = self.input(&[13], -1.0, 1.0)?;
        self.record(
            "linear with bias".into(),
            be.linear(&x, &w, Some(&bias)),
            &reference::linear(&xr, &wr, Some(&brr)),
        );
        self.record(
            "linear without bias".into(),
            be.linear(&x, &w, None),
            &reference::linear(&xr, &wr, None),
        );

        // Quantized linear: the reference is the dequantized weight in f64,
        // so the check measures the kernel, not the quantization error.
        // Shapes: one row (decode's matvec), a few rows with bias, and many
        // rows (prefill's matmul path); odd output counts.
        let ql: [(QuantType, &[usize], usize, usize); 6] = [
            (QuantType::Q8_0, &[1, 64], 19, 0),
            (QuantType::Q8_0, &[2, 3, 96], 13, 1),
            (QuantType::Q8_0, &[37, 128], 33, 0),
            (QuantType::Q4K, &[1, 256], 21, 0),
            (QuantType::Q4K, &[2, 2, 512], 7, 1),
            (QuantType::Q4K, &[19, 256], 40, 1),
        ];
        for (qt, xs, out, with_bias) in ql {
            let inn = *xs.last().unwrap_or(&0);
            let (x, xr) = self.input(xs, -1.0, 1.0)?;
            let wsrc = RefTensor::random(&mut self.rng, &[out, inn], -1.0, 1.0);
            let q = QuantTensor::quantize("suite.weight", &HostTensor::from_f64(&[out, inn], wsrc.data)?, qt)?;
            // The default rounds the weight to the input dtype; so does the reference.
            let wdeq = q.dequantize()?.to_dtype(self.dtype)?;
            let wr = RefTensor::new(&[out, inn], wdeq.to_f64_vec()?);
            let (bias, br) = self.input(&[out], -1.0, 1.0)?;
            let (bias, br) = if with_bias == 1 {
                (Some(&bias), Some(&br))
            } else {
                (None, None)
            };
            self.record(
                format!(
                    "linear_quant {qt} {xs:?}x[{out},{inn}]{}",
                    if with_bias == 1 { " +bias" } else { "" }
                ),
                be.linear_quant(&x, &q, bias),
                &reference::linear(&xr, &wr, br),
            );
        }

        // Normalisation and activations of the networks.
        let (x, xr) = self.input(&[2, 5, 19], -4.0, 4.0)?;
        self.record(
            "softmax_last_dim".into(),
            be.softmax_last_dim(&x),
            &reference::softmax_last(&xr),
        );
        let (g, gr) = self.input(&[19], 0.5, 1.5)?;
        let (b, br) = self.input(&[19], -0.5, 0.5)?;
        self.record(
            "layer_norm".into(),
            be.layer_norm(&x, Some(&g), Some(&b), 1e-6),
            &reference::layer_norm(&xr, Some(&gr), Some(&br), 1e-6),
        );
        self.record(
            "layer_norm no affine".into(),
            be.layer_norm(&x, None, None, 1e-5),
            &reference::layer_norm(&xr, None, None, 1e-5),
        );
        self.record(
            "rms_norm".into(),
            be.rms_norm(&x, &g, 1e-6),
            &reference::rms_norm(&xr, &gr, 1e-6),
        );
        let (x, xr) = self.input(&[2, 12, 5, 3], -2.0, 2.0)?;
        let (g, gr) = self.input(&[12], 0.5, 1.5)?;
        let (b, br) = self.input(&[12], -0.5, 0.5)?;
        self.record(
            "group_norm 4 groups".into(),
            be.group_norm(&x, 4, Some(&g), Some(&b), 1e-5),
            &reference::group_norm(&xr, 4, &gr, &br, 1e-5),
        );

        // Rotary embedding, shared and per-sequence positions.
        let (x, xr) = self.input(&[2, 3, 5, 8], -1.0, 1.0)?;
        let (cos, sin, cr, sr) = self.rope_tables(&[5, 4], 0)?;
        self.record(
            "rope [T,D/2]".into(),
            be.rope(&x, &cos, &sin),
            &reference::rope(&xr, &cr, &sr),
        );
        let (cos, sin, cr, sr) = self.rope_tables(&[2, 5, 4], 3)?;
        self.record(
            "rope [B,T,D/2]".into(),
            be.rope(&x, &cos, &sin),
            &reference::rope(&xr, &cr, &sr),
        );

        // Attention: plain, causal prefill, decode against a longer cache, bias, GQA.
        let scale = 1.0 / (8f64).sqrt();
        let (q, qr) = self.input(&[2, 4, 5, 8], -1.0, 1.0)?;
        let (k, kr) = self.input(&[2, 4, 5, 8], -1.0, 1.0)?;
        let (v, vr) = self.input(&[2, 4, 5, 8], -1.0, 1.0)?;
        self.record(
            "attention no mask".into(),
            be.attention(&q, &k, &v, &AttnMask::none(), scale),
            &reference::attention(&qr, &kr, &vr, None, None, scale),
        );
        self.record(
            "attention causal".into(),
            be.attention(&q, &k, &v, &AttnMask::causal(0), scale),
            &reference::attention(&qr, &kr, &vr, Some(0), None, scale),
        );
        let (q1, q1r) = self.input(&[2, 4, 1, 8], -1.0, 1.0)?;
        let (kc, kcr) = self.input(&[2, 4, 9, 8], -1.0, 1.0)?;
        let (vc, vcr) = self.input(&[2, 4, 9, 8], -1.0, 1.0)?;
        self.record(
            "attention decode step, offset 6 of 9".into(),
            be.attention(&q1, &kc, &vc, &AttnMask::causal(6), scale),
            &reference::attention(&q1r, &kcr, &vcr, Some(6), None, scale),
        );
        // A left-padding mask: the first key of sequence 0 is padding.
        let mut pad = vec![0.0f64; 2 * 5];
        pad[0] = crate::backend::MASK_VALUE;
        let padr = RefTensor::new(&[2, 1, 1, 5], pad.clone());
        let padt = be.cast(
            &be.upload(&HostTensor::from_f64(&[2, 1, 1, 5], pad)?.to_dtype(DType::F32)?)?,
            dt,
        )?;
        let mask = AttnMask {
            causal_offset: Some(0),
            bias: Some(&padt),
        };
        let mut want = reference::attention(&qr, &kr, &vr, Some(0), Some(&padr), scale);
        // Row 0 of sequence 0 sees only padding; both sides then average uniformly
        // over the keys they were left with. Neither is meaningful, so skip it.
        for h in 0..4 {
            for e in 0..8 {
                want.data[(h * 5) * 8 + e] = f64::NAN;
            }
        }
        let got = be.attention(&q, &k, &v, &mask, scale);
        self.record_masked("attention causal + padding bias".into(), got, &want);
        let (kg, kgr) = self.input(&[2, 2, 5, 8], -1.0, 1.0)?;
        let (vg, vgr) = self.input(&[2, 2, 5, 8], -1.0, 1.0)?;
        self.record(
            "attention grouped-query (4 q heads, 2 kv heads)".into(),
            be.attention(&q, &kg, &vg, &AttnMask::causal(0), scale),
            &reference::attention(&qr, &kgr, &vgr, Some(0), None, scale),
        );

        // Spatial ops.
        let convs = [
            ([2, 3, 9, 7], [4, 3, 3, 3], Conv2dParams::new(1, 1)),
            ([1, 4, 10, 10], [6, 4, 3, 3], Conv2dParams::new(2, 1)),
            ([1, 3, 28, 28], [8, 3, 14, 14], Conv2dParams::new(14, 0)),
            (
                [2, 6, 8, 5],
                [6, 2, 3, 1],
                Conv2dParams {
                    groups: 3,
                    padding: (1, 0),
                    ..Conv2dParams::default()
                },
            ),
            ([1, 2, 9, 9], [3, 2, 1, 1], Conv2dParams::default()),
        ];
        for (xs, ws, p) in convs {
            let (x, xr) = self.input(&xs, -1.0, 1.0)?;
            let (w, wr) = self.input(&ws, -1.0, 1.0)?;
            let (b, br) = self.input(&[ws[0]], -1.0, 1.0)?;
            self.record(
                format!("conv2d {xs:?} * {ws:?} {p:?}"),
                be.conv2d(&x, &w, Some(&b), p),
                &reference::conv2d(&xr, &wr, Some(&br), p),
            );
        }
        let (x, xr) = self.input(&[2, 3, 8, 12], -1.0, 1.0)?;
        self.record(
            "avg_pool2d 4x4/4".into(),
            be.avg_pool2d(&x, (4, 4), (4, 4)),
            &reference::avg_pool2d(&xr, (4, 4), (4, 4)),
        );
        self.record(
            "avg_pool2d 3x2/2".into(),
            be.avg_pool2d(&x, (3, 2), (2, 2)),
            &reference::avg_pool2d(&xr, (3, 2), (2, 2)),
        );
        let (x, xr) = self.input(&[1, 2, 5, 3], -1.0, 1.0)?;
        self.record(
            "upsample_nearest2d x2".into(),
            be.upsample_nearest2d(&x, 10, 6),
            &reference::upsample_nearest2d(&xr, 10, 6),
        );
        self.record(
            "upsample_nearest2d 5x3->7x8".into(),
            be.upsample_nearest2d(&x, 7, 8),
            &reference::upsample_nearest2d(&xr, 7, 8),
        );
        Ok(())
    }

    fn rope_tables(&mut self, dims: &[usize], pos0: usize) -> Result<(B::Tensor, B::Tensor, RefTensor, RefTensor)> {
        let half = dims[dims.len() - 1];
        let t = dims[dims.len() - 2];
        let n: usize = dims.iter().product();
        let (mut c, mut s) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let (row, j) = (i / half, i % half);
            let pos = (pos0 + row % t + row / t) as f64;
            let ang = pos / 10000f64.powf(2.0 * j as f64 / (2 * half) as f64);
            c.push(ang.cos());
            s.push(ang.sin());
        }
        let ch = HostTensor::from_f64(dims, c)?.to_dtype(self.dtype)?;
        let sh = HostTensor::from_f64(dims, s)?.to_dtype(self.dtype)?;
        let (cr, sr) = (
            RefTensor::new(dims, ch.to_f64_vec()?),
            RefTensor::new(dims, sh.to_f64_vec()?),
        );
        Ok((self.be.upload(&ch)?, self.be.upload(&sh)?, cr, sr))
    }

    /// Like `record`, ignoring reference elements that are NaN.
    fn record_masked(&mut self, name: String, got: Result<B::Tensor>, want: &RefTensor) {
        let keep: Vec<bool> = want.data.iter().map(|x| !x.is_nan()).collect();
        let got = got.and_then(|t| {
            let host = self.be.download(&t)?;
            let v: Vec<f64> = host
                .to_f64_vec()?
                .into_iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(x, _)| x)
                .collect();
            Ok((self.be.dims(&t), v))
        });
        let w: Vec<f64> = want.data.iter().cloned().filter(|x| !x.is_nan()).collect();
        let check = match got {
            Ok((dims, _)) if dims != want.dims => OpCheck {
                name,
                rel_err: f64::INFINITY,
                tol: 0.0,
                error: Some(format!("shape {dims:?}, expected {:?}", want.dims)),
            },
            Ok((_, v)) => OpCheck {
                name,
                rel_err: rel_err(&v, &w),
                tol: op_tolerance(self.dtype),
                error: None,
            },
            Err(e) => OpCheck {
                name,
                rel_err: f64::INFINITY,
                tol: 0.0,
                error: Some(e.to_string()),
            },
        };
        self.checks.push(check);
    }
}

/// Runs every op check on `backend` with inputs of `dtype` and returns the
/// results (also the failed ones: callers decide how to report).
pub fn run_op_suite<B: Backend>(backend: &B, dtype: DType) -> Result<Vec<OpCheck>> {
    let mut suite = Suite {
        be: backend,
        dtype,
        rng: Rng::new(0x5eed ^ dtype.size_in_bytes() as u64),
        checks: Vec::new(),
    };
    suite.run()?;
    Ok(suite.checks)
}

/// Checks that malformed op calls come back as errors, not panics or garbage.
/// Returns the names of the calls that wrongly succeeded.
pub fn run_error_suite<B: Backend>(be: &B) -> Result<Vec<String>> {
    let up = |dims: &[usize]| -> Result<B::Tensor> {
        let n = dims.iter().product();
        be.upload(&HostTensor::from_f32(dims, vec![0.5; n])?)
    };
    let (a, b, c) = (up(&[2, 3])?, up(&[4, 5])?, up(&[2, 3, 4])?);
    let ids = be.upload(&HostTensor::from_u32(&[2], vec![0, 7])?)?;
    let half = be.cast(&a, DType::BF16);
    let mut wrongly_ok = Vec::new();
    let mut expect_err = |name: &str, r: Result<B::Tensor>| {
        if r.is_ok() {
            wrongly_ok.push(name.to_string());
        }
    };
    expect_err("matmul inner dims", be.matmul(&a, &b));
    expect_err("binary non-broadcastable", be.binary(BinaryOp::Add, &a, &b));
    expect_err("reshape wrong numel", be.reshape(&a, &[7]));
    expect_err("permute not a permutation", be.permute(&c, &[0, 0, 1]));
    expect_err("narrow past the end", be.narrow(&a, 1, 2, 2));
    expect_err("narrow bad dim", be.narrow(&a, 5, 0, 1));
    expect_err("concat mismatched", be.concat(&[&a, &b], 0));
    expect_err("slice_set too long", be.slice_set(a.clone(), &c, 0, 0));
    expect_err("index_select out of range", be.index_select(&a, &ids, 0));
    expect_err("broadcast_to incompatible", be.broadcast_to(&b, &[3, 4, 6]));
    expect_err("reduce bad dim", be.reduce(ReduceOp::Sum, &a, 2, false));
    expect_err("linear wrong in-features", be.linear(&a, &b, None));
    let q = QuantTensor::quantize(
        "suite.q",
        &HostTensor::from_f32(&[2, 32], vec![0.5; 64])?,
        QuantType::Q8_0,
    )?;
    expect_err("linear_quant wrong in-features", be.linear_quant(&a, &q, None));
    expect_err(
        "conv2d channel mismatch",
        be.conv2d(&up(&[1, 3, 5, 5])?, &up(&[2, 4, 3, 3])?, None, Conv2dParams::default()),
    );
    expect_err(
        "conv2d kernel larger than input",
        be.conv2d(&up(&[1, 1, 2, 2])?, &up(&[1, 1, 3, 3])?, None, Conv2dParams::default()),
    );
    expect_err(
        "avg_pool2d kernel too big",
        be.avg_pool2d(&up(&[1, 1, 2, 2])?, (3, 3), (1, 1)),
    );
    expect_err(
        "group_norm groups do not divide",
        be.group_norm(&up(&[1, 6, 2, 2])?, 4, None, None, 1e-5),
    );
    expect_err(
        "attention head mismatch",
        be.attention(
            &up(&[1, 3, 2, 4])?,
            &up(&[1, 2, 2, 4])?,
            &up(&[1, 2, 2, 4])?,
            &AttnMask::none(),
            1.0,
        ),
    );
    expect_err(
        "rope odd head dim",
        be.rope(&up(&[1, 1, 2, 3])?, &up(&[2, 1])?, &up(&[2, 1])?),
    );
    if let Ok(h) = half {
        expect_err("binary dtype mismatch", be.binary(BinaryOp::Add, &a, &h));
    }
    Ok(wrongly_ok)
}

/// Runs the op suite on `be` in `dtype`, prints the worst error, and panics
/// with the table of failed checks: the body of every backend's op tests.
pub fn assert_op_suite_passes<B: Backend>(be: &B, dtype: DType) {
    let checks = match run_op_suite(be, dtype) {
        Ok(c) => c,
        Err(e) => panic!("{} {dtype}: op suite setup failed: {e}", be.name()),
    };
    assert!(checks.len() > 80, "suite ran only {} checks", checks.len());
    let worst = checks
        .iter()
        .filter(|c| c.error.is_none())
        .map(|c| c.rel_err)
        .fold(0.0, f64::max);
    eprintln!(
        "{} {dtype}: {} checks, worst relative error {worst:.2e}",
        be.name(),
        checks.len()
    );
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).cloned().collect();
    assert!(
        failed.is_empty(),
        "{} {dtype} op checks failed:\n{}",
        be.name(),
        format_checks(&failed)
    );
}

/// Runs [`run_error_suite`] and panics naming the calls that wrongly succeeded.
pub fn assert_error_suite_passes<B: Backend>(be: &B) {
    let wrongly_ok = match run_error_suite(be) {
        Ok(w) => w,
        Err(e) => panic!("{}: error suite setup failed: {e}", be.name()),
    };
    assert!(
        wrongly_ok.is_empty(),
        "{}: these calls should have failed: {wrongly_ok:?}",
        be.name()
    );
}

/// Formats a suite's results as a table (for `cargo xtask test` and test failures).
pub fn format_checks(checks: &[OpCheck]) -> String {
    let mut s = String::new();
    for c in checks {
        let status = if c.passed() { "ok  " } else { "FAIL" };
        match &c.error {
            Some(e) => s.push_str(&format!("{status} {:<58} error: {e}\n", c.name)),
            None => s.push_str(&format!(
                "{status} {:<58} rel err {:.2e} (tol {:.0e})\n",
                c.name, c.rel_err, c.tol
            )),
        }
    }
    s
}

/// Writes `src`'s tensors to the safetensors file `dst` in f32, each tensor
/// that `select` picks (with its format) replaced by its quantize-then-
/// dequantize round trip: a dense model loaded from `dst` is the reference
/// that a model quantized while loading from `src` must reproduce.
pub fn write_dequantized_copy(
    src: &crate::Checkpoint,
    dst: &std::path::Path,
    select: &dyn Fn(&str, &[usize]) -> Option<crate::QuantType>,
) -> Result<usize> {
    let mut tensors = Vec::new();
    let mut replaced = 0;
    for key in src.keys() {
        let t = src.get_as(key, DType::F32)?;
        let t = match select(key, t.dims()) {
            Some(q) => {
                replaced += 1;
                QuantTensor::quantize(key, &t, q)?.dequantize()?
            }
            None => t,
        };
        tensors.push((key.to_string(), t));
    }
    let views = tensors
        .iter()
        .map(|(k, t)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.dims().to_vec(), t.as_bytes())
                .map(|v| (k.clone(), v))
                .map_err(|e| crate::Error::InvalidArgument(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, dst).map_err(|e| crate::Error::InvalidArgument(e.to_string()))?;
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::reference::*;
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Values from Abramowitz & Stegun table 7.1 / high-precision tables.
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.5, 0.9999992569016276),
            (-1.5, -0.9661051464753108),
        ] {
            assert!((erf(x) - want).abs() < 1e-14, "erf({x}) = {} != {want}", erf(x));
        }
    }

    #[test]
    fn reference_matmul_and_conv_agree_on_a_hand_example() {
        let a = RefTensor::new(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(matmul(&a, &a).data, vec![7.0, 10.0, 15.0, 22.0]);
        // A 1x1 conv is a matmul over channels.
        let x = RefTensor::new(&[1, 2, 1, 1], vec![1.0, 2.0]);
        let w = RefTensor::new(&[1, 2, 1, 1], vec![3.0, 4.0]);
        assert_eq!(conv2d(&x, &w, None, Conv2dParams::default()).data, vec![11.0]);
    }

    #[test]
    fn rel_err_flags_nan_and_length_mismatch() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_err(&[f64::NAN], &[1.0]).is_infinite());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
    }
}
