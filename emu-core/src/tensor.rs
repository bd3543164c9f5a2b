//! `Tensor<B>`: a backend handle with method syntax, so model code reads like
//! PyTorch (`x.matmul(&w)?.add(&b)?`) instead of `b.binary(Add, &b.matmul(..)?, ..)`.

use crate::backend::{AttnMask, Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp};
use crate::{DType, Error, HostTensor, Result};

/// A device tensor together with the backend that owns it.
#[derive(Clone, Debug)]
pub struct Tensor<B: Backend> {
    backend: B,
    inner: B::Tensor,
}

macro_rules! unary_methods {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            pub fn $name(&self) -> Result<Self> {
                self.wrap(self.backend.unary(UnaryOp::$op, &self.inner)?)
            }
        )*
    };
}

macro_rules! binary_methods {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            pub fn $name(&self, rhs: &Self) -> Result<Self> {
                self.wrap(self.backend.binary(BinaryOp::$op, &self.inner, &rhs.inner)?)
            }
        )*
    };
}

impl<B: Backend> Tensor<B> {
    /// Wraps a raw backend tensor.
    pub fn from_raw(backend: &B, inner: B::Tensor) -> Self {
        Self {
            backend: backend.clone(),
            inner,
        }
    }

    /// Uploads a host tensor.
    pub fn from_host(backend: &B, host: &HostTensor) -> Result<Self> {
        Ok(Self::from_raw(backend, backend.upload(host)?))
    }

    /// Uploads f32 values.
    pub fn from_f32(backend: &B, dims: &[usize], values: Vec<f32>) -> Result<Self> {
        Self::from_host(backend, &HostTensor::from_f32(dims, values)?)
    }

    /// Uploads u32 indices (token ids, gather indices).
    pub fn from_u32(backend: &B, dims: &[usize], values: Vec<u32>) -> Result<Self> {
        Self::from_host(backend, &HostTensor::from_u32(dims, values)?)
    }

    pub fn full(backend: &B, dims: &[usize], value: f64, dtype: DType) -> Result<Self> {
        Ok(Self::from_raw(backend, backend.full(dims, value, dtype)?))
    }

    pub fn zeros(backend: &B, dims: &[usize], dtype: DType) -> Result<Self> {
        Self::full(backend, dims, 0.0, dtype)
    }

    fn wrap(&self, inner: B::Tensor) -> Result<Self> {
        Ok(Self {
            backend: self.backend.clone(),
            inner,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn raw(&self) -> &B::Tensor {
        &self.inner
    }

    pub fn into_raw(self) -> B::Tensor {
        self.inner
    }

    pub fn dims(&self) -> Vec<usize> {
        self.backend.dims(&self.inner)
    }

    pub fn rank(&self) -> usize {
        self.dims().len()
    }

    /// Size of dimension `dim`, with a shape error instead of a panic.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        let d = self.dims();
        d.get(dim)
            .copied()
            .ok_or_else(|| Error::shape(format!("dimension {dim} out of range for {d:?}")))
    }

    pub fn dtype(&self) -> DType {
        self.backend.dtype(&self.inner)
    }

    /// Copies the tensor to the host.
    pub fn to_host(&self) -> Result<HostTensor> {
        self.backend.download(&self.inner)
    }

    /// The loop-carried value at the end of an iteration; see [`Backend::materialize`].
    pub fn materialize(&self) -> Result<Self> {
        self.wrap(self.backend.materialize(&self.inner)?)
    }

    /// Copies the tensor to the host as f32 values.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.to_host()?.to_f32_vec()
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        self.wrap(self.backend.cast(&self.inner, dtype)?)
    }

    pub fn reshape(&self, dims: &[usize]) -> Result<Self> {
        self.wrap(self.backend.reshape(&self.inner, dims)?)
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        self.wrap(self.backend.permute(&self.inner, perm)?)
    }

    /// Swaps two dimensions.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Self> {
        let rank = self.rank();
        if d0 >= rank || d1 >= rank {
            return Err(Error::shape(format!("transpose({d0}, {d1}) of a rank-{rank} tensor")));
        }
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(d0, d1);
        self.permute(&perm)
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        self.wrap(self.backend.narrow(&self.inner, dim, start, len)?)
    }

    pub fn concat(ts: &[&Self], dim: usize) -> Result<Self> {
        let first = ts.first().ok_or_else(|| Error::shape("concat of no tensors"))?;
        let raws: Vec<&B::Tensor> = ts.iter().map(|t| &t.inner).collect();
        first.wrap(first.backend.concat(&raws, dim)?)
    }

    /// Writes `src` into `self` at `start` along `dim`; consumes `self`
    /// (see [`Backend::slice_set`]).
    pub fn slice_set(self, src: &Self, dim: usize, start: usize) -> Result<Self> {
        let Self { backend, inner } = self;
        let inner = backend.slice_set(inner, &src.inner, dim, start)?;
        Ok(Self { backend, inner })
    }

