//! Tokenizer folders and prompts a careless user could hand over: broken
//! side files, empty or special files, boxes that mark nothing. Each is an
//! error naming the file or box, never a silent load.

use emu_prompt::{parse_markup, render, Emu2Tokenizer, ModelKind, RenderOptions, Variant};
use std::path::{Path, PathBuf};

const LLAMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/emu2-conf/llama_config/tokenizer.model"
);

struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("emu-prompt-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn err(r: emu_prompt::Result<Emu2Tokenizer>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_or_special_tokenizer_files_are_named() {
    let t = Tmp::new("empty");
    let model = t.0.join("tokenizer.model");
    std::fs::write(&model, b"").unwrap();
    let m = err(Emu2Tokenizer::from_dir(&t.0, Variant::Chat));
    assert!(m.contains("tokenizer.model") && m.contains("empty"), "{m}");
    std::fs::remove_file(&model).unwrap();
    std::fs::create_dir(&model).unwrap();
    let m = err(Emu2Tokenizer::from_dir(&t.0, Variant::Chat));
    assert!(m.contains("tokenizer.model") && m.contains("directory"), "{m}");
    // Garbage that is not a SentencePiece model names the file too.
    std::fs::remove_dir(&model).unwrap();
    std::fs::write(&model, b"\xff\xff\xff\xff not protobuf").unwrap();
    let m = err(Emu2Tokenizer::from_dir(&t.0, Variant::Chat));
    assert!(m.contains("tokenizer.model"), "{m}");
}

#[test]
fn a_special_tokens_map_that_is_not_json_is_an_error() {
    if !Path::new(LLAMA).is_file() {
        eprintln!("skipping: {LLAMA} not present");
        return;
    }
    let t = Tmp::new("special");
    std::fs::copy(LLAMA, t.0.join("tokenizer.model")).unwrap();
    Emu2Tokenizer::from_dir(&t.0, Variant::Chat).unwrap();
    std::fs::write(t.0.join("special_tokens_map.json"), "{\"bos_token\": \"<s>\", ").unwrap();
    let m = err(Emu2Tokenizer::from_dir(&t.0, Variant::Chat));
    assert!(m.contains("special_tokens_map.json"), "{m}");
}

#[test]
fn boxes_without_area_on_the_canvas_are_refused() {
    let opts = RenderOptions::new(ModelKind::Emu2Gen);
    for (b, ok) in [
        ("10,10,200,200", true),
        ("-50,-50,20,20", true),    // partly outside: clamped, still a box
        ("10,10,10,200", false),    // zero width
        ("10,30,200,30", false),    // zero height
        ("500,10,600,200", false),  // right of the canvas
        ("-90,-90,-10,-10", false), // above and left of it
    ] {
        let p = parse_markup(&format!("{{object box={b} phrase=\"a cat\"}} in a garden")).unwrap();
        let r = render(&p, &opts);
        match (ok, r) {
            (true, r) => {
                r.unwrap();
            }
            (false, Ok(_)) => panic!("box {b} rendered"),
            (false, Err(e)) => {
                let m = e.to_string();
                assert!(m.contains(&format!("box={b}")) && m.contains("no area"), "{m}");
            }
        }
    }
}
