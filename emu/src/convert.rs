//! `emu convert`: streaming re-encoding of a checkpoint into sharded
//! safetensors in one floating-point dtype.
//!
//! The shard plan is made from headers alone (shapes and dtypes are known
//! before any data is read), so each shard's header is written first and its
//! tensors are then read, converted and appended one at a time: at most one
//! converted tensor is in memory, whatever the checkpoint's size.

use crate::error::{CliError, Result};
use crate::layout::{self, is_weight_file};
use emu_core::{Checkpoint, DType};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to convert to.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Target of every floating-point tensor; other tensors keep their dtype.
    pub dtype: DType,
    /// Largest shard in bytes of tensor data (a bigger tensor gets a shard of its own).
    pub shard_size: u64,
    /// Write into a non-empty destination, removing its weight files first.
    pub force: bool,
    /// Which weight variant of the source to read, when it has several.
    pub variant: Option<String>,
    /// Block-quantize linears: the weights are then written as one GGUF
    /// file (see ARCHITECTURE.md) instead of safetensors.
    pub quantize: Option<emu_llm::LlmQuant>,
    /// Whose linears `quantize` applies to: the LLaMA's (by default), the
    /// EVA blocks', the UNet transformer blocks'.
    pub quantize_components: crate::pipeline::QuantComponents,
}

/// What one converted checkpoint produced.
#[derive(Debug, Clone)]
pub struct ConvertedWeights {
    pub dst: PathBuf,
    pub shards: Vec<String>,
    pub index: Option<String>,
    pub tensors: usize,
    /// Float tensors whose dtype changed.
    pub converted: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Everything `convert` did.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    pub weights: Vec<ConvertedWeights>,
    /// Non-weight files copied, relative to the destination.
    pub copied: Vec<PathBuf>,
    /// Weight files of the source that were not part of the converted
    /// checkpoint (other variants, other frameworks), relative to the source.
    pub skipped: Vec<PathBuf>,
    pub seconds: f64,
}

/// safetensors' name for a dtype.
fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::U32 => "U32",
        DType::U8 => "U8",
        DType::Bool => "BOOL",
    }
}

struct Planned {
    key: String,
    dims: Vec<usize>,
    src: DType,
    dst: DType,
    bytes: u64,
}

/// Splits `tensors` (in key order) into shards of at most `max` bytes, the
/// way `transformers`' `save_pretrained` does: a shard is closed when the
/// next tensor would overflow it; a tensor larger than `max` is alone.
fn plan_shards(tensors: Vec<Planned>, max: u64) -> Vec<Vec<Planned>> {
    let mut shards: Vec<Vec<Planned>> = Vec::new();
    let mut current: Vec<Planned> = Vec::new();
    let mut size = 0u64;
    for t in tensors {
        if !current.is_empty() && size + t.bytes > max {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        size += t.bytes;
        current.push(t);
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// The safetensors header for `shard` (already in write order), padded with
/// spaces to a multiple of 8 bytes as the reference writer does, so that
/// tensor data stays aligned.
fn header(shard: &[Planned]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for t in shard {
        map.insert(
            t.key.clone(),
            serde_json::json!({
                "dtype": st_dtype(t.dst),
                "shape": t.dims,
                "data_offsets": [offset, offset + t.bytes],
            }),
        );
        offset += t.bytes;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(map)).expect("a JSON map always serializes");
    let pad = (8 - h.len() % 8) % 8;
    h.resize(h.len() + pad, b' ');
    h
}

fn stem_of(ckpt: &Checkpoint) -> &'static str {
    let diffusers = ckpt.files().any(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("diffusion_pytorch_model"))
    });
    if diffusers {
        "diffusion_pytorch_model"
    } else {
        "model"
    }
}

