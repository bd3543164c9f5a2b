//! `emu inspect`: what a checkpoint holds, from headers only.
//!
//! Shapes and dtypes come from safetensors headers and from the `data.pkl`
//! of `torch.save` archives; no tensor data is read, so inspecting the 148 GB
//! BAAI/Emu2 takes as long as parsing fifteen pickles.

use crate::error::{CliError, Result};
use crate::layout::{self, is_weight_file, Layout};
use crate::pipeline::QuantComponents;
use crate::units::{grouped, human_bytes, human_count};
use emu_core::{Checkpoint, DType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The result of inspecting a path.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub layout: Layout,
    /// The model family when it can be told (`Emu2`, `Emu2-Chat`, `Emu2-Gen`).
    pub model: Option<String>,
    /// One entry per weight-bearing or config-only part (the root of a
    /// single-model layout is the component named `.`).
    pub components: Vec<Component>,
    /// Non-weight files at the top level (configs, tokenizer files, code).
    pub other_files: Vec<FileInfo>,
    pub totals: Totals,
    /// What running the model needs, per component and format, all
    /// resident or staged (`None`: not an Emu2 model the pipelines load).
    pub memory_plan: Option<MemoryPlan>,
}

/// Weight memory of each component of an Emu2 model as the pipelines load
/// it (from its config and tensor shapes, the preflight's own arithmetic,
/// [`crate::memory`]), in several formats.
#[derive(Debug, Serialize)]
pub struct MemoryPlan {
    /// The host memory available to a run ([`crate::memory::host_available`]).
    pub host_available: Option<u64>,
    pub formats: Vec<PlanFormat>,
    /// Formats that do not apply to this model, with why.
    pub unavailable: Vec<FileInfoNote>,
}

