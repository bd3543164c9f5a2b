//! The markup parser and the JSON prompt form on arbitrary input: no panic, and whatever
//! parses renders (or is refused with an error) and round-trips through `to_markup`.
#![no_main]

use emu_prompt::{parse_markup, render, to_markup, ModelKind, Prompt, RenderOptions};
use libfuzzer_sys::fuzz_target;

fn exercise(p: &Prompt) {
    let again = parse_markup(&to_markup(p)).expect("to_markup output must parse");
    if !p.turns.is_empty() {
        assert_eq!(&again, p, "markup round-trip");
    }
    for kind in [ModelKind::Emu2, ModelKind::Emu2Chat, ModelKind::Emu2Gen] {
        let mut opts = RenderOptions::new(kind);
        // Keep rendering cheap: slot counts do not change the logic.
        opts.n_query = 2;
        opts.v_query = 1;
        if let Ok(r) = render(p, &opts) {
            let _ = r.text();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match parse_markup(s) {
        Ok(p) => exercise(&p),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(p) = Prompt::from_json(s) {
        exercise(&p);
    }
});
