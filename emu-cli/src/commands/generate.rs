//! `emu generate`: Emu2-Gen, a prompt to a PNG image.

use super::{report_timings, BackendKind, ModelArgs, OffloadArgs};
use clap::Args;
use emu::pipeline::{GenerationOptions, GenerationPipeline, ModelDir, ModelFamily, PipelineError, Result};
use emu::with_backend;
use emu_core::Backend;
use emu_prompt::{Item, Prompt};
use std::path::{Path, PathBuf};

/// Arguments of `emu generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt in emu markup: text, `{image PATH}` for subject images,
    /// `{object box=X1,Y1,X2,Y2 phrase=TEXT subject=PATH}` to place things
    /// (box in pixels of a 448x448 canvas). A lone `{image PATH}` is the
    /// autoencoding mode.
    pub prompt: String,
    /// The PNG file to write.
    #[arg(short, long, value_name = "FILE.png")]
    pub output: PathBuf,
    /// Denoising steps.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off).
    #[arg(long, default_value_t = 3.0, value_name = "SCALE")]
    pub guidance: f32,
    /// Seed of the initial noise: the same seed gives the same image.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image size: N (square) or WIDTHxHEIGHT. Default: the model's (1024 for
    /// Emu2-Gen, 32 for the tiny model).
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Negative prompt (markup). Default: upstream's, the empty prompt.
    #[arg(long, value_name = "PROMPT")]
    pub negative: Option<String>,
    /// Where to run the UNet and the VAE (overrides --backend).
    #[arg(long, value_name = "NAME")]
    pub decoder_backend: Option<String>,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

/// Image sizes are parsed by the library, so the server reads `size` the same way.
pub use emu::pipeline::parse_image_size as parse_size;

/// Checks that `path` names a .png file in an existing folder.
pub fn check_png_output(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if ext.as_deref() != Some("png") {
        return Err(PipelineError::Input(format!(
            "output `{}` must be a .png file (PNG is the only output format)",
            path.display()
        )));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(PipelineError::Input(format!(
                "the output folder `{}` does not exist",
                parent.display()
            )));
        }
    }
    Ok(())
}

/// Runs `emu generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let prompt = emu_prompt::parse_markup(&args.prompt)?;
    let negative = args.negative.as_deref().map(emu_prompt::parse_markup).transpose()?;
    let size = args.size.as_deref().map(parse_size).transpose()?;
    check_png_output(&args.output)?;
    for item in prompt.items().chain(negative.iter().flat_map(|p| p.items())) {
        let paths: Vec<&String> = match item {
            Item::Image(p) => vec![p],
            Item::Object(o) => o.subject.iter().collect(),
            Item::Video(v) => v.frames.iter().collect(),
            Item::Text(_) => vec![],
        };
        for p in paths {
            if !Path::new(p).is_file() {
                return Err(PipelineError::Input(format!(
                    "image `{p}` does not exist or is not a file"
                )));
            }
        }
    }
    let decoder_kind = match &args.decoder_backend {
        Some(name) => BackendKind::parse(name)?,
        None => BackendKind::parse(&args.model.backend)?,
    };
    let (kind, dir) = args.model.resolve(ModelFamily::Emu2Gen)?;
    let opts = GenerationOptions {
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        size,
        negative,
        latents: None,
    };
    let mut backends = args.model.backends();
    let (v, l) = args.model.open(kind, &mut backends)?;
    let d = backends.open(decoder_kind)?;
    with_backend!(v, |vb| with_backend!(l, |lb| with_backend!(d, |db| run_on(
        vb, lb, db, args, &prompt, &opts, &dir
    ))))
}

fn run_on<V: Backend, L: Backend, D: Backend>(
    vision: V,
    llm: L,
    decoder: D,
    args: &GenerateArgs,
    prompt: &Prompt,
    opts: &GenerationOptions,
    dir: &ModelDir,
) -> Result<()> {
    let (vision, llm) = args.model.components(&vision, &llm, dir)?;
    // --vision-dtype applies to the EVA encoder, --dtype to the LLM, the UNet and the VAE.
    let mut decoder = super::component(&decoder, llm.dtype, "UNet and VAE")?;
    decoder.quant = args.model.decoder_quant()?;
    let loading = super::progress::loading(dir.root());
    let mut pipe = GenerationPipeline::load_with_residency(dir, &vision, &llm, &decoder, args.offload.offload)?;
    drop(loading);
    pipe.set_dump(args.model.dump()?);
    let mut on_step = super::progress::steps("denoising");
    let img = pipe.generate(prompt, opts, Some(&mut on_step))?;
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.rgb)
        .ok_or_else(|| PipelineError::Input("the decoded image has the wrong number of pixels".into()))?;
    buf.save_with_format(&args.output, image::ImageFormat::Png)
        .map_err(|e| PipelineError::Input(format!("cannot write `{}`: {e}", args.output.display())))?;
    crate::outln!("wrote {} ({}x{})", args.output.display(), img.width, img.height)?;
    report_timings(args.model.verbose, pipe.load_timings(), &img.timings);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), (1024, 1024));
        assert_eq!(parse_size("768x512").unwrap(), (512, 768));
        assert!(parse_size("big").is_err());
        assert!(parse_size("12x").is_err());
    }
}
