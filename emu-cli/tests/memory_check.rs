//! The memory preflight end to end on the tiny model, with the host's
//! available memory faked through `EMU_MEMORY_AVAILABLE` (the injectable
//! source): a run that cannot fit is refused before loading (or before
//! generating) with one line that names every part and both amounts, and
//! the escape hatches let it run anyway.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn emu(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emu"));
    cmd.args(args)
        .env_remove("EMU_NO_MEMORY_CHECK")
        .env_remove("EMU_MEMORY_AVAILABLE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run emu")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lines of stderr other than the tiny model's notice.
fn error_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note: `--model tiny`"))
        .map(str::to_string)
        .collect()
}

fn picture(dir: &Path) -> PathBuf {
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let path = dir.join("pic.png");
    img.save(&path).unwrap();
    path
}

fn chat_args<'a>(img: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["chat", "--model", "tiny", "--image", img];
    a.extend_from_slice(extra);
    if !extra.contains(&"--max-new-tokens") {
        a.extend(["--max-new-tokens", "4"]);
    }
    a.push("hi");
    a
}

#[test]
fn a_model_that_cannot_fit_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path());
    let img = img.to_str().unwrap();
    let o = emu(&chat_args(img, &[]), &[("EMU_MEMORY_AVAILABLE", "64KiB")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = error_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let e = &lines[0];
    for part in [
        "error: not enough memory for loading the model: need about ",
        "vision: ",
        " weights in f32",
        "llm: ",
        "loading: ",
        "for the largest tensor while it is read and converted",
        "have 64.0 KiB",
        "--dtype bf16",
        "--no-memory-check",
        "EMU_NO_MEMORY_CHECK=1",
    ] {
        assert!(e.contains(part), "`{part}` not in: {e}");
    }
    assert!(!stderr(&o).contains("panicked"));

    // Both escape hatches run the same command to its end.
    let mut args = chat_args(img, &[]);
    args.insert(0, "--no-memory-check");
    let o = emu(&args, &[("EMU_MEMORY_AVAILABLE", "64KiB")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = emu(
        &chat_args(img, &[]),
        &[("EMU_MEMORY_AVAILABLE", "64KiB"), ("EMU_NO_MEMORY_CHECK", "1")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // And with enough memory, no flag is needed.
    let o = emu(&chat_args(img, &[]), &[("EMU_MEMORY_AVAILABLE", "4GiB")]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_kv_cache_that_cannot_fit_is_refused_before_generating() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path());
    let img = img.to_str().unwrap();
    // The tiny model's weights fit in 24 MiB; 64 beams of a 900-token
    // context (2 layers x 2 x 64 x ~950 x 4 heads x 8 x 4 bytes, about 31 MiB) do not.
    let big = chat_args(img, &["--num-beams", "64", "--max-new-tokens", "900"]);
    let o = emu(&big, &[("EMU_MEMORY_AVAILABLE", "24MiB")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let lines = error_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let e = &lines[0];
    for part in [
        "not enough memory for generating 900 tokens after a ",
        "llm: ",
        "KV cache (2 layers x 2 x 64 beams x ",
        "kv heads x 8 x 4 bytes)",
        "have 24.0 MiB",
        "lower --max-new-tokens or --num-beams, or use a shorter prompt",
    ] {
        assert!(e.contains(part), "`{part}` not in: {e}");
    }
    // The same model answers a small request within the same budget.
    let o = emu(
        &chat_args(img, &["--num-beams", "1"]),
        &[("EMU_MEMORY_AVAILABLE", "24MiB")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_bad_memory_budget_is_an_error_naming_the_variable() {
    let o = emu(
        &["chat", "--model", "tiny", "--max-new-tokens", "2", "hi"],
        &[("EMU_MEMORY_AVAILABLE", "lots")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("EMU_MEMORY_AVAILABLE") && e.contains("lots"), "{e}");
}
