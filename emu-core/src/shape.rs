//! Shape and dtype validation shared by every backend, so that all of them
//! reject the same malformed calls with the same messages.

use crate::{DType, Error, Result};

/// The NumPy broadcast of two shapes, or an error naming the op and both shapes.
pub fn broadcast_dims(op: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::shape(format!("{op}: shapes {a:?} and {b:?} do not broadcast"))),
        };
    }
    Ok(out)
}

/// `dim` must index a dimension of `dims`.
pub fn check_dim(op: &str, dims: &[usize], dim: usize) -> Result<()> {
    if dim >= dims.len() {
        return Err(Error::shape(format!("{op}: dimension {dim} out of range for {dims:?}")));
    }
    Ok(())
}

/// Operands of one op must share a dtype.
pub fn check_same_dtype(op: &str, a: DType, b: DType) -> Result<()> {
    if a != b {
        return Err(Error::DType(format!(
            "{op}: operands have different dtypes {a} and {b}"
        )));
    }
    Ok(())
}

/// Row-major strides of a contiguous tensor of shape `dims`, in elements.
pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Whether `dims` with `strides` are laid out row-major without gaps
/// (size-1 dimensions may have any stride).
pub fn is_contiguous(dims: &[usize], strides: &[usize]) -> bool {
    let mut expect = 1;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

/// Strides of a view (`dims`, `strides`) seen through a broadcast to `to`:
/// 0 on the expanded and the new leading dimensions. `to` must be a
/// broadcast of `dims` (checked by [`broadcast_dims`] or [`View::broadcast_to`]).
pub fn broadcast_strides(dims: &[usize], strides: &[usize], to: &[usize]) -> Vec<usize> {
    let off = to.len().saturating_sub(dims.len());
    (0..to.len())
        .map(|i| {
            if i < off || dims[i - off] == 1 {
                0
            } else {
                strides[i - off]
            }
        })
        .collect()
}

/// A strided view of a buffer: `dims`, per-dimension `strides` and the
/// `offset` of its first element, all in elements. The GPU backends keep
/// tensors as such views, so that `permute`, `narrow` and `broadcast_to`
/// are metadata changes; the checks and arithmetic of those ops live here
/// once, so every backend refuses the same calls with the same messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl View {
    /// A contiguous view of `dims` from the start of its buffer.
    pub fn contiguous(dims: &[usize]) -> Self {
        Self {
            dims: dims.to_vec(),
            strides: contiguous_strides(dims),
            offset: 0,
        }
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the elements are laid out row-major without gaps (size-1
    /// dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        is_contiguous(&self.dims, &self.strides)
    }

    /// Whether several indices share one element (a broadcast dimension):
    /// such a view must not be written through.
    pub fn aliases(&self) -> bool {
        self.strides.iter().zip(&self.dims).any(|(&s, &d)| s == 0 && d > 1)
    }

    /// Checks that the view can be reshaped to `dims` (same element count);
    /// the backend then makes it contiguous and applies [`View::contiguous`].
    pub fn check_reshape(&self, dims: &[usize]) -> Result<()> {
        if crate::host::checked_numel(dims)? != self.numel() {
            return Err(Error::shape(format!(
                "reshape: cannot view {:?} as {dims:?}",
                self.dims
            )));
        }
        Ok(())
    }

    /// The view with its dimensions reordered: output dimension `i` is input dimension `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        let rank = self.dims.len();
        let mut seen = vec![false; rank];
        if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::shape(format!(
                "permute: {perm:?} is not a permutation of the dims of {:?}",
                self.dims
            )));
        }
        Ok(Self {
            dims: perm.iter().map(|&p| self.dims[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// Elements `start..start + len` of dimension `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        check_dim("narrow", &self.dims, dim)?;
        if start.checked_add(len).is_none_or(|end| end > self.dims[dim]) {
            return Err(Error::shape(format!(
                "narrow: {start}..{start}+{len} out of range for dim {dim} of {:?}",
                self.dims
            )));
        }
        let mut dims = self.dims.clone();
        dims[dim] = len;
        Ok(Self {
            dims,
            strides: self.strides.clone(),
            // An empty view points nowhere new, so its offset may stay in bounds.
            offset: self.offset + if len > 0 { start * self.strides[dim] } else { 0 },
        })
    }

    /// Strides of this view seen through a broadcast to `dims` (0 on the
    /// expanded and the new leading dimensions). `dims` must be a
    /// broadcast of `self.dims` (see [`View::broadcast_to`]).
    pub fn broadcast_strides(&self, dims: &[usize]) -> Vec<usize> {
        broadcast_strides(&self.dims, &self.strides, dims)
    }

    /// The view expanded to `dims` without copying (NumPy rules, one way).
    pub fn broadcast_to(&self, dims: &[usize]) -> Result<Self> {
        let out = broadcast_dims("broadcast_to", &self.dims, dims)?;
        if out != dims || dims.len() < self.dims.len() {
            return Err(Error::shape(format!(
                "broadcast_to: {:?} cannot expand to {dims:?}",
                self.dims
            )));
        }
        Ok(Self {
            dims: dims.to_vec(),
            strides: self.broadcast_strides(dims),
            offset: self.offset,
        })
    }
}

/// The shape of `shapes` concatenated along `dim`: all of the same rank and
/// equal outside `dim`.
pub fn concat_dims(shapes: &[&[usize]], dim: usize) -> Result<Vec<usize>> {
    let first = *shapes.first().ok_or_else(|| Error::shape("concat of no tensors"))?;
    check_dim("concat", first, dim)?;
    for t in shapes {
        let ok = t.len() == first.len() && t.iter().zip(first).enumerate().all(|(i, (a, b))| i == dim || a == b);
        if !ok {
            return Err(Error::shape(format!(
                "concat along {dim}: {t:?} does not fit {first:?}"
            )));
        }
    }
    let mut dims = first.to_vec();
    dims[dim] = shapes.iter().map(|t| t[dim]).sum();
    Ok(dims)
}

/// `src` must fit into `dst` at `start` along `dim` (same rank, equal elsewhere).
pub fn check_slice_set(dst: &[usize], src: &[usize], dim: usize, start: usize) -> Result<()> {
    check_dim("slice_set", dst, dim)?;
    let fits = src.len() == dst.len()
        && src.iter().zip(dst).enumerate().all(|(i, (s, d))| {
            if i == dim {
                start.checked_add(*s).is_some_and(|end| end <= *d)
            } else {
                s == d
            }
        });
    if !fits {
        return Err(Error::shape(format!(
            "slice_set: {src:?} at {start} along {dim} does not fit into {dst:?}"
        )));
    }
    Ok(())
}

/// Checks an `index_select` of dimension `dim` of a tensor of shape `dims`
/// with the 1-D u32/i32 `ids` of shape `ids_dims`, and returns the output
/// shape. `ids_values`, when the ids' values are known on the host (the
/// buffer they were uploaded from, read at `offset + k * stride`), are
/// checked to lie in range, so a device never reads out of bounds.
pub fn index_select_dims(
    dims: &[usize],
    dim: usize,
    ids_dims: &[usize],
    ids_dtype: DType,
    ids_values: Option<(&[u32], usize, usize)>,
) -> Result<Vec<usize>> {
    check_dim("index_select", dims, dim)?;
    if ids_dims.len() != 1 || !matches!(ids_dtype, DType::U32 | DType::I32) {
        return Err(Error::shape(format!(
            "index_select: ids must be a 1-D u32/i32 tensor, found {ids_dims:?} {ids_dtype}"
        )));
    }
    let size = dims[dim];
    if let Some((host, offset, stride)) = ids_values {
        for k in 0..ids_dims[0] {
            let v = host.get(offset + k * stride).copied().unwrap_or(u32::MAX);
            let (shown, bad) = if ids_dtype == DType::I32 {
                let s = v as i32;
                (s as i64, s < 0 || s as usize >= size)
            } else {
                (v as i64, v as usize >= size)
            };
            if bad {
                return Err(Error::shape(format!(
                    "index_select: index {shown} out of range for dim {dim} of {dims:?}"
                )));
            }
        }
    }
    let mut out = dims.to_vec();
    out[dim] = ids_dims[0];
    Ok(out)
}

/// `(outer, dims[dim], inner)`: the element counts before, at and after
/// dimension `dim` (which must be in range), the launch shape of ops along one dimension.
pub fn split_at_dim(dims: &[usize], dim: usize) -> (usize, usize, usize) {
    (
        dims[..dim].iter().product(),
        dims[dim],
        dims[dim + 1..].iter().product(),
    )
}

/// The output shape of a reduction of dimension `dim` (kept as size 1 with
/// `keepdim`); the dimension must exist and not be empty.
pub fn reduce_dims(op: &str, dims: &[usize], dim: usize, keepdim: bool) -> Result<Vec<usize>> {
    check_dim(op, dims, dim)?;
    if dims[dim] == 0 {
        return Err(Error::shape(format!("{op}: dimension {dim} of {dims:?} is empty")));
    }
    let mut out = dims.to_vec();
    if keepdim {
        out[dim] = 1;
    } else {
        out.remove(dim);
    }
    Ok(out)
}

/// A per-channel vector of an op (a norm's weight or bias, `dims`/`dtype`)
/// must hold `n` elements along its last dimension, in the input's `expected` dtype.
pub fn check_channel_vector(op: &str, dims: &[usize], dtype: DType, n: usize, expected: DType) -> Result<()> {
    if dtype != expected {
        return Err(Error::DType(format!("{op}: weight is {dtype}, input {expected}")));
    }
    if dims.iter().product::<usize>() != n || dims.last() != Some(&n) {
        return Err(Error::shape(format!("{op}: weight {dims:?} does not fit rows of {n}")));
    }
    Ok(())
}

/// Drops size-1 dimensions and merges neighbours that are contiguous in
/// every operand, so strided kernels loop over as few dimensions as
/// possible: `(dims, per-operand strides)` of the same index space.
pub fn coalesce(dims: &[usize], strides: &[&[usize]]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut od: Vec<usize> = Vec::new();
    let mut os: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for d in 0..dims.len() {
        if dims[d] == 1 {
            continue;
        }
        let mergeable = !od.is_empty() && strides.iter().zip(&os).all(|(s, o)| o[o.len() - 1] == s[d] * dims[d]);
        if mergeable {
            let last = od.len() - 1;
            od[last] *= dims[d];
            for (k, s) in strides.iter().enumerate() {
                let l = os[k].len() - 1;
                os[k][l] = s[d];
            }
        } else {
            od.push(dims[d]);
            for (k, s) in strides.iter().enumerate() {
                os[k].push(s[d]);
            }
        }
    }
    (od, os)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_dims("t", &[2, 1, 5], &[3, 1]).unwrap(), vec![2, 3, 5]);
        assert_eq!(broadcast_dims("t", &[1], &[3, 2, 9]).unwrap(), vec![3, 2, 9]);
        assert_eq!(broadcast_dims("t", &[], &[4]).unwrap(), vec![4]);
        let e = broadcast_dims("add", &[4, 7], &[4, 5]).unwrap_err().to_string();
        assert!(e.contains("add") && e.contains("[4, 7]") && e.contains("[4, 5]"), "{e}");
    }

    #[test]
    fn dim_and_dtype_checks_name_the_op() {
        assert!(check_dim("narrow", &[2, 3], 1).is_ok());
        assert!(check_dim("narrow", &[2, 3], 2)
            .unwrap_err()
            .to_string()
            .contains("narrow"));
        assert!(check_same_dtype("matmul", DType::F32, DType::F32).is_ok());
        assert!(check_same_dtype("matmul", DType::F32, DType::BF16)
            .unwrap_err()
            .to_string()
            .contains("bf16"));
    }

    #[test]
    fn views_permute_narrow_and_broadcast_without_copies() {
        let v = View::contiguous(&[2, 3, 4]);
        assert_eq!(v.strides, vec![12, 4, 1]);
        assert!(v.is_contiguous() && !v.aliases());
        let p = v.permute(&[2, 0, 1]).unwrap();
        assert_eq!((p.dims.clone(), p.strides.clone()), (vec![4, 2, 3], vec![1, 12, 4]));
        assert!(!p.is_contiguous());
        for bad in [&[0, 1][..], &[0, 0, 1], &[0, 1, 3]] {
            let e = v.permute(bad).unwrap_err().to_string();
            assert!(e.contains("not a permutation") && e.contains("[2, 3, 4]"), "{e}");
        }
        let n = v.narrow(1, 1, 2).unwrap();
        assert_eq!((n.dims.clone(), n.offset), (vec![2, 2, 4], 4));
        assert_eq!(v.narrow(1, 3, 0).unwrap().offset, 0, "an empty view keeps its offset");
        assert!(v.narrow(1, 2, 2).is_err());
        assert!(v.narrow(1, usize::MAX, 2).is_err(), "start + len overflows");
        assert!(v.narrow(3, 0, 1).unwrap_err().to_string().contains("dimension 3"));
        let b = View::contiguous(&[3, 1]).broadcast_to(&[2, 3, 5]).unwrap();
        assert_eq!(b.strides, vec![0, 1, 0]);
        assert!(b.aliases());
        assert!(View::contiguous(&[3, 2]).broadcast_to(&[3, 5]).is_err());
        assert!(
            View::contiguous(&[1, 3]).broadcast_to(&[3]).is_err(),
            "no rank reduction"
        );
        assert!(v.check_reshape(&[6, 4]).is_ok());
        assert!(v.check_reshape(&[5, 5]).unwrap_err().to_string().contains("reshape"));
        assert!(v.check_reshape(&[usize::MAX, 3]).is_err());
    }

    #[test]
    fn concat_slice_set_and_index_select_shapes() {
        assert_eq!(concat_dims(&[&[2, 3], &[2, 5]], 1).unwrap(), vec![2, 8]);
        assert!(concat_dims(&[&[2, 3], &[3, 5]], 1)
            .unwrap_err()
            .to_string()
            .contains("does not fit"));
        assert!(concat_dims(&[&[2, 3], &[2, 3, 1]], 0).is_err());
        assert!(concat_dims(&[], 0).is_err());
        assert!(check_slice_set(&[4, 8], &[4, 3], 1, 5).is_ok());
        assert!(check_slice_set(&[4, 8], &[4, 3], 1, 6).is_err());
        assert!(check_slice_set(&[4, 8], &[4, 3], 1, usize::MAX).is_err());
        assert!(check_slice_set(&[4, 8], &[3, 3], 1, 0).is_err());
        let ids = [0u32, 2, 7, 1];
        assert_eq!(
            index_select_dims(&[3, 5], 0, &[2], DType::U32, Some((&ids, 0, 3))).unwrap(),
            vec![2, 5]
        );
        // Every other element of the upload: 0 and 7, and 7 is out of range.
        let e = index_select_dims(&[3, 5], 0, &[2], DType::U32, Some((&ids, 0, 2))).unwrap_err();
        assert!(e.to_string().contains("index 7 out of range"), "{e}");
        let neg = [(-1i32) as u32];
        let e = index_select_dims(&[3, 5], 1, &[1], DType::I32, Some((&neg, 0, 1))).unwrap_err();
        assert!(e.to_string().contains("index -1"), "{e}");
        assert!(index_select_dims(&[3, 5], 0, &[1, 1], DType::U32, None).is_err());
        assert!(index_select_dims(&[3, 5], 0, &[1], DType::F32, None).is_err());
    }

    #[test]
    fn reductions_and_channel_vectors() {
        assert_eq!(split_at_dim(&[2, 3, 4, 5], 2), (6, 4, 5));
        assert_eq!(split_at_dim(&[7], 0), (1, 7, 1));
        assert_eq!(reduce_dims("sum", &[2, 3, 4], 1, false).unwrap(), vec![2, 4]);
        assert_eq!(reduce_dims("sum", &[2, 3, 4], 2, true).unwrap(), vec![2, 3, 1]);
        assert!(reduce_dims("max", &[2, 0], 1, false)
            .unwrap_err()
            .to_string()
            .contains("max: dimension 1 of [2, 0] is empty"));
        assert!(reduce_dims("max", &[2], 1, false).is_err());
        assert!(check_channel_vector("rms_norm", &[8], DType::F32, 8, DType::F32).is_ok());
        assert!(check_channel_vector("rms_norm", &[2, 4], DType::F32, 8, DType::F32).is_err());
        assert!(check_channel_vector("rms_norm", &[8], DType::F16, 8, DType::F32)
            .unwrap_err()
            .to_string()
            .contains("weight is f16"));
    }

    #[test]
    fn coalesce_merges_dims_contiguous_in_every_operand() {
        // Contiguous [2, 3] and a broadcast row: nothing merges across the 0 stride.
        let (d, s) = coalesce(&[2, 3], &[&[3, 1], &[0, 1]]);
        assert_eq!((d, s), (vec![2, 3], vec![vec![3, 1], vec![0, 1]]));
        let (d, s) = coalesce(&[2, 1, 3], &[&[60, 60, 20], &[90, 90, 30]]);
        assert_eq!((d, s), (vec![6], vec![vec![20], vec![30]]));
        let (d, s) = coalesce(&[1, 1], &[&[0, 0]]);
        assert!(d.is_empty() && s[0].is_empty());
    }
}
