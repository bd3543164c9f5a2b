//! End-to-end tests of `emu chat` / `emu complete` on the built-in tiny
//! model (random weights: only shapes, determinism, the load path and error
//! handling are checked, never the words). The library pipelines themselves
//! are tested in `emu/tests/pipelines.rs`.

use emu::tiny::{write_model, TinyKind};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn emu(args: &[&str]) -> Output {
    emu_env(args, &[])
}

fn emu_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emu"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run emu")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small RGB test picture (a gradient) written as PNG.
fn picture(dir: &Path, name: &str, w: u32, h: u32) -> PathBuf {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    });
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

/// Asserts a failed run with exactly one line on stderr, which contains `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure, got success: {}", stdout(o));
    let err = stderr(o);
    // The tiny model's notice is printed before any work starts; the error is the one other line.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note: `--model tiny`"))
        .collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn chat_tiny_answers_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 64, 48);
    let img = img.to_str().unwrap();
    let args = [
        "chat",
        "--model",
        "tiny",
        "--image",
        img,
        "what is this?",
        "--max-new-tokens",
        "8",
    ];
    let a = emu(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(
        stderr(&a).contains("meaningless"),
        "the tiny model must say so: {}",
        stderr(&a)
    );
    let text = stdout(&a);
    assert!(text.ends_with('\n'));
    assert!(!text.trim().is_empty(), "empty answer");
    let b = emu(&args);
    assert!(b.status.success());
    assert_eq!(a.stdout, b.stdout, "same inputs must give the same answer");
}