/// Writes `ckpt` as safetensors shards into the existing directory `dst`.
pub fn write_checkpoint(
    ckpt: &Checkpoint,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ConvertedWeights> {
    if let Some(q) = &opts.quantize {
        return write_quantized(ckpt, dst, opts.dtype, q, opts.quantize_components, progress);
    }
    let mut planned = Vec::with_capacity(ckpt.len());
    let mut bytes_read = 0u64;
    for key in ckpt.keys() {
        // An unsupported dtype fails here, before anything is written.
        let info = ckpt.info(key)?;
        let n: u64 = info.dims.iter().map(|&d| d as u64).product();
        let dst_dtype = if info.dtype.is_float() { opts.dtype } else { info.dtype };
        bytes_read += n * info.dtype.size_in_bytes() as u64;
        planned.push(Planned {
            key: key.to_string(),
            dims: info.dims,
            src: info.dtype,
            dst: dst_dtype,
            bytes: n * dst_dtype.size_in_bytes() as u64,
        });
    }
    let total_size: u64 = planned.iter().map(|t| t.bytes).sum();
    let mut shards = plan_shards(planned, opts.shard_size);
    let stem = stem_of(ckpt);
    let n_shards = shards.len();
    let names: Vec<String> = if n_shards == 1 {
        vec![format!("{stem}.safetensors")]
    } else {
        (1..=n_shards)
            .map(|i| format!("{stem}-{i:05}-of-{n_shards:05}.safetensors"))
            .collect()
    };
    let mut weight_map = BTreeMap::new();
    let mut converted = 0;
    let mut tensors = 0;
    for (i, (shard, name)) in shards.iter_mut().zip(&names).enumerate() {
        // Wider dtypes first keeps every tensor aligned to its element size.
        shard.sort_by(|a, b| {
            b.dst
                .size_in_bytes()
                .cmp(&a.dst.size_in_bytes())
                .then_with(|| a.key.cmp(&b.key))
        });
        let path = dst.join(name);
        let partial = dst.join(format!(".{name}.partial"));
        let started = Instant::now();
        let result = write_shard(ckpt, shard, &partial);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &path).map_err(|e| CliError::io(&path, e))?;
        let bytes: u64 = shard.iter().map(|t| t.bytes).sum();
        for t in shard.iter() {
            weight_map.insert(t.key.clone(), name.clone());
            converted += usize::from(t.src != t.dst);
            tensors += 1;
        }
        progress(&format!(
            "[{}/{n_shards}] {} ({} tensors, {}) in {:.1}s",
            i + 1,
            path.display(),
            shard.len(),
            crate::units::human_bytes(bytes),
            started.elapsed().as_secs_f64()
        ));
    }
    let index = if n_shards > 1 {
        let name = format!("{stem}.safetensors.index.json");
        let json = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let path = dst.join(&name);
        let text = serde_json::to_string_pretty(&json).expect("a JSON value always serializes");
        std::fs::write(&path, text + "\n").map_err(|e| CliError::io(&path, e))?;
        Some(name)
    } else {
        None
    };
    Ok(ConvertedWeights {
        dst: dst.to_path_buf(),
        shards: names,
        index,
        tensors,
        converted,
        bytes_read,
        bytes_written: total_size,
    })
}

