//! `emu encode` and [`EncodePipeline`] on the tiny models.

use emu::tiny::{write_model, TinyKind};
use std::path::Path;
use std::process::{Command, Output};

fn emu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_emu"))
        .args(args)
        .output()
        .expect("run emu")
}

fn picture(dir: &Path, name: &str) -> String {
    let img = image::RgbImage::from_fn(33, 21, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, 40]));
    let path = dir.join(name);
    img.save(&path).unwrap();
    path.to_str().unwrap().to_string()
}

fn shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(k, t)| (k, t.shape().to_vec())).collect();
    v.sort();
    v
}

#[test]
fn encode_writes_features_of_every_model_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (picture(dir.path(), "a.png"), picture(dir.path(), "b.png"));
    let out = dir.path().join("f.safetensors");
    let o = emu(&[
        "encode",
        "--model",
        "tiny",
        "--image",
        &a,
        "--image",
        &b,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        shapes(&out),
        vec![
            ("pooled_tokens".to_string(), vec![2, 16, 16]),
            ("projected_tokens".to_string(), vec![2, 16, 32]),
            ("vision_features".to_string(), vec![2, 65, 16]),
        ]
    );
    let first = std::fs::read(&out).unwrap();
    let o = emu(&[
        "encode",
        "--model",
        "tiny",
        "--image",
        &a,
        "--image",
        &b,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_eq!(first, std::fs::read(&out).unwrap(), "deterministic");

    // An Emu2-Gen folder (its multimodal encoder) and a custom n_query.
    let gen = dir.path().join("gen");
    write_model(&gen, TinyKind::Gen).unwrap();
    let o = emu(&[
        "encode",
        "--model",
        gen.to_str().unwrap(),
        "--dtype",
        "f32",
        "--image",
        &a,
        "-o",
        out.to_str().unwrap(),
        "--n-query",
        "64",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(shapes(&out)[0], ("pooled_tokens".to_string(), vec![1, 64, 16]));

    let o = emu(&[
        "encode",
        "--model",
        "tiny",
        "--image",
        &a,
        "-o",
        out.to_str().unwrap(),
        "--n-query",
        "5",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("n_query 5"));
    let o = emu(&[
        "encode",
        "--model",
        "tiny",
        "--image",
        "/nonexistent.png",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).lines().count() == 1);
}