#[test]
fn chat_greedy_streams_and_reports_timings() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 30, 50);
    let o = emu(&[
        "chat",
        "--model",
        "tiny",
        "--image",
        img.to_str().unwrap(),
        "describe it",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "6",
        "--verbose",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
    let err = stderr(&o);
    for stage in ["load", "vision", "generate", "total"] {
        assert!(err.contains(stage), "timing `{stage}` missing: {err}");
    }
}

#[test]
fn chat_runs_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 20, 20);
    let o = emu(&[
        "chat",
        "--model",
        "tiny",
        "--dtype",
        "bf16",
        "--image",
        img.to_str().unwrap(),
        "hi",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn interactive_chat_reads_turns_from_stdin() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 32, 32);
    let mut child = Command::new(env!("CARGO_BIN_EXE_emu"))
        .args([
            "chat",
            "--model",
            "tiny",
            "--image",
            img.to_str().unwrap(),
            "--num-beams",
            "1",
        ])
        .args(["--max-new-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"what is it?\nand the colour?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 2, "one answer per question: {}", stdout(&o));
}

#[test]
fn repo_id_resolves_from_the_hugging_face_cache() {
    // The tiny model written in the hub cache layout loads through the same
    // path as a downloaded checkpoint and answers exactly as `--model tiny`.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--BAAI--Emu2-Chat");
    write_model(&repo.join("snapshots").join("0123abcd"), TinyKind::Chat).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd\n").unwrap();
    let img = picture(cache.path(), "pic.png", 40, 40);
    let img = img.to_str().unwrap();
    let args = |m: &'static str| {
        vec![
            "chat",
            "--model",
            m,
            "--dtype",
            "f32",
            "--image",
            img,
            "q",
            "--max-new-tokens",
            "5",
        ]
    };
    let cached = emu_env(&args("BAAI/Emu2-Chat"), &[("HF_HUB_CACHE", cache.path())]);
    assert!(cached.status.success(), "{}", stderr(&cached));
    assert!(!stderr(&cached).contains("meaningless"));
    let tiny = emu(&args("tiny"));
    assert_eq!(cached.stdout, tiny.stdout);

    let missing = emu_env(&args("BAAI/Emu2-Chat"), &[("HF_HUB_CACHE", Path::new("/nonexistent"))]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("not in the local Hugging Face cache"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 16, 16);
    let img = img.to_str().unwrap();

    let o = emu(&["chat", "--model", "tiny", "--image", "/nonexistent/dog.png", "q"]);
    assert_one_line_error(&o, "/nonexistent/dog.png");

    let o = emu(&["chat", "--model", "tiny", "--backend", "tpu", "--image", img, "q"]);
    assert_one_line_error(&o, "unknown backend `tpu`; available backends: cpu, wgpu, onnx, cuda");

    // Without an NVIDIA driver (CI) cuda is one line saying why; with one it runs.
    let o = emu(&["chat", "--model", "tiny", "--backend", "cuda", "--image", img, "q"]);
    if !o.status.success() {
        assert_one_line_error(&o, "backend `cuda` is unavailable");
    }

    let o = emu(&["chat", "--model", "tiny", "--dtype", "f64", "--image", img, "q"]);
    assert_one_line_error(&o, "f64");

    let o = emu(&["chat", "--model", "/nonexistent/model", "--image", img, "q"]);
    assert_one_line_error(&o, "does not exist");

    let not_image = dir.path().join("notes.png");
    std::fs::write(&not_image, b"this is not a picture").unwrap();
    let o = emu(&["chat", "--model", "tiny", "--image", not_image.to_str().unwrap(), "q"]);
    assert_one_line_error(&o, "notes.png");

    // A base checkpoint given to `emu chat`.
    let base = dir.path().join("emu2-base");
    write_model(&base, TinyKind::Base).unwrap();
    let o = emu(&["chat", "--model", base.to_str().unwrap(), "--image", img, "q"]);
    assert_one_line_error(&o, "emu complete");

    // Too many images for the context (each costs 18 tokens of 1024).
    let mut args = vec!["chat", "--model", "tiny"];
    for _ in 0..60 {
        args.extend(["--image", img]);
    }
    args.push("q");
    let o = emu(&args);
    assert_one_line_error(&o, "context");

    let o = emu(&["complete", "--model", "tiny", "{image"]);
    assert_one_line_error(&o, "markup");
}

#[test]
fn complete_tiny_continues_interleaved_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let a = picture(dir.path(), "a.png", 20, 30);
    let b = picture(dir.path(), "b.png", 30, 20);
    let prompt = format!("{{image {}}}[red, 3].{{image {}}}", a.display(), b.display());
    let args = ["complete", "--model", "tiny", &prompt, "--max-new-tokens", "5"];
    let o = emu(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
    assert_eq!(o.stdout, emu(&args).stdout);
}

#[test]
fn grounding_mode_and_box_drawing() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 50, 40);
    let out = dir.path().join("boxes.png");
    let o = emu(&[
        "chat",
        "--model",
        "tiny",
        "--grounding",
        "--boxes-out",
        out.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "where is the dog?",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Random weights rarely write a box, but the picture is always saved.
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (50, 40));

    let drawn = dir.path().join("drawn.png");
    emu_cli::commands::chat::draw_boxes(&img, &drawn, &[[10.0, 5.0, 30.0, 20.0]]).unwrap();
    let d = image::open(&drawn).unwrap().to_rgb8();
    let red = image::Rgb([255u8, 0, 0]);
    for (x, y) in [(10, 5), (30, 20), (20, 5), (10, 12), (11, 6)] {
        assert_eq!(*d.get_pixel(x, y), red, "({x}, {y}) is on the outline");
    }
    let src = image::open(&img).unwrap().to_rgb8();
    assert_eq!(d.get_pixel(20, 12), src.get_pixel(20, 12), "the inside is untouched");

    let o = emu(&[
        "chat",
        "--model",
        "tiny",
        "--boxes-out",
        out.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "q",
    ]);
    assert!(!o.status.success(), "--boxes-out needs --grounding");
}

