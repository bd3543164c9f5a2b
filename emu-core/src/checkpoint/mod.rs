//! Lazy, memory-mapped checkpoint loading.
//!
//! A [`Checkpoint`] is a set of tensors by name, backed by one or more
//! memory-mapped files:
//!
//! * safetensors files, single or sharded with a `*.safetensors.index.json`;
//! * PyTorch `torch.save` zip archives (`pytorch_model.bin`, sharded
//!   `pytorch_model-0000x-of-0000y.bin` with `pytorch_model.bin.index.json`),
//!   read by a small pickle interpreter that never executes anything;
//! * GGUF files (`*.gguf`, written by `emu convert --quantize`), whose
//!   `Q8_0` / `Q4_K` tensors read as [`QuantTensor`]s ([`Checkpoint::get_quant`])
//!   or, through every other accessor, dequantized to f32;
//! * diffusers/HF *variants* (`diffusion_pytorch_model.bf16.safetensors`,
//!   `model.bf16-00001-of-00008.safetensors` + `model.safetensors.index.bf16.json`).
//!
//! Opening parses headers only; tensor bytes are read from the mapping when a
//! tensor is asked for, and converted to the requested dtype one tensor at a
//! time, so loading a model never holds two full copies of it.
//!
//! [`Weights`] is a prefix-scoped view used by model constructors; it is the
//! one place where checkpoint key prefixes (`model.` in HF layouts, none in
//! native ones) are resolved.
//!
//! ```
//! use emu_core::checkpoint::{Checkpoint, Weights};
//! use emu_core::DType;
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/loader/safetensors_sharded");
//! let ckpt = Checkpoint::open(dir)?;
//! let w = Weights::resolve_prefix(&ckpt, &["model.", ""], "layers.0.weight")?;
//! let t = w.get_as("layers.0.weight", DType::F32)?;
//! assert_eq!(t.dims(), &[4, 3]);
//! # Ok::<(), emu_core::Error>(())
//! ```

mod discover;
pub mod gguf_file;
mod pickle;
mod safetensors_file;
mod torch_file;
mod weights;

pub use discover::{open_dir_files, CheckpointFiles};
pub use weights::Weights;

use crate::host::checked_numel;
use crate::quant::{quantized_size, QuantTensor, QuantType};
use crate::{DType, Error, HostTensor, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// What a [load observer](set_load_observer) is told, so that front ends can
/// show loading progress without the loaders knowing about terminals.
#[derive(Debug, Clone, Copy)]
pub enum LoadEvent<'a> {
    /// A checkpoint was opened (headers only): its tensor count and stored bytes.
    Opened {
        origin: &'a Path,
        tensors: usize,
        bytes: u64,
    },
    /// One tensor of it was read (`get`, `get_as` and everything built on them).
    Read { origin: &'a Path, key: &'a str, bytes: u64 },
}

/// A process-wide callback for [`LoadEvent`]s.
pub type LoadObserver = Arc<dyn Fn(&LoadEvent<'_>) + Send + Sync>;

// Process-wide because checkpoints are opened deep inside model loaders;
// threading a callback through every `load` would change every signature.
static OBSERVER: RwLock<Option<LoadObserver>> = RwLock::new(None);

/// Installs (or with `None` removes) the observer of checkpoint loading;
/// returns the previous one.
pub fn set_load_observer(observer: Option<LoadObserver>) -> Option<LoadObserver> {
    let mut slot = OBSERVER.write().unwrap_or_else(|e| e.into_inner());
    std::mem::replace(&mut *slot, observer)
}

fn notify(event: LoadEvent<'_>) {
    let observer = OBSERVER.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(o) = observer {
        o(&event);
    }
}

/// Shape and element type of a stored tensor (metadata only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dims: Vec<usize>,
    pub dtype: DType,
}

/// A set of named tensors backed by memory-mapped files.
///
/// Cheap to clone (the mappings are shared). See the [module docs](self).
#[derive(Clone)]
pub struct Checkpoint {
    inner: Arc<Inner>,
}

