//! Property tests: round-trips and no panics on arbitrary input.

mod common;

use common::*;
use emu_prompt::video::sample_frame_indices;
use emu_prompt::{
    parse_boxes, parse_markup, to_markup, BoxMask, Compat, Error, GroundedObject, Item, Prompt, Role, Turn, Variant,
    Video,
};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    // Characters the markup treats specially, whitespace and non-ASCII, mixed with letters.
    let ch = prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => proptest::sample::select(vec!['{', '}', '"', '\\', '=', ' ', '\n', '\t', '[', ']', '<', '>', '/', ',', '日', 'é', '\u{301}', '😀', '\u{a0}', '\u{3000}']),
        1 => any::<char>(),
    ];
    proptest::collection::vec(ch, 0..16).prop_map(|v| v.into_iter().collect())
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        3 => text().prop_map(Item::Text),
        1 => text().prop_map(Item::Image),
        1 => proptest::collection::vec(text(), 1..4).prop_map(|frames| Item::Video(Video { frames })),
        1 => (proptest::option::of(text()), any::<[i64; 4]>(), proptest::option::of(text()))
            .prop_map(|(phrase, bbox, subject)| Item::Object(GroundedObject { phrase, bbox, subject })),
    ]
}

fn prompt() -> impl Strategy<Value = Prompt> {
    let turn = (any::<bool>(), proptest::collection::vec(item(), 0..6)).prop_map(|(user, items)| Turn {
        role: if user { Role::User } else { Role::Assistant },
        items,
    });
    proptest::collection::vec(turn, 1..4).prop_map(|turns| Prompt { turns })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn markup_round_trips(p in prompt()) {
        let m = to_markup(&p);
        let back = parse_markup(&m);
        prop_assert!(back.is_ok(), "{m:?}: {back:?}");
        prop_assert_eq!(back.unwrap(), p);
    }

    #[test]
    fn json_round_trips(p in prompt()) {
        prop_assert_eq!(Prompt::from_json(&p.to_json()).unwrap(), p);
    }

    #[test]
    fn markup_parser_never_panics(src in "\\PC*|[{}\"= a-z\\\\\n]*") {
        match parse_markup(&src) {
            Ok(p) => {
                // Whatever parses, writes back to markup that parses to the same prompt.
                prop_assert_eq!(parse_markup(&to_markup(&p)).unwrap(), p);
            }
            Err(Error::Markup { offset, line, column, .. }) => {
                prop_assert!(offset <= src.len() && src.is_char_boundary(offset));
                prop_assert_eq!(line, src[..offset].matches('\n').count() + 1);
                prop_assert!(column >= 1);
            }
            Err(e) => prop_assert!(false, "unexpected error kind {e}"),
        }
    }

    #[test]
    fn grounding_parser_never_panics(s in "\\PC*|[\\[\\], 0-9.+\\-a]*", w in 1u32..5000, h in 1u32..5000) {
        let g = parse_boxes(&s, w, h);
        for b in &g.boxes {
            prop_assert!(b.grid.iter().all(|v| (0.0..=224.0).contains(v)));
            prop_assert!(b.grid[0] <= b.grid[2] && b.grid[1] <= b.grid[3]);
            prop_assert!(b.pixels[2] <= w as f64 && b.pixels[3] <= h as f64);
            let again = parse_boxes(&s[b.span.clone()], w, h);
            prop_assert_eq!(&again.boxes[0].grid, &b.grid);
        }
        for p in &g.problems {
            prop_assert!(s.is_char_boundary(p.span.start) && s.is_char_boundary(p.span.end));
        }
    }

    #[test]
    fn written_boxes_are_read_back(b in proptest::array::uniform4(0u32..=224)) {
        let (x1, x2) = (b[0].min(b[2]), b[0].max(b[2]));
        let (y1, y2) = (b[1].min(b[3]), b[1].max(b[3]));
        let g = parse_boxes(&format!("the dog [{x1}, {y1}, {x2}, {y2}]."), 448, 224);
        prop_assert!(g.problems.is_empty());
        prop_assert_eq!(g.boxes[0].pixels, [x1 as f64 * 2.0, y1 as f64, x2 as f64 * 2.0, y2 as f64]);
    }

    #[test]
    fn masks_stay_near_the_box(b in any::<[i64; 4]>().prop_map(|b| b.map(|v| v.rem_euclid(600) - 80)), canvas in 1u32..64) {
        let m = BoxMask::with_canvas(b, canvas);
        let swapped = BoxMask::with_canvas([b[2], b[3], b[0], b[1]], canvas);
        prop_assert_eq!(m, swapped);
        let g = m.to_gray();
        prop_assert_eq!(g.len(), (canvas * canvas) as usize);
        for (i, v) in g.iter().enumerate() {
            let (x, y) = ((i % canvas as usize) as i64, (i / canvas as usize) as i64);
            let inside = x >= m.left as i64 - 2 && x <= m.right as i64 + 2 && y >= m.top as i64 - 2 && y <= m.bottom as i64 + 2;
            prop_assert!(*v == 0 || (*v == 255 && inside));
        }
    }

    #[test]
    fn frame_sampling_is_uniform(total in 1usize..5000, n in 1usize..64) {
        match sample_frame_indices(total, n) {
            Ok(idx) => {
                let segment = total / n;
                prop_assert!(idx.len() >= n);
                prop_assert_eq!(idx.len(), (total - segment / 2).div_ceil(segment));
                prop_assert!(idx.iter().enumerate().all(|(k, &i)| i == segment / 2 + k * segment));
                prop_assert!(idx.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(*idx.last().unwrap() < total);
            }
            Err(_) => prop_assert!(total < n),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn markup_encoding_and_decoding_never_panic(
        s in "(\\PC|\\[IMG\\]|</s>|<s>|<unk>|\\[USER\\]| |\n)*",
        ids in proptest::collection::vec(0u32..32274, 0..40),
    ) {
        for compat in [Compat::Slow, Compat::Fast] {
            let tok = cached(Variant::Chat, compat);
            let enc = tok.encode_markup(&s).unwrap();
            prop_assert!(enc.iter().all(|&i| (i as usize) < tok.vocab_size()));
            let _ = tok.decode(&enc, false).unwrap();
            let _ = tok.decode(&ids, false).unwrap();
            let _ = tok.decode(&ids, true).unwrap();
        }
    }

    #[test]
    fn user_text_is_never_special_and_decodes_back(s in "[^\u{2581}]{0,40}") {
        for compat in [Compat::Slow, Compat::Fast] {
            let tok = cached(Variant::Chat, compat);
            let ids = tok.encode(&s).unwrap();
            prop_assert_eq!(ids[0], 1);
            prop_assert!(ids[1..].iter().all(|&i| i > 2 && i < 32000), "{compat:?} {s:?} -> {ids:?}");
            prop_assert_eq!(tok.decode(&ids, true).unwrap(), s.clone(), "{:?}", compat);
        }
    }
}
