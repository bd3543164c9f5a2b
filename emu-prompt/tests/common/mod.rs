//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use emu_prompt::{Compat, Emu2Tokenizer, Variant};

/// `tests/fixtures/prompt` in the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/prompt")
}

/// The upstream LLaMA tokenizer files (`../shared` beside the checkout; never committed).
pub fn llama_dir() -> PathBuf {
    let shared = std::env::var_os("EMU_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let dir = shared.join("reference/emu2-conf/llama_config");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: these tests read the upstream tokenizer from ../shared (set EMU_SHARED)",
        dir.display()
    );
    dir
}

pub fn load_json(name: &str) -> serde_json::Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/reference/make_fixtures.py prompt)", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn tokenizer_json(variant: Variant, compat: Compat) -> Emu2Tokenizer {
    Emu2Tokenizer::from_tokenizer_json(llama_dir().join("tokenizer.json"), variant)
        .unwrap()
        .with_compat(compat)
}

pub fn variant_of(kind: &str) -> Variant {
    if kind == "chat" {
        Variant::Chat
    } else {
        Variant::Base
    }
}

/// First index where two id lists differ, for readable failures.
pub fn first_diff(a: &[u32], b: &[u32]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

/// Loaded once per test binary (loading parses a 1.8 MB JSON).
pub fn cached(variant: Variant, compat: Compat) -> &'static Emu2Tokenizer {
    use std::sync::OnceLock;
    static TOKS: OnceLock<[Emu2Tokenizer; 4]> = OnceLock::new();
    let toks = TOKS.get_or_init(|| {
        let chat = tokenizer_json(Variant::Chat, Compat::Slow);
        let base = tokenizer_json(Variant::Base, Compat::Slow);
        [
            chat.clone(),
            chat.with_compat(Compat::Fast),
            base.clone(),
            base.with_compat(Compat::Fast),
        ]
    });
    let i = match variant {
        Variant::Chat => 0,
        Variant::Base => 2,
    } + usize::from(compat == Compat::Fast);
    &toks[i]
}

/// The 400 random fragment strings: raw markup (slow, fast) and plain text (SentencePiece).
/// Returns the descriptions of the cases that differ.
pub fn random_failures(slow: &Emu2Tokenizer, fast: &Emu2Tokenizer) -> Vec<String> {
    let fx = load_json("tokenizer.json");
    let cases = fx["random"].as_array().unwrap();
    assert!(cases.len() >= 400);
    let plain = slow.clone().with_bos(false);
    let mut bad = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        for (what, got, key) in [
            ("slow", slow.encode_markup(text).unwrap(), "slow"),
            ("fast", fast.encode_markup(text).unwrap(), "fast"),
            ("plain", plain.encode(text).unwrap(), "sp"),
        ] {
            if got != ids(&case[key]) {
                bad.push(format!("{what} {text:?}: got {got:?} want {:?}", ids(&case[key])));
            }
        }
    }
    bad
}
