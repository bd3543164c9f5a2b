//! `--offload sequential` end to end on the tiny models: the same bytes and
//! text as with every component resident, the preflight's peak as the
//! largest stage (a budget between the largest stage and the sum refuses
//! `--offload none` with a hint and runs sequentially), and `emu inspect`'s
//! memory plan (sums of the parts, staged = the largest).

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

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

fn picture(dir: &Path) -> PathBuf {
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 128]));
    let path = dir.join("pic.png");
    img.save(&path).unwrap();
    path
}

fn with_offload<'a>(args: &[&'a str], mode: &'a str) -> Vec<&'a str> {
    let mut a = args.to_vec();
    a.extend(["--offload", mode]);
    a
}

#[test]
fn generate_sequential_writes_the_same_png() {
    let dir = tempfile::tempdir().unwrap();
    let pic = picture(dir.path());
    let pic = pic.to_str().unwrap();
    let prompt = format!("a {{image {pic}}} on a red cube");
    let out = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    // Text and image (every stage: vision, LLM, UNet, VAE; guided, so the
    // default negative too), then the autoencoding mode (no LLM).
    for (i, p) in [prompt.as_str(), &format!("{{image {pic}}}")].iter().enumerate() {
        let (a, b) = (out(&format!("all{i}.png")), out(&format!("seq{i}.png")));
        let base = ["generate", "--model", "tiny", p, "--steps", "3", "--seed", "5"];
        let mut all = base.to_vec();
        all.extend(["-o", &a]);
        ok(emu(&all, &[]));
        let mut seq = base.to_vec();
        seq.extend(["-o", &b, "-v"]);
        let o = ok(emu(&with_offload(&seq, "sequential"), &[]));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "prompt {p}");
        // Each component loaded in its stage shows in the timings.
        let e = stderr(&o);
        for stage in ["load vision", "load unet", "load vae"] {
            assert!(e.contains(stage), "`{stage}` not in: {e}");
        }
        assert_eq!(e.contains("load llm"), i == 0, "{e}");
    }
    // A negative prompt with its own picture.
    let (a, b) = (out("neg_all.png"), out("neg_seq.png"));
    let neg = format!("{{image {pic}}} blurry");
    let base = [
        "generate",
        "--model",
        "tiny",
        "a cube",
        "--steps",
        "2",
        "--negative",
        &neg,
    ];
    let mut all = base.to_vec();
    all.extend(["-o", &a, "--offload", "none"]);
    ok(emu(&all, &[]));
    let mut seq = base.to_vec();
    seq.extend(["-o", &b]);
    ok(emu(&with_offload(&seq, "sequential"), &[]));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn chat_and_complete_sequential_give_the_same_text() {
    let dir = tempfile::tempdir().unwrap();
    let pic = picture(dir.path());
    let pic = pic.to_str().unwrap();
    for beams in ["1", "3"] {
        let args = [
            "chat",
            "--model",
            "tiny",
            "--image",
            pic,
            "--max-new-tokens",
            "8",
            "--num-beams",
            beams,
            "what is this?",
        ];
        let all = ok(emu(&args, &[]));
        let seq = ok(emu(&with_offload(&args, "sequential"), &[]));
        assert!(!all.stdout.is_empty());
        assert_eq!(all.stdout, seq.stdout, "--num-beams {beams}");
    }
    // Text only: the vision encoder is never loaded.
    let args = ["chat", "--model", "tiny", "--max-new-tokens", "6", "hello", "-v"];
    let seq = ok(emu(&with_offload(&args, "sequential"), &[]));
    assert_eq!(ok(emu(&args, &[])).stdout, seq.stdout);
    let e = stderr(&seq);
    assert!(e.contains("load llm") && !e.contains("load vision"), "{e}");
    let prompt = format!("{{image {pic}}}[red, 3].{{image {pic}}}");
    let args = ["complete", "--model", "tiny", &prompt, "--max-new-tokens", "6"];
    assert_eq!(
        ok(emu(&args, &[])).stdout,
        ok(emu(&with_offload(&args, "sequential"), &[])).stdout
    );
}

