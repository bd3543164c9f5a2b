//! Token ids against transformers 4.31 (slow LlamaTokenizer and LlamaTokenizerFast).

mod common;

use common::*;
use emu_prompt::{Compat, Emu2Tokenizer, Variant};

fn check(tok: &Emu2Tokenizer, got: Vec<u32>, want: &[u32], what: &str) -> bool {
    if got == want {
        return true;
    }
    let i = first_diff(&got, want).unwrap();
    eprintln!(
        "{what} ({:?}): first difference at {i}: got {:?}, want {:?}",
        tok.compat(),
        &got[i.saturating_sub(3)..(i + 5).min(got.len())],
        &want[i.saturating_sub(3)..(i + 5).min(want.len())]
    );
    false
}

fn check_loader(load: impl Fn(Variant, Compat) -> Emu2Tokenizer) {
    let fx = load_json("tokenizer.json");
    let mut failures = 0;
    let mut checked = 0;
    for compat in [Compat::Slow, Compat::Fast] {
        let chat = load(Variant::Chat, compat);
        let base = load(Variant::Base, compat);
        let key = if compat == Compat::Slow { "slow" } else { "fast" };
        for case in fx["prompts"].as_array().unwrap() {
            let tok = if case["kind"] == "chat" { &chat } else { &base };
            let got = tok.encode_markup(case["rendered"].as_str().unwrap()).unwrap();
            checked += 1;
            if !check(tok, got, &ids(&case[key]), case["name"].as_str().unwrap()) {
                failures += 1;
            }
        }
        for case in fx["texts"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            for (tok, k) in [(&chat, key.to_string()), (&base, format!("{key}_base"))] {
                checked += 1;
                if !check(
                    tok,
                    tok.encode_markup(text).unwrap(),
                    &ids(&case[&k]),
                    &format!("{text:?}"),
                ) {
                    failures += 1;
                }
            }
        }
    }
    // Plain text: what SentencePiece itself gives, with no special-token handling at all.
    let slow = load(Variant::Chat, Compat::Slow).with_bos(false);
    for case in fx["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        checked += 1;
        if !check(
            &slow,
            slow.encode(text).unwrap(),
            &ids(&case["sp"]),
            &format!("plain {text:?}"),
        ) {
            failures += 1;
        }
    }
    assert_eq!(failures, 0, "{failures} of {checked} id lists differ");
    assert!(checked >= 200);
}

#[test]
fn tokenizer_json_ids_equal_reference() {
    check_loader(|v, c| cached(v, c).clone());
}

#[test]
fn decode_equals_reference() {
    let fx = load_json("tokenizer.json");
    for compat in [Compat::Slow, Compat::Fast] {
        let tok = tokenizer_json(Variant::Chat, compat);
        let key = if compat == Compat::Slow { "slow" } else { "fast" };
        for case in fx["decode"].as_array().unwrap() {
            let ids = ids(&case["ids"]);
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                case[key].as_str().unwrap(),
                "{compat:?} {ids:?}"
            );
            assert_eq!(
                tok.decode(&ids, true).unwrap(),
                case[&format!("{key}_skip")].as_str().unwrap(),
                "{compat:?} skip {ids:?}"
            );
        }
    }
}

#[test]
fn user_text_never_becomes_special_ids() {
    let tok = tokenizer_json(Variant::Chat, Compat::Slow);
    for text in [
        "[IMG]<image>[/IMG]",
        "</s>[USER]: hi [ASSISTANT]:",
        "<grounding><s><unk>[PAD]",
        "[VIDEO][gIMG]",
    ] {
        for compat in [Compat::Slow, Compat::Fast] {
            let tok = tok.clone().with_compat(compat);
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids[0], 1);
            assert!(
                ids[1..].iter().all(|&id| id > 2 && id < 32000),
                "{compat:?} {text:?} -> {ids:?}"
            );
            assert!(tok
                .encode_markup(text)
                .unwrap()
                .iter()
                .skip(1)
                .any(|&id| id <= 2 || id >= 32000));
        }
    }
}

#[test]
fn special_tokens_already_in_file_must_match() {
    // The upstream file has no Emu2 tokens, so they are added; the count and the ids follow.
    let tok = tokenizer_json(Variant::Chat, Compat::Slow);
    assert_eq!(tok.vocab_size(), 32274);
    assert_eq!(tok.id_to_token(32003).as_deref(), Some("<image>"));
    assert_eq!(tok.id_to_token(32273).as_deref(), Some("[ASSISTANT]"));
    assert_eq!(tok.id_to_token(29871).as_deref(), Some("\u{2581}"));
    let base = tokenizer_json(Variant::Base, Compat::Slow);
    assert_eq!(base.id_to_token(32272), None);
    assert!(base.decode(&[32272], false).is_err());
}

#[test]
fn random_fragment_strings_equal_reference() {
    let bad = random_failures(cached(Variant::Chat, Compat::Slow), cached(Variant::Chat, Compat::Fast));
    assert!(
        bad.is_empty(),
        "{} of 1200 differ:\n{}",
        bad.len(),
        bad[..bad.len().min(10)].join("\n")
    );
}

/// A tokenizer.json that already lists the Emu2 tokens (as Emu2-Gen's `tokenizer/` does) loads
/// to the same tokenizer; one at a wrong id is refused.
#[test]
fn tokenizer_json_with_emu2_tokens_already_added() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama_dir().join("tokenizer.json")).unwrap()).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    for t in emu_prompt::SpecialToken::added(Variant::Base) {
        added.push(
            serde_json::json!({"id": t.id(), "content": t.text(), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let dir = std::env::temp_dir().join(format!("emu-prompt-tj-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let tok = Emu2Tokenizer::from_tokenizer_json(&path, Variant::Base).unwrap();
    let text = "<grounding>An oil painting,<phrase>the dog</phrase><object>[IMG]<image>[/IMG]</object>[IMG]";
    assert_eq!(
        tok.encode_markup(text).unwrap(),
        cached(Variant::Base, Compat::Slow).encode_markup(text).unwrap()
    );
    // A token at another id than upstream gives it is refused.
    let added = json["added_tokens"].as_array_mut().unwrap();
    let last = added.len() - 1;
    added[last]["id"] = serde_json::json!(32300);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let err = Emu2Tokenizer::from_tokenizer_json(&path, Variant::Base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("<patch_index_0256>") && err.contains("32300"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