    pub fn index_select(&self, ids: &Self, dim: usize) -> Result<Self> {
        self.wrap(self.backend.index_select(&self.inner, &ids.inner, dim)?)
    }

    pub fn broadcast_to(&self, dims: &[usize]) -> Result<Self> {
        self.wrap(self.backend.broadcast_to(&self.inner, dims)?)
    }

    unary_methods!(
        neg => Neg, abs => Abs, exp => Exp, log => Log, sqrt => Sqrt, sqr => Sqr,
        recip => Recip, tanh => Tanh, sigmoid => Sigmoid, sin => Sin, cos => Cos,
        relu => Relu, silu => Silu, gelu => Gelu, gelu_tanh => GeluTanh,
    );

    binary_methods!(add => Add, sub => Sub, mul => Mul, div => Div, maximum => Maximum, minimum => Minimum);

    /// `self * mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        self.wrap(self.backend.affine(&self.inner, mul, add)?)
    }

    pub fn reduce(&self, op: ReduceOp, dim: usize, keepdim: bool) -> Result<Self> {
        self.wrap(self.backend.reduce(op, &self.inner, dim, keepdim)?)
    }

    pub fn sum(&self, dim: usize, keepdim: bool) -> Result<Self> {
        self.reduce(ReduceOp::Sum, dim, keepdim)
    }

    pub fn mean(&self, dim: usize, keepdim: bool) -> Result<Self> {
        self.reduce(ReduceOp::Mean, dim, keepdim)
    }

    pub fn max(&self, dim: usize, keepdim: bool) -> Result<Self> {
        self.reduce(ReduceOp::Max, dim, keepdim)
    }

    pub fn argmax(&self, dim: usize) -> Result<Self> {
        self.wrap(self.backend.argmax(&self.inner, dim)?)
    }

    pub fn matmul(&self, rhs: &Self) -> Result<Self> {
        self.wrap(self.backend.matmul(&self.inner, &rhs.inner)?)
    }

    pub fn linear(&self, w: &Self, b: Option<&Self>) -> Result<Self> {
        self.wrap(self.backend.linear(&self.inner, &w.inner, b.map(|b| &b.inner))?)
    }

    /// `self @ W^T + b` with a block-quantized `W` (see [`Backend::linear_quant`]).
    pub fn linear_quant(&self, w: &crate::QuantTensor, b: Option<&Self>) -> Result<Self> {
        self.wrap(self.backend.linear_quant(&self.inner, w, b.map(|b| &b.inner))?)
    }

    pub fn conv2d(&self, w: &Self, b: Option<&Self>, params: Conv2dParams) -> Result<Self> {
        self.wrap(
            self.backend
                .conv2d(&self.inner, &w.inner, b.map(|b| &b.inner), params)?,
        )
    }

    pub fn avg_pool2d(&self, kernel: (usize, usize), stride: (usize, usize)) -> Result<Self> {
        self.wrap(self.backend.avg_pool2d(&self.inner, kernel, stride)?)
    }

    pub fn upsample_nearest2d(&self, h: usize, w: usize) -> Result<Self> {
        self.wrap(self.backend.upsample_nearest2d(&self.inner, h, w)?)
    }

    pub fn softmax_last_dim(&self) -> Result<Self> {
        self.wrap(self.backend.softmax_last_dim(&self.inner)?)
    }

    pub fn layer_norm(&self, w: Option<&Self>, b: Option<&Self>, eps: f64) -> Result<Self> {
        self.wrap(
            self.backend
                .layer_norm(&self.inner, w.map(|w| &w.inner), b.map(|b| &b.inner), eps)?,
        )
    }

    pub fn rms_norm(&self, w: &Self, eps: f64) -> Result<Self> {
        self.wrap(self.backend.rms_norm(&self.inner, &w.inner, eps)?)
    }

    pub fn group_norm(&self, groups: usize, w: Option<&Self>, b: Option<&Self>, eps: f64) -> Result<Self> {
        self.wrap(
            self.backend
                .group_norm(&self.inner, groups, w.map(|w| &w.inner), b.map(|b| &b.inner), eps)?,
        )
    }

    pub fn rope(&self, cos: &Self, sin: &Self) -> Result<Self> {
        self.wrap(self.backend.rope(&self.inner, &cos.inner, &sin.inner)?)
    }

    /// Scaled dot-product attention with `self` as the queries.
    pub fn attention(
        &self,
        k: &Self,
        v: &Self,
        causal_offset: Option<usize>,
        bias: Option<&Self>,
        scale: f64,
    ) -> Result<Self> {
        let mask = AttnMask {
            causal_offset,
            bias: bias.map(|b| &b.inner),
        };
        self.wrap(self.backend.attention(&self.inner, &k.inner, &v.inner, &mask, scale)?)
    }
}
