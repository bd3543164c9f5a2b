//! Emu2 (base): few-shot, in-context completion of an interleaved prompt.
//! Two solved examples (image, then "colour, count") and a third image to
//! complete, as in the Emu2 paper's few-shot evaluation.
//!
//! ```sh
//! cargo run -p emu-examples --example few_shot -- [MODEL] [IMAGE1 IMAGE2 IMAGE3]
//! ```
//! Without images, three synthetic ones (coloured squares) are drawn.

use emu::pipeline::{upstream_generation, CompletionOptions, CompletionPipeline, Component, ModelDir, ModelFamily};
use emu_backend_cpu::CpuBackend;
use emu_prompt::{Item, Prompt};
use std::path::{Path, PathBuf};

/// Writes `n` squares of `rgb` on a grey 64x64 canvas to `path` (PNG).
fn draw_squares(path: &Path, rgb: [u8; 3], n: u32) -> anyhow::Result<()> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        let (cell, inside) = (x / 20, x % 20 >= 4 && y % 20 >= 4 && y < 20);
        if cell < n && inside {
            image::Rgb(rgb)
        } else {
            image::Rgb([128, 128, 128])
        }
    });
    img.save(path)?;
    Ok(())
}

/// Three demo images in `dir`: 3 red squares, 2 blue, 1 green.
pub fn demo_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (name, rgb, n) in [
        ("red", [220, 30, 30], 3),
        ("blue", [30, 30, 220], 2),
        ("green", [30, 200, 30], 1),
    ] {
        let p = dir.join(format!("{name}.png"));
        draw_squares(&p, rgb, n)?;
        out.push(p);
    }
    Ok(out)
}

/// Completes "[img1][red, 3].[img2][blue, 2].[img3]" and returns the continuation.
pub fn run(model: &str, images: &[PathBuf]) -> anyhow::Result<String> {
    anyhow::ensure!(images.len() == 3, "few_shot needs three images");
    let dir = ModelDir::resolve(model, ModelFamily::Emu2)?;
    if dir.is_tiny() {
        // Random weights: say so, as the `emu` binary does.
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    let cpu = Component::new(CpuBackend::new(), emu_examples::dtype_for(model));
    let pipe = CompletionPipeline::load(&dir, &cpu, &cpu)?;
    let image = |p: &PathBuf| Item::Image(p.to_string_lossy().into_owned());
    let prompt = Prompt::new(vec![
        image(&images[0]),
        Item::Text("[red, 3].".into()),
        image(&images[1]),
        Item::Text("[blue, 2].".into()),
        image(&images[2]),
    ]);
    let opts = CompletionOptions {
        // Upstream's beam search, but the answer is short: stop after "]".
        generation: emu_llm::GenerationConfig {
            max_new_tokens: 12,
            stop_strings: vec!["]".into()],
            ..upstream_generation()
        },
    };
    let answer = pipe.complete(&prompt, &opts, None)?;
    println!("{}", answer.text);
    Ok(answer.text)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map(String::as_str).unwrap_or("tiny");
    let tmp = std::env::temp_dir().join("emu-few-shot-demo");
    let images: Vec<PathBuf> = if args.len() == 4 {
        args[1..].iter().map(PathBuf::from).collect()
    } else {
        std::fs::create_dir_all(&tmp)?;
        demo_images(&tmp)?
    };
    run(model, &images)?;
    Ok(())
}
