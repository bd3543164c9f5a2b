//! A table of bad invocations of the `emu` binary: wrong files, special
//! files, absurd numbers, contradictory flags, closed and full outputs.
//!
//! For each: the exit code is the expected one (non-zero for an error), never
//! a panic (101), an abort (134) or a crash (139), nothing is killed by a
//! signal or left hanging (each run has a deadline), stderr never says
//! "panicked", and the message names the offending file or flag and what
//! was expected. Cases run on the built-in tiny model; none needs a GPU,
//! ONNX Runtime or the network.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a case must end.
enum Expect {
    /// Non-zero exit; stderr contains every needle.
    Error(&'static [&'static str]),
}

struct Run {
    code: Option<i32>,
    stderr: String,
}

/// Runs `emu` with a deadline (a hang fails the test instead of blocking it).
fn run_emu(args: &[String], stdout: Stdio, env_remove: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emu"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped());
    for k in env_remove {
        cmd.env_remove(k);
    }
    let mut child = cmd.spawn().expect("the emu binary runs");
    let mut err_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err_pipe, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("emu {args:?} did not finish within 240 s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap();
    Run {
        code: status.code(),
        stderr,
    }
}

fn check(args: &[String], run: &Run, expect: &Expect) {
    let shown = args.join(" ");
    let code = run
        .code
        .unwrap_or_else(|| panic!("emu {shown} was killed by a signal; stderr: {}", run.stderr));
    assert!(
        ![101, 134, 139].contains(&code),
        "emu {shown}: exit {code} (panic/abort/crash): {}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "emu {shown}: {}", run.stderr);
    match expect {
        Expect::Error(needles) => {
            assert_ne!(code, 0, "emu {shown} succeeded but should fail: {}", run.stderr);
            for n in *needles {
                assert!(
                    run.stderr.contains(n),
                    "emu {shown}: `{n}` not in the message: {}",
                    run.stderr
                );
            }
        }
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    image: String,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 90]));
    let image = dir.join("pic.png");
    img.save(&image).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        image: image.to_str().unwrap().to_string(),
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

#[test]
fn bad_invocations_are_clear_errors() {
    let f = fixture();
    let d = &f.dir;
    let img = f.image.as_str();
    // Odd files the cases refer to.
    let text_bin = d.join("text_model");
    std::fs::create_dir(&text_bin).unwrap();
    std::fs::write(text_bin.join("pytorch_model.bin"), "<html>404 not found</html>\n").unwrap();
    let config_dir = d.join("config_is_dir");
    std::fs::create_dir_all(config_dir.join("config.json")).unwrap();
    let plain_file = d.join("notes.txt");
    std::fs::write(&plain_file, "notes").unwrap();
    let out_png = s(&d.join("out.png"));
    let onnx_out = s(&d.join("onnx"));
    let dump_file = s(&plain_file);

    let cases: Vec<(Vec<String>, Expect)> = vec![
        (
            args(&["chat", "--model", "tiny", "--grounding", "where is the dog?"]),
            Expect::Error(&["--grounding", "--image"]),
        ),
        (
            args(&[
                "chat",
                "--model",
                "tiny",
                "--image",
                img,
                "--num-beams",
                "4294967296",
                "hi",
            ]),
            Expect::Error(&["--num-beams 4294967296"]),
        ),
        (
            args(&["chat", "--model", "tiny", "--image", img, "--num-beams", "0", "hi"]),
            Expect::Error(&["--num-beams 0"]),
        ),
        (
            args(&["chat", "--model", "tiny", "--offload", "foo", "hi"]),
            Expect::Error(&["--offload", "foo", "none", "sequential"]),
        ),
        (
            args(&["generate", "--model", "tiny", "x", "-o", &out_png, "--offload", ""]),
            Expect::Error(&["--offload", "none", "sequential"]),
        ),
        (
            args(&[
                "complete",
                "--model",
                "tiny",
                "once upon",
                "--max-new-tokens",
                "18446744073709551615",
            ]),
            Expect::Error(&["--max-new-tokens"]),
        ),
        (
            args(&["--threads", "100000", "chat", "--model", "tiny", "--image", img, "hi"]),
            Expect::Error(&["--threads 100000"]),
        ),
        (
            args(&["chat", "--model", "tiny", "--image", img, "--dump", &dump_file, "hi"]),
            Expect::Error(&["--dump needs a directory", "notes.txt"]),
        ),
        (
            args(&[
                "generate",
                "--model",
                "tiny",
                "a red cube",
                "-o",
                &out_png,
                "--size",
                "4096",
                "--steps",
                "1",
            ]),
            Expect::Error(&["4096x4096", "GiB", "--size"]),
        ),
        (
            args(&[
                "generate",
                "--model",
                "tiny",
                "a red cube",
                "-o",
                &out_png,
                "--size",
                "0",
            ]),
            Expect::Error(&["height 0"]),
        ),
        (
            args(&[
                "generate",
                "--model",
                "tiny",
                "{object box=500,500,600,600 phrase=\"a cat\"}",
                "-o",
                &out_png,
                "--steps",
                "1",
            ]),
            Expect::Error(&["box=500,500,600,600", "no area"]),
        ),
        (
            args(&["generate", "--model", "tiny", "a cube", "-o", &out_png, "--steps", "0"]),
            Expect::Error(&["--steps 0"]),
        ),
        (
            args(&["inspect", "/dev/zero"]),
            Expect::Error(&["/dev/zero", "character device"]),
        ),
        (
            args(&["inspect", &s(&text_bin)]),
            Expect::Error(&["pytorch_model.bin", "not a checkpoint"]),
        ),
        (
            args(&["convert", &s(&text_bin), &s(&d.join("converted"))]),
            Expect::Error(&["pytorch_model.bin", "not a checkpoint"]),
        ),
        (
            args(&["chat", "--model", &s(&config_dir), "--image", img, "hi"]),
            Expect::Error(&["config.json", "is a directory"]),
        ),
        (
            args(&["export-onnx", "--model", "tiny", "-o", &onnx_out, "--unet-batch", "0"]),
            Expect::Error(&["--unet-batch 0"]),
        ),
        (
            args(&["export-onnx", "--model", "tiny", "-o", &onnx_out, "--context-len", "0"]),
            Expect::Error(&["--context-len 0"]),
        ),
        (
            args(&[
                "export-onnx",
                "--model",
                "tiny",
                "-o",
                &onnx_out,
                "--prefill-len",
                "100",
                "--max-len",
                "50",
            ]),
            Expect::Error(&["--prefill-len 100", "--max-len 50"]),
        ),
        (
            args(&[
                "export-onnx",
                "--model",
                "tiny",
                "-o",
                &onnx_out,
                "--image-size",
                "100000",
            ]),
            Expect::Error(&["--image-size 100000"]),
        ),
        (
            args(&[
                "encode",
                "--model",
                "tiny",
                "--image",
                "/dev/zero",
                "-o",
                &s(&d.join("f.safetensors")),
            ]),
            Expect::Error(&["/dev/zero"]),
        ),
    ];
    for (a, expect) in &cases {
        let r = run_emu(a, Stdio::null(), &[]);
        check(a, &r, expect);
    }
    // Nothing half-written by the refused export.
    assert!(!Path::new(&onnx_out).join("manifest.json").exists());
}

#[cfg(unix)]
#[test]
fn special_files_never_block() {
    let f = fixture();
    let model = f.dir.join("model");
    std::fs::create_dir(&model).unwrap();
    let fifo = model.join("model.safetensors");
    let made = Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipping: mkfifo is not available");
        return;
    }
    for a in [
        args(&["inspect", &s(&fifo)]),
        args(&["inspect", &s(&model)]),
        args(&["convert", &s(&model), &s(&f.dir.join("out"))]),
    ] {
        let r = run_emu(&a, Stdio::null(), &[]);
        check(&a, &r, &Expect::Error(&["model.safetensors", "FIFO"]));
    }
    // A symlink loop as a shard.
    let loopy = f.dir.join("loop");
    std::fs::create_dir(&loopy).unwrap();
    let lp = loopy.join("model.safetensors");
    std::os::unix::fs::symlink(&lp, &lp).unwrap();
    let a = args(&["inspect", &s(&lp)]);
    check(&a, &run_emu(&a, Stdio::null(), &[]), &Expect::Error(&["symlink loop"]));
}