struct Inner {
    /// What was opened (a file, an index or a directory), for messages.
    origin: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, Entry>,
}

pub(crate) struct MappedFile {
    pub(crate) path: PathBuf,
    pub(crate) map: Mmap,
    /// Zip entries whose CRC-32 is checked the first time a tensor in them
    /// is read (checking at open would read every byte of the checkpoint).
    pub(crate) crc: Vec<CrcRegion>,
}

/// A byte range of a mapped file with the CRC-32 its zip directory records.
pub(crate) struct CrcRegion {
    pub(crate) name: String,
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) crc32: u32,
    checked: std::sync::OnceLock<bool>,
}

impl CrcRegion {
    pub(crate) fn new(name: String, start: usize, len: usize, crc32: u32) -> Self {
        Self {
            name,
            start,
            len,
            crc32,
            checked: std::sync::OnceLock::new(),
        }
    }

    /// Whether the bytes match the recorded CRC-32 (computed once).
    fn verify(&self, map: &[u8], path: &Path) -> Result<()> {
        let ok = *self.checked.get_or_init(|| {
            map.get(self.start..self.start + self.len)
                .is_some_and(|b| crc32fast::hash(b) == self.crc32)
        });
        if ok {
            Ok(())
        } else {
            Err(format_err(
                path,
                format!(
                    "zip entry `{}` is corrupt: its CRC-32 does not match the one the archive records",
                    self.name
                ),
            ))
        }
    }
}

/// Element type as stored; types emu-rs cannot represent are kept by name so
/// that listing keys works and only reading such a tensor fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoredDType {
    Known(DType),
    /// GGUF block-quantized; reads as f32 unless asked for the blocks.
    Quant(QuantType),
    Unsupported(String),
}

/// Where a tensor's bytes live inside its file. Every range is checked against
/// the file length when the checkpoint is opened.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// Row-major bytes starting at this file offset.
    Contiguous { start: usize },
    /// A strided view into a storage that starts at `base` (file offset);
    /// `offset` and `strides` are in elements, as in PyTorch.
    Strided {
        base: usize,
        offset: usize,
        strides: Vec<usize>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) file: usize,
    pub(crate) dtype: StoredDType,
    pub(crate) dims: Vec<usize>,
    pub(crate) layout: Layout,
    /// The file's [`CrcRegion`] holding the tensor's bytes, if any.
    pub(crate) crc: Option<usize>,
}

impl Entry {
    /// Bytes of the tensor as stored (0 for dtypes emu-rs cannot read).
    fn stored_bytes(&self) -> u64 {
        match &self.dtype {
            StoredDType::Known(d) => self
                .dims
                .iter()
                .fold(d.size_in_bytes() as u64, |acc, &n| acc.saturating_mul(n as u64)),
            StoredDType::Quant(q) => quantized_size("", *q, &self.dims).unwrap_or(0) as u64,
            StoredDType::Unsupported(_) => 0,
        }
    }
}

