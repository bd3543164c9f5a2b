//! The plain-text markup: parsing, positioned errors, round-trips.

mod common;

use common::*;
use emu_prompt::{
    parse_markup, render, to_markup, Error, GroundedObject, Item, ModelKind, Prompt, RenderOptions, Role,
};

fn err_at(src: &str) -> (usize, usize, usize, String) {
    match parse_markup(src) {
        Err(Error::Markup {
            offset,
            line,
            column,
            message,
        }) => (offset, line, column, message),
        other => panic!("{src:?} should not parse: {other:?}"),
    }
}

#[test]
fn parses_every_element() {
    let p = parse_markup(
        r#"An oil painting of {image "my dog.jpg"}{video f0.png f1.png}{object box=22,14,224,224 phrase="the first dog" subject=dog1.jpg}{object box=-5,0,10,500}{{literal}}"#,
    )
    .unwrap();
    assert_eq!(
        p,
        Prompt::new(vec![
            Item::Text("An oil painting of ".into()),
            Item::Image("my dog.jpg".into()),
            Item::Video(emu_prompt::Video {
                frames: vec!["f0.png".into(), "f1.png".into()]
            }),
            Item::Object(GroundedObject {
                phrase: Some("the first dog".into()),
                bbox: [22, 14, 224, 224],
                subject: Some("dog1.jpg".into())
            }),
            Item::Object(GroundedObject {
                phrase: None,
                bbox: [-5, 0, 10, 500],
                subject: None
            }),
            Item::Text("{literal}".into()),
        ])
    );
}

#[test]
fn chat_turns_one_per_line() {
    let src = "{user} {image dog.jpg}What animal is this?\n{assistant} A dog.\n{user} What colour is it?\n";
    let p = parse_markup(src).unwrap();
    assert_eq!(p.turns.len(), 3);
    assert_eq!(p.turns[1].role, Role::Assistant);
    assert_eq!(
        p.turns[0].items,
        vec![Item::Image("dog.jpg".into()), Item::Text("What animal is this?".into())]
    );
    assert_eq!(p.turns[2].items, vec![Item::Text("What colour is it?".into())]);
    // Rendering gives upstream's template.
    let r = render(&p, &RenderOptions::new(ModelKind::Emu2Chat)).unwrap();
    assert!(r
        .text()
        .ends_with("What animal is this? [ASSISTANT]: A dog.</s>[USER]: What colour is it? [ASSISTANT]:"));
    // Text before the first marker is a user turn.
    let p = parse_markup("hello {assistant} hi {user} bye").unwrap();
    assert_eq!(p.turns.len(), 3);
    assert_eq!(p.turns[0].items, vec![Item::Text("hello".into())]);
    // Without markers every character counts.
    let p = parse_markup("  spaced  ").unwrap();
    assert_eq!(p, Prompt::new(vec![Item::Text("  spaced  ".into())]));
    let p = parse_markup("{user}{text \" kept \"}").unwrap();
    assert_eq!(p.turns[0].items, vec![Item::Text(" kept ".into())]);
}

#[test]
fn errors_point_at_the_problem() {
    let cases: &[(&str, usize, usize, usize, &str)] = &[
        ("abc {image}", 5, 1, 6, "takes 1 value"),
        ("abc\n  {imag x}", 7, 2, 4, "unknown element 'imag'"),
        ("x {image a.jpg", 2, 1, 3, "unclosed"),
        ("x } y", 2, 1, 3, "unmatched '}'"),
        ("{object phrase=dog}", 1, 1, 2, "needs box="),
        ("{object box=1,2,3}", 12, 1, 13, "four comma-separated"),
        ("{object box=1,2,x,4}", 12, 1, 13, "coordinate 3"),
        ("{object box=1,2,3,4 colour=red}", 20, 1, 21, "unknown key 'colour'"),
        ("{object box=1,2,3,4 box=1,2,3,4}", 20, 1, 21, "given twice"),
        ("{object 1,2,3,4}", 8, 1, 9, "expected box="),
        ("{image \"a.jpg}", 7, 1, 8, "unterminated"),
        ("{image \"a\\q\"}", 9, 1, 10, "unknown escape"),
        ("{image \"a\"b}", 10, 1, 11, "after a quoted string"),
        ("{user x}", 6, 1, 7, "takes no values"),
        ("{}", 1, 1, 2, "expected an element name"),
        ("{image a=b}", 7, 1, 8, "takes no 'a=' argument"),
        ("{object box=}", 12, 1, 13, "expected a value"),
        ("日本 {vid x}", 8, 1, 5, "unknown element 'vid'"),
    ];
    for &(src, offset, line, column, what) in cases {
        let (o, l, c, m) = err_at(src);
        assert!(m.contains(what), "{src:?}: {m}");
        assert_eq!((o, l, c), (offset, line, column), "{src:?}: {m}");
        let shown = Error::Markup {
            offset: o,
            line: l,
            column: c,
            message: m,
        }
        .to_string();
        assert!(shown.contains(&format!("line {line}, column {column}")));
    }
}

#[test]
fn fixture_prompts_round_trip() {
    let fx = load_json("tokenizer.json");
    let mut n = 0;
    for list in ["prompts", "safety"] {
        for case in fx[list].as_array().unwrap() {
            let prompt: Prompt = serde_json::from_value(case["prompt"].clone()).unwrap();
            let markup = to_markup(&prompt);
            assert_eq!(parse_markup(&markup).unwrap(), prompt, "{markup}");
            // JSON round-trips too.
            assert_eq!(Prompt::from_json(&prompt.to_json()).unwrap(), prompt);
            n += 1;
        }
    }
    assert!(n >= 55);
}

#[test]
fn awkward_prompts_round_trip() {
    let t = |s: &str| Item::Text(s.into());
    let prompts = vec![
        Prompt::new(vec![]),
        Prompt::new(vec![t(""), t("a"), t("b"), t(" ")]),
        Prompt::new(vec![t("{braces}} and }{ \" quotes \\ =")]),
        Prompt::new(vec![Item::Image("".into()), Item::Image("a b\"c\\d=e{f}".into())]),
        Prompt {
            turns: vec![
                emu_prompt::Turn {
                    role: Role::User,
                    items: vec![t("  lead"), Item::Image("x".into()), t("trail \n")],
                },
                emu_prompt::Turn {
                    role: Role::Assistant,
                    items: vec![],
                },
                emu_prompt::Turn {
                    role: Role::User,
                    items: vec![t(" "), t("\n")],
                },
            ],
        },
        Prompt {
            turns: vec![emu_prompt::Turn {
                role: Role::Assistant,
                items: vec![t("x")],
            }],
        },
        Prompt::new(vec![Item::Object(GroundedObject {
            phrase: Some("".into()),
            bbox: [i64::MIN, -1, 0, i64::MAX],
            subject: Some("s p".into()),
        })]),
    ];
    for p in prompts {
        let m = to_markup(&p);
        assert_eq!(parse_markup(&m).unwrap(), p, "{m:?}");
    }
}
