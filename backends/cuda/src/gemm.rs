//! Mapping row-major, possibly strided matrix products onto cuBLAS's
//! column-major `gemmStridedBatchedEx` without copies.
//!
//! A row-major `C[m, n] = A[m, k] B[k, n]` is, read column-major,
//! `C^T[n, m] = B^T[n, k] A^T[k, m]`: cuBLAS gets `B` as its first operand
//! and `A` as its second. A row-major matrix with unit column stride is its
//! own transpose in column-major order (op N, leading dimension = row
//! stride); one with unit row stride (a permuted view, e.g. a linear
//! layer's weight `w.t()`) is read with op T. Anything else is copied to a
//! contiguous layout by the caller first.

/// One operand as cuBLAS sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// Device address of the first matrix.
    pub ptr: u64,
    pub trans: bool,
    pub ld: i64,
    /// Elements between successive matrices of the batch.
    pub batch_stride: i64,
}

/// One `gemmStridedBatchedEx` call, in cuBLAS's (column-major) terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub first: Operand,
    pub second: Operand,
    pub out: Operand,
    pub batch: i64,
}

/// How cuBLAS reads the row-major matrix `X[r, c]` with element strides
/// `(rs, cs)` as the column-major `X^T[c, r]`: `(transposed, leading
/// dimension)`, or `None` when neither stride is unit.
pub fn layout(r: usize, c: usize, rs: usize, cs: usize) -> Option<(bool, i64)> {
    let (r, c) = (r as i64, c as i64);
    let (rs, cs) = (rs as i64, cs as i64);
    if (cs == 1 || c == 1) && (r == 1 || rs >= c.max(1)) {
        return Some((false, if r == 1 { c.max(1) } else { rs }));
    }
    if (rs == 1 || r == 1) && (c == 1 || cs >= r.max(1)) {
        return Some((true, if c == 1 { r.max(1) } else { cs }));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_is_op_n_and_permuted_is_op_t() {
        // Contiguous [3, 5]: row stride 5.
        assert_eq!(layout(3, 5, 5, 1), Some((false, 5)));
        // A narrowed row-major view keeps the parent's row stride.
        assert_eq!(layout(3, 5, 8, 1), Some((false, 8)));
        // The transpose of a contiguous [5, 3] (strides (1, 3)).
        assert_eq!(layout(3, 5, 1, 3), Some((true, 3)));
        // Vectors: any stride on the size-1 axis.
        assert_eq!(layout(1, 5, 0, 1), Some((false, 5)));
        assert_eq!(layout(5, 1, 1, 0), Some((false, 1)));
        assert_eq!(layout(5, 1, 7, 0), Some((false, 7)));
        // A row stride smaller than the row (overlapping rows): not a cuBLAS layout.
        assert_eq!(layout(3, 5, 2, 1), None);
        // Neither stride is unit (e.g. every other column).
        assert_eq!(layout(3, 5, 10, 2), None);
        // Broadcast rows (stride 0) cannot be a leading dimension.
        assert_eq!(layout(3, 5, 0, 1), None);
    }
}