pub(crate) fn format_err(path: &Path, message: impl Into<String>) -> Error {
    Error::CheckpointFormat {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Maps a whole file read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    // Checked before opening: a FIFO would block the open forever.
    crate::fs::regular_file_len(path).map_err(|e| Error::io(path, e))?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(format_err(path, "is not a regular file"));
    }
    let len = meta.len();
    if len == 0 {
        return Err(format_err(path, "file is empty"));
    }
    // SAFETY: the mapping is read-only. As with every memory-mapped reader,
    // another process truncating the file while it is mapped is undefined
    // behaviour; checkpoints are not expected to change while loaded.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Why a file that is neither safetensors nor a zip/pickle is refused, with
/// a look at how it starts (a text file, an HTML error page, a random binary).
fn not_a_checkpoint(map: &[u8]) -> String {
    let head = &map[..map.len().min(16)];
    let text = head.iter().all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    let start = if text {
        format!("text `{}`", String::from_utf8_lossy(head).trim())
    } else {
        head.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
    };
    format!(
        "not a checkpoint: neither a safetensors file (a JSON header at byte 8) nor a \
         torch.save zip archive (starting with `PK`); the file starts with {start}"
    )
}

/// Bytes `elems * dtype size` with overflow reported as a format error.
pub(crate) fn byte_len(path: &Path, key: &str, dims: &[usize], elem: usize) -> Result<usize> {
    checked_numel(dims)
        .ok()
        .and_then(|n| n.checked_mul(elem))
        .ok_or_else(|| format_err(path, format!("tensor `{key}`: shape {dims:?} overflows")))
}

impl Checkpoint {
    /// Opens a checkpoint: a directory (see [`Checkpoint::open_dir`] for which
    /// files are picked), an index (`*.index.json`, `*.index.<variant>.json`),
    /// a safetensors file or a `torch.save` zip archive. Only headers are read.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = crate::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Self::open_dir(path, None);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".json") {
            return Self::open_index(path);
        }
        Self::open_files(path, &[path.to_path_buf()])
    }

    /// Opens the checkpoint stored in a directory (not recursively).
    ///
    /// Recognised files, in order of precedence:
    /// 1. a safetensors index `<stem>.safetensors.index.json` (variant:
    ///    `<stem>.safetensors.index.<variant>.json`);
    /// 2. a single `<stem>.safetensors` (variant: `<stem>.<variant>.safetensors`);
    /// 3. a pickle index `<stem>.bin.index.json` (`<stem>.bin.index.<variant>.json`);
    /// 4. a single `<stem>.bin` / `.pth` / `.pt` (`<stem>.<variant>.bin`, ...);
    /// 5. a single `<stem>.gguf` (a quantized checkpoint).
    ///
    /// Shard files (`*-00001-of-00002.*`) are only reached through an index.
    /// With `variant: Some(v)` only files of that variant are considered. With
    /// `None`, files without a variant are preferred; if there are none and
    /// the directory holds exactly one variant, that one is used. Several
    /// candidates of the same kind are disambiguated by the standard stems
    /// (`model`, `diffusion_pytorch_model`, `pytorch_model`), otherwise it is
    /// an error that lists them.
    ///
    /// ```
    /// use emu_core::checkpoint::Checkpoint;
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/loader/diffusers_variant");
    /// // Only a bf16 variant exists there, so it is picked without asking.
    /// let ckpt = Checkpoint::open_dir(dir, None)?;
    /// assert!(Checkpoint::open_dir(dir, Some("fp16")).is_err());
    /// assert_eq!(ckpt.keys().count(), Checkpoint::open_dir(dir, Some("bf16"))?.keys().count());
    /// # Ok::<(), emu_core::Error>(())
    /// ```
    pub fn open_dir(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<Checkpoint> {
        let dir = dir.as_ref();
        match open_dir_files(dir, variant)? {
            CheckpointFiles::Index(index) => Self::open_index(&index),
            CheckpointFiles::Single(file) => Self::open_files(&file, std::slice::from_ref(&file)),
        }
    }

    /// Opens a sharded set from its index (`{"weight_map": {key: shard}}`).
    fn open_index(index: &Path) -> Result<Checkpoint> {
        let text = crate::fs::read_limited(index, crate::fs::MAX_TEXT_FILE).map_err(|e| Error::io(index, e))?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index =
            serde_json::from_slice(&text).map_err(|e| format_err(index, format!("invalid index JSON: {e}")))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = parsed.weight_map.values().cloned().collect();
        shards.sort();
        shards.dedup();
        if shards.is_empty() {
            return Err(format_err(index, "index lists no tensors"));
        }
        let mut paths = Vec::with_capacity(shards.len());
        for shard in &shards {
            let rel = Path::new(shard);
            if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(format_err(
                    index,
                    format!("shard name `{shard}` points outside the directory"),
                ));
            }
            let p = dir.join(rel);
            if let Err(why) = crate::fs::regular_file_len(&p) {
                let example = parsed
                    .weight_map
                    .iter()
                    .find(|(_, f)| *f == shard)
                    .map(|(k, _)| k.as_str());
                return Err(format_err(
                    index,
                    format!(
                        "shard `{}` (listed for tensor `{}`) {why}",
                        p.display(),
                        example.unwrap_or("?")
                    ),
                ));
            }
            paths.push(p);
        }
        let ckpt = Self::open_files(index, &paths)?;
        for (key, shard) in &parsed.weight_map {
            match ckpt.inner.tensors.get(key) {
                Some(e) if ckpt.inner.files[e.file].path == dir.join(shard) => {}
                Some(e) => {
                    return Err(format_err(
                        index,
                        format!(
                            "index puts `{key}` in `{shard}` but it is in `{}`",
                            ckpt.inner.files[e.file].path.display()
                        ),
                    ))
                }
                None => {
                    return Err(format_err(
                        index,
                        format!("index lists `{key}` in `{shard}`, which has no such tensor"),
                    ))
                }
            }
        }
        Ok(ckpt)
    }

    /// Maps every file and collects its tensor table.
    fn open_files(origin: &Path, paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for path in paths {
            let map = map_file(path)?;
            let idx = files.len();
            let mut crc = Vec::new();
            let entries = if map.starts_with(gguf_file::MAGIC) {
                gguf_file::read_entries(path, &map, idx)?
            } else if map.starts_with(b"PK\x03\x04") {
                torch_file::read_entries(path, &map, idx, &mut crc)?
            } else if map.first() == Some(&0x80) && map.get(8) != Some(&b'{') {
                // A pickle starts with PROTO (0x80), but so does a safetensors
                // file whose header length has 0x80 as its low byte; its JSON
                // header opens at byte 8.
                return Err(format_err(
                    path,
                    "this is a legacy (pre-1.6, non-zip) PyTorch file, which is not supported; \
                     re-save it in the zip format with `torch.save(torch.load(p), p2)` under torch >= 1.6, \
                     or convert it with `safetensors.torch.save_file(torch.load(p), \"model.safetensors\")`",
                ));
            } else if map.len() > 8 && map[8] != b'{' {
                return Err(format_err(path, not_a_checkpoint(&map)));
            } else {
                safetensors_file::read_entries(path, &map, idx)?
            };
            for (key, entry) in entries {
                if tensors.contains_key(&key) {
                    return Err(format_err(path, format!("tensor `{key}` is stored more than once")));
                }
                tensors.insert(key, entry);
            }
            files.push(MappedFile {
                path: path.clone(),
                map,
                crc,
            });
        }
        let ckpt = Checkpoint {
            inner: Arc::new(Inner {
                origin: origin.to_path_buf(),
                files,
                tensors,
            }),
        };
        notify(LoadEvent::Opened {
            origin,
            tensors: ckpt.inner.tensors.len(),
            bytes: ckpt
                .inner
                .tensors
                .values()
                .map(Entry::stored_bytes)
                .fold(0u64, u64::saturating_add),
        });
        Ok(ckpt)
    }

    /// The file, index or directory this checkpoint was opened from.
    pub fn origin(&self) -> &Path {
        &self.inner.origin
    }

    /// The files that hold the tensors.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.inner.files.iter().map(|f| f.path.as_path())
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.inner.tensors.keys().map(String::as_str)
    }

    /// Tensor names that start with `prefix`, sorted (prefix included).
    pub fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.inner
            .tensors
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(prefix))
    }

    pub fn len(&self) -> usize {
        self.inner.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.tensors.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.inner.tensors.contains_key(key)
    }

    /// A short description for error messages.
    pub(crate) fn location(&self) -> String {
        let n = self.inner.files.len();
        if n == 1 && self.inner.files[0].path == self.inner.origin {
            format!("checkpoint {}", self.inner.origin.display())
        } else {
            format!(
                "checkpoint {} ({n} file{})",
                self.inner.origin.display(),
                if n == 1 { "" } else { "s" }
            )
        }
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.inner.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_string(),
            location: self.location(),
        })
    }

    /// The file that holds `key`.
    pub fn file_of(&self, key: &str) -> Result<&Path> {
        Ok(&self.inner.files[self.entry(key)?.file].path)
    }

    /// Shape and dtype of a tensor, without reading it.
    pub fn info(&self, key: &str) -> Result<TensorInfo> {
        let e = self.entry(key)?;
        Ok(TensorInfo {
            dims: e.dims.clone(),
            dtype: self.known_dtype(key, e)?,
        })
    }

    fn known_dtype(&self, key: &str, e: &Entry) -> Result<DType> {
        match &e.dtype {
            StoredDType::Known(d) => Ok(*d),
            // Quantized tensors read as their f32 dequantization.
            StoredDType::Quant(_) => Ok(DType::F32),
            StoredDType::Unsupported(name) => Err(format_err(
                &self.inner.files[e.file].path,
                format!("tensor `{key}` has dtype {name}, which emu-rs cannot load"),
            )),
        }
    }

    /// The tensor's bytes in row-major order, borrowed from the mapping when
    /// it is stored contiguously.
    fn raw(&self, key: &str) -> Result<(TensorInfo, Cow<'_, [u8]>)> {
        let e = self.entry(key)?;
        if let StoredDType::Quant(_) = e.dtype {
            let q = self.read_quant(key, e)?;
            let bytes = q.dequantize()?.as_bytes().to_vec();
            return Ok((
                TensorInfo {
                    dims: e.dims.clone(),
                    dtype: DType::F32,
                },
                Cow::Owned(bytes),
            ));
        }
        let dtype = self.known_dtype(key, e)?;
        let file = &self.inner.files[e.file];
        let es = dtype.size_in_bytes();
        let nbytes = byte_len(&file.path, key, &e.dims, es)?;
        let out_of_file = || {
            format_err(
                &file.path,
                format!("tensor `{key}`: data lies past the end of the file"),
            )
        };
        if let Some(region) = e.crc.and_then(|i| file.crc.get(i)) {
            region.verify(&file.map, &file.path)?;
        }
        let bytes = match &e.layout {
            Layout::Contiguous { start } => {
                let end = start.checked_add(nbytes).ok_or_else(out_of_file)?;
                Cow::Borrowed(file.map.get(*start..end).ok_or_else(out_of_file)?)
            }
            Layout::Strided { base, offset, strides } => {
                Cow::Owned(gather(&file.map, *base, *offset, &e.dims, strides, es).ok_or_else(out_of_file)?)
            }
        };
        notify(LoadEvent::Read {
            origin: &self.inner.origin,
            key,
            bytes: e.stored_bytes(),
        });
        Ok((
            TensorInfo {
                dims: e.dims.clone(),
                dtype,
            },
            bytes,
        ))
    }

    /// The block format of a tensor stored quantized (GGUF), `None` for a plain one.
    pub fn quant_type(&self, key: &str) -> Result<Option<QuantType>> {
        Ok(match self.entry(key)?.dtype {
            StoredDType::Quant(q) => Some(q),
            _ => None,
        })
    }

    /// The blocks of a quantized tensor, or `None` where `key` is stored
    /// as plain floats.
    pub fn get_quant(&self, key: &str) -> Result<Option<QuantTensor>> {
        let e = self.entry(key)?;
        match e.dtype {
            StoredDType::Quant(_) => self.read_quant(key, e).map(Some),
            _ => Ok(None),
        }
    }

    fn read_quant(&self, key: &str, e: &Entry) -> Result<QuantTensor> {
        let StoredDType::Quant(q) = e.dtype else {
            return Err(Error::DType(format!("tensor `{key}` is not quantized")));
        };
        let file = &self.inner.files[e.file];
        let n = quantized_size(key, q, &e.dims)?;
        let Layout::Contiguous { start } = e.layout else {
            return Err(format_err(
                &file.path,
                format!("tensor `{key}`: strided quantized data"),
            ));
        };
        let bytes = start
            .checked_add(n)
            .and_then(|end| file.map.get(start..end))
            .ok_or_else(|| {
                format_err(
                    &file.path,
                    format!("tensor `{key}`: block data lies past the end of the file"),
                )
            })?;
        notify(LoadEvent::Read {
            origin: &self.inner.origin,
            key,
            bytes: n as u64,
        });
        let mut data = crate::memory::huge_vec(bytes.len());
        data.extend_from_slice(bytes);
        crate::memory::settle_on_huge_pages(&data);
        QuantTensor::from_bytes(key, q, &e.dims, data)
    }

    /// Reads a tensor in its stored dtype (always contiguous).
    pub fn get(&self, key: &str) -> Result<HostTensor> {
        let (info, bytes) = self.raw(key)?;
        HostTensor::from_bytes(&info.dims, info.dtype, bytes.into_owned())
    }

    /// Reads a tensor converted to `dtype`. Float conversions round to nearest
    /// even like PyTorch's `.to()`; float to integer is refused.
    pub fn get_as(&self, key: &str, dtype: DType) -> Result<HostTensor> {
        let (info, bytes) = self.raw(key)?;
        convert(&info.dims, info.dtype, bytes, dtype).map_err(|e| match e {
            Error::DType(m) => Error::DType(format!("tensor `{key}` in {}: {m}", self.location())),
            other => other,
        })
    }

    /// A view of every tensor with no prefix.
    pub fn weights(&self) -> Weights {
        Weights::new(self)
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({}, {} tensors)", self.location(), self.len())
    }
}