/// `emu inspect tiny --json`'s memory plan.
fn plan() -> serde_json::Value {
    let o = ok(emu(&["inspect", "tiny", "--json"], &[]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["memory_plan"].clone()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_budget_between_the_largest_stage_and_the_sum_needs_sequential() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    // The tiny model runs in f32: the preflight's amounts, from inspect.
    let p = plan();
    let f32 = &p["formats"][0];
    assert_eq!(f32["format"], "f32");
    let (staged, all) = (u(&f32["load_peak_staged"]), u(&f32["load_peak_all_resident"]));
    assert!(staged < all, "{f32}");
    let budget = ((staged + all) / 2).to_string();
    let env = [("EMU_MEMORY_AVAILABLE", budget.as_str())];
    let args = ["generate", "--model", "tiny", "a cube", "--steps", "2", "-o", out];
    let o = emu(&args, &env);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    for part in [
        "not enough memory for loading the model",
        "decoder: ",
        "UNet weights in f32 + VAE weights in f32",
        "or --offload sequential (one component in memory at a time; the largest, llm, fits)",
    ] {
        assert!(e.contains(part), "`{part}` not in: {e}");
    }
    ok(emu(&with_offload(&args, "sequential"), &env));
    // Below the largest stage even sequential is refused, naming the stage,
    // and no longer suggests it.
    let small = (staged - 1).to_string();
    let o = emu(&with_offload(&args, "sequential"), &[("EMU_MEMORY_AVAILABLE", &small)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("not enough memory for loading the model, llm stage (--offload sequential)"),
        "{e}"
    );
    let o = emu(&args, &[("EMU_MEMORY_AVAILABLE", &small)]);
    assert!(!stderr(&o).contains("--offload sequential"), "{}", stderr(&o));
}

#[test]
fn inspect_shows_the_memory_plan_of_every_component() {
    let p = plan();
    let formats = p["formats"].as_array().unwrap();
    let names: Vec<&str> = formats.iter().map(|f| f["format"].as_str().unwrap()).collect();
    assert_eq!(names, ["f32", "bf16", "q8_0", "q4_k", "q8_0 all", "q4_k all"]);
    for f in formats {
        let parts: Vec<(&str, u64)> = f["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap(), u(&c["bytes"])))
            .collect();
        let order: Vec<&str> = parts.iter().map(|(n, _)| *n).collect();
        assert_eq!(order, ["vision", "llm", "unet", "vae"]);
        assert_eq!(u(&f["all_resident"]), parts.iter().map(|(_, b)| b).sum::<u64>(), "{f}");
        assert_eq!(u(&f["staged"]), parts.iter().map(|(_, b)| *b).max().unwrap(), "{f}");
        assert!(u(&f["load_peak_staged"]) <= u(&f["load_peak_all_resident"]));
    }
    // bf16 halves every float; quantizing shrinks only the LLM, and with
    // "all" the vision encoder and the UNet too (the tiny EVA's fc2 and the
    // UNet's ff.net.2 have whole Q8_0 blocks: 2 x [16, 32] in bf16 is 2048
    // bytes, in Q8_0 2 x 16 blocks of 34), never the VAE.
    let bytes = |i: usize, c: usize| u(&formats[i]["components"][c]["bytes"]);
    for c in 0..4 {
        assert_eq!(bytes(0, c), 2 * bytes(1, c));
    }
    assert!(bytes(2, 1) < bytes(1, 1));
    assert_eq!(bytes(2, 2), bytes(1, 2));
    assert_eq!(bytes(4, 0), bytes(2, 0) - 2048 + 2 * 16 * 34);
    assert_eq!(bytes(4, 1), bytes(2, 1));
    assert!(bytes(4, 2) < bytes(2, 2));
    assert_eq!(bytes(4, 3), bytes(2, 3));
    // A budget decides the fits columns.
    let o = ok(emu(&["inspect", "tiny"], &[("EMU_MEMORY_AVAILABLE", "1GiB")]));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    for part in [
        "memory to run",
        "all resident (sum)",
        "staged (largest, --offload sequential)",
        "fits all resident",
        "1.07 GB of host memory available",
    ] {
        assert!(text.contains(part), "`{part}` not in: {text}");
    }
    let o = ok(emu(&["inspect", "tiny", "--json"], &[("EMU_MEMORY_AVAILABLE", "1KiB")]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["memory_plan"]["formats"][0]["fits_staged"], false);
    assert_eq!(v["memory_plan"]["host_available"], 1024);
}
