//! tokenizer.model (+ added_tokens.json) converted in Rust, against the same references.

mod common;

use common::*;
use emu_prompt::sentencepiece::{PieceType, SentencePieceModel};
use emu_prompt::{Compat, Emu2Tokenizer, Variant};

fn sp_tokenizer(variant: Variant, compat: Compat) -> Emu2Tokenizer {
    let added = fixtures().join(match variant {
        Variant::Chat => "added_tokens_chat.json",
        Variant::Base => "added_tokens_base.json",
    });
    Emu2Tokenizer::from_sentencepiece(llama_dir().join("tokenizer.model"), Some(&added), variant)
        .unwrap()
        .with_compat(compat)
}

#[test]
fn model_proto_fields() {
    let m = SentencePieceModel::from_file(llama_dir().join("tokenizer.model")).unwrap();
    assert_eq!(m.pieces.len(), 32000);
    assert_eq!((m.model_type, m.byte_fallback), (2, true));
    assert_eq!(m.normalizer, "identity");
    assert!(m.add_dummy_prefix && !m.remove_extra_whitespaces && m.escape_whitespaces);
    assert_eq!(m.pieces[3].piece, "<0x00>");
    assert_eq!(m.pieces[3].kind, PieceType::Byte);
    assert_eq!(m.pieces[1].kind, PieceType::Control);
    assert_eq!(m.pieces[29871].piece, "\u{2581}");
    assert_eq!(m.pieces.iter().filter(|p| p.kind == PieceType::Byte).count(), 256);
}

#[test]
fn converted_merges_equal_tokenizer_json() {
    let m = SentencePieceModel::from_file(llama_dir().join("tokenizer.model")).unwrap();
    let merges = m.bpe_merges();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama_dir().join("tokenizer.json")).unwrap()).unwrap();
    let want: Vec<(String, String)> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| match v {
            serde_json::Value::String(s) => {
                let (a, b) = s.split_once(' ').unwrap();
                (a.to_string(), b.to_string())
            }
            v => (v[0].as_str().unwrap().to_string(), v[1].as_str().unwrap().to_string()),
        })
        .collect();
    assert_eq!(merges.len(), want.len());
    let diff = merges.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(diff, None, "first differing merge rank");
}

#[test]
fn sentencepiece_ids_equal_reference() {
    let fx = load_json("tokenizer.json");
    for compat in [Compat::Slow, Compat::Fast] {
        let key = if compat == Compat::Slow { "slow" } else { "fast" };
        let chat = sp_tokenizer(Variant::Chat, compat);
        let base = sp_tokenizer(Variant::Base, compat);
        let mut n = 0;
        for case in fx["prompts"].as_array().unwrap() {
            let tok = if case["kind"] == "chat" { &chat } else { &base };
            let prompt: emu_prompt::Prompt = serde_json::from_value(case["prompt"].clone()).unwrap();
            let opts = emu_prompt::RenderOptions::new(match case["kind"].as_str().unwrap() {
                "chat" => emu_prompt::ModelKind::Emu2Chat,
                "gen" => emu_prompt::ModelKind::Emu2Gen,
                _ => emu_prompt::ModelKind::Emu2,
            })
            .grounding(case["grounding"].as_bool().unwrap_or(false));
            let rendered = emu_prompt::render(&prompt, &opts).unwrap();
            let got = tok.encode_pieces(&rendered.pieces).unwrap();
            let want = ids(&case[key]);
            assert!(
                got == want,
                "{} {key}: first difference at {:?}",
                case["name"],
                first_diff(&got, &want)
            );
            n += 1;
        }
        for case in fx["texts"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(chat.encode_markup(text).unwrap(), ids(&case[key]), "{text:?}");
            assert_eq!(
                base.encode_markup(text).unwrap(),
                ids(&case[&format!("{key}_base")]),
                "{text:?}"
            );
            n += 1;
        }
        for case in fx["decode"].as_array().unwrap() {
            let ids = ids(&case["ids"]);
            assert_eq!(chat.decode(&ids, false).unwrap(), case[key].as_str().unwrap());
            assert_eq!(
                chat.decode(&ids, true).unwrap(),
                case[&format!("{key}_skip")].as_str().unwrap()
            );
        }
        assert!(n >= 70);
    }
}

#[test]
fn directory_layout_and_errors() {
    let dir = std::env::temp_dir().join(format!("emu-prompt-sp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(llama_dir().join("tokenizer.model"), dir.join("tokenizer.model")).unwrap();
    std::fs::copy(fixtures().join("added_tokens_chat.json"), dir.join("added_tokens.json")).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "legacy": true}"#,
    )
    .unwrap();
    let tok = Emu2Tokenizer::from_dir(&dir, Variant::Chat).unwrap();
    assert_eq!(tok.encode_markup("[USER]: hi").unwrap(), vec![32272, 584, 7251]);
    // Chat's added tokens do not fit the base vocabulary.
    let err = Emu2Tokenizer::from_dir(&dir, Variant::Base).unwrap_err().to_string();
    assert!(err.contains("[USER]"), "{err}");
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"legacy": false}"#).unwrap();
    assert!(Emu2Tokenizer::from_dir(&dir, Variant::Chat).is_err());
    std::fs::write(dir.join("added_tokens.json"), r#"{"[IMG]": 32000}"#).unwrap();
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    let err = Emu2Tokenizer::from_dir(&dir, Variant::Chat).unwrap_err().to_string();
    assert!(err.contains("32000"), "{err}");
    // Truncated protobuf: cut inside a piece it is a parse error; either way loading fails.
    let bytes = std::fs::read(llama_dir().join("tokenizer.model")).unwrap();
    assert!(SentencePieceModel::parse(&bytes[..bytes.len() - 3]).is_err());
    std::fs::write(dir.join("tokenizer.model"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(dir.join("added_tokens.json")).unwrap();
    assert!(Emu2Tokenizer::from_dir(&dir, Variant::Chat).is_err());
    assert!(SentencePieceModel::parse(&[0x0a, 0x05, 0x0a]).is_err());
    assert!(SentencePieceModel::parse(&[0xff; 12]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sentencepiece_random_fragment_strings_equal_reference() {
    let bad = random_failures(
        &sp_tokenizer(Variant::Chat, Compat::Slow),
        &sp_tokenizer(Variant::Chat, Compat::Fast),
    );
    assert!(
        bad.is_empty(),
        "{} of 1200 differ:\n{}",
        bad.len(),
        bad[..bad.len().min(10)].join("\n")
    );
}
