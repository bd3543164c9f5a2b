//! Batched `a @ b` as a run of 2-D products: the shape rules the AMX (bf16)
//! and AVX-512 (f32) kernels share.

use candle_core::Tensor as CTensor;

/// `a [.., m, k] @ b [.., k, n]` with `a` contiguous and `b` row-major
/// (`b_rows`) or the transpose of a row-major `[.., n, k]` (the keys of
/// `q k^T`, which pack without a copy).
pub(crate) struct Batched {
    pub a: CTensor,
    pub b: CTensor,
    pub b_rows: bool,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// One `b` for every product (its batch dimensions are all 1).
    pub shared: bool,
    out: Vec<usize>,
}

impl Batched {
    /// The plan, or `None` where the kernels do not apply: batch dimensions
    /// other than equal ones or a `b` without any, or an empty product.
    /// Ranks and inner sizes are validated by the caller.
    pub fn plan(a: &CTensor, b: &CTensor) -> candle_core::Result<Option<Self>> {
        let (ad, bd) = (a.dims(), b.dims());
        let (ra, rb) = (ad.len(), bd.len());
        let (m, k, n) = (ad[ra - 2], ad[ra - 1], bd[rb - 1]);
        let (abatch, bbatch) = (&ad[..ra - 2], &bd[..rb - 2]);
        let shared = bbatch.iter().all(|&d| d == 1) && bbatch.len() <= abatch.len();
        if !(abatch == bbatch || shared) || m == 0 || n == 0 || k == 0 || abatch.contains(&0) {
            return Ok(None);
        }
        let (b, b_rows) = if b.is_contiguous() {
            (b.clone(), true)
        } else if b.t()?.is_contiguous() {
            (b.t()?, false)
        } else {
            (b.contiguous()?, true)
        };
        let mut out = abatch.to_vec();
        out.extend([m, n]);
        Ok(Some(Batched {
            a: a.contiguous()?,
            b,
            b_rows,
            m,
            k,
            n,
            shared,
            out,
        }))
    }

    /// The output's dimensions.
    pub fn out_dims(&self) -> &[usize] {
        &self.out
    }

    /// Where product `i`'s `b` starts in `b`'s elements.
    pub fn b_at(&self, i: usize) -> usize {
        if self.shared {
            0
        } else {
            i * self.k * self.n
        }
    }
}
