//! GGUF (version 3) files: the tensor table for [`super::Checkpoint`], and a
//! streaming writer for quantized checkpoints (`emu convert --quantize`).
//!
//! Layout (ggml's `docs/gguf.md`): magic `GGUF`, version, tensor count,
//! metadata count; the metadata key/values; per tensor its name, rank, dims
//! (innermost first), ggml type and data offset; padding to the alignment
//! (`general.alignment`, default 32); the data, each tensor aligned.
//! Tensor names are kept as the source checkpoint spells them (PyTorch
//! keys), so every loader of emu-rs finds them like in a safetensors file;
//! dims are stored innermost first as GGUF requires and reversed on reading.

use super::{byte_len, format_err, Entry, Layout, StoredDType};
use crate::quant::{quantized_size, QuantType};
use crate::{DType, Error, Result};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml type ids of the plain dtypes.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_I8: u32 = 24;
const GGML_I32: u32 = 26;
const GGML_I64: u32 = 27;
const GGML_F64: u32 = 28;
const GGML_BF16: u32 = 30;

/// How a tensor is stored in a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// Stored as plain elements (f32, f16, bf16, f64, i64, i32).
    Float(DType),
    Quant(QuantType),
}

impl GgufType {
    fn id(self) -> Result<u32> {
        Ok(match self {
            GgufType::Float(DType::F32) => GGML_F32,
            GgufType::Float(DType::F16) => GGML_F16,
            GgufType::Float(DType::BF16) => GGML_BF16,
            GgufType::Float(DType::F64) => GGML_F64,
            GgufType::Float(DType::I64) => GGML_I64,
            GgufType::Float(DType::I32) => GGML_I32,
            GgufType::Float(d) => return Err(Error::DType(format!("GGUF cannot store {d} tensors"))),
            GgufType::Quant(q) => q.ggml_type(),
        })
    }

    /// Bytes of a tensor of `dims` (errors name `name`).
    pub fn size(self, name: &str, dims: &[usize]) -> Result<usize> {
        match self {
            GgufType::Float(d) => crate::host::checked_numel(dims)?
                .checked_mul(d.size_in_bytes())
                .ok_or_else(|| Error::shape(format!("tensor `{name}`: shape {dims:?} overflows"))),
            GgufType::Quant(q) => quantized_size(name, q, dims),
        }
    }
}

/// A little-endian cursor over the mapped file, with errors that say what was cut off.
struct Reader<'a> {
    path: &'a Path,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format_err(self.path, format!("GGUF header truncated while reading {what}")))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // Nothing in a header is larger than the file itself.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.b.len())
            .ok_or_else(|| format_err(self.path, format!("GGUF {what}: length {n} is larger than the file")))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| format_err(self.path, format!("GGUF {what} is not UTF-8")))
    }
    /// Skips or reads one metadata value of type `t`; returns it as u64 when
    /// it is an unsigned integer (the only values the loader needs).
    fn value(&mut self, t: u32, key: &str) -> Result<Option<u64>> {
        let fixed = |t: u32| match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match t {
            4 => Ok(Some(self.u32(key)? as u64)),
            10 => Ok(Some(self.u64(key)?)),
            8 => {
                self.string(key)?;
                Ok(None)
            }
            9 => {
                let et = self.u32(key)?;
                let n = self.len(key)?;
                if let Some(sz) = fixed(et) {
                    let total = n
                        .checked_mul(sz)
                        .ok_or_else(|| format_err(self.path, format!("GGUF array `{key}` overflows")))?;
                    self.take(total, key)?;
                } else {
                    for _ in 0..n {
                        self.value(et, key)?;
                    }
                }
                Ok(None)
            }
            t => match fixed(t) {
                Some(sz) => {
                    self.take(sz, key)?;
                    Ok(None)
                }
                None => Err(format_err(
                    self.path,
                    format!("GGUF metadata `{key}` has unknown type {t}"),
                )),
            },
        }
    }
}

