//! Emu2-Chat: ask a question about an image and stream the answer.
//!
//! ```sh
//! cargo run -p emu-examples --example chat -- [MODEL] IMAGE "QUESTION"
//! ```
//! MODEL is `tiny` (the default: random weights, meaningless answers), a
//! BAAI/Emu2-Chat directory, or that repo id in the local Hugging Face cache.

use emu::pipeline::{upstream_generation, ChatOptions, ChatPipeline, Component, ModelDir, ModelFamily};
use emu_backend_cpu::CpuBackend;
use emu_prompt::{Item, Prompt};
use std::io::Write;

/// Answers `question` about `image` with the model `model`; returns the answer.
pub fn run(model: &str, image: &str, question: &str) -> anyhow::Result<String> {
    // Find the checkpoint (or build the tiny one) and check it is Emu2-Chat.
    let dir = ModelDir::resolve(model, ModelFamily::Emu2Chat)?;
    if dir.is_tiny() {
        // Random weights: say so, as the `emu` binary does.
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    // Each component gets its own backend and dtype; here both run on the CPU.
    let cpu = Component::new(CpuBackend::new(), emu_examples::dtype_for(model));
    let chat = ChatPipeline::load(&dir, &cpu, &cpu)?;

    // A prompt is typed: images and text in order (no markup parsing needed).
    let prompt = Prompt::new(vec![Item::Image(image.to_string()), Item::Text(question.to_string())]);
    let opts = ChatOptions {
        // Upstream decodes with 5 beams; greedy search (1 beam) can stream.
        generation: emu_llm::GenerationConfig {
            num_beams: 1,
            max_new_tokens: 32,
            // Stop at the end of the first sentence, as transformers' `stop_strings`.
            stop_strings: vec![".".into()],
            ..upstream_generation()
        },
        ..ChatOptions::default()
    };
    let mut print = |piece: &str| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    };
    let answer = chat.answer(&prompt, &opts, Some(&mut print))?;
    println!();
    eprintln!(
        "{} prompt tokens, {} answer tokens",
        answer.prompt_tokens,
        answer.ids.len()
    );
    Ok(answer.text)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, image, question) = match args.as_slice() {
        [m, i, q] => (m.as_str(), i.as_str(), q.as_str()),
        [i, q] => ("tiny", i.as_str(), q.as_str()),
        _ => anyhow::bail!("usage: chat [MODEL] IMAGE QUESTION"),
    };
    run(model, image, question)?;
    Ok(())
}
