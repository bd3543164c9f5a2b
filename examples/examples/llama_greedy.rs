//! The LLaMA decoder on its own: greedy decoding from token ids, with the
//! model's tokenizer to turn text into ids and back.
//!
//! ```sh
//! cargo run -p emu-examples --example llama_greedy -- [MODEL] "TEXT"
//! ```

use emu::pipeline::{ModelDir, ModelFamily};
use emu_backend_cpu::CpuBackend;
use emu_core::checkpoint::Checkpoint;
use emu_llm::{generate, lm_weights, GenerationConfig, Llama, LlamaConfig};
use emu_prompt::{Emu2Tokenizer, Variant};

/// Continues `text` greedily for `n` tokens; returns the new ids.
pub fn run(model: &str, text: &str, n: usize) -> anyhow::Result<Vec<u32>> {
    let dir = ModelDir::resolve(model, ModelFamily::Emu2)?;
    if dir.is_tiny() {
        // Random weights: say so, as the `emu` binary does.
        eprintln!("{}", emu::tiny::TINY_NOTICE);
    }
    let cpu = CpuBackend::new();
    // The LLaMA hyper-parameters sit at the top level of Emu2's config.json.
    let cfg = LlamaConfig::from_file(dir.encoder_dir().join("config.json"))?;
    let ckpt = Checkpoint::open_dir(dir.encoder_dir(), None)?;
    // `lm_weights` finds the decoder's keys (`model.decoder.lm.*` in HF layouts).
    let llm = Llama::load(&cpu, &lm_weights(&ckpt)?, &cfg, emu_examples::dtype_for(model))?;

    let tokenizer = Emu2Tokenizer::from_dir(dir.tokenizer_dir(), Variant::Base)?;
    let ids = tokenizer.encode(text)?; // starts with <s>
                                       // The model is fed embeddings (so image slots can be filled); plain text
                                       // just embeds its ids. Batch of one: [1, T, hidden].
    let embeds = llm.embed(&ids, 1)?;
    let greedy = GenerationConfig {
        max_new_tokens: n,
        eos_token_ids: vec![2], // </s>
        ..GenerationConfig::default()
    };
    let mut out = generate(&llm, &embeds, &[], &greedy, None)?.remove(0);
    out.retain(|&id| id != 2);
    println!("prompt ids {ids:?}");
    println!("new ids    {out:?}");
    println!("text       {:?}", tokenizer.decode(&out, true)?);
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, text) = match args.as_slice() {
        [m, t] => (m.as_str(), t.as_str()),
        [t] => ("tiny", t.as_str()),
        _ => anyhow::bail!("usage: llama_greedy [MODEL] TEXT"),
    };
    run(model, text, 16)?;
    Ok(())
}