/// `emu chat … | head -c 10`: once stdout's reader has gone, streaming
/// generation stops at the next token and the run ends quietly with success.
/// Deterministic evidence that it stopped early, without timing anything:
/// `--dump` writes `generated_ids` only when generation ran to its end, and
/// the same run into a reader that stays writes it with every token.
#[test]
fn a_reader_that_goes_away_stops_streaming_generation() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 64, 48);
    let run = |dump: &Path, closed: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_emu"));
        cmd.args(["chat", "--model", "tiny", "--num-beams", "1", "--max-new-tokens", "600"])
            .arg("--image")
            .arg(&img)
            .arg("--dump")
            .arg(dump)
            .arg("describe the picture")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if closed {
            cmd.stdout(Stdio::piped());
            let mut child = cmd.spawn().unwrap();
            // The reader goes away before the model has even loaded.
            drop(child.stdout.take());
            child.wait_with_output().unwrap()
        } else {
            cmd.stdout(Stdio::null()).output().unwrap()
        }
    };
    let full = dir.path().join("full");
    let o = run(&full, false);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids = emu_core::Checkpoint::open(full.join("generated_ids.safetensors"))
        .unwrap()
        .get("generated_ids")
        .unwrap();
    assert!(
        ids.numel() > 100,
        "the uninterrupted answer should be long, got {} tokens",
        ids.numel()
    );

    let cut = dir.path().join("cut");
    let o = run(&cut, true);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let other: Vec<&str> = err.lines().filter(|l| !l.starts_with("note: `--model tiny`")).collect();
    assert!(other.is_empty(), "a closed pipe is not an error to report: {err}");
    assert!(
        cut.join("prefill_logits.safetensors").is_file(),
        "generation was reached"
    );
    assert!(
        !cut.join("generated_ids.safetensors").exists(),
        "generation ran to its end although nobody was reading"
    );
}

#[test]
fn int8_activations_run_with_q4_k_on_the_cpu_and_are_refused_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 20, 20);
    let img = img.to_str().unwrap();
    let base = ["chat", "--model", "tiny", "--image", img, "hi", "--max-new-tokens", "3"];
    let with = |extra: &[&str]| emu(&[&base[..], extra].concat());
    let o = with(&["--quantize", "q4_k", "--int8-activations"]);
    if emu_backend_cpu::CpuBackend::int8_activations_available() {
        assert!(o.status.success(), "{}", stderr(&o));
    } else {
        assert_one_line_error(&o, "AVX2");
    }
    assert_one_line_error(&with(&["--int8-activations"]), "--quantize q4_k");
    assert_one_line_error(&with(&["--quantize", "q8_0", "--int8-activations"]), "--quantize q4_k");
    assert_one_line_error(
        &with(&["--quantize", "q4_k", "--int8-activations", "--backend", "wgpu"]),
        "cpu backend",
    );
}

#[test]
fn quantize_components_run_on_the_vision_encoder_and_bad_lists_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path(), "pic.png", 20, 20);
    let img = img.to_str().unwrap();
    let base = ["chat", "--model", "tiny", "--image", img, "hi", "--max-new-tokens", "3"];
    let with = |extra: &[&str]| emu(&[&base[..], extra].concat());
    let o = with(&["--quantize", "q8_0", "--quantize-components", "llm,vision"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with(&["--quantize", "q8_0", "--quantize-components", "vision"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_one_line_error(&with(&["--quantize-components", "vision"]), "add --quantize");
    assert_one_line_error(
        &with(&["--quantize", "q8_0", "--quantize-components", "unet"]),
        "runs no UNet",
    );
    assert_one_line_error(
        &with(&["--quantize", "q8_0", "--quantize-components", "vison"]),
        "unknown component `vison`",
    );
    assert_one_line_error(
        &with(&["--quantize", "q8_0", "--quantize-components", ","]),
        "names no component",
    );
    let enc = |extra: &[&str]| {
        let out = dir.path().join("f.safetensors");
        let args = ["encode", "--model", "tiny", "--image", img, "-o", out.to_str().unwrap()];
        emu(&[&args[..], extra].concat())
    };
    assert!(enc(&["--quantize", "q4_k", "--quantize-components", "vision"])
        .status
        .success());
    assert_one_line_error(&enc(&["--quantize", "q4_k"]), "--quantize-components vision");
}
