//! The tensor table of one safetensors file.
//!
//! The `safetensors` crate parses and validates the header (length within the
//! file and under 100 MB, offsets contiguous and matching shapes, the data
//! ending exactly at the end of the file); nothing past the header is read.

use super::{byte_len, format_err, Entry, Layout, StoredDType};
use crate::{DType, Result};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::path::Path;

fn dtype(d: Dtype) -> StoredDType {
    StoredDType::Known(match d {
        Dtype::BOOL => DType::Bool,
        Dtype::U8 => DType::U8,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I32 => DType::I32,
        Dtype::U32 => DType::U32,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        other => return StoredDType::Unsupported(format!("{other:?}")),
    })
}

fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => "file is shorter than the 8-byte header length".into(),
        SafeTensorError::HeaderTooLarge => "header length is larger than 100 MB (corrupt file?)".into(),
        SafeTensorError::InvalidHeaderLength => {
            "header length points past the end of the file (truncated or not a safetensors file)".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not end at the end of the file (truncated or padded file)".into()
        }
        other => format!("invalid safetensors header: {other}"),
    }
}

/// Parses the header of `map` (a whole safetensors file).
pub(crate) fn read_entries(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let (header_len, meta) = SafeTensors::read_metadata(map).map_err(|e| format_err(path, describe(&e)))?;
    // 8 bytes of length, then the header; offsets are relative to what follows.
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = dtype(info.dtype);
        let (s, e) = info.data_offsets;
        if let StoredDType::Known(d) = &dtype {
            let n = byte_len(path, &name, &info.shape, d.size_in_bytes())?;
            if e.checked_sub(s) != Some(n) {
                return Err(format_err(
                    path,
                    format!("tensor `{name}`: data size does not match its shape"),
                ));
            }
        }
        let start = data_start
            .checked_add(s)
            .filter(|st| st.checked_add(e.saturating_sub(s)).is_some_and(|end| end <= map.len()))
            .ok_or_else(|| format_err(path, format!("tensor `{name}`: data lies past the end of the file")))?;
        out.push((
            name,
            Entry {
                file,
                dtype,
                dims: info.shape.clone(),
                layout: Layout::Contiguous { start },
                crc: None,
            },
        ));
    }
    Ok(out)
}
