//! End-to-end tests of `emu generate` on the built-in tiny Emu2-Gen (random
//! weights: only shapes, determinism, modes and error handling are checked,
//! never what the picture shows). `GenerationPipeline` itself is tested in
//! `emu/tests/pipelines.rs`.

use emu::tiny::{write_model, TinyKind};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn emu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_emu"))
        .args(args)
        .output()
        .expect("run emu")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn picture(dir: &Path, name: &str) -> PathBuf {
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 128]));
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    let err = stderr(o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note: `--model tiny`"))
        .collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "`{needle}` not in: {err}"
    );
}

#[test]
fn generate_tiny_writes_a_deterministic_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run = |o: &str, seed: &str| {
        emu(&[
            "generate",
            "--model",
            "tiny",
            "a red cube",
            "-o",
            o,
            "--steps",
            "4",
            "--seed",
            seed,
        ])
    };
    let a = run(&out("a.png"), "7");
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(stderr(&a).contains("meaningless"));
    let img = image::open(out("a.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (32, 32), "the tiny model's default size");
    let b = run(&out("b.png"), "7");
    assert!(b.status.success());
    let c = run(&out("c.png"), "8");
    assert!(c.status.success());
    let bytes = |n: &str| std::fs::read(out(n)).unwrap();
    assert_eq!(bytes("a.png"), bytes("b.png"), "same seed, same image");
    assert_ne!(bytes("a.png"), bytes("c.png"), "another seed, another image");
}

#[test]
fn generate_sizes_modes_and_verbose() {
    let dir = tempfile::tempdir().unwrap();
    let pic = picture(dir.path(), "subject.png");
    let pic = pic.to_str().unwrap();
    let o = dir.path().join("wide.png");
    let r = emu(&[
        "generate",
        "--model",
        "tiny",
        "a cat",
        "-o",
        o.to_str().unwrap(),
        "--steps",
        "2",
        "--size",
        "48x24",
        "--verbose",
        "--guidance",
        "5",
        "--negative",
        "blurry",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(image::open(&o).unwrap().to_rgb8().dimensions(), (48, 24));
    for stage in ["load", "regress", "diffusion", "vae", "total"] {
        assert!(stderr(&r).contains(stage), "timing `{stage}` missing: {}", stderr(&r));
    }
    // Autoencoding (a lone image), then subject-driven with a box.
    let o = dir.path().join("ae.png");
    let r = emu(&[
        "generate",
        "--model",
        "tiny",
        &format!("{{image {pic}}}"),
        "-o",
        o.to_str().unwrap(),
        "--steps",
        "2",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let o = dir.path().join("obj.png");
    let prompt = format!("{{object box=0,0,224,448 phrase=\"a dog\" subject={pic}}} on the beach");
    let r = emu(&[
        "generate",
        "--model",
        "tiny",
        &prompt,
        "-o",
        o.to_str().unwrap(),
        "--steps",
        "2",
        "--size",
        "16",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(image::open(&o).unwrap().to_rgb8().dimensions(), (16, 16));
}

#[test]
fn generate_bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("x.png");
    let o = o.to_str().unwrap();
    let r = emu(&["generate", "--model", "tiny", "x", "-o", o, "--size", "30"]);
    assert_one_line_error(&r, "multiple of 4");
    let r = emu(&["generate", "--model", "tiny", "x", "-o", o, "--size", "big"]);
    assert_one_line_error(&r, "--size `big`");
    let r = emu(&["generate", "--model", "tiny", "x", "-o", o, "--steps", "0"]);
    assert_one_line_error(&r, "--steps 0");
    let r = emu(&[
        "generate",
        "--model",
        "tiny",
        "x",
        "-o",
        dir.path().join("x.jpg").to_str().unwrap(),
    ]);
    assert_one_line_error(&r, ".png");
    let r = emu(&["generate", "--model", "tiny", "x", "-o", "/nonexistent/dir/x.png"]);
    assert_one_line_error(&r, "/nonexistent/dir");
    let r = emu(&["generate", "--model", "tiny", "--backend", "metal", "x", "-o", o]);
    assert_one_line_error(&r, "available backends: cpu");
    let r = emu(&["generate", "--model", "tiny", "{image /nonexistent/a.png} x", "-o", o]);
    assert_one_line_error(&r, "/nonexistent/a.png");
    let r = emu(&["generate", "--model", "tiny", "{object box=1,2 phrase=a}", "-o", o]);
    assert_one_line_error(&r, "markup");
    let chat = dir.path().join("chat-model");
    write_model(&chat, TinyKind::Chat).unwrap();
    let r = emu(&["generate", "--model", chat.to_str().unwrap(), "x", "-o", o]);
    assert_one_line_error(&r, "emu chat");
    assert!(!Path::new(o).exists(), "nothing is written on error");
}

/// Reads the single tensor of `DIR/<name>.safetensors`: (dtype, shape).
fn dumped(dir: &Path, name: &str) -> (safetensors::Dtype, Vec<usize>) {
    let bytes =
        std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap_or_else(|e| panic!("{name}.safetensors: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.dtype(), t.shape().to_vec())
}

#[test]
fn dump_writes_every_stage() {
    use safetensors::Dtype as D;
    let dir = tempfile::tempdir().unwrap();
    let pic = picture(dir.path(), "p.png");
    let chat_dump = dir.path().join("chat");
    let r = emu(&[
        "chat",
        "--model",
        "tiny",
        "--image",
        pic.to_str().unwrap(),
        "q",
        "--max-new-tokens",
        "3",
        "--num-beams",
        "1",
        "--dump",
        chat_dump.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let (_, ids) = dumped(&chat_dump, "input_ids");
    let t = ids[0];
    assert_eq!(dumped(&chat_dump, "input_ids").0, D::U32);
    assert_eq!(dumped(&chat_dump, "pixel_values"), (D::F32, vec![1, 3, 56, 56]));
    assert_eq!(dumped(&chat_dump, "vision_features"), (D::F32, vec![1, 65, 16]));
    assert_eq!(dumped(&chat_dump, "pooled_tokens"), (D::F32, vec![1, 16, 16]));
    assert_eq!(dumped(&chat_dump, "projected_tokens"), (D::F32, vec![16, 32]));
    assert_eq!(dumped(&chat_dump, "input_embeds"), (D::F32, vec![1, t, 32]));
    assert_eq!(dumped(&chat_dump, "prefill_hidden"), (D::F32, vec![1, t, 32]));
    assert_eq!(dumped(&chat_dump, "prefill_logits"), (D::F32, vec![1, 1, 32274]));
    let (dt, n) = dumped(&chat_dump, "generated_ids");
    assert!(dt == D::U32 && n[0] <= 3);

    let gen_dump = dir.path().join("gen");
    let out = dir.path().join("g.png");
    let r = emu(&[
        "generate",
        "--model",
        "tiny",
        "a cube",
        "-o",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--dump",
        gen_dump.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(dumped(&gen_dump, "condition"), (D::F32, vec![1, 4, 16]));
    assert_eq!(dumped(&gen_dump, "negative_condition"), (D::F32, vec![1, 4, 16]));
    assert_eq!(dumped(&gen_dump, "negative_input_ids"), (D::U32, vec![2]), "<s>[IMG]");
    assert_eq!(dumped(&gen_dump, "initial_latents"), (D::F32, vec![1, 4, 16, 16]));
    assert_eq!(dumped(&gen_dump, "final_latents"), (D::F32, vec![1, 4, 16, 16]));
    assert_eq!(dumped(&gen_dump, "image"), (D::U8, vec![32, 32, 3]));
}
