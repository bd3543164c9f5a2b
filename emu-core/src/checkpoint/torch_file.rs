//! The tensor table of a `torch.save` zip archive (PyTorch >= 1.6).
//!
//! Layout: `<name>/data.pkl` is a pickle of the saved object whose tensors
//! refer to storages by key; storage `k` is the entry `<name>/data/k`, stored
//! uncompressed. The zip crate only locates entries; their bytes are used in
//! place from the memory map.

use super::pickle::{self, TorchDType};
use super::{format_err, CrcRegion, Entry, Layout, StoredDType};
use crate::Result;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use zip::CompressionMethod;

struct ZipEntry {
    start: usize,
    len: usize,
    stored: bool,
    crc32: u32,
}

/// Parses the archive's directory and its `data.pkl`.
/// Storage entries that tensors use are appended to `crc` for checking when read.
pub(crate) fn read_entries(
    path: &Path,
    map: &[u8],
    file: usize,
    crc: &mut Vec<CrcRegion>,
) -> Result<Vec<(String, Entry)>> {
    let bad = |m: String| format_err(path, m);
    let mut zip =
        zip::ZipArchive::new(Cursor::new(map)).map_err(|e| bad(format!("not a valid PyTorch zip archive: {e}")))?;
    let mut entries: HashMap<String, ZipEntry> = HashMap::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| bad(format!("zip entry {i} is unreadable: {e}")))?;
        let name = f
            .name()
            .map_err(|e| bad(format!("zip entry {i} has a bad name: {e}")))?
            .into_owned();
        let start = f
            .data_start()
            .ok_or_else(|| bad(format!("zip entry `{name}` has no data offset")))?;
        let len = f.compressed_size();
        let range = usize::try_from(start)
            .ok()
            .zip(usize::try_from(len).ok())
            .filter(|(s, l)| s.checked_add(*l).is_some_and(|e| e <= map.len()))
            .ok_or_else(|| bad(format!("zip entry `{name}` lies past the end of the file (truncated?)")))?;
        let stored = f.compression() == CompressionMethod::Stored && f.size() == len;
        entries.insert(
            name,
            ZipEntry {
                start: range.0,
                len: range.1,
                stored,
                crc32: f.crc32(),
            },
        );
    }
    let pkl_names: Vec<&String> = entries
        .keys()
        .filter(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .collect();
    let pkl_name = match pkl_names.as_slice() {
        [one] => (*one).clone(),
        [] => return Err(bad("zip archive has no `data.pkl`: not a torch.save file".into())),
        _ => return Err(bad("zip archive has several `data.pkl` entries".into())),
    };
    let root = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    if let Some(order) = entries.get(&format!("{root}byteorder")) {
        let b = order.stored.then(|| &map[order.start..order.start + order.len]);
        if b != Some(b"little".as_slice()) {
            return Err(bad(
                "archive was saved on a big-endian machine (byteorder is not `little`)".into(),
            ));
        }
    }
    let pkl = &entries[&pkl_name];
    if !pkl.stored {
        return Err(bad(format!("`{pkl_name}` is compressed; torch.save never does that")));
    }
    let pkl_bytes = &map[pkl.start..pkl.start + pkl.len];
    let corrupt = crc32fast::hash(pkl_bytes) != pkl.crc32;
    let crc_note = if corrupt {
        " is corrupt (its CRC-32 does not match the one the archive records)"
    } else {
        ""
    };
    let value = pickle::load(pkl_bytes).map_err(|e| bad(format!("`{pkl_name}`{crc_note}: {e}")))?;
    if corrupt {
        return Err(bad(format!("zip entry `{pkl_name}`{crc_note}")));
    }
    let found = pickle::tensors(&value).map_err(|e| bad(format!("`{pkl_name}`: {e}")))?;
    let tensors = found.tensors;
    if tensors.is_empty() && !found.refused.is_empty() {
        return Err(bad(format!(
            "`{pkl_name}` holds no tensors, only calls to {} that this reader refuses to run \
             (it interprets tensor rebuilds and dicts only; nothing in the file was executed)",
            found
                .refused
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if tensors.is_empty() {
        return Err(bad(format!(
            "`{pkl_name}` holds no tensors in (nested) dicts; if it stores a whole nn.Module, \
             re-save its state_dict() instead"
        )));
    }
    let mut out = Vec::with_capacity(tensors.len());
    let mut regions: HashMap<String, usize> = HashMap::new();
    for (key, t) in tensors {
        let storage_name = format!("{root}data/{}", t.storage.key);
        let s = entries
            .get(&storage_name)
            .ok_or_else(|| bad(format!("tensor `{key}`: storage entry `{storage_name}` is missing")))?;
        if !s.stored {
            return Err(bad(format!("tensor `{key}`: storage `{storage_name}` is compressed")));
        }
        let dtype = match &t.dtype {
            TorchDType::Known(d) => StoredDType::Known(*d),
            TorchDType::Other(n) => StoredDType::Unsupported(n.clone()),
        };
        let dims: Vec<usize> = t
            .size
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("tensor `{key}`: size {:?} does not fit in memory", t.size)))?;
        // Check that every element of the view lies inside the storage entry,
        // so that reading never goes out of bounds. Unknown dtypes are only
        // listed, never read, so their extent is not needed.
        if let Some(es) = t.dtype.size_in_bytes() {
            let storage_bytes = match &t.storage.dtype {
                None => Some(t.storage.numel),
                Some(sd) => sd.size_in_bytes().and_then(|b| t.storage.numel.checked_mul(b as u64)),
            };
            let Some(storage_bytes) = storage_bytes.filter(|b| *b <= s.len as u64) else {
                return Err(bad(format!(
                    "tensor `{key}`: storage `{storage_name}` claims {} elements but the entry has {} bytes",
                    t.storage.numel, s.len
                )));
            };
            let empty = t.size.contains(&0);
            let last = t.size.iter().zip(&t.stride).try_fold(t.offset, |acc, (&n, &st)| {
                acc.checked_add(n.saturating_sub(1).checked_mul(st)?)
            });
            let end_bytes = last
                .and_then(|l| l.checked_add(1))
                .and_then(|n| n.checked_mul(es as u64));
            // Against the storage's own size, not the entry's: a view past
            // the storage it names would read another storage's bytes.
            if !empty && end_bytes.is_none_or(|e| e > storage_bytes) {
                return Err(bad(format!(
                    "tensor `{key}`: view (offset {}, size {:?}, stride {:?}) reaches past its storage `{storage_name}`",
                    t.offset, t.size, t.stride
                )));
            }
        }
        let too_big = || bad(format!("tensor `{key}`: offset or strides do not fit in memory"));
        let offset = usize::try_from(t.offset).map_err(|_| too_big())?;
        let strides: Vec<usize> = t
            .stride
            .iter()
            .map(|&x| usize::try_from(x))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| too_big())?;
        let layout = if is_contiguous(&dims, &strides) {
            // Validated above for known dtypes; empty or unreadable tensors
            // never dereference `start`.
            let es = t.dtype.size_in_bytes().unwrap_or(0);
            let start = offset
                .checked_mul(es)
                .and_then(|b| b.checked_add(s.start))
                .unwrap_or(s.start);
            Layout::Contiguous { start }
        } else {
            Layout::Strided {
                base: s.start,
                offset,
                strides,
            }
        };
        let region = *regions.entry(storage_name.clone()).or_insert_with(|| {
            crc.push(CrcRegion::new(storage_name.clone(), s.start, s.len, s.crc32));
            crc.len() - 1
        });
        out.push((
            key,
            Entry {
                file,
                dtype,
                dims,
                layout,
                crc: Some(region),
            },
        ));
    }
    Ok(out)
}

/// Row-major strides (dimensions of size 1 may have any stride).
fn is_contiguous(dims: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}