/// Writes `ckpt` as `<stem>.gguf` with the linears `q` selects on the
/// components `on` names quantized (the streaming and the partial-file
/// handling are emu-core's). The LLaMA's linears follow `q` strictly (a row
/// without whole blocks is an error naming it); the EVA and UNet blocks'
/// keep such rows dense, as their loaders do.
fn write_quantized(
    ckpt: &Checkpoint,
    dst: &Path,
    dtype: DType,
    q: &emu_llm::LlmQuant,
    on: crate::pipeline::QuantComponents,
    progress: &mut dyn FnMut(&str),
) -> Result<ConvertedWeights> {
    let name = format!("{}.gguf", stem_of(ckpt));
    let meta = BTreeMap::from([
        ("general.name".to_string(), stem_of(ckpt).to_string()),
        ("emu.quantization".to_string(), q.qtype.to_string()),
    ]);
    let blocks = q.blocks();
    let block_linear = |key: &str, dims: &[usize]| {
        let group = emu_vision::linear_group(key)
            .filter(|_| on.vision)
            .or_else(|| emu_decoder::unet_linear_group(key).filter(|_| on.unet))?;
        match dims {
            [_, inner] => blocks.format(group, *inner),
            _ => None,
        }
    };
    let select = |key: &str, dims: &[usize]| {
        if let Some(f) = block_linear(key, dims) {
            return Ok(Some(f));
        }
        if !on.llm {
            return Ok(None);
        }
        q.convert_format(key, dims).map_err(|e| match e {
            emu_llm::Error::Core(c) => c,
            other => emu_core::Error::InvalidArgument(other.to_string()),
        })
    };
    let mut quantized = 0;
    for key in ckpt.keys() {
        quantized += usize::from(select(key, &ckpt.info(key)?.dims)?.is_some());
    }
    let path = emu_core::checkpoint::gguf_file::write_checkpoint_gguf(
        ckpt,
        &dst.join(&name),
        dtype,
        &select,
        &meta,
        |key, i, n| {
            if i % 64 == 0 {
                progress(&format!("[{i}/{n}] {key}"));
            }
        },
    )?;
    let read: u64 = ckpt
        .keys()
        .filter_map(|k| ckpt.info(k).ok())
        .map(|i| i.dims.iter().product::<usize>() as u64 * i.dtype.size_in_bytes() as u64)
        .sum();
    let written = std::fs::metadata(&path).map_err(|e| CliError::io(&path, e))?.len();
    Ok(ConvertedWeights {
        dst: dst.to_path_buf(),
        shards: vec![name],
        index: None,
        tensors: ckpt.len(),
        converted: quantized,
        bytes_read: read,
        bytes_written: written,
    })
}

