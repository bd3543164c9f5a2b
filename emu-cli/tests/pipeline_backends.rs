//! The pipelines on every backend, and with components on different
//! backends, against the CPU run of the tiny model: greedy chat answers must
//! be the same tokens, generated images the same within a few levels.
//!
//! wgpu needs a GPU adapter (lavapipe does: `WGPU_BACKEND=vulkan`, with
//! `XDG_RUNTIME_DIR` set), onnx the ONNX Runtime library in
//! `ORT_DYLIB_PATH`; a test whose backend cannot start here prints why and
//! checks nothing else.

mod common;

use common::{emu, emu_ok, stderr};
use emu::pipeline::{ChatOptions, ChatPipeline, Component, ModelDir, ModelFamily};
use emu_backend_cpu::CpuBackend;
use emu_backend_onnx::OnnxBackend;
use emu_backend_wgpu::WgpuBackend;
use emu_core::{Backend, DType};
use emu_prompt::{Item, Prompt};
use std::path::{Path, PathBuf};

/// Largest difference allowed per 8-bit channel between backends: f32
/// kernels differ in summation order, and a value near a rounding boundary
/// may land one level off after the VAE.
const PIXEL_TOLERANCE: u8 = 2;

fn wgpu() -> Option<WgpuBackend> {
    WgpuBackend::new()
        .map_err(|e| eprintln!("note: skipping the wgpu checks: {e}"))
        .ok()
}

fn onnx() -> Option<OnnxBackend> {
    OnnxBackend::new()
        .map_err(|e| eprintln!("note: skipping the onnx checks: {e}"))
        .ok()
}

/// A small picture with structure in both directions, so that the vision
/// encoder's output depends on its kernels.
fn test_image(dir: &Path) -> PathBuf {
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x * y) % 251) as u8])
    });
    let path = dir.join("picture.png");
    img.save(&path).unwrap();
    path
}

/// Greedy answer ids of the tiny chat model with the vision encoder on `V`
/// and the language model on `L`.
fn chat_ids<V: Backend, L: Backend>(vision: V, llm: L, picture: &Path) -> Vec<u32> {
    let model = ModelDir::resolve("tiny", ModelFamily::Emu2Chat).unwrap();
    let chat = ChatPipeline::load(
        &model,
        &Component::new(vision, DType::F32),
        &Component::new(llm, DType::F32),
    )
    .unwrap();
    let prompt = Prompt::new(vec![
        Item::Image(picture.to_str().unwrap().to_string()),
        Item::Text("What is in the picture?".into()),
    ]);
    let mut opts = ChatOptions::default();
    opts.generation.num_beams = 1;
    opts.generation.max_new_tokens = 10;
    let answer = chat.answer(&prompt, &opts, None).unwrap();
    assert!(!answer.ids.is_empty(), "the tiny model answers something");
    answer.ids
}

/// `emu chat --num-beams 1` with extra arguments; returns the answer printed.
fn chat_cli(picture: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"chat", &"--model", &"tiny", &"--image", &picture];
    args.extend([
        &"--num-beams" as &dyn AsRef<std::ffi::OsStr>,
        &"1",
        &"--max-new-tokens",
        &"10",
    ]);
    for a in extra {
        args.push(a);
    }
    args.push(&"What is in the picture?");
    emu_ok(&args)
}

/// `emu generate` of the tiny model (4 steps, 32x32) with extra arguments;
/// returns the decoded PNG's RGB bytes.
fn generate_cli(dir: &Path, name: &str, extra: &[&str]) -> Vec<u8> {
    let out = dir.join(format!("{name}.png"));
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"generate",
        &"--model",
        &"tiny",
        &"--steps",
        &"4",
        &"--seed",
        &"7",
        &"-o",
        &out,
    ];
    for a in extra {
        args.push(a);
    }
    args.push(&"a red cube on a table");
    emu_ok(&args);
    image::open(&out).unwrap().to_rgb8().into_raw()
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "images of different sizes");
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

fn check_image(what: &str, cpu: &[u8], other: &[u8]) {
    let d = max_abs_diff(cpu, other);
    eprintln!("{what}: max abs pixel difference to cpu {d}");
    assert!(
        d <= PIXEL_TOLERANCE,
        "{what}: pixels differ by up to {d} from the cpu run"
    );
}

#[test]
fn chat_same_tokens_on_every_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let picture = test_image(tmp.path());
    let cpu = chat_ids(CpuBackend::new(), CpuBackend::new(), &picture);
    let cpu_text = chat_cli(&picture, &["--backend", "cpu"]);
    if let Some(w) = wgpu() {
        assert_eq!(chat_ids(w.clone(), w.clone(), &picture), cpu, "wgpu");
        // Vision on the CPU, the language model on the GPU.
        assert_eq!(
            chat_ids(CpuBackend::new(), w.clone(), &picture),
            cpu,
            "vision cpu, llm wgpu"
        );
        assert_eq!(chat_cli(&picture, &["--backend", "wgpu"]), cpu_text);
        assert_eq!(
            chat_cli(&picture, &["--vision-backend", "cpu", "--llm-backend", "wgpu"]),
            cpu_text
        );
    }
    if let Some(o) = onnx() {
        assert_eq!(chat_ids(o.clone(), o.clone(), &picture), cpu, "onnx");
        assert_eq!(chat_cli(&picture, &["--backend", "onnx"]), cpu_text);
    }
}

#[test]
fn generate_same_image_on_every_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let cpu = generate_cli(tmp.path(), "cpu", &["--backend", "cpu"]);
    if wgpu().is_some() {
        let w = generate_cli(tmp.path(), "wgpu", &["--backend", "wgpu"]);
        check_image("wgpu", &cpu, &w);
        let mixed = generate_cli(
            tmp.path(),
            "mixed",
            &[
                "--vision-backend",
                "cpu",
                "--llm-backend",
                "wgpu",
                "--decoder-backend",
                "cpu",
            ],
        );
        check_image("vision cpu, llm wgpu, decoder cpu", &cpu, &mixed);
    }
    if onnx().is_some() {
        let o = generate_cli(tmp.path(), "onnx", &["--backend", "onnx"]);
        check_image("onnx", &cpu, &o);
        if wgpu().is_some() {
            let three = generate_cli(
                tmp.path(),
                "three",
                &[
                    "--vision-backend",
                    "cpu",
                    "--llm-backend",
                    "wgpu",
                    "--decoder-backend",
                    "onnx",
                ],
            );
            check_image("vision cpu, llm wgpu, decoder onnx", &cpu, &three);
        }
    }
}

#[test]
fn unknown_backend_is_a_one_line_error() {
    for flag in ["--backend", "--vision-backend", "--llm-backend"] {
        let r = emu(&[&"chat", &"--model", &"tiny", &flag, &"tpu", &"hi"]);
        assert!(!r.status.success());
        let err = stderr(&r);
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: unknown backend `tpu`") && last.contains("cpu, wgpu, onnx"),
            "{flag}: {err}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never.png");
    let r = emu(&[
        &"generate",
        &"--model",
        &"tiny",
        &"--decoder-backend",
        &"tpu",
        &"x",
        &"-o",
        &out,
    ]);
    assert!(!r.status.success());
    assert!(stderr(&r).contains("unknown backend `tpu`"), "{}", stderr(&r));
    assert!(!out.exists());
}

#[test]
fn unloadable_onnx_runtime_says_why() {
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_emu"))
        .args(["chat", "--model", "tiny", "--backend", "onnx", "hi"])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: backend `onnx` is unavailable") && last.contains("ORT_DYLIB_PATH"),
        "{err}"
    );
}
