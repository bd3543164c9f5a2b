//! Rendered prompts and their ids against the upstream templates run through transformers 4.31.

mod common;

use common::*;
use emu_prompt::{render, Compat, Item, ModelKind, Piece, Prompt, RenderOptions, SpecialToken, VisualInput};

fn kind_of(kind: &str) -> ModelKind {
    match kind {
        "chat" => ModelKind::Emu2Chat,
        "gen" => ModelKind::Emu2Gen,
        _ => ModelKind::Emu2,
    }
}

fn options(case: &serde_json::Value) -> RenderOptions {
    RenderOptions::new(kind_of(case["kind"].as_str().unwrap())).grounding(case["grounding"].as_bool().unwrap_or(false))
}

#[test]
fn rendered_text_and_ids_equal_reference() {
    let fx = load_json("tokenizer.json");
    let cases = fx["prompts"].as_array().unwrap();
    assert!(cases.len() >= 50);
    let mut kinds = std::collections::HashSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt: Prompt = serde_json::from_value(case["prompt"].clone()).unwrap();
        let rendered = render(&prompt, &options(case)).unwrap();
        assert_eq!(rendered.text(), case["rendered"].as_str().unwrap(), "{name}");
        let variant = variant_of(case["kind"].as_str().unwrap());
        for (compat, key) in [(Compat::Slow, "slow"), (Compat::Fast, "fast")] {
            let tok = cached(variant, compat);
            let got = tok.encode_pieces(&rendered.pieces).unwrap();
            let want = ids(&case[key]);
            assert!(
                got == want,
                "{name} {key}: first difference at {:?}",
                first_diff(&got, &want)
            );
        }
        // Slot counts agree with the pictures the prompt carries.
        let slow = ids(&case["slow"]);
        let n_query = if case["kind"] == "chat" { 256 } else { 64 };
        let image_slots = slow.iter().filter(|&&i| i == SpecialToken::Image.id()).count();
        let frame_slots = slow.iter().filter(|&&i| i == SpecialToken::GImg.id()).count();
        assert_eq!(image_slots, rendered.images.len() * n_query, "{name}");
        assert_eq!(frame_slots, rendered.frames.len() * 64, "{name}");
        kinds.insert((
            case["kind"].as_str().unwrap().to_string(),
            case["grounding"].as_bool().unwrap_or(false),
        ));
    }
    assert_eq!(
        kinds.len(),
        4,
        "base, chat, chat grounding and gen templates are all covered"
    );
}

#[test]
fn user_markup_stays_text() {
    let fx = load_json("tokenizer.json");
    for case in fx["safety"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt: Prompt = serde_json::from_value(case["prompt"].clone()).unwrap();
        let rendered = render(&prompt, &options(case)).unwrap();
        assert_eq!(rendered.text(), case["rendered_raw"].as_str().unwrap(), "{name}");
        let tok = cached(variant_of(case["kind"].as_str().unwrap()), Compat::Slow);
        let safe = tok.encode_pieces(&rendered.pieces).unwrap();
        assert_eq!(safe, ids(&case["safe_slow"]), "{name}");
        // Reading the same string as markup (what a naive port does) forges tokens.
        let raw = tok.encode_markup(&rendered.text()).unwrap();
        assert_eq!(raw, ids(&case["raw_slow"]), "{name}");
        assert_ne!(safe, raw, "{name}");
        // In the safe ids, every special id comes from the template, none from the user text.
        let template_specials = rendered
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Special(_)))
            .count();
        let safe_specials = safe.iter().skip(1).filter(|&&i| i <= 2 || i >= 32000).count();
        assert_eq!(safe_specials, template_specials, "{name}");
    }
}

#[test]
fn gen_objects_become_masks_and_subjects() {
    let prompt = Prompt::from_json(
        r#"{"turns":[{"role":"user","items":[{"text":"two dogs,"},
            {"object":{"phrase":"a dog","box":[300,20,10,500],"subject":"dog.png"}},
            {"object":{"box":[0,0,10,10]}}]}]}"#,
    )
    .unwrap();
    let r = render(&prompt, &RenderOptions::new(ModelKind::Emu2Gen)).unwrap();
    assert_eq!(r.images.len(), 3);
    match &r.images[0] {
        VisualInput::BoxMask(m) => assert_eq!((m.left, m.top, m.right, m.bottom), (10, 20, 300, 448)),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.images[1], VisualInput::Image("dog.png".into()));
    assert!(matches!(r.images[2], VisualInput::BoxMask(_)));
    let text = r.text();
    assert!(text.starts_with("<grounding>two dogs,<phrase>a dog</phrase><object>[IMG]<image>"));
    assert!(text.ends_with("[/IMG]</object>[IMG]"));
}

#[test]
fn invalid_prompts_are_reported() {
    let chat = RenderOptions::new(ModelKind::Emu2Chat);
    let obj = Prompt::new(vec![Item::Object(emu_prompt::GroundedObject {
        phrase: None,
        bbox: [0, 0, 1, 1],
        subject: None,
    })]);
    assert!(render(&obj, &chat).is_err());
    assert!(render(&obj, &RenderOptions::new(ModelKind::Emu2)).is_err());
    let video = Prompt::new(vec![Item::Video(emu_prompt::Video {
        frames: vec!["a".into()],
    })]);
    assert!(render(&video, &RenderOptions::new(ModelKind::Emu2Gen)).is_err());
    let empty_video = Prompt::new(vec![Item::Video(emu_prompt::Video { frames: vec![] })]);
    assert!(render(&empty_video, &chat).is_err());
    let two_turns: Prompt = serde_json::from_str(
        r#"{"turns":[{"role":"user","items":[{"text":"a"}]},{"role":"assistant","items":[{"text":"b"}]}]}"#,
    )
    .unwrap();
    assert!(render(&two_turns, &chat).is_err(), "must end with a user turn");
    assert!(render(&two_turns, &RenderOptions::new(ModelKind::Emu2)).is_err());
    assert!(render(&Prompt { turns: vec![] }, &chat).is_err());
    assert!(render(
        &Prompt::new(vec![]),
        &RenderOptions::new(ModelKind::Emu2).grounding(true)
    )
    .is_err());
}
