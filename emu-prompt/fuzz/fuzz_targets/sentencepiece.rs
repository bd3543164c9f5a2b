//! The SentencePiece `tokenizer.model` reader (protobuf wire format, pieces,
//! trainer and normalizer specs) and the LLaMA checks and BPE conversion
//! behind it: a tokenizer or an error, never a panic.
#![no_main]

use emu_prompt::sentencepiece::SentencePieceModel;
use emu_prompt::{Emu2Tokenizer, Variant};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = SentencePieceModel::parse(data) else { return };
    let _ = m.bpe_merges();
    // The full loader goes through a file, as users' tokenizers do.
    let dir = std::env::temp_dir().join(format!("emu-prompt-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tokenizer.model");
    std::fs::write(&p, data).unwrap();
    if let Ok(tok) = Emu2Tokenizer::from_sentencepiece(&p, None, Variant::Chat) {
        let _ = tok.encode_markup("a photo of <s> [IMG] cat");
    }
});