/// One format's numbers.
#[derive(Debug, Serialize)]
pub struct PlanFormat {
    /// `f32`, `bf16` (every component in it), `q8_0`, `q4_k` (the language
    /// model's attention and MLP linears quantized as `--quantize` does,
    /// everything else bf16).
    pub format: String,
    /// Resident weight bytes per component (`vision`, `llm`, `unet`, `vae`).
    pub components: Vec<PlanComponent>,
    /// The sum of the components (`--offload none`).
    pub all_resident: u64,
    /// The largest component (`--offload sequential`).
    pub staged: u64,
    /// What the load-time preflight compares with the available memory:
    /// the weights plus twice the largest tensor in f32 while it loads.
    pub load_peak_all_resident: u64,
    pub load_peak_staged: u64,
    /// Whether that fits the available host memory (`None`: unknown).
    pub fits_all_resident: Option<bool>,
    pub fits_staged: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct PlanComponent {
    pub name: String,
    pub bytes: u64,
}

/// A name and why it is left out.
#[derive(Debug, Serialize)]
pub struct FileInfoNote {
    pub name: String,
    pub reason: String,
}

/// The formats of [`MemoryPlan`]: `(name, float dtype, quantization, the
/// components it applies to)`.
fn plan_formats() -> Vec<(&'static str, DType, Option<emu_llm::LlmQuant>, QuantComponents)> {
    use emu_core::quant::QuantType;
    let (llm, all) = (QuantComponents::default(), QuantComponents::ALL);
    let q = |t| Some(emu_llm::LlmQuant::new(t));
    vec![
        ("f32", DType::F32, None, llm),
        ("bf16", DType::BF16, None, llm),
        ("q8_0", DType::BF16, q(QuantType::Q8_0), llm),
        ("q4_k", DType::BF16, q(QuantType::Q4K), llm),
        ("q8_0 all", DType::BF16, q(QuantType::Q8_0), all),
        ("q4_k all", DType::BF16, q(QuantType::Q4K), all),
    ]
}

/// The memory plan of the model at `path`, when it is an Emu2 model
/// (Emu2, Emu2-Chat, Emu2-Gen, a native single file).
pub fn memory_plan(path: &Path) -> Result<Option<MemoryPlan>> {
    use crate::memory::{load_peak, peak};
    use crate::pipeline::{ModelDir, ModelFamily, Residency};
    let Some(spec) = path.to_str() else {
        return Ok(None);
    };
    // A file or folder named `tiny` is that, not the built-in model.
    let spec = if spec == "tiny" { "./tiny" } else { spec };
    let Ok(dir) = ModelDir::resolve_any(spec, ModelFamily::Emu2Chat) else {
        return Ok(None);
    };
    let formats = plan_formats();
    let wanted: Vec<_> = formats.iter().map(|(_, d, q, on)| (*d, *q, *on)).collect();
    let host_available = crate::memory::host_available()?;
    let mut plan = MemoryPlan {
        host_available,
        formats: Vec::new(),
        unavailable: Vec::new(),
    };
    let stages = match crate::pipeline::model_stages(&dir, &wanted) {
        Ok(s) => s,
        // A model that resolves but cannot be read: every format says why.
        Err(e) => formats.iter().map(|_| Err(e.duplicate())).collect(),
    };
    for ((name, ..), stages) in formats.iter().zip(stages) {
        let stages = match stages {
            Ok(s) => s,
            Err(e) => {
                plan.unavailable.push(FileInfoNote {
                    name: name.to_string(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let bytes: Vec<u64> = stages.iter().map(|s| s.bytes()).collect();
        let (peak_all, peak_staged) = (
            load_peak(&stages, Residency::All),
            load_peak(&stages, Residency::Sequential),
        );
        plan.formats.push(PlanFormat {
            format: name.to_string(),
            components: stages
                .iter()
                .map(|s| PlanComponent {
                    name: s.name.to_string(),
                    bytes: s.bytes(),
                })
                .collect(),
            all_resident: peak(&bytes, Residency::All),
            staged: peak(&bytes, Residency::Sequential),
            load_peak_all_resident: peak_all,
            load_peak_staged: peak_staged,
            fits_all_resident: host_available.map(|h| peak_all <= h),
            fits_staged: host_available.map(|h| peak_staged <= h),
        });
    }
    Ok(Some(plan))
}

#[derive(Debug, Serialize)]
pub struct Component {
    /// Subfolder name, or `.` for the root.
    pub name: String,
    /// What the config says it is (`EmuForCausalLM`, `UNet2DConditionModel`,
    /// `diffusers.EulerDiscreteScheduler` from a model index, ...).
    pub class: Option<String>,
    pub path: PathBuf,
    /// Non-weight files of a component folder (empty for the root, whose
    /// files are in [`Inspection::other_files`]).
    pub other_files: Vec<FileInfo>,
    pub weights: Option<WeightsInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub name: String,
    pub bytes: u64,
}

/// The weights of one component.
#[derive(Debug, Serialize)]
pub struct WeightsInfo {
    /// `safetensors`, `pickle` or `mixed`.
    pub format: String,
    pub variant: Option<String>,
    /// The shard index, when sharded.
    pub index: Option<String>,
    pub files: Vec<FileInfo>,
    pub bytes_on_disk: u64,
    pub tensors: usize,
    /// Exact number of elements over all readable tensors.
    pub params: u64,
    pub dtypes: Vec<DTypeStat>,
    pub prefixes: Vec<PrefixStat>,
    /// Tensors whose dtype emu-rs cannot represent (not counted above).
    pub unsupported: Vec<UnsupportedTensor>,
    pub memory: Memory,
}

#[derive(Debug, Serialize)]
pub struct DTypeStat {
    pub dtype: String,
    pub tensors: usize,
    pub params: u64,
    /// Bytes of tensor data in this dtype.
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct PrefixStat {
    pub prefix: String,
    pub tensors: usize,
    pub params: u64,
}

#[derive(Debug, Serialize)]
pub struct UnsupportedTensor {
    pub key: String,
    pub reason: String,
}

/// Bytes needed to hold the weights with every floating-point tensor in one
/// dtype (integer and bool tensors at their stored size).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Memory {
    pub f32: u64,
    pub bf16: u64,
    pub f16: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub tensors: usize,
    pub params: u64,
    pub bytes_on_disk: u64,
    pub memory: Memory,
}

/// Segments that only nest the interesting modules (`model.decoder.lm` is the
/// LLM, `model.visual` the vision encoder): they do not count towards the
/// depth of a key prefix.
const CONTAINERS: [&str; 3] = ["model", "multimodal_encoder", "decoder"];

/// The module a key belongs to: the first segment that is not a container,
/// with the containers before it (`model.decoder.lm.model.layers.0.x` →
/// `model.decoder.lm`, `project_up.weight` → `project_up`, `unet.conv_in.bias`
/// → `unet`, `down_blocks.0.resnets.0.conv1.weight` → `down_blocks`).
pub fn key_prefix(key: &str) -> &str {
    let segs: Vec<&str> = key.split('.').collect();
    if segs.len() == 1 {
        return key;
    }
    // Never take the leaf (`weight`, `bias`) itself.
    let mut end = 0;
    for (i, s) in segs[..segs.len() - 1].iter().enumerate() {
        end = i + 1;
        if !CONTAINERS.contains(s) {
            break;
        }
    }
    let len: usize = segs[..end].iter().map(|s| s.len()).sum::<usize>() + end - 1;
    &key[..len]
}

fn file_info(path: &Path) -> Result<FileInfo> {
    let meta = std::fs::metadata(path).map_err(|e| CliError::io(path, e))?;
    Ok(FileInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: meta.len(),
    })
}

/// Summarises a checkpoint's tensors from their headers.
pub fn summarize(ckpt: &Checkpoint, index: Option<&Path>, variant: Option<String>) -> Result<WeightsInfo> {
    let files: Vec<FileInfo> = ckpt.files().map(file_info).collect::<Result<_>>()?;
    let is_pickle = |n: &str| !n.ends_with(".safetensors");
    let n_pickle = files.iter().filter(|f| is_pickle(&f.name)).count();
    let format = match n_pickle {
        0 => "safetensors",
        n if n == files.len() && files.iter().all(|f| f.name.ends_with(".gguf")) => "gguf",
        n if n == files.len() => "pickle",
        _ => "mixed",
    };
    let mut dtypes: BTreeMap<&'static str, DTypeStat> = BTreeMap::new();
    let mut prefixes: Vec<PrefixStat> = Vec::new();
    let mut prefix_pos: BTreeMap<String, usize> = BTreeMap::new();
    let mut unsupported = Vec::new();
    let mut params = 0u64;
    let mut memory = Memory::default();
    let mut tensors = 0usize;
    for key in ckpt.keys() {
        let info = match ckpt.info(key) {
            Ok(i) => i,
            Err(e) => {
                unsupported.push(UnsupportedTensor {
                    key: key.to_string(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let n = info.dims.iter().map(|&d| d as u64).product::<u64>();
        // GGUF blocks (`emu convert --quantize`) are listed under their format.
        let quant = ckpt.quant_type(key).ok().flatten();
        let stored = match quant {
            Some(q) => n / q.block_size() as u64 * q.type_size() as u64,
            None => n * info.dtype.size_in_bytes() as u64,
        };
        let stored_name = quant.map_or(info.dtype.name(), |q| q.name());
        tensors += 1;
        params += n;
        let d = dtypes.entry(stored_name).or_insert_with(|| DTypeStat {
            dtype: stored_name.to_string(),
            tensors: 0,
            params: 0,
            bytes: 0,
        });
        d.tensors += 1;
        d.params += n;
        d.bytes += stored;
        let at = |t: DType| {
            if info.dtype.is_float() {
                n * t.size_in_bytes() as u64
            } else {
                stored
            }
        };
        memory.f32 += at(DType::F32);
        memory.bf16 += at(DType::BF16);
        memory.f16 += at(DType::F16);
        let p = key_prefix(key);
        let i = *prefix_pos.entry(p.to_string()).or_insert_with(|| {
            prefixes.push(PrefixStat {
                prefix: p.to_string(),
                tensors: 0,
                params: 0,
            });
            prefixes.len() - 1
        });
        prefixes[i].tensors += 1;
        prefixes[i].params += n;
    }
    // Largest dtype first reads best ("f32 ... then i64 buffers").
    let mut dtypes: Vec<DTypeStat> = dtypes.into_values().collect();
    dtypes.sort_by(|a, b| b.params.cmp(&a.params).then(a.dtype.cmp(&b.dtype)));
    Ok(WeightsInfo {
        format: format.to_string(),
        variant,
        index: index
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
        bytes_on_disk: files.iter().map(|f| f.bytes).sum(),
        files,
        tensors,
        params,
        dtypes,
        prefixes,
        unsupported,
        memory,
    })
}

/// What a transformers `config.json` says the model is.
fn model_from_config(cfg: &serde_json::Value) -> (Option<String>, Option<String>) {
    let class = cfg
        .get("_class_name")
        .or_else(|| cfg.get("architectures").and_then(|a| a.get(0)))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let model = match (class.as_deref(), cfg.get("model_version").and_then(|v| v.as_str())) {
        (Some("EmuForCausalLM"), Some("chat")) => Some("Emu2-Chat".to_string()),
        (Some("EmuForCausalLM"), Some("base")) => Some("Emu2".to_string()),
        (Some("EmuForCausalLM"), Some(other)) => Some(format!("Emu2 (model_version `{other}`)")),
        _ => None,
    };
    (class, model)
}

/// The model a native checkpoint holds, from its key names.
fn model_from_keys(ckpt: &Checkpoint) -> Option<String> {
    let has = |p: &str| ckpt.keys_with_prefix(p).next().is_some();
    if has("multimodal_encoder.") && has("unet.") {
        return Some("Emu2-Gen".into());
    }
    if has("visual.") && (has("decoder.lm.") || has("project_up.")) {
        // Emu2-Chat's vocabulary has two more tokens than Emu2's.
        let vocab = ckpt
            .info("decoder.lm.model.embed_tokens.weight")
            .ok()
            .and_then(|i| i.dims.first().copied());
        return Some(
            match vocab {
                Some(32274) => "Emu2-Chat",
                Some(32272) => "Emu2",
                _ => "Emu2-family (native keys)",
            }
            .into(),
        );
    }
    None
}

/// `dir` has a subfolder with weights or a `config.json` (a pipeline folder
/// without its `model_index.json`).
fn has_component_dirs(dir: &Path) -> Result<bool> {
    for sub in layout::subdir_names(dir)? {
        let d = dir.join(sub);
        if d.join("config.json").is_file() || layout::file_names(&d)?.iter().any(|n| is_weight_file(n)) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn other_files(dir: &Path) -> Result<Vec<FileInfo>> {
    layout::file_names(dir)?
        .into_iter()
        .filter(|n| !is_weight_file(n))
        .map(|n| file_info(&dir.join(n)))
        .collect()
}

/// Inspects a checkpoint directory or file. `variant` picks among weight
/// variants (`bf16`) when a folder has several.
pub fn inspect(path: &Path, variant: Option<&str>) -> Result<Inspection> {
    layout::require_exists(path)?;
    let meta = emu_core::fs::metadata(path).map_err(|e| CliError::io(path, e))?;
    let model: Option<String>;
    let mut components = Vec::new();
    let mut top_files = Vec::new();
    let layout = if meta.is_dir() {
        top_files = other_files(path)?;
        let model_index = path.join("model_index.json");
        let opened = if model_index.is_file() {
            None
        } else {
            layout::open_weights_dir(path, variant)?
        };
        if opened.is_none() && (model_index.is_file() || has_component_dirs(path)?) {
            let index = if model_index.is_file() {
                layout::read_json(&model_index)?
            } else {
                serde_json::Value::Null
            };
            let class_name = index.get("_class_name").and_then(|v| v.as_str());
            model = match class_name {
                Some("EmuVisualGenerationPipeline") => Some("Emu2-Gen".to_string()),
                Some(other) => Some(other.to_string()),
                None => None,
            };
            // Components named in the index, then any other subfolder.
            let mut names: Vec<String> = index
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, v)| !k.starts_with('_') && v.is_array())
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            for sub in layout::subdir_names(path)? {
                if !names.contains(&sub) {
                    names.push(sub);
                }
            }
            names.sort();
            for name in names {
                let dir = path.join(&name);
                let listed = index.get(&name).and_then(|v| v.as_array()).and_then(|a| {
                    let parts: Vec<&str> = a.iter().filter_map(|x| x.as_str()).collect();
                    (parts.len() == 2).then(|| format!("{}.{}", parts[0], parts[1]))
                });
                if !dir.is_dir() {
                    // Listed with `null` class or missing on disk: say so.
                    if listed.is_some() {
                        components.push(Component {
                            name,
                            class: listed,
                            path: dir,
                            other_files: vec![],
                            weights: None,
                        });
                    }
                    continue;
                }
                let mut class = None;
                for name in ["config.json", "scheduler_config.json", "preprocessor_config.json"] {
                    let config = dir.join(name);
                    if class.is_none() && config.is_file() {
                        class = model_from_config(&layout::read_json(&config)?).0;
                    }
                }
                let class = class.or(listed);
                let opened = layout::open_weights_dir(&dir, variant);
                let opened = match opened {
                    // Without a model_index.json the folder was only guessed
                    // to hold components (e.g. `/`, whose `bin/` has *.bin
                    // files): a subfolder that fails to open means the guess
                    // was wrong, not that the checkpoint is damaged.
                    Err(e) if !model_index.is_file() && class.is_none() => {
                        return Err(CliError::NotACheckpoint {
                            path: path.to_path_buf(),
                            hint: format!(
                                "no model_index.json, no config.json and no weights at the top, and subfolder `{name}` \
                                 holds no readable checkpoint ({e}); give a model directory, a diffusers pipeline folder or a weights file"
                            ),
                        })
                    }
                    other => other?,
                };
                let weights = match opened {
                    Some(o) => Some(summarize(&o.checkpoint, o.index.as_deref(), o.variant)?),
                    None => None,
                };
                components.push(Component {
                    name,
                    class,
                    other_files: other_files(&dir)?,
                    path: dir,
                    weights,
                });
            }
            if model_index.is_file() {
                Layout::DiffusersPipeline
            } else {
                Layout::ComponentsDirectory
            }
        } else {
            let Some(opened) = opened else {
                return Err(CliError::NotACheckpoint {
                    path: path.to_path_buf(),
                    hint: "no weight files (*.safetensors, *.bin, *.pth, *.pt) and no model_index.json; \
                           give a model directory, a diffusers pipeline folder or a weights file"
                        .into(),
                });
            };
            let config = path.join("config.json");
            let (class, layout) = if config.is_file() {
                let cfg = layout::read_json(&config)?;
                let (class, m) = model_from_config(&cfg);
                model = m;
                let l = if cfg.get("_class_name").is_some() {
                    Layout::DiffusersComponent
                } else {
                    Layout::HfModel
                };
                (class, l)
            } else {
                model = model_from_keys(&opened.checkpoint);
                (None, Layout::WeightsDirectory)
            };
            components.push(Component {
                name: ".".into(),
                class,
                path: path.to_path_buf(),
                other_files: vec![],
                weights: Some(summarize(&opened.checkpoint, opened.index.as_deref(), opened.variant)?),
            });
            layout
        }
    } else {
        let ckpt = Checkpoint::open(path)?;
        let is_index = path.extension().is_some_and(|e| e == "json");
        model = model_from_keys(&ckpt);
        let layout = if is_index {
            Layout::IndexFile
        } else if model.is_some() {
            Layout::NativeFile
        } else {
            Layout::SingleFile
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let weights = summarize(
            &ckpt,
            is_index.then_some(path),
            layout::variant_of(&name).filter(|_| !is_index),
        )?;
        components.push(Component {
            name: ".".into(),
            class: None,
            path: path.to_path_buf(),
            other_files: vec![],
            weights: Some(weights),
        });
        layout
    };
    let mut totals = Totals::default();
    for w in components.iter().filter_map(|c| c.weights.as_ref()) {
        totals.tensors += w.tensors;
        totals.params += w.params;
        totals.bytes_on_disk += w.bytes_on_disk;
        totals.memory.f32 += w.memory.f32;
        totals.memory.bf16 += w.memory.bf16;
        totals.memory.f16 += w.memory.f16;
    }
    Ok(Inspection {
        path: path.to_path_buf(),
        layout,
        model,
        components,
        other_files: top_files,
        totals,
        memory_plan: memory_plan(path)?,
    })
}

/// Left-aligned first column, right-aligned others.
fn table(out: &mut String, indent: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        let mut s = String::from(indent);
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<width$}", width = w[0]);
            } else {
                let _ = write!(s, "  {c:>width$}", width = w[i]);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(out, &header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in rows {
        line(out, r);
    }
}

/// `26,000 (26.0K)`; small counts without the short form.
fn params_text(n: u64) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        format!("{} ({})", grouped(n), human_count(n))
    }
}

fn files_line(files: &[FileInfo]) -> String {
    files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn memory_line(m: &Memory) -> String {
    format!(
        "f32 {}   bf16 {}   f16 {}",
        human_bytes(m.f32),
        human_bytes(m.bf16),
        human_bytes(m.f16)
    )
}

/// The human-readable report.
pub fn render(ins: &Inspection) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", ins.path.display());
    let _ = write!(out, "  layout: {}", ins.layout.describe());
    if let Some(m) = &ins.model {
        let _ = write!(out, " ({m})");
    }
    out.push('\n');
    if !ins.other_files.is_empty() {
        let _ = writeln!(out, "  other files: {}", files_line(&ins.other_files));
    }
    for c in &ins.components {
        out.push('\n');
        let _ = write!(out, "component {}", c.name);
        if let Some(cl) = &c.class {
            let _ = write!(out, " ({cl})");
        }
        out.push('\n');
        if !c.other_files.is_empty() {
            let _ = writeln!(out, "  other files: {}", files_line(&c.other_files));
        }
        let Some(w) = &c.weights else {
            let _ = writeln!(out, "  no weights");
            continue;
        };
        let _ = write!(
            out,
            "  weights: {} file{}, {} ({}",
            w.files.len(),
            if w.files.len() == 1 { "" } else { "s" },
            human_bytes(w.bytes_on_disk),
            w.format
        );
        if let Some(v) = &w.variant {
            let _ = write!(out, ", variant {v}");
        }
        if let Some(i) = &w.index {
            let _ = write!(out, ", index {i}");
        }
        out.push_str(")\n");
        let rows: Vec<Vec<String>> = w
            .files
            .iter()
            .map(|f| vec![f.name.clone(), human_bytes(f.bytes)])
            .collect();
        table(&mut out, "    ", &["file", "size"], &rows);
        let _ = writeln!(
            out,
            "  tensors: {}   parameters: {}",
            grouped(w.tensors as u64),
            params_text(w.params)
        );
        let rows: Vec<Vec<String>> = w
            .dtypes
            .iter()
            .map(|d| {
                vec![
                    d.dtype.clone(),
                    grouped(d.tensors as u64),
                    grouped(d.params),
                    human_bytes(d.bytes),
                ]
            })
            .collect();
        table(&mut out, "    ", &["dtype", "tensors", "parameters", "bytes"], &rows);
        let rows: Vec<Vec<String>> = w
            .prefixes
            .iter()
            .map(|p| vec![p.prefix.clone(), grouped(p.tensors as u64), grouped(p.params)])
            .collect();
        table(&mut out, "    ", &["prefix", "tensors", "parameters"], &rows);
        for u in &w.unsupported {
            let _ = writeln!(out, "  unsupported: {} ({})", u.key, u.reason);
        }
        let _ = writeln!(out, "  memory: {}", memory_line(&w.memory));
    }
    if ins.components.iter().filter(|c| c.weights.is_some()).count() > 1 {
        let t = &ins.totals;
        let _ = writeln!(
            out,
            "\ntotal: {} tensors, {} parameters, {} on disk",
            grouped(t.tensors as u64),
            params_text(t.params),
            human_bytes(t.bytes_on_disk)
        );
        let _ = writeln!(out, "  memory: {}", memory_line(&t.memory));
    }
    if let Some(p) = &ins.memory_plan {
        render_plan(&mut out, p);
    }
    out
}

/// The memory plan as a table: components down, formats across.
fn render_plan(out: &mut String, p: &MemoryPlan) {
    let _ = writeln!(
        out,
        "\nmemory to run (weights as loaded; q8_0/q4_k: --quantize on the LLM's attention and MLP linears, \
         \"all\": --quantize-components all, the EVA and UNet transformer blocks too; the rest bf16)"
    );
    if let Some(first) = p.formats.first() {
        let mut header = vec!["component"];
        header.extend(p.formats.iter().map(|f| f.format.as_str()));
        let mut rows: Vec<Vec<String>> = Vec::new();
        for (i, c) in first.components.iter().enumerate() {
            let mut row = vec![c.name.clone()];
            row.extend(
                p.formats
                    .iter()
                    .map(|f| f.components.get(i).map_or("-".into(), |c| human_bytes(c.bytes))),
            );
            rows.push(row);
        }
        let mut row = |label: &str, cell: &dyn Fn(&PlanFormat) -> String| {
            let mut r = vec![label.to_string()];
            r.extend(p.formats.iter().map(cell));
            rows.push(r);
        };
        row("all resident (sum)", &|f| human_bytes(f.all_resident));
        row("staged (largest, --offload sequential)", &|f| human_bytes(f.staged));
        let fits = |b: Option<bool>| match b {
            Some(true) => "yes".to_string(),
            Some(false) => "no".to_string(),
            None => "?".to_string(),
        };
        row("fits all resident", &|f| fits(f.fits_all_resident));
        row("fits staged", &|f| fits(f.fits_staged));
        table(out, "  ", &header, &rows);
    }
    for u in &p.unavailable {
        let _ = writeln!(out, "  {}: not available ({})", u.name, u.reason);
    }
    let have = match p.host_available {
        Some(h) => format!("{} of host memory available", human_bytes(h)),
        None => "host memory available: unknown".to_string(),
    };
    let _ = writeln!(
        out,
        "  fits: {have}, for the weights plus twice the largest tensor in f32 while it loads (as the preflight counts); the KV cache and activations come on top"
    );
}

#[cfg(test)]
mod tests {
    use super::key_prefix;

    #[test]
    fn prefixes() {
        assert_eq!(
            key_prefix("model.decoder.lm.model.layers.0.mlp.up_proj.weight"),
            "model.decoder.lm"
        );
        assert_eq!(key_prefix("model.decoder.lm.lm_head.weight"), "model.decoder.lm");
        assert_eq!(key_prefix("model.visual.blocks.3.attn.qkv.weight"), "model.visual");
        assert_eq!(key_prefix("project_up.weight"), "project_up");
        assert_eq!(key_prefix("model.project_down.weight"), "model.project_down");
        assert_eq!(
            key_prefix("multimodal_encoder.visual.cls_token"),
            "multimodal_encoder.visual"
        );
        assert_eq!(key_prefix("unet.conv_in.weight"), "unet");
        assert_eq!(key_prefix("down_blocks.0.resnets.0.conv1.weight"), "down_blocks");
        assert_eq!(key_prefix("model.weight"), "model");
        assert_eq!(key_prefix("scalar"), "scalar");
    }
}