fn write_shard(ckpt: &Checkpoint, shard: &[Planned], path: &Path) -> Result<()> {
    let file = File::create(path).map_err(|e| CliError::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| CliError::io(path, e);
    let h = header(shard);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for t in shard {
        let host = if t.src == t.dst {
            ckpt.get(&t.key)?
        } else {
            ckpt.get_as(&t.key, t.dst)?
        };
        let bytes = host.as_bytes();
        if bytes.len() as u64 != t.bytes {
            // The header already promised this many bytes.
            return Err(CliError::Core(emu_core::Error::CheckpointFormat {
                path: ckpt.file_of(&t.key)?.to_path_buf(),
                message: format!("tensor `{}` read as {} bytes, expected {}", t.key, bytes.len(), t.bytes),
            }));
        }
        w.write_all(bytes).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| CliError::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// Prepares `dst`: creates it, or checks that it may be written into.
fn prepare_destination(src: &Path, dst: &Path, force: bool) -> Result<()> {
    if dst.exists() {
        if !dst.is_dir() {
            return Err(CliError::BadDestination {
                path: dst.to_path_buf(),
                reason: "is a file; give a directory to write the converted checkpoint into".into(),
            });
        }
        let src_c = src.canonicalize().map_err(|e| CliError::io(src, e))?;
        let dst_c = dst.canonicalize().map_err(|e| CliError::io(dst, e))?;
        if src_c == dst_c || (src_c.is_dir() && dst_c.starts_with(&src_c)) {
            return Err(CliError::BadDestination {
                path: dst.to_path_buf(),
                reason: "is the source or inside it; write to a separate directory".into(),
            });
        }
        if src_c.is_file() && src_c.parent() == Some(dst_c.as_path()) {
            return Err(CliError::BadDestination {
                path: dst.to_path_buf(),
                reason: "holds the source file; write to a separate directory".into(),
            });
        }
        let non_empty = std::fs::read_dir(dst)
            .map_err(|e| CliError::io(dst, e))?
            .next()
            .is_some();
        if non_empty && !force {
            return Err(CliError::DestinationNotEmpty {
                path: dst.to_path_buf(),
            });
        }
    } else {
        let src_c = src.canonicalize().map_err(|e| CliError::io(src, e))?;
        std::fs::create_dir_all(dst).map_err(|e| CliError::io(dst, e))?;
        let dst_c = dst.canonicalize().map_err(|e| CliError::io(dst, e))?;
        if src_c.is_dir() && dst_c.starts_with(&src_c) {
            let _ = std::fs::remove_dir(dst);
            return Err(CliError::BadDestination {
                path: dst.to_path_buf(),
                reason: "is inside the source; write to a separate directory".into(),
            });
        }
    }
    Ok(())
}

/// Removes weight files from `dir` (not recursively) so that stale shards or
/// indexes of an earlier conversion cannot shadow the new ones; `keep` (the
/// source's own files) are never removed.
fn remove_stale_weights(dir: &Path, keep: &[PathBuf]) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for name in layout::file_names(dir)? {
        let p = dir.join(&name);
        let is_source = p
            .canonicalize()
            .is_ok_and(|c| keep.iter().any(|k| k.canonicalize().is_ok_and(|k| k == c)));
        if is_weight_file(&name) && !is_source {
            std::fs::remove_file(&p).map_err(|e| CliError::io(&p, e))?;
        }
    }
    Ok(())
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    // Copying a FIFO or a device would block or never end.
    emu_core::fs::regular_file_len(src).map_err(|e| CliError::io(src, e))?;
    std::fs::copy(src, dst).map_err(|e| CliError::io(dst, e))?;
    Ok(())
}

/// Copies the non-weight files of `src_dir` into `dst_dir` (not recursively),
/// recording them relative to the top destination as `rel/name`.
fn copy_other_files(src_dir: &Path, dst_dir: &Path, rel: &Path, report: &mut ConvertReport) -> Result<()> {
    for name in layout::file_names(src_dir)? {
        if is_weight_file(&name) {
            continue;
        }
        copy_file(&src_dir.join(&name), &dst_dir.join(&name))?;
        report.copied.push(rel.join(&name));
    }
    Ok(())
}

/// Converts the checkpoint in `src_dir` (one model folder) into `dst_dir`.
fn convert_dir(
    src_dir: &Path,
    dst_dir: &Path,
    rel: &Path,
    opts: &ConvertOptions,
    report: &mut ConvertReport,
    progress: &mut dyn FnMut(&str),
) -> Result<bool> {
    let Some(opened) = layout::open_weights_dir(src_dir, opts.variant.as_deref())? else {
        return Ok(false);
    };
    std::fs::create_dir_all(dst_dir).map_err(|e| CliError::io(dst_dir, e))?;
    let sources: Vec<PathBuf> = opened.checkpoint.files().map(Path::to_path_buf).collect();
    if opts.force {
        remove_stale_weights(dst_dir, &sources)?;
    }
    let w = write_checkpoint(&opened.checkpoint, dst_dir, opts, progress)?;
    report.weights.push(w);
    // Weight files that are not part of what was converted.
    let mut used: Vec<PathBuf> = sources;
    used.extend(opened.index);
    for name in layout::file_names(src_dir)? {
        let p = src_dir.join(&name);
        if is_weight_file(&name) && !used.contains(&p) {
            report.skipped.push(rel.join(&name));
        }
    }
    copy_other_files(src_dir, dst_dir, rel, report)?;
    Ok(true)
}

fn copy_tree(src: &Path, dst: &Path, rel: &Path, report: &mut ConvertReport) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| CliError::io(dst, e))?;
    for name in layout::file_names(src)? {
        if is_weight_file(&name) {
            report.skipped.push(rel.join(&name));
            continue;
        }
        copy_file(&src.join(&name), &dst.join(&name))?;
        report.copied.push(rel.join(&name));
    }
    for sub in layout::subdir_names(src)? {
        copy_tree(&src.join(&sub), &dst.join(&sub), &rel.join(&sub), report)?;
    }
    Ok(())
}

/// Checks that every tensor can be read, so that an unsupported dtype is
/// reported before anything is written.
fn check_readable(ckpt: &Checkpoint) -> Result<()> {
    for key in ckpt.keys() {
        ckpt.info(key)
            .map_err(|e| CliError::Unconvertible { reason: e.to_string() })?;
    }
    Ok(())
}

