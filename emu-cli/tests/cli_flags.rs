//! The global flags (`--threads`, `--progress`, `--no-progress`) and stop
//! strings (`--stop`) of the `emu` binary, on the built-in tiny model
//! (random weights: its words are meaningless, only where it stops matters).

use std::process::{Command, Output};

const DOG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/emu2-examples/dog.jpg"
);

fn emu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_emu"))
        .args(args)
        .output()
        .expect("run emu")
}

fn ok(args: &[&str]) -> (String, String) {
    let o = emu(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "emu {args:?} failed: {err}");
    (String::from_utf8_lossy(&o.stdout).into_owned(), err)
}

/// A small picture of our own when the shared demo images are not there.
fn picture(dir: &std::path::Path) -> String {
    if std::path::Path::new(DOG).is_file() {
        return DOG.to_string();
    }
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 90]));
    let p = dir.join("pic.png");
    img.save(&p).unwrap();
    p.to_str().unwrap().to_string()
}

fn answer(img: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "chat",
        "--model",
        "tiny",
        "--image",
        img,
        "what is this?",
        "--max-new-tokens",
        "16",
    ];
    args.extend_from_slice(extra);
    let (out, _) = ok(&args);
    out.strip_suffix('\n').expect("answer ends with a newline").to_string()
}

/// More bytes than any tiny piece decodes to (at most a word-initial space
/// and three letters, or one byte piece): a stop string is completed by one
/// token, which may run past it by less than that.
const LONGEST_PIECE: usize = 8;

#[test]
fn stop_strings_end_greedy_answers() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path());
    let full = answer(&img, &["--num-beams", "1"]);
    assert!(full.len() > 12, "answer too short to cut: {full:?}");
    let mut checked = 0;
    for start in [3, full.len() / 2] {
        let Some(stop) = full.get(start..start + 3) else {
            continue;
        };
        if stop.trim().len() < 3 {
            continue;
        }
        let at = full.find(stop).unwrap() + stop.len();
        let cut = answer(&img, &["--num-beams", "1", "--stop", "no such text", "--stop", stop]);
        assert!(full.starts_with(&cut), "{cut:?} is not a prefix of {full:?}");
        assert!(
            cut.len() >= at && cut.len() < at + LONGEST_PIECE,
            "{cut:?} does not end at {stop:?}"
        );
        assert!(
            cut.len() < full.len() || at == full.len(),
            "{stop:?} did not stop {full:?}"
        );
        checked += 1;
    }
    assert!(checked > 0, "no usable stop string in {full:?}");
}

#[test]
fn stop_strings_end_beams_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path());
    let full = answer(&img, &[]);
    // One letter of the beam answer: the beams that reach it end there.
    let stop = full.trim().chars().next().expect("empty answer").to_string();
    let cut = answer(&img, &["--stop", &stop]);
    let at = cut.find(&stop).expect("the stop string is in the answer") + stop.len();
    assert!(cut.len() < at + LONGEST_PIECE, "{cut:?} runs on past {stop:?}");
    let prompt = format!("{{image {img}}} is a");
    let (free, _) = ok(&[
        "complete",
        "--model",
        "tiny",
        &prompt,
        "--num-beams",
        "1",
        "--max-new-tokens",
        "12",
    ]);
    let stop: String = free.trim().chars().take(2).collect();
    let stop = stop.as_str();
    let (cut, _) = ok(&[
        "complete",
        "--model",
        "tiny",
        &prompt,
        "--num-beams",
        "1",
        "--max-new-tokens",
        "12",
        "--stop",
        stop,
    ]);
    assert!(
        free.starts_with(cut.trim_end()) && cut.contains(stop),
        "{cut:?} vs {free:?}"
    );
    assert!(cut.trim_end().len() < stop.len() + LONGEST_PIECE, "{cut:?}");
}

#[test]
fn threads_flag_sets_the_cpu_pool() {
    let dir = tempfile::tempdir().unwrap();
    let img = picture(dir.path());
    for args in [vec!["--threads", "2", "chat"], vec!["chat", "--threads", "2"]] {
        let mut a = args.clone();
        a.extend([
            "--model",
            "tiny",
            "--image",
            &img,
            "hi",
            "--max-new-tokens",
            "3",
            "--verbose",
        ]);
        let (_, err) = ok(&a);
        assert!(err.contains("cpu threads: 2"), "{err}");
    }
    let o = emu(&["--threads", "many", "chat", "--model", "tiny", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--threads"), "{err}");
}

#[test]
fn progress_bars_follow_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let gen = |flags: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            "tiny",
            "a red cube",
            "-o",
            out.to_str().unwrap(),
            "--steps",
            "3",
        ];
        a.extend_from_slice(flags);
        ok(&a).1
    };
    // Forced on: a bar per checkpoint loaded and one for the steps, drawn in
    // place, each with its rate and time left.
    let err = gen(&["--progress"]);
    for needle in [
        "loading unet/",
        "loading vae/",
        "denoising [",
        "3/3 steps",
        "\r",
        "steps/s",
        "tensors/s",
        "ETA ",
    ] {
        assert!(err.contains(needle), "`{needle}` missing: {err:?}");
    }
    assert!(err.contains("tensors, ") && err.contains(" kB / "), "{err:?}");
    // Text answers report their rate.
    let (_, err) = ok(&[
        "chat",
        "--model",
        "tiny",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "3",
        "--progress",
        "hi",
    ]);
    assert!(err.contains("generated ") && err.contains(" tokens/s)"), "{err:?}");
    let (_, err) = ok(&[
        "chat",
        "--model",
        "tiny",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "3",
        "hi",
    ]);
    assert!(!err.contains("tokens/s"), "{err:?}");
    // stderr is a pipe here: no bars by default, nor with --no-progress.
    for flags in [&[][..], &["--no-progress"], &["--progress", "--no-progress"]] {
        let err = gen(flags);
        assert!(!err.contains('\r') && !err.contains("denoising"), "{flags:?}: {err:?}");
    }
}

#[test]
fn help_documents_the_global_flags() {
    let (out, _) = ok(&["--help"]);
    for flag in ["--threads <N>", "--progress", "--no-progress", "ONNX Runtime"] {
        assert!(out.contains(flag), "`{flag}` missing from emu --help");
    }
    let (out, _) = ok(&["chat", "--help"]);
    assert!(out.contains("--stop <STRING>"), "{out}");
}