fn fixture_checkpoint() -> String {
    s(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/loader/safetensors_sharded"))
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let a = args(&["inspect", &fixture_checkpoint()]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emu"));
    cmd.args(&a).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // The reader goes away before anything is written (as `| head -0`).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "a closed pipe is not an error to report: {stderr}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_an_error_not_a_panic() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full");
    let Ok(full) = full else {
        eprintln!("skipping: no /dev/full");
        return;
    };
    let a = args(&["inspect", &fixture_checkpoint()]);
    let r = run_emu(&a, Stdio::from(full), &[]);
    check(&a, &r, &Expect::Error(&["standard output"]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
}

#[test]
fn a_wgpu_run_without_xdg_runtime_dir_is_quiet() {
    let f = fixture();
    let a = args(&[
        "chat",
        "--model",
        "tiny",
        "--backend",
        "wgpu",
        "--image",
        &f.image,
        "--num-beams",
        "1",
        "--max-new-tokens",
        "2",
        "hi",
    ]);
    let r = run_emu(&a, Stdio::null(), &["XDG_RUNTIME_DIR"]);
    if r.code != Some(0) {
        assert!(r.stderr.contains("unavailable"), "{}", r.stderr);
        eprintln!("skipping: no wgpu adapter here ({})", r.stderr.trim());
        return;
    }
    assert!(!r.stderr.contains("XDG_RUNTIME_DIR"), "{}", r.stderr);
}
