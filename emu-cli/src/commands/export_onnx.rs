//! `emu export-onnx`: the components of a model as standalone ONNX files
//! (opset 17, standard operators only) that ONNX Runtime in any language
//! loads, with a JSON manifest describing every file.
//!
//! The graphs are recorded by running each component once through the ONNX
//! backend on sample inputs, so they are exactly what `--backend onnx` runs.
//! Shapes are static (chosen here, written to the manifest):
//!
//! * `vision.onnx`: `pixel_values` `[1, 3, S, S]` (preprocessed, S the
//!   encoder's image size) → `features` `[1, 1 + grid², d_model]` (CLS
//!   first), `pooled` `[1, n_query, d_model]` and, when the checkpoint has
//!   `project_up`, `projected` `[1, n_query, hidden_size]`.
//! * `llm_decode.onnx` / `llm_prefill.onnx`: one step of the LLaMA decoder on
//!   a static-size KV cache of `--max-len` positions. Inputs `inputs_embeds`
//!   `[1, T, hidden]` (T = 1 for decode, `--prefill-len` for prefill),
//!   `position` (i64 `[1]`: the number of positions already in the cache),
//!   and `past_key.{i}` / `past_value.{i}` `[1, kv_heads, max_len, head_dim]`
//!   per layer; outputs `logits` `[1, 1, vocab]` (last position) and
//!   `present_key.{i}` / `present_value.{i}` (the caches with positions
//!   `position .. position + T` written). Slots after `position + T` are
//!   masked, so a fresh cache is all zeros. A prompt of any length runs as
//!   whole prefill chunks then single decode steps; `position + T` must not
//!   exceed `max_len`.
//! * `unet.onnx`: `sample` `[B, C, h, w]`, `timestep` (f32 `[B]`),
//!   `encoder_hidden_states` `[B, S, cross_attention_dim]` and, with
//!   `addition_embed_type "text_time"`, `text_embeds` `[B, D]` and
//!   `time_ids` (f32 `[B, 6]`: original size, crop offset, target size) →
//!   `noise_pred` `[B, out_channels, h, w]`. The sinusoidal embeddings the
//!   UNet computes on the host are computed in the graph here.
//! * `vae.onnx`: `latents` `[1, C, h, w]` as the sampler leaves them →
//!   `image` `[1, 3, 8h, 8w]` in `[0, 1]` (scaled by `1 / scaling_factor`,
//!   decoded, mapped from `[-1, 1]` and clamped).
//!
//! With `--quantize q8_0|q4_k` (or a model converted with `emu convert
//! --quantize`, whose stored blocks are kept) the quantized linears are ONNX
//! Runtime's `MatMulNBits` (`com.microsoft` domain, 4-bit codes: Q8_0 as two
//! exact 4-bit halves, Q4_K with its minima as a second product; see the
//! onnx backend), so those files need ONNX Runtime rather than any ONNX
//! runtime; the manifest lists each file's `com.microsoft` nodes.
//!
//! Weights are initializers; above `--external-data-threshold` bytes they go
//! to `<file>.onnx.data` (ONNX external data). `--check-data` also writes the
//! sample inputs and the in-process outputs under `check/<graph>/` as `.npy`
//! (the LLM graphs at a position other than the one traced), which
//! `tools/onnx/check_export_onnx.py` runs in Python's onnxruntime.

use clap::Args;
use emu::pipeline::{ModelDir, ModelFamily, PipelineError, Result};
use emu::units::parse_size;
use emu_backend_onnx::{ExportSpec, ExportedFile, OnnxBackend, ParamInput, Port, EXTERNAL_DATA_THRESHOLD, OPSET};
use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::{DType, HostTensor, Tensor};
use emu_decoder::unet::{timestep_embedding, PerBlock};
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use emu_llm::{Llama, LlamaConfig, LlmQuant, Logits};
use emu_vision::{EmuVisionConfig, VisionEncoder};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

type T = Tensor<OnnxBackend>;

/// Named host tensors: graph inputs or outputs of a sample run.
type Named = Vec<(String, HostTensor)>;

