//! Emu2-Gen: text to image, written as PNG.
//!
//! ```sh
//! cargo run -p emu-examples --example text_to_image -- [MODEL] "PROMPT" OUT.png
//! ```
//! With `tiny` the picture is noise from random weights, 32x32 pixels.

use emu::pipeline::{Component, GenerationOptions, GenerationPipeline, ModelDir, ModelFamily};
use emu_backend_cpu::CpuBackend;
use emu_prompt::{Item, Prompt};
use std::path::Path;

/// Generates `text` into `out`; returns `(width, height)`.
pub fn run(model: &str, text: &str, out: &Path, steps: usize) -> anyhow::Result<(usize, usize)> {
    let dir = ModelDir::resolve(model, ModelFamily::Emu2Gen)?;
    if dir.is_tiny() {
        // Random weights: say so, as the `emu` binary does.
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    let cpu = Component::new(CpuBackend::new(), emu_examples::dtype_for(model));
    // Vision encoder, LLM (regressing 64 visual embeddings) and UNet/VAE: three components.
    let pipe = GenerationPipeline::load(&dir, &cpu, &cpu, &cpu)?;
    let opts = GenerationOptions {
        steps,
        seed: 42, // the same seed gives the same picture
        ..GenerationOptions::default()
    };
    let prompt = Prompt::new(vec![Item::Text(text.to_string())]);
    let mut on_step = |k: usize, n: usize| eprint!("\rstep {k}/{n}");
    let img = pipe.generate(&prompt, &opts, Some(&mut on_step))?;
    eprintln!();
    let png = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.rgb)
        .ok_or_else(|| anyhow::anyhow!("the image has the wrong number of pixels"))?;
    png.save(out)?;
    println!("wrote {} ({}x{})", out.display(), img.width, img.height);
    Ok((img.width, img.height))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, text, out) = match args.as_slice() {
        [m, t, o] => (m.as_str(), t.as_str(), o.as_str()),
        [t, o] => ("tiny", t.as_str(), o.as_str()),
        _ => anyhow::bail!("usage: text_to_image [MODEL] PROMPT OUT.png"),
    };
    // Upstream samples 50 Euler steps; the tiny model needs few to show the loop.
    let steps = if model == "tiny" { 4 } else { 50 };
    run(model, text, Path::new(out), steps)?;
    Ok(())
}
