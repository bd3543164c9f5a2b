//! The tiny model's tokenizer: a LLaMA-shaped byte-fallback BPE built in code.
//!
//! [`emu_prompt::Emu2Tokenizer`] expects what every Emu2 checkpoint has: the
//! 32000 LLaMA pieces (`<unk>`, `<s>`, `</s>`, the 256 byte pieces, then
//! SentencePiece pieces), on top of which it adds Emu2's special tokens at
//! their real ids. The tiny vocabulary keeps that shape exactly so that the
//! special tokens, the chat template and the image slots behave as with the
//! real model; only the ordinary pieces are synthetic: single characters,
//! lowercase letter pairs and triples, and `▁`-prefixed (word-initial) forms.
//! Any text tokenizes (unknown characters fall back to bytes).

use serde_json::{json, Map, Value};

/// SentencePiece's word-boundary marker.
const SPIECE: char = '\u{2581}';
/// Pieces in a LLaMA vocabulary.
const LLAMA_PIECES: usize = 32000;

/// The pieces in id order, and the merges (in rank order) that build every
/// multi-character piece from two shorter ones.
fn pieces_and_merges() -> (Vec<String>, Vec<(String, String)>) {
    let mut pieces: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let lower: Vec<char> = ('a'..='z').collect();
    let upper: Vec<char> = ('A'..='Z').collect();
    let mut singles = vec![SPIECE];
    singles.extend(&lower);
    singles.extend(&upper);
    singles.extend('0'..='9');
    singles.extend((0x21u8..=0x7e).map(char::from).filter(|c| c.is_ascii_punctuation()));
    pieces.extend(singles.iter().map(|c| c.to_string()));

    let mut merges: Vec<(String, String)> = Vec::new();
    let mut add = |pieces: &mut Vec<String>, left: String, right: String| {
        pieces.push(format!("{left}{right}"));
        merges.push((left, right));
    };
    // Word-initial letters, then letter pairs, then word-initial pairs.
    for c in lower.iter().chain(&upper) {
        add(&mut pieces, SPIECE.to_string(), c.to_string());
    }
    for a in &lower {
        for b in &lower {
            add(&mut pieces, a.to_string(), b.to_string());
        }
    }
    for a in &lower {
        for b in &lower {
            add(&mut pieces, format!("{SPIECE}{a}"), b.to_string());
        }
    }
    // Triples, then word-initial triples until the vocabulary is full.
    'outer: for pass in 0..2 {
        for a in &lower {
            for b in &lower {
                for c in &lower {
                    if pieces.len() == LLAMA_PIECES {
                        break 'outer;
                    }
                    let left = if pass == 0 {
                        format!("{a}{b}")
                    } else {
                        format!("{SPIECE}{a}{b}")
                    };
                    add(&mut pieces, left, c.to_string());
                }
            }
        }
    }
    (pieces, merges)
}

/// A `tokenizer.json` (HF `tokenizers` format) holding the tiny BPE model.
/// It lists no added tokens: the Emu2 ones are added by
/// [`emu_prompt::Emu2Tokenizer::from_tokenizer_json`] at their upstream ids.
pub fn tokenizer_json() -> Value {
    let (pieces, merges) = pieces_and_merges();
    debug_assert_eq!(pieces.len(), LLAMA_PIECES);
    let mut vocab = Map::with_capacity(pieces.len());
    for (id, p) in pieces.into_iter().enumerate() {
        vocab.insert(p, json!(id));
    }
    let merges: Vec<Value> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_is_llama_shaped() {
        let (pieces, merges) = pieces_and_merges();
        assert_eq!(pieces.len(), LLAMA_PIECES);
        let unique: std::collections::HashSet<&String> = pieces.iter().collect();
        assert_eq!(unique.len(), pieces.len(), "pieces must be unique");
        assert_eq!(pieces[3], "<0x00>");
        assert_eq!(pieces[258], "<0xFF>");
        for (a, b) in &merges {
            assert!(
                unique.contains(a) && unique.contains(b),
                "merge {a} {b} uses unknown pieces"
            );
        }
    }
}
