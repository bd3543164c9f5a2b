//! Every example's `run` on the built-in tiny model, end to end: the
//! examples are compiled here as modules, so a change to the library API
//! that breaks one fails this test (tiny outputs are meaningless, so only
//! shapes and that each stage ran are checked).

// Each example's `main` is only used by its own binary.
#[allow(dead_code)]
#[path = "../examples/chat.rs"]
mod chat;
#[allow(dead_code)]
#[path = "../examples/diffusion_decoder.rs"]
mod diffusion_decoder;
#[allow(dead_code)]
#[path = "../examples/encode_image.rs"]
mod encode_image;
#[allow(dead_code)]
#[path = "../examples/few_shot.rs"]
mod few_shot;
#[allow(dead_code)]
#[path = "../examples/llama_greedy.rs"]
mod llama_greedy;
#[allow(dead_code)]
#[path = "../examples/text_to_image.rs"]
mod text_to_image;

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let img = image::open(path).expect("a readable PNG");
    (img.width(), img.height())
}

#[test]
fn chat_answers_about_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let images = few_shot::demo_images(dir.path()).unwrap();
    let answer = chat::run("tiny", images[0].to_str().unwrap(), "what is this?").unwrap();
    assert!(!answer.trim().is_empty());
    // The example stops at the first "." (if the tiny model ever writes one).
    if let Some(i) = answer.find('.') {
        assert!(answer.len() - i <= 8, "{answer:?} runs on past the stop string");
    }
}

#[test]
fn few_shot_completes_a_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let images = few_shot::demo_images(dir.path()).unwrap();
    assert_eq!(images.len(), 3);
    let text = few_shot::run("tiny", &images).unwrap();
    assert!(!text.is_empty());
}

#[test]
fn text_to_image_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let (w, h) = text_to_image::run("tiny", "a red cube", &out, 2).unwrap();
    assert_eq!(png_size(&out), (w as u32, h as u32));
}

#[test]
fn encoder_alone_gives_features_pooled_and_projected() {
    let dir = tempfile::tempdir().unwrap();
    let images = few_shot::demo_images(dir.path()).unwrap();
    let paths: Vec<String> = images[..2].iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let [features, pooled, projected] = encode_image::run("tiny", &paths).unwrap();
    // Tiny EVA: an 8x8 grid plus CLS, pooled to 4 tokens, projected to the LLM width.
    assert_eq!(features[..2], [2, 65]);
    assert_eq!(pooled[..2], [2, 4]);
    assert_eq!(features[2], pooled[2]);
    assert_eq!(projected[..2], [2, 4]);
}

#[test]
fn llama_alone_decodes_greedily() {
    let a = llama_greedy::run("tiny", "a red cube", 6).unwrap();
    assert!(!a.is_empty() && a.len() <= 6);
    assert_eq!(
        a,
        llama_greedy::run("tiny", "a red cube", 6).unwrap(),
        "greedy is deterministic"
    );
}

#[test]
fn diffusion_decoder_alone_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.png");
    let (w, h) = diffusion_decoder::run("tiny", &out, 2).unwrap();
    assert_eq!((w, h), (32, 32));
    assert_eq!(png_size(&out), (32, 32));
}
