//! The diffusion decoder on its own (UNet + Euler with classifier-free
//! guidance + VAE): an image from visual embeddings, here random ones, as
//! when testing a decoder without the LLM that regresses them.
//!
//! ```sh
//! cargo run -p emu-examples --example diffusion_decoder -- [MODEL] OUT.png
//! ```

use emu::pipeline::{gaussian_noise, ModelDir, ModelFamily};
use emu_backend_cpu::CpuBackend;
use emu_core::{HostTensor, Tensor};
use emu_decoder::unet::PerBlock;
use emu_decoder::{DiffusionDecoder, SamplingParams};
use std::path::Path;

/// Decodes random embeddings into `out`; returns `(width, height)`.
pub fn run(model: &str, out: &Path, steps: usize) -> anyhow::Result<(usize, usize)> {
    let dir = ModelDir::resolve(model, ModelFamily::Emu2Gen)?;
    if dir.is_tiny() {
        // Random weights: say so, as the `emu` binary does.
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    let cpu = CpuBackend::new();
    let dtype = emu_examples::dtype_for(model);
    // unet/, vae/ and scheduler/ of the Emu2-Gen (diffusers) folder.
    let decoder = DiffusionDecoder::load_dir(&cpu, dir.root(), None, dtype)?;
    // The width the UNet's cross-attention reads (Emu2-Gen: 1792, EVA's width).
    let width = match &decoder.unet.config().cross_attention_dim {
        PerBlock::One(w) => *w,
        PerBlock::Each(w) => w[0],
    };
    let size = if model == "tiny" { 32 } else { 1024 };
    let f = decoder.vae.config().downscale_factor();
    let channels = decoder.unet.config().in_channels;

    // Emu2-Gen's condition is 64 embeddings; the negative, zeros here (upstream
    // regresses it from an empty prompt).
    let randn = |seed: u64, dims: &[usize]| -> anyhow::Result<Tensor<CpuBackend>> {
        let n = dims.iter().product();
        let host = HostTensor::from_f32(dims, gaussian_noise(seed, n))?;
        Ok(Tensor::from_host(&cpu, &host)?.to_dtype(dtype)?)
    };
    let cond = randn(1, &[1, 64, width])?;
    let uncond = Tensor::zeros(&cpu, &[1, 64, width], dtype)?;
    let noise = randn(2, &[1, channels, size / f, size / f])?;
    let params = SamplingParams {
        height: size,
        width: size,
        num_inference_steps: steps,
        ..SamplingParams::default()
    };
    let images = decoder.generate(&cond, Some(&uncond), &noise, &params, &mut |p| {
        eprint!("\rstep {}/{} (t = {:.0})", p.step, p.total, p.timestep)
    })?;
    eprintln!();
    let img = &images[0];
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .ok_or_else(|| anyhow::anyhow!("the image has the wrong number of pixels"))?
        .save(out)?;
    println!("wrote {} ({}x{})", out.display(), img.width, img.height);
    Ok((img.width, img.height))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, out) = match args.as_slice() {
        [m, o] => (m.as_str(), o.as_str()),
        [o] => ("tiny", o.as_str()),
        _ => anyhow::bail!("usage: diffusion_decoder [MODEL] OUT.png"),
    };
    let steps = if model == "tiny" { 4 } else { 50 };
    run(model, Path::new(out), steps)?;
    Ok(())
}