/// Parses the header of `map` (a whole GGUF file).
pub(crate) fn read_entries(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let mut r = Reader { path, b: map, pos: 0 };
    if r.take(4, "the magic")? != MAGIC {
        return Err(format_err(path, "not a GGUF file"));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format_err(
            path,
            format!("GGUF version {version} is not supported (2 or 3)"),
        ));
    }
    let n_tensors = r.len("tensor count")?;
    let n_kv = r.len("metadata count")?;
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let t = r.u32(&key)?;
        let v = r.value(t, &key)?;
        if key == "general.alignment" {
            alignment = v
                .filter(|&a| a > 0 && a.is_power_of_two())
                .ok_or_else(|| format_err(path, "general.alignment must be a power of two"))?;
        }
    }
    let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let rank = r.u32(&name)? as usize;
        if rank == 0 || rank > 8 {
            return Err(format_err(path, format!("tensor `{name}`: rank {rank}")));
        }
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(r.len(&name)?);
        }
        dims.reverse();
        let t = r.u32(&name)?;
        let offset = r.u64(&name)?;
        infos.push((name, dims, t, offset));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let mut out = Vec::with_capacity(infos.len());
    for (name, dims, t, offset) in infos {
        let dtype = match t {
            GGML_F32 => StoredDType::Known(DType::F32),
            GGML_F16 => StoredDType::Known(DType::F16),
            GGML_BF16 => StoredDType::Known(DType::BF16),
            GGML_F64 => StoredDType::Known(DType::F64),
            GGML_I64 => StoredDType::Known(DType::I64),
            GGML_I32 => StoredDType::Known(DType::I32),
            GGML_I8 => StoredDType::Unsupported("ggml type I8".into()),
            other => match QuantType::from_ggml_type(other, &name) {
                Ok(q) => StoredDType::Quant(q),
                Err(_) => StoredDType::Unsupported(format!("ggml type {other}")),
            },
        };
        let size = match &dtype {
            StoredDType::Known(d) => Some(byte_len(path, &name, &dims, d.size_in_bytes())?),
            StoredDType::Quant(q) => Some(quantized_size(&name, *q, &dims)?),
            StoredDType::Unsupported(_) => None,
        };
        let start = data_start
            .checked_add(offset)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|&s| size.is_none_or(|n| s.checked_add(n).is_some_and(|e| e <= map.len())))
            .ok_or_else(|| {
                format_err(
                    path,
                    format!("tensor `{name}`: data lies past the end of the file (truncated?)"),
                )
            })?;
        out.push((
            name,
            Entry {
                file,
                dtype,
                dims,
                layout: Layout::Contiguous { start },
                // GGUF has no checksums to verify.
                crc: None,
            },
        ));
    }
    Ok(out)
}

/// One tensor to be written by [`GgufWriter`].
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// PyTorch order (outermost first).
    pub dims: Vec<usize>,
    pub ty: GgufType,
}

/// Writes a GGUF file tensor by tensor: the whole header (every tensor's
/// name, shape, type and offset) first, then each tensor's bytes in order,
/// so only one tensor is held at a time. The file is written as
/// `<path>.partial` and renamed when [`GgufWriter::finish`] succeeds; if
/// anything fails (or the writer is dropped early) the partial file is
/// removed, so a failed conversion never leaves a file that looks valid.
pub struct GgufWriter {
    out: Option<BufWriter<std::fs::File>>,
    partial: PathBuf,
    path: PathBuf,
    tensors: Vec<(GgufTensor, usize)>,
    next: usize,
    written: u64,
    finished: bool,
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend((s.len() as u64).to_le_bytes());
    w.extend(s.as_bytes());
}