/// Arguments of `emu export-onnx`.
#[derive(Args, Debug, Clone)]
pub struct ExportOnnxArgs {
    /// The model: `tiny` (the built-in Emu2-Gen with random weights), or a
    /// model directory (Emu2, Emu2-Chat or an Emu2-Gen pipeline folder).
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// What to export: vision, llm, unet, vae or all (every component the model has).
    #[arg(long, default_value = "all", value_name = "NAME")]
    pub component: String,
    /// The folder to write (created if missing).
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Dtype of weights and activations: f32, bf16 or f16 (default f32).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// KV-cache positions of the LLM graphs (default: max_position_embeddings, at most 2048).
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
    /// Positions per prefill step (default: 64, at most max_len - 2).
    #[arg(long, value_name = "N")]
    pub prefill_len: Option<usize>,
    /// UNet batch (2: conditional and unconditional rows of guided sampling).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub unet_batch: usize,
    /// Output image size in pixels for the UNet and VAE graphs (default: the
    /// UNet's sample_size times the VAE factor).
    #[arg(long, value_name = "PIXELS")]
    pub image_size: Option<usize>,
    /// Conditioning tokens of the UNet (Emu2-Gen: 64 regressed embeddings).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub context_len: usize,
    /// Initializer bytes above which weights go to an external `.data` file
    /// (default 2000000000; 0 always uses one). Sizes like 1GB work.
    #[arg(long, value_name = "BYTES", value_parser = parse_threshold)]
    pub external_data_threshold: Option<u64>,
    /// Also write sample inputs and the in-process outputs as .npy under
    /// OUT/check/<graph>/, for tools/onnx/check_export_onnx.py.
    #[arg(long)]
    pub check_data: bool,
    /// Block-quantize linears while loading: q8_0 or q4_k (GGUF's layouts),
    /// the language model's unless --quantize-components says otherwise.
    /// They become ONNX Runtime's MatMulNBits nodes (com.microsoft domain).
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// Which linears --quantize applies to: a comma list of attn, mlp,
    /// lm_head, or all.
    #[arg(long, value_name = "LIST", default_value = "attn,mlp")]
    pub quantize_linears: String,
    /// Which components --quantize applies to: a comma list of llm, vision
    /// (the EVA blocks' linears), unet (its transformer blocks' linears), or
    /// all. The VAE stays dense.
    #[arg(long, value_name = "LIST", default_value = "llm")]
    pub quantize_components: String,
}

fn parse_threshold(s: &str) -> std::result::Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    parse_size(s).map_err(|e| e.to_string())
}

const COMPONENTS: [&str; 4] = ["vision", "llm", "unet", "vae"];

/// The UNet check data's timestep and time ids (other than the traced ones).
const CHECK_TIMESTEP: f32 = 123.5;
const CHECK_TIME_IDS: [f32; 6] = [96.0, 80.0, 8.0, 4.0, 64.0, 48.0];

/// `--quantize` for each of (vision, LLM, UNet).
type Quants = (Option<LlmQuant>, Option<LlmQuant>, Option<LlmQuant>);

/// One exported graph: the file written and the sample run used for checking.
struct Graph {
    component: &'static str,
    file: ExportedFile,
    source: String,
    notes: Value,
    /// Sample inputs and the in-process outputs, by graph input/output name.
    check: Option<(Named, Named)>,
}

