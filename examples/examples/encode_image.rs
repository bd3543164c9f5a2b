//! The EVA-CLIP vision encoder on its own: image features, pooled tokens and
//! the embeddings the LLM would receive, without loading the LLM.
//!
//! ```sh
//! cargo run -p emu-examples --example encode_image -- [MODEL] IMAGE...
//! ```

use emu::pipeline::{ModelDir, ModelFamily};
use emu_backend_cpu::CpuBackend;
use emu_vision::{Preprocessor, VisionEncoder};

/// Encodes `images`; returns the dims of (features, pooled, projected).
pub fn run(model: &str, images: &[String]) -> anyhow::Result<[Vec<usize>; 3]> {
    // Any Emu2 model carries the encoder; the Emu2 (base) layout is the plainest.
    let dir = ModelDir::resolve(model, ModelFamily::Emu2)?;
    if dir.is_tiny() {
        // Random weights: say so, as the `emu` binary does.
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    let cpu = CpuBackend::new();
    let encoder = VisionEncoder::from_dir(&cpu, dir.encoder_dir(), emu_examples::dtype_for(model))?;
    // PIL-exact bicubic resize to the encoder's size and CLIP normalisation.
    let pre = Preprocessor::for_config(&encoder.config().vision)?;
    let pixels = pre.batch_from_paths(&cpu, images)?;
    let features = encoder.encode(&pixels)?; // [N, 1 + grid², width], CLS first
                                             // Emu2 pools the patch grid to 64 tokens per image (Emu2-Chat: 256); the
                                             // tiny model's 8x8 grid pools to 4.
    let n_query = if model == "tiny" { 4 } else { 64 };
    let pooled = encoder.pool(&features, n_query)?;
    let projected = encoder.project(&pooled)?; // into the LLM's hidden size
    for (name, t) in [("features", &features), ("pooled", &pooled), ("projected", &projected)] {
        let v = t.to_f32_vec()?;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        println!("{name:>9}: {:?}, mean {mean:.4}", t.dims());
    }
    Ok([features.dims(), pooled.dims(), projected.dims()])
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!args.is_empty(), "usage: encode_image [MODEL] IMAGE...");
    let model = if args.len() > 1 && !std::path::Path::new(&args[0]).is_file() {
        args.remove(0)
    } else {
        "tiny".to_string()
    };
    run(&model, &args)?;
    Ok(())
}