impl GgufWriter {
    /// Creates the file and writes the header. `metadata` is written as
    /// string key/values (plus `general.alignment`).
    pub fn create(
        path: impl Into<PathBuf>,
        metadata: &BTreeMap<String, String>,
        tensors: Vec<GgufTensor>,
    ) -> Result<Self> {
        let path = path.into();
        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let mut h = Vec::new();
        h.extend(MAGIC);
        h.extend(VERSION.to_le_bytes());
        h.extend((tensors.len() as u64).to_le_bytes());
        h.extend((metadata.len() as u64 + 1).to_le_bytes());
        put_str(&mut h, "general.alignment");
        h.extend(4u32.to_le_bytes());
        h.extend((DEFAULT_ALIGNMENT as u32).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut h, k);
            h.extend(8u32.to_le_bytes());
            put_str(&mut h, v);
        }
        let mut sized = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            let n = t.ty.size(&t.name, &t.dims)?;
            put_str(&mut h, &t.name);
            h.extend((t.dims.len() as u32).to_le_bytes());
            for d in t.dims.iter().rev() {
                h.extend((*d as u64).to_le_bytes());
            }
            h.extend(t.ty.id()?.to_le_bytes());
            h.extend(offset.to_le_bytes());
            offset = (offset + n as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
            sized.push((t, n));
        }
        h.resize(
            (h.len() as u64).div_ceil(DEFAULT_ALIGNMENT) as usize * DEFAULT_ALIGNMENT as usize,
            0,
        );
        let file = std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
        let mut w = Self {
            out: Some(BufWriter::new(file)),
            partial,
            path,
            tensors: sized,
            next: 0,
            written: 0,
            finished: false,
        };
        w.write_raw(&h)?;
        w.written = 0;
        Ok(w)
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| Error::InvalidArgument("GGUF writer already closed".into()))?;
        out.write_all(b).map_err(|e| Error::io(&self.partial, e))?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// The next tensor to write (in the order given to [`GgufWriter::create`]).
    pub fn next_tensor(&self) -> Option<&GgufTensor> {
        self.tensors.get(self.next).map(|(t, _)| t)
    }

    /// Writes the bytes of the next tensor, which must be `name` with exactly
    /// the size its shape and type imply.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some((t, n)) = self.tensors.get(self.next) else {
            return Err(Error::InvalidArgument(format!(
                "GGUF writer: `{name}` is one tensor too many"
            )));
        };
        if t.name != name || *n != bytes.len() {
            return Err(Error::InvalidArgument(format!(
                "GGUF writer: expected `{}` ({n} bytes), got `{name}` ({} bytes)",
                t.name,
                bytes.len()
            )));
        }
        self.write_raw(bytes)?;
        let pad = self.written.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - self.written;
        if pad > 0 && self.next + 1 < self.tensors.len() {
            self.write_raw(&vec![0u8; pad as usize])?;
        }
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; an error if tensors are missing.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.next != self.tensors.len() {
            return Err(Error::InvalidArgument(format!(
                "GGUF writer: only {} of {} tensors written",
                self.next,
                self.tensors.len()
            )));
        }
        let out = self
            .out
            .take()
            .ok_or_else(|| Error::InvalidArgument("GGUF writer already closed".into()))?;
        let file = out.into_inner().map_err(|e| Error::io(&self.partial, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.partial, e))?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.finished = true;
        Ok(self.path.clone())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.out.take();
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Picks the format of a tensor from its key and shape (`None`: keep floats).
pub type QuantSelect<'a> = &'a dyn Fn(&str, &[usize]) -> Result<Option<QuantType>>;

/// Writes every tensor of `ckpt` into the GGUF file `out`, one tensor at a
/// time: those for which `select(key, dims)` names a format are quantized
/// from f32, other float tensors are stored in `float_dtype`, integer ones
/// as they are. `metadata` goes into the header as strings.
pub fn write_checkpoint_gguf(
    ckpt: &super::Checkpoint,
    out: &Path,
    float_dtype: DType,
    select: QuantSelect<'_>,
    metadata: &BTreeMap<String, String>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<PathBuf> {
    let mut plan = Vec::with_capacity(ckpt.len());
    for key in ckpt.keys() {
        let info = ckpt.info(key)?;
        let ty = match select(key, &info.dims)? {
            Some(q) if info.dtype.is_float() => GgufType::Quant(q),
            _ if info.dtype.is_float() => GgufType::Float(float_dtype),
            _ => GgufType::Float(info.dtype),
        };
        plan.push(GgufTensor {
            name: key.to_string(),
            dims: info.dims,
            ty,
        });
    }
    let total = plan.len();
    let mut w = GgufWriter::create(out, metadata, plan.clone())?;
    for (i, t) in plan.iter().enumerate() {
        progress(&t.name, i, total);
        let bytes = match t.ty {
            GgufType::Quant(q) => crate::QuantTensor::quantize(t.name.clone(), &ckpt.get_as(&t.name, DType::F32)?, q)?
                .bytes()
                .to_vec(),
            GgufType::Float(d) => ckpt.get_as(&t.name, d)?.as_bytes().to_vec(),
        };
        w.write_tensor(&t.name, &bytes)?;
    }
    w.finish()
}
