//! `emu encode`: images to EVA features, as safetensors.

use super::{report_timings, Backends, ModelArgs};
use clap::Args;
use emu::pipeline::{EncodePipeline, ModelDir, ModelFamily, PipelineError, Result};
use emu::with_backend;
use emu_core::{Backend, DType, HostTensor};
use std::path::PathBuf;

/// Arguments of `emu encode`.
#[derive(Args, Debug, Clone)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image to encode; repeat for several (one batch, in order).
    #[arg(long = "image", value_name = "FILE", required = true)]
    pub images: Vec<PathBuf>,
    /// The safetensors file to write: `vision_features` [N, 1+grid², D]
    /// (CLS first), `pooled_tokens` [N, n_query, D] and, when the model has
    /// project_up, `projected_tokens` [N, n_query, hidden].
    #[arg(short, long, value_name = "FILE.safetensors")]
    pub output: PathBuf,
    /// Tokens per image after pooling (a square dividing the patch grid);
    /// default: the model's (256 for Emu2-Chat, 64 otherwise).
    #[arg(long, value_name = "N")]
    pub n_query: Option<usize>,
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        _ => safetensors::Dtype::F32,
    }
}

/// Runs `emu encode`.
pub fn run(args: &EncodeArgs) -> Result<()> {
    for p in &args.images {
        if !p.is_file() {
            return Err(PipelineError::Input(format!(
                "image `{}` does not exist or is not a file",
                p.display()
            )));
        }
    }
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(PipelineError::Input(format!(
                "the output folder `{}` does not exist",
                parent.display()
            )));
        }
    }
    let kind = args.model.check_names()?;
    args.model.no_unet("encode")?;
    if args.model.quantize.is_some() && !args.model.quant_components()?.vision {
        return Err(PipelineError::Input(
            "--quantize applies to the language model unless --quantize-components says otherwise; \
             `encode` runs the vision encoder alone: add --quantize-components vision"
                .into(),
        ));
    }
    let dir = ModelDir::resolve_any(&args.model.model, ModelFamily::Emu2Chat)?;
    if dir.is_tiny() {
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    // Only the vision encoder runs here.
    let vision = Backends::default().open(kind.vision)?;
    with_backend!(vision, |b| run_on(b, args, &dir))
}

fn run_on<B: Backend>(backend: B, args: &EncodeArgs, dir: &ModelDir) -> Result<()> {
    let (vision_dtype, _) = args.model.dtypes(dir)?;
    let mut vision = super::component(&backend, vision_dtype, "vision encoder")?;
    vision.quant = args.model.quant_components()?.split(args.model.quant()?).0;
    let loading = super::progress::loading(dir.root());
    let pipe = EncodePipeline::load(dir, &vision)?;
    drop(loading);
    let enc = pipe.encode(&args.images, args.n_query)?;
    let mut tensors: Vec<(&str, &HostTensor)> =
        vec![("vision_features", &enc.features), ("pooled_tokens", &enc.pooled)];
    if let Some(p) = &enc.projected {
        tensors.push(("projected_tokens", p));
    }
    let views = tensors
        .iter()
        .map(|(k, t)| {
            safetensors::tensor::TensorView::new(st_dtype(t.dtype()), t.dims().to_vec(), t.as_bytes())
                .map(|v| (*k, v))
                .map_err(|e| PipelineError::Input(format!("`{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, None).map_err(|e| PipelineError::Input(e.to_string()))?;
    std::fs::write(&args.output, bytes).map_err(|e| emu_core::Error::io(&args.output, e))?;
    let shapes: Vec<String> = tensors.iter().map(|(k, t)| format!("{k} {:?}", t.dims())).collect();
    crate::outln!("wrote {}: {}", args.output.display(), shapes.join(", "))?;
    report_timings(args.model.verbose, pipe.load_timings(), &enc.timings);
    Ok(())
}