/// Copies a strided view into row-major order; `None` if any element falls
/// outside `map` (never the case for entries validated at open time).
fn gather(map: &[u8], base: usize, offset: usize, dims: &[usize], strides: &[usize], es: usize) -> Option<Vec<u8>> {
    let n = checked_numel(dims).ok()?;
    let mut out = Vec::with_capacity(n.checked_mul(es)?);
    if n == 0 {
        return Some(out);
    }
    let rank = dims.len();
    // The innermost dimension with stride 1 is copied as one run.
    let (outer_rank, run) = match (dims.last(), strides.last()) {
        (Some(&d), Some(&1)) => (rank - 1, d),
        _ => (rank, 1),
    };
    let mut idx = vec![0usize; outer_rank];
    loop {
        let mut elem = offset;
        for (i, s) in idx.iter().zip(strides) {
            elem = elem.checked_add(i.checked_mul(*s)?)?;
        }
        let start = base.checked_add(elem.checked_mul(es)?)?;
        out.extend_from_slice(map.get(start..start.checked_add(run * es)?)?);
        // Advance the odometer over the outer dimensions.
        let mut d = outer_rank;
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Converts row-major bytes of `src` dtype into a host tensor of `dst`,
/// straight from the (possibly memory-mapped) bytes for float pairs so that
/// no intermediate full-size buffer is made.
fn convert(dims: &[usize], src: DType, bytes: Cow<'_, [u8]>, dst: DType) -> Result<HostTensor> {
    if src == dst {
        return HostTensor::from_bytes(dims, dst, bytes.into_owned());
    }
    let b: &[u8] = &bytes;
    let f32_of = |x: [u8; 4]| f32::from_le_bytes(x);
    let f16_of = |x: [u8; 2]| f16::from_le_bytes(x).to_f32();
    let bf16_of = |x: [u8; 2]| bf16::from_le_bytes(x).to_f32();
    let to_f32 = |x: f32| x.to_le_bytes();
    let to_f16 = |x: f32| f16::from_f32(x).to_le_bytes();
    let to_bf16 = |x: f32| bf16::from_f32(x).to_le_bytes();
    let out = match (src, dst) {
        (DType::F32, DType::BF16) => map_elems(b, f32_of, to_bf16),
        (DType::F32, DType::F16) => map_elems(b, f32_of, to_f16),
        (DType::BF16, DType::F32) => map_elems(b, bf16_of, to_f32),
        (DType::F16, DType::F32) => map_elems(b, f16_of, to_f32),
        (DType::BF16, DType::F16) => map_elems(b, bf16_of, to_f16),
        (DType::F16, DType::BF16) => map_elems(b, f16_of, to_bf16),
        _ => return HostTensor::from_bytes(dims, src, bytes.into_owned())?.to_dtype(dst),
    };
    HostTensor::from_bytes(dims, dst, out)
}

/// Element-wise re-encoding of little-endian values, monomorphised per pair
/// of dtypes so that the loop vectorises.
fn map_elems<const I: usize, const O: usize>(
    src: &[u8],
    decode: impl Fn([u8; I]) -> f32,
    encode: impl Fn(f32) -> [u8; O],
) -> Vec<u8> {
    let n = src.len() / I;
    let mut out = vec![0u8; n * O];
    for (i, o) in src.chunks_exact(I).zip(out.chunks_exact_mut(O)) {
        let mut a = [0u8; I];
        a.copy_from_slice(i);
        o.copy_from_slice(&encode(decode(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_transposed_and_offset_views() {
        // Storage 0..12 as u8, viewed as the transpose of a 3x4 matrix.
        let map: Vec<u8> = (0..12).collect();
        let t = gather(&map, 0, 0, &[4, 3], &[1, 4], 1).unwrap();
        assert_eq!(t, vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        // Rows 1.. of the 3x4 matrix: contiguous runs with an offset.
        assert_eq!(
            gather(&map, 0, 4, &[2, 4], &[4, 1], 1).unwrap(),
            (4..12).collect::<Vec<u8>>()
        );
        // Column 2 with an element size of 2 bytes.
        assert_eq!(gather(&map, 0, 1, &[3], &[2], 2).unwrap(), vec![2, 3, 6, 7, 10, 11]);
        // Out of range is reported, not a panic.
        assert!(gather(&map, 0, 10, &[3], &[1], 1).is_none());
        assert_eq!(gather(&map, 0, 0, &[0, 3], &[3, 1], 4).unwrap(), Vec::<u8>::new());
        // Scalars.
        assert_eq!(gather(&map, 0, 5, &[], &[], 1).unwrap(), vec![5]);
    }

    #[test]
    fn float_conversion_matches_host_tensor() {
        let v = vec![1.0f32, -2.5, 1.0 + 1.0 / 256.0 + 1e-6, 65504.0, 1e-8];
        let h = HostTensor::from_f32(&[5], v).unwrap();
        for dst in [DType::BF16, DType::F16, DType::F64] {
            let a = convert(&[5], DType::F32, Cow::Borrowed(h.as_bytes()), dst).unwrap();
            assert_eq!(a, h.to_dtype(dst).unwrap(), "{dst}");
            let back = convert(&[5], dst, Cow::Borrowed(a.as_bytes()), DType::F32).unwrap();
            assert_eq!(back, a.to_dtype(DType::F32).unwrap(), "{dst}");
        }
        // Every pair of float dtypes, on values that round differently in each
        // (halfway cases, f16 overflow and subnormals, NaN, infinities).
        let v = vec![
            1.0f32 + 1.0 / 256.0,
            1.0 + 3.0 / 2048.0,
            70000.0,
            3e-6,
            -0.0,
            f32::INFINITY,
            f32::NAN,
            0.1,
        ];
        let h = HostTensor::from_f32(&[8], v).unwrap();
        let floats = [DType::F32, DType::F16, DType::BF16, DType::F64];
        for src in floats {
            let s = h.to_dtype(src).unwrap();
            for dst in floats {
                let got = convert(&[8], src, Cow::Borrowed(s.as_bytes()), dst).unwrap();
                assert_eq!(got.as_bytes(), s.to_dtype(dst).unwrap().as_bytes(), "{src} -> {dst}");
            }
        }
        let i = HostTensor::from_i64(&[2], vec![3, -4]).unwrap();
        assert!(convert(&[5], DType::F32, Cow::Borrowed(h.as_bytes()), DType::I64).is_err());
        let f = convert(&[2], DType::I64, Cow::Borrowed(i.as_bytes()), DType::F32).unwrap();
        assert_eq!(f.to_f32_vec().unwrap(), vec![3.0, -4.0]);
    }
}
