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
}