/// Runs `emu export-onnx`; returns the manifest path.
pub fn run(args: &ExportOnnxArgs) -> Result<PathBuf> {
    check_numbers(args)?;
    let wanted: Vec<&str> = match args.component.as_str() {
        "all" => COMPONENTS.to_vec(),
        c if COMPONENTS.contains(&c) => vec![c],
        other => {
            return Err(PipelineError::Input(format!(
                "--component `{other}`: use vision, llm, unet, vae or all"
            )))
        }
    };
    let dtype = match args.dtype.as_deref() {
        None => DType::F32,
        Some(s) => match DType::parse(s) {
            Some(d @ (DType::F32 | DType::BF16 | DType::F16)) => d,
            _ => {
                return Err(PipelineError::DType(format!(
                    "`{s}` is not a compute dtype; use f32, bf16 or f16"
                )))
            }
        },
    };
    let quant = super::quant_request(args.quantize.as_deref(), &args.quantize_linears)?;
    let on = super::quant_components(args.quantize.as_deref(), &args.quantize_components)?;
    let dir = ModelDir::resolve_any(&args.model, ModelFamily::Emu2Gen)?;
    if dir.is_tiny() {
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    let has_decoder = dir.family() == ModelFamily::Emu2Gen;
    if !has_decoder && args.component != "all" && matches!(args.component.as_str(), "unet" | "vae") {
        return Err(PipelineError::Model(format!(
            "{} has no {}; the UNet and VAE are part of Emu2-Gen",
            dir.root().display(),
            args.component
        )));
    }
    if quant.is_some() {
        let quantized = |c: &&str| match *c {
            "vision" => on.vision,
            "llm" => on.llm,
            "unet" => on.unet && has_decoder,
            _ => false,
        };
        if !wanted.iter().any(quantized) {
            return Err(PipelineError::Input(format!(
                "--quantize applies to --quantize-components {}, and --component {} of this model exports none of them",
                args.quantize_components, args.component
            )));
        }
    }
    let quants = on.split(quant);
    if args.output.exists() && !args.output.is_dir() {
        return Err(PipelineError::Input(format!(
            "-o `{}` is a file; export-onnx writes a folder",
            args.output.display()
        )));
    }
    let created = !args.output.exists();
    std::fs::create_dir_all(&args.output).map_err(|e| io_err(&args.output, e))?;
    // Everything is written into a staging folder inside OUT and moved into
    // place only once every graph and the manifest are written: a failed
    // export leaves no ONNX files without their manifest.
    let staged = tempfile::Builder::new()
        .prefix(".emu-export-")
        .tempdir_in(&args.output)
        .map_err(|e| io_err(&args.output, e));
    let result = staged.and_then(|staging| {
        let graphs = export_into(args, &dir, wanted, dtype, quants, has_decoder, staging.path())?;
        publish(staging.path(), &args.output)?;
        Ok(graphs)
    });
    let graphs = match result {
        Ok(g) => g,
        Err(e) => {
            if created {
                // Only removes the folder when nothing else was put there.
                let _ = std::fs::remove_dir(&args.output);
            }
            return Err(e);
        }
    };
    let path = args.output.join("manifest.json");
    let moved = |p: &Path| args.output.join(p.file_name().unwrap_or_default());
    for g in &graphs {
        crate::outln!(
            "wrote {} ({} bytes{})",
            moved(&g.file.path).display(),
            g.file.model_bytes,
            match &g.file.external_data {
                Some(p) => format!(", weights in {} ({} bytes)", moved(p).display(), g.file.external_bytes),
                None => String::new(),
            }
        )?;
    }
    crate::outln!("wrote {}", path.display())?;
    Ok(path)
}

/// Most images side, UNet batch and conditioning length export-onnx takes:
/// graphs are traced on sample inputs of these sizes.
const MAX_IMAGE_SIZE: usize = 8192;
const MAX_UNET_BATCH: usize = 64;
const MAX_CONTEXT_LEN: usize = 4096;

/// Refuses numbers that would be clamped, replaced or would trace a graph
/// too large to build, before anything is loaded.
fn check_numbers(args: &ExportOnnxArgs) -> Result<()> {
    let bad = |m: String| Err(PipelineError::Input(m));
    if !(1..=MAX_UNET_BATCH).contains(&args.unet_batch) {
        return bad(format!(
            "--unet-batch {}: between 1 and {MAX_UNET_BATCH} (2 for guided sampling)",
            args.unet_batch
        ));
    }
    if !(1..=MAX_CONTEXT_LEN).contains(&args.context_len) {
        return bad(format!(
            "--context-len {}: between 1 and {MAX_CONTEXT_LEN} (Emu2-Gen: 64)",
            args.context_len
        ));
    }
    if let Some(s) = args.image_size.filter(|s| *s == 0 || *s > MAX_IMAGE_SIZE) {
        return bad(format!("--image-size {s}: between 1 and {MAX_IMAGE_SIZE} pixels"));
    }
    if let (Some(p), Some(m)) = (args.prefill_len, args.max_len) {
        if p.saturating_add(2) > m {
            return bad(format!(
                "--prefill-len {p} does not fit --max-len {m}: a prefill step needs at most max_len - 2 positions"
            ));
        }
    }
    Ok(())
}

/// Moves everything from `staging` into `out`, the manifest last, replacing
/// what an earlier export left there.
fn publish(staging: &Path, out: &Path) -> Result<()> {
    let manifest = out.join("manifest.json");
    if manifest.exists() {
        std::fs::remove_file(&manifest).map_err(|e| io_err(&manifest, e))?;
    }
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(staging)
        .map_err(|e| io_err(staging, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| io_err(staging, e))?;
    names.sort_by_key(|n| n == "manifest.json");
    for name in names {
        let (from, to) = (staging.join(&name), out.join(&name));
        if to.is_dir() {
            std::fs::remove_dir_all(&to).map_err(|e| io_err(&to, e))?;
        }
        std::fs::rename(&from, &to).map_err(|e| io_err(&to, e))?;
    }
    Ok(())
}

/// Exports `wanted` into `out` (the staging folder); returns the graphs.
#[allow(clippy::too_many_arguments)]
fn export_into(
    args: &ExportOnnxArgs,
    dir: &ModelDir,
    wanted: Vec<&str>,
    dtype: DType,
    quants: Quants,
    has_decoder: bool,
    out: &Path,
) -> Result<Vec<Graph>> {
    let be = OnnxBackend::new()?;
    let threshold = args
        .external_data_threshold
        .map(|t| t as usize)
        .unwrap_or(EXTERNAL_DATA_THRESHOLD);
    let x = Exporter {
        be: &be,
        out,
        threshold,
        dtype,
        quants,
        check: args.check_data,
    };
    let mut graphs = Vec::new();
    for c in wanted {
        match c {
            "vision" => graphs.push(x.vision(dir)?),
            "llm" => graphs.extend(x.llm(dir, args)?),
            "unet" if has_decoder => graphs.push(x.unet(dir, args)?),
            "vae" if has_decoder => graphs.push(x.vae(dir, args)?),
            _ => {}
        }
    }
    let manifest = manifest(dir, args, dtype, &graphs);
    let path = out.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| PipelineError::Input(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| io_err(&path, e))?;
    if args.check_data {
        for g in &graphs {
            if let Some((ins, outs)) = &g.check {
                let stem = graph_stem(&g.file.path);
                let d = out.join("check").join(&stem);
                std::fs::create_dir_all(&d).map_err(|e| io_err(&d, e))?;
                for (name, h) in ins.iter().chain(outs) {
                    let p = d.join(format!("{name}.npy"));
                    write_npy(&p, h)?;
                }
            }
        }
    }
    Ok(graphs)
}

/// Refuses a traced sample run whose attention cannot fit in memory.
fn fits(what: &str, bytes: u64) -> Result<()> {
    Ok(emu_core::memory::check_fits(
        what,
        bytes,
        emu::memory::host_available()?,
        "use a smaller --image-size",
    )?)
}

fn io_err(p: &Path, e: std::io::Error) -> PipelineError {
    PipelineError::Input(format!("{}: {e}", p.display()))
}

fn graph_stem(p: &Path) -> String {
    p.file_stem().and_then(|s| s.to_str()).unwrap_or("graph").to_string()
}

struct Exporter<'a> {
    be: &'a OnnxBackend,
    out: &'a Path,
    threshold: usize,
    dtype: DType,
    quants: Quants,
    check: bool,
}

/// Deterministic sample values in [-1, 1) (an LCG; the values only need to be varied).
fn sample(dims: &[usize], seed: u64) -> Result<HostTensor> {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(HostTensor::from_f32(dims, v)?)
}

impl Exporter<'_> {
    fn up(&self, h: &HostTensor) -> Result<T> {
        Ok(Tensor::from_host(self.be, &h.to_dtype(self.dtype)?)?)
    }

    fn write(
        &self,
        name: &str,
        inputs: &[Port<'_>],
        params: &[ParamInput<'_>],
        outputs: &[Port<'_>],
        replace: &[(&emu_backend_onnx::OnnxTensor, &emu_backend_onnx::OnnxTensor)],
    ) -> Result<ExportedFile> {
        let spec = ExportSpec {
            graph_name: name,
            inputs,
            params,
            outputs,
            external_data_threshold: self.threshold,
            replace,
        };
        Ok(self.be.export_to_file(&spec, &self.out.join(format!("{name}.onnx")))?)
    }

    fn vision(&self, dir: &ModelDir) -> Result<Graph> {
        let (config, origin) = dir.emu_config()?;
        let cfg = EmuVisionConfig::from_value(&config)?;
        let ckpt = dir.open_encoder_weights()?;
        let enc = VisionEncoder::load_quantized(self.be, &Weights::new(&ckpt), cfg, self.dtype, blocks(self.quants.0))?;
        let s = enc.config().vision.image_size;
        let px_host = sample(&[1, 3, s, s], 1)?.to_dtype(self.dtype)?;
        let px = Tensor::from_host(self.be, &px_host)?;
        let features = enc.encode(&px)?;
        let pooled = enc.pool(&features, enc.config().vision.n_query)?;
        let projected = match enc.project(&pooled) {
            Ok(p) => Some(p),
            Err(emu_vision::VisionError::InvalidArgument(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut outs = vec![
            Port::new(
                "features",
                features.raw(),
                "EVA-CLIP output [1, 1 + grid^2, d_model], CLS token first",
            ),
            Port::new(
                "pooled",
                pooled.raw(),
                "features without CLS, average-pooled to [1, n_query, d_model]",
            ),
        ];
        if let Some(p) = &projected {
            outs.push(Port::new(
                "projected",
                p.raw(),
                "project_up(pooled): LLM input embeddings [1, n_query, hidden_size]",
            ));
        }
        let ins = [Port::new(
            "pixel_values",
            px.raw(),
            "[1, 3, S, S] RGB, resized and normalised with the encoder's mean/std (emu-vision Preprocessor)",
        )];
        let file = self.write("vision", &ins, &[], &outs, &[])?;
        let check = self.check.then(|| -> Result<_> {
            let mut o = vec![
                ("features".to_string(), features.to_host()?),
                ("pooled".to_string(), pooled.to_host()?),
            ];
            if let Some(p) = &projected {
                o.push(("projected".to_string(), p.to_host()?));
            }
            Ok((vec![("pixel_values".to_string(), px_host.clone())], o))
        });
        Ok(Graph {
            component: "vision",
            file,
            source: origin,
            notes: json!({"image_size": s, "n_query": enc.config().vision.n_query}),
            check: check.transpose()?,
        })
    }

    fn llm(&self, dir: &ModelDir, args: &ExportOnnxArgs) -> Result<Vec<Graph>> {
        let (config, origin) = dir.emu_config()?;
        let cfg = LlamaConfig::from_json_value(config).map_err(|e| PipelineError::Model(format!("{origin}: {e}")))?;
        let ckpt = dir.open_encoder_weights()?;
        let m = Llama::load_quantized(
            self.be,
            &emu_llm::lm_weights(&ckpt)?,
            &cfg,
            self.dtype,
            self.quants.1.as_ref(),
        )?;
        let cap = args.max_len.unwrap_or(cfg.max_position_embeddings.min(2048));
        if cap < 4 || cap > cfg.max_position_embeddings {
            return Err(PipelineError::Input(format!(
                "--max-len {cap}: between 4 and max_position_embeddings ({})",
                cfg.max_position_embeddings
            )));
        }
        // Only the default adapts to --max-len; a given value is checked.
        let prefill = args.prefill_len.unwrap_or(64.min(cap - 2));
        if prefill < 2 || prefill + 2 > cap {
            return Err(PipelineError::Input(format!(
                "--prefill-len {prefill}: between 2 and max_len - 2 ({})",
                cap - 2
            )));
        }
        let mut graphs = Vec::new();
        for (name, t) in [("llm_decode", 1), ("llm_prefill", prefill)] {
            // Traced a few positions in (the slices of the RoPE table are
            // then middle slices, whose offsets are the only ones fed in a
            // LLaMA step, so every fed offset is the position), after a
            // short warm-up prefill that stays cheap on a real model; checked
            // one position further.
            let traced = 3.min(cap - t - 1);
            let checked = traced + 1;
            let (run, file) = self.llm_step(&m, &cfg, name, cap, t, traced, true)?;
            let file = file.ok_or_else(|| PipelineError::Model("llm export wrote nothing".into()))?;
            drop(run);
            let check = if self.check {
                let (run, _) = self.llm_step(&m, &cfg, name, cap, t, checked, false)?;
                Some(run)
            } else {
                None
            };
            graphs.push(Graph {
                component: "llm",
                file,
                source: origin.clone(),
                notes: json!({
                    "max_len": cap,
                    "tokens_per_step": t,
                    "traced_position": traced,
                    "layers": cfg.num_hidden_layers,
                    "kv_cache": "static: [1, num_key_value_heads, max_len, head_dim] per layer; zeros when empty",
                }),
                check,
            });
        }
        Ok(graphs)
    }

    /// One step of `t` tokens at `position` on a cache of `cap`; exports it
    /// when `export` is set. Returns the sample inputs and outputs.
    #[allow(clippy::too_many_arguments)]
    fn llm_step(
        &self,
        m: &Llama<OnnxBackend>,
        cfg: &LlamaConfig,
        name: &str,
        cap: usize,
        t: usize,
        position: usize,
        export: bool,
    ) -> Result<((Named, Named), Option<ExportedFile>)> {
        let h = cfg.hidden_size;
        let mut cache = m.new_cache(1, cap)?;
        // Fill the first `position` slots, then make them plain values the
        // step starts from.
        let warm = m.forward_embeds(&self.up(&sample(&[1, position, h], 2)?)?, &mut cache, Logits::Skip)?;
        warm.hidden.to_host()?;
        drop(warm);
        let x_host = sample(&[1, t, h], 3 + t as u64)?.to_dtype(self.dtype)?;
        let x = Tensor::from_host(self.be, &x_host)?;
        let out = m.forward_embeds(&x, &mut cache, Logits::Last)?;
        let logits = out
            .logits
            .ok_or_else(|| PipelineError::Model("the decoder returned no logits".into()))?;
        let updates = self.be.slice_set_updates(logits.raw());
        let layers = cfg.num_hidden_layers;
        if updates.len() != 2 * layers {
            return Err(PipelineError::Model(format!(
                "expected {} cache writes in the decoder step, found {}",
                2 * layers,
                updates.len()
            )));
        }
        let mut names = Vec::new();
        for i in 0..layers {
            for kv in ["key", "value"] {
                names.push((format!("past_{kv}.{i}"), format!("present_{kv}.{i}")));
            }
        }
        let file = match export {
            true => {
                let mut ins = vec![Port::new(
                    "inputs_embeds",
                    x.raw(),
                    "[1, T, hidden_size] input embeddings (token rows of embed_tokens, or visual embeddings)",
                )];
                let mut outs = vec![Port::new(
                    "logits",
                    logits.raw(),
                    "[1, 1, vocab_size] logits of the last position",
                )];
                for ((past, present), (pn, qn)) in updates.iter().zip(&names) {
                    ins.push(Port::new(
                        pn,
                        past,
                        "[1, num_key_value_heads, max_len, head_dim] cache before this step",
                    ));
                    outs.push(Port::new(
                        qn,
                        present,
                        "the cache with positions position .. position + T written",
                    ));
                }
                let params = [ParamInput {
                    name: "position",
                    traced: position,
                    doc: "i64 [1]: positions already in the cache (RoPE position of the first input row)",
                }];
                Some(self.write(name, &ins, &params, &outs, &[])?)
            }
            false => None,
        };
        let mut ins = vec![
            ("inputs_embeds".to_string(), x_host),
            (
                "position".to_string(),
                HostTensor::from_i64(&[1], vec![position as i64])?,
            ),
        ];
        let mut outs = vec![("logits".to_string(), logits.to_host()?)];
        for ((past, present), (pn, qn)) in updates.iter().zip(names) {
            ins.push((pn, self.be_download(past)?));
            outs.push((qn, self.be_download(present)?));
        }
        Ok(((ins, outs), file))
    }

    fn be_download(&self, t: &emu_backend_onnx::OnnxTensor) -> Result<HostTensor> {
        Ok(T::from_raw(self.be, t.clone()).to_host()?)
    }

    fn image_hw(
        &self,
        unet: &UNet2DConditionConfig,
        vae: &AutoencoderKLConfig,
        args: &ExportOnnxArgs,
    ) -> Result<(usize, usize)> {
        let f = vae.downscale_factor();
        let size = match args.image_size {
            Some(s) => s,
            None => match &unet.sample_size {
                Some(Value::Number(n)) => (n.as_u64().unwrap_or(128) as usize).saturating_mul(f),
                Some(Value::Array(a)) => (a.first().and_then(Value::as_u64).unwrap_or(128) as usize).saturating_mul(f),
                _ => 128 * f,
            },
        };
        if size > MAX_IMAGE_SIZE {
            return Err(PipelineError::Input(format!(
                "image size {size} (--image-size, or the UNet's sample_size times {f}) is more than {MAX_IMAGE_SIZE} pixels"
            )));
        }
        if size == 0 || size % f != 0 {
            return Err(PipelineError::Input(format!(
                "--image-size {size} is not a positive multiple of the VAE factor {f}"
            )));
        }
        Ok((size / f, size / f))
    }

    fn unet(&self, dir: &ModelDir, args: &ExportOnnxArgs) -> Result<Graph> {
        let root = dir.root();
        let cfg_path = root.join("unet").join("config.json");
        let cfg = UNet2DConditionConfig::from_file(&cfg_path)?;
        let vae_cfg = AutoencoderKLConfig::from_file(root.join("vae").join("config.json"))?;
        let (h, w) = self.image_hw(&cfg, &vae_cfg, args)?;
        fits(
            "the UNet graph's sample run",
            cfg.attention_bytes(args.unet_batch, h, w)?,
        )?;
        let unet = UNet2DConditionModel::load_quantized(
            self.be,
            &Checkpoint::open(root.join("unet"))?.weights(),
            &cfg,
            self.dtype,
            blocks(self.quants.2),
        )?;
        let b = args.unet_batch;
        let cross = match &cfg.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.first().copied().unwrap_or(0),
        };
        let s_host = sample(&[b, cfg.in_channels, h, w], 4)?.to_dtype(self.dtype)?;
        let e_host = sample(&[b, args.context_len, cross], 5)?.to_dtype(self.dtype)?;
        let s = Tensor::from_host(self.be, &s_host)?;
        let e = Tensor::from_host(self.be, &e_host)?;
        // A timestep no weight happens to equal, so the upload is found by value.
        let timestep = 517.25f32;
        let (flip, shift, c0) = (cfg.flip_sin_to_cos, cfg.freq_shift, cfg.block_out_channels[0]);
        let t_emb = timestep_embedding(&vec![timestep; b], c0, flip, shift)?.to_dtype(self.dtype)?;
        let time_ids = [h as f32 * 8.0, w as f32 * 8.0, 0.0, 0.0, h as f32 * 8.0, w as f32 * 8.0];
        let added = match (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) {
            (Some(td), Some(pd)) if cfg.addition_embed_type.as_deref() == Some("text_time") => {
                let text_dim = pd.checked_sub(6 * td).ok_or_else(|| {
                    PipelineError::Model(format!(
                        "{}: projection_class_embeddings_input_dim too small",
                        cfg_path.display()
                    ))
                })?;
                let text_host = sample(&[b, text_dim], 6)?.to_dtype(self.dtype)?;
                let flat: Vec<f32> = (0..b).flat_map(|_| time_ids).collect();
                let te = timestep_embedding(&flat, td, flip, shift)?
                    .reshape(&[b, 6 * td])?
                    .to_dtype(self.dtype)?;
                Some((text_host, te, td))
            }
            _ => None,
        };
        let cond = match &added {
            Some((text_host, _, _)) => Some(TextTimeCond {
                text_embeds: Tensor::from_host(self.be, text_host)?,
                time_ids: vec![time_ids; b],
            }),
            None => None,
        };
        let y = unet.forward(&s, timestep, &e, cond.as_ref())?;
        let find = |hst: &HostTensor, what: &str| {
            self.be
                .find_upload(y.raw(), hst)
                .ok_or_else(|| PipelineError::Model(format!("the UNet graph has no {what} upload")))
        };
        // The UNet embeds the timestep (and the time ids) on the host and
        // uploads the result; the exported graph computes the same embedding
        // from plain inputs instead.
        let t_node = find(&t_emb, "timestep embedding")?;
        let t_host = HostTensor::from_f32(&[b], vec![timestep; b])?;
        let t_in = Tensor::from_host(self.be, &t_host)?;
        let t_graph = embed_in_graph(&t_in, c0, flip, shift)?.to_dtype(self.dtype)?;
        let mut replace = vec![(t_node, t_graph.raw().clone())];
        let mut ins = vec![
            Port::new(
                "sample",
                s.raw(),
                "[B, in_channels, h, w] latents, already scaled by the scheduler (scale_model_input)",
            ),
            Port::new("timestep", t_in.raw(), "f32 [B] the scheduler's timestep per row"),
            Port::new(
                "encoder_hidden_states",
                e.raw(),
                "[B, S, cross_attention_dim] conditioning (Emu2-Gen: regressed visual embeddings)",
            ),
        ];
        let mut check_in = vec![
            ("sample".to_string(), s_host.clone()),
            // Checked at another timestep and other time ids than traced.
            (
                "timestep".to_string(),
                HostTensor::from_f32(&[b], vec![CHECK_TIMESTEP; b])?,
            ),
            ("encoder_hidden_states".to_string(), e_host.clone()),
        ];
        let ids_in;
        if let (Some((text_host, te, td)), Some(c)) = (&added, &cond) {
            let ids_host = HostTensor::from_f32(&[b, 6], (0..b).flat_map(|_| time_ids).collect())?;
            ids_in = Tensor::from_host(self.be, &ids_host)?;
            let te_graph = embed_in_graph(&ids_in.reshape(&[b * 6])?, *td, flip, shift)?
                .reshape(&[b, 6 * td])?
                .to_dtype(self.dtype)?;
            replace.push((find(te, "time ids embedding")?, te_graph.raw().clone()));
            ins.push(Port::new(
                "text_embeds",
                c.text_embeds.raw(),
                "[B, D] pooled conditioning (Emu2-Gen: mean of encoder_hidden_states over tokens)",
            ));
            ins.push(Port::new(
                "time_ids",
                ids_in.raw(),
                "f32 [B, 6] SDXL micro-conditioning: original height, width, crop top, left, target height, width",
            ));
            check_in.push(("text_embeds".to_string(), text_host.clone()));
            let check_ids: Vec<f32> = (0..b).flat_map(|_| CHECK_TIME_IDS).collect();
            check_in.push(("time_ids".to_string(), HostTensor::from_f32(&[b, 6], check_ids)?));
        }
        let replace: Vec<(&emu_backend_onnx::OnnxTensor, &emu_backend_onnx::OnnxTensor)> =
            replace.iter().map(|(a, b)| (a, b)).collect();
        let outs = [Port::new(
            "noise_pred",
            y.raw(),
            "[B, out_channels, h, w] the UNet's prediction (prediction_type of the scheduler)",
        )];
        let file = self.write("unet", &ins, &[], &outs, &replace)?;
        let check = if self.check {
            let cond = cond.as_ref().map(|c| TextTimeCond {
                text_embeds: c.text_embeds.clone(),
                time_ids: vec![CHECK_TIME_IDS; b],
            });
            let y = unet.forward(&s, CHECK_TIMESTEP, &e, cond.as_ref())?;
            Some((check_in, vec![("noise_pred".to_string(), y.to_host()?)]))
        } else {
            None
        };
        Ok(Graph {
            component: "unet",
            file,
            source: cfg_path.display().to_string(),
            notes: json!({"batch": b, "latent_hw": [h, w], "context_len": args.context_len, "traced_timestep": timestep}),
            check,
        })
    }

    fn vae(&self, dir: &ModelDir, args: &ExportOnnxArgs) -> Result<Graph> {
        let root = dir.root();
        let cfg_path = root.join("vae").join("config.json");
        let cfg = AutoencoderKLConfig::from_file(&cfg_path)?;
        let unet_cfg = UNet2DConditionConfig::from_file(root.join("unet").join("config.json"))?;
        let (h, w) = self.image_hw(&unet_cfg, &cfg, args)?;
        fits("the VAE graph's sample run", cfg.attention_bytes(h, w))?;
        let vae = AutoencoderKL::load(
            self.be,
            &Checkpoint::open(root.join("vae"))?.weights(),
            &cfg,
            self.dtype,
        )?;
        let z_host = sample(&[1, cfg.latent_channels, h, w], 7)?;
        let z = Tensor::from_host(self.be, &z_host)?;
        let img = vae
            .decode(&z.affine(1.0 / cfg.scaling_factor, 0.0)?.to_dtype(self.dtype)?)?
            .affine(0.5, 0.5)?;
        let ones = vec![1usize; 4];
        let img = img
            .maximum(&Tensor::zeros(self.be, &ones, img.dtype())?)?
            .minimum(&Tensor::full(self.be, &ones, 1.0, img.dtype())?)?;
        let ins = [Port::new(
            "latents",
            z.raw(),
            "[1, latent_channels, h, w] f32 latents as the sampler returns them",
        )];
        let outs = [Port::new("image", img.raw(), "[1, 3, H, W] RGB in [0, 1]")];
        let file = self.write("vae", &ins, &[], &outs, &[])?;
        let check = if self.check {
            Some((
                vec![("latents".to_string(), z_host)],
                vec![("image".to_string(), img.to_host()?)],
            ))
        } else {
            None
        };
        Ok(Graph {
            component: "vae",
            file,
            source: cfg_path.display().to_string(),
            notes: json!({"latent_hw": [h, w], "scaling_factor": cfg.scaling_factor}),
            check,
        })
    }
}

/// What the EVA encoder and the UNet load their block linears with.
fn blocks(q: Option<LlmQuant>) -> emu_core::linear::BlockQuant {
    q.map(|q| q.blocks()).unwrap_or_default()
}

/// diffusers' `get_timestep_embedding` in the graph: `[N]` f32 to `[N, dim]`
/// f32, the computation `emu_decoder::unet::timestep_embedding` does on the host.
fn embed_in_graph(t: &T, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<T> {
    let be = t.backend();
    let n = t.dims()[0];
    let half = dim / 2;
    let log_max = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_max * i as f32) / denom).exp()).collect();
    let args = t.reshape(&[n, 1])?.mul(&Tensor::from_f32(be, &[1, half], freqs)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut parts = if flip_sin_to_cos {
        vec![cos, sin]
    } else {
        vec![sin, cos]
    };
    if dim % 2 == 1 {
        parts.push(Tensor::zeros(be, &[n, 1], DType::F32)?);
    }
    let refs: Vec<&T> = parts.iter().collect();
    Ok(Tensor::concat(&refs, 1)?)
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::U32 => "uint32",
        DType::U8 => "uint8",
        DType::Bool => "bool",
    }
}

fn manifest(dir: &ModelDir, args: &ExportOnnxArgs, dtype: DType, graphs: &[Graph]) -> Value {
    let ports = |v: &[emu_backend_onnx::TensorInfo]| -> Vec<Value> {
        v.iter()
            .map(|t| json!({"name": t.name, "dtype": dtype_name(t.dtype), "shape": t.dims, "doc": t.doc}))
            .collect()
    };
    let name = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
    };
    // Config files relative to the model folder (the tiny one is temporary).
    let root = dir.root().display().to_string();
    let source = |s: &str| match s.strip_prefix(&root) {
        Some(rel) => rel.trim_start_matches('/').to_string(),
        None => s.to_string(),
    };
    json!({
        "format": "emu-rs export-onnx manifest v1",
        "model": args.model,
        "model_dir": if dir.is_tiny() { "tiny (built in)".to_string() } else { dir.root().display().to_string() },
        "dtype": dtype_name(dtype),
        "quantize": args.quantize.as_ref().map(|q| json!({
            "type": emu_core::QuantType::parse(q).map_or(q.as_str(), |t| t.name()),
            "linears": args.quantize_linears,
            "components": args.quantize_components,
        })),
        "opset": OPSET,
        "ir_version": emu_backend_onnx::IR_VERSION,
        "files": graphs.iter().map(|g| json!({
            "component": g.component,
            "file": name(&Some(g.file.path.clone())),
            "external_data": name(&g.file.external_data),
            "external_bytes": g.file.external_bytes,
            "model_bytes": g.file.model_bytes,
            "config": source(&g.source),
            "inputs": ports(&g.file.inputs),
            "outputs": ports(&g.file.outputs),
            "contrib_ops": g.file.contrib_ops,
            "notes": g.notes,
            "check": if g.check.is_some() { Some(format!("check/{}", graph_stem(&g.file.path))) } else { None },
        })).collect::<Vec<_>>(),
    })
}

/// A little-endian `.npy` file (float32 for float tensors, int64 for integers).
fn write_npy(path: &Path, h: &HostTensor) -> Result<()> {
    let (descr, bytes) = if h.dtype().is_float() {
        ("<f4", h.to_dtype(DType::F32)?.as_bytes().to_vec())
    } else {
        ("<i8", h.to_dtype(DType::I64)?.as_bytes().to_vec())
    };
    let shape: Vec<String> = h.dims().iter().map(|d| d.to_string()).collect();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes);
    std::fs::write(path, out).map_err(|e| io_err(path, e))
}
