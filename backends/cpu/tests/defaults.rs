//! The trait's default composites (linear, softmax, norms, rope, attention),
//! checked by running the conformance suite on a backend that implements only
//! the required primitives. This is what a new backend gets before it adds any
//! fused kernel.

use emu_backend_cpu::CpuBackend;
use emu_core::backend::{Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp};
use emu_core::testing::{assert_error_suite_passes, assert_op_suite_passes};
use emu_core::{DType, HostTensor, Result};

#[derive(Debug, Clone)]
struct PrimitivesOnly(CpuBackend);

type T = <CpuBackend as Backend>::Tensor;

impl Backend for PrimitivesOnly {
    type Tensor = T;
    fn name(&self) -> &str {
        "primitives-only"
    }
    fn supports(&self, dtype: DType) -> bool {
        self.0.supports(dtype)
    }
    fn dims(&self, t: &T) -> Vec<usize> {
        self.0.dims(t)
    }
    fn dtype(&self, t: &T) -> DType {
        self.0.dtype(t)
    }
    fn upload(&self, host: &HostTensor) -> Result<T> {
        self.0.upload(host)
    }
    fn download(&self, t: &T) -> Result<HostTensor> {
        self.0.download(t)
    }
    fn full(&self, dims: &[usize], value: f64, dtype: DType) -> Result<T> {
        self.0.full(dims, value, dtype)
    }
    fn cast(&self, t: &T, dtype: DType) -> Result<T> {
        self.0.cast(t, dtype)
    }
    fn reshape(&self, t: &T, dims: &[usize]) -> Result<T> {
        self.0.reshape(t, dims)
    }
    fn permute(&self, t: &T, perm: &[usize]) -> Result<T> {
        self.0.permute(t, perm)
    }
    fn narrow(&self, t: &T, dim: usize, start: usize, len: usize) -> Result<T> {
        self.0.narrow(t, dim, start, len)
    }
    fn concat(&self, ts: &[&T], dim: usize) -> Result<T> {
        self.0.concat(ts, dim)
    }
    fn slice_set(&self, dst: T, src: &T, dim: usize, start: usize) -> Result<T> {
        self.0.slice_set(dst, src, dim, start)
    }
    fn index_select(&self, t: &T, ids: &T, dim: usize) -> Result<T> {
        self.0.index_select(t, ids, dim)
    }
    fn broadcast_to(&self, t: &T, dims: &[usize]) -> Result<T> {
        self.0.broadcast_to(t, dims)
    }
    fn unary(&self, op: UnaryOp, t: &T) -> Result<T> {
        self.0.unary(op, t)
    }
    fn binary(&self, op: BinaryOp, a: &T, b: &T) -> Result<T> {
        self.0.binary(op, a, b)
    }
    fn affine(&self, t: &T, mul: f64, add: f64) -> Result<T> {
        self.0.affine(t, mul, add)
    }
    fn reduce(&self, op: ReduceOp, t: &T, dim: usize, keepdim: bool) -> Result<T> {
        self.0.reduce(op, t, dim, keepdim)
    }
    fn argmax(&self, t: &T, dim: usize) -> Result<T> {
        self.0.argmax(t, dim)
    }
    fn matmul(&self, a: &T, b: &T) -> Result<T> {
        self.0.matmul(a, b)
    }
    fn conv2d(&self, x: &T, w: &T, bias: Option<&T>, params: Conv2dParams) -> Result<T> {
        self.0.conv2d(x, w, bias, params)
    }
    fn avg_pool2d(&self, x: &T, kernel: (usize, usize), stride: (usize, usize)) -> Result<T> {
        self.0.avg_pool2d(x, kernel, stride)
    }
    fn upsample_nearest2d(&self, x: &T, h: usize, w: usize) -> Result<T> {
        self.0.upsample_nearest2d(x, h, w)
    }
}

fn assert_suite_passes(dtype: DType) {
    assert_op_suite_passes(&PrimitivesOnly(CpuBackend::new()), dtype);
}

#[test]
fn default_composites_match_the_reference_in_f32() {
    assert_suite_passes(DType::F32);
}

#[test]
fn default_composites_match_the_reference_in_bf16() {
    assert_suite_passes(DType::BF16);
}

#[test]
fn default_composites_reject_malformed_calls() {
    assert_error_suite_passes(&PrimitivesOnly(CpuBackend::new()));
}