/// Converts `src` (a model directory, a diffusers pipeline folder, an index or
/// a single weights file) into the directory `dst`.
///
/// Everything that can be checked from headers is checked before `dst` is
/// touched; if writing fails anyway, a `dst` that this call created is removed.
pub fn convert(src: &Path, dst: &Path, opts: &ConvertOptions, progress: &mut dyn FnMut(&str)) -> Result<ConvertReport> {
    layout::require_exists(src)?;
    let created = !dst.exists();
    let result = convert_inner(src, dst, opts, progress);
    if result.is_err() && created && dst.is_dir() {
        let _ = std::fs::remove_dir_all(dst);
    }
    result
}

fn convert_inner(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ConvertReport> {
    let started = Instant::now();
    let mut report = ConvertReport::default();
    if src.is_dir() {
        let pipeline = src.join("model_index.json").is_file();
        if pipeline {
            // Parse and open everything first so that a broken component
            // fails before anything is written.
            layout::read_json(&src.join("model_index.json"))?;
            for sub in layout::subdir_names(src)? {
                if let Some(o) = layout::open_weights_dir(&src.join(sub), opts.variant.as_deref())? {
                    check_readable(&o.checkpoint)?;
                }
            }
        } else {
            match layout::open_weights_dir(src, opts.variant.as_deref())? {
                Some(o) => check_readable(&o.checkpoint)?,
                None => {
                    return Err(CliError::NotACheckpoint {
                        path: src.to_path_buf(),
                        hint: "no weight files (*.safetensors, *.bin, *.pth, *.pt) and no model_index.json; \
                               give a model directory, a diffusers pipeline folder or a weights file"
                            .into(),
                    })
                }
            }
        }
        prepare_destination(src, dst, opts.force)?;
        if pipeline {
            copy_other_files(src, dst, Path::new(""), &mut report)?;
            for sub in layout::subdir_names(src)? {
                let (s, d, rel) = (src.join(&sub), dst.join(&sub), PathBuf::from(&sub));
                if !convert_dir(&s, &d, &rel, opts, &mut report, progress)? {
                    copy_tree(&s, &d, &rel, &mut report)?;
                }
            }
        } else {
            convert_dir(src, dst, Path::new(""), opts, &mut report, progress)?;
        }
    } else {
        let ckpt = Checkpoint::open(src)?;
        check_readable(&ckpt)?;
        prepare_destination(src, dst, opts.force)?;
        if opts.force {
            remove_stale_weights(dst, &ckpt.files().map(Path::to_path_buf).collect::<Vec<_>>())?;
        }
        report.weights.push(write_checkpoint(&ckpt, dst, opts, progress)?);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(key: &str, bytes: u64) -> Planned {
        Planned {
            key: key.into(),
            dims: vec![bytes as usize],
            src: DType::U8,
            dst: DType::U8,
            bytes,
        }
    }

    #[test]
    fn shards_split_like_save_pretrained() {
        let keys = |s: &Vec<Vec<Planned>>| -> Vec<Vec<String>> {
            s.iter().map(|v| v.iter().map(|t| t.key.clone()).collect()).collect()
        };
        let s = plan_shards(vec![t("a", 4), t("b", 4), t("c", 4)], 8);
        assert_eq!(keys(&s), vec![vec!["a", "b"], vec!["c"]]);
        // An oversized tensor is alone; it does not make an empty shard.
        let s = plan_shards(vec![t("a", 20), t("b", 4), t("c", 30)], 8);
        assert_eq!(keys(&s), vec![vec!["a"], vec!["b"], vec!["c"]]);
        let s = plan_shards(vec![], 8);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn header_is_padded_to_eight() {
        for n in 1..12 {
            let h = header(&[t(&"k".repeat(n), 3)]);
            assert_eq!(h.len() % 8, 0);
            let v: serde_json::Value = serde_json::from_slice(&h).unwrap();
            assert_eq!(v["__metadata__"]["format"], "pt");
        }
    }
}
