//! `emu chat` on the tiny reference checkpoints of `tests/fixtures/pipeline`
//! (the library pipelines are compared stage by stage with the PyTorch
//! reference in `emu/tests/reference_pipeline.rs`; this checks that the
//! command finds the same models and gives the reference's tokens).

use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pipeline")
}

/// The token ids of a one-tensor safetensors file (u32 as dumped, i64 as the
/// reference writes them).
fn ids(path: &Path) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert_eq!(names.len(), 1, "{}: one tensor expected", path.display());
    let t = st.tensor(names[0]).unwrap();
    match t.dtype() {
        Dtype::U32 => t
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        d => panic!("{}: ids of dtype {d:?}", path.display()),
    }
}

/// `emu chat` finds both Emu2-Chat layouts the way users give them (a model
/// directory, a native file) and answers as the reference does.
#[test]
fn emu_chat_command_on_both_chat_layouts() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference/cases.json")).unwrap()).unwrap();
    let picture = fixtures().join("inputs/picture.png");
    for (model, case) in [
        (fixtures().join("chat"), "chat"),
        (fixtures().join("native/Emu2-Chat_pytorch_model.bf16.bin"), "native"),
    ] {
        let dump = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_emu"))
            .arg("chat")
            .arg("--model")
            .arg(&model)
            .arg("--image")
            .arg(&picture)
            .args(["--dtype", "f32", "--num-beams", "1", "--max-new-tokens", "12", "--dump"])
            .arg(dump.path())
            .arg("What is in this picture?")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "emu chat --model {}: {}",
            model.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let reference = fixtures().join("reference").join(case);
        assert_eq!(
            ids(&dump.path().join("input_ids.safetensors")),
            ids(&reference.join("input_ids.safetensors")),
            "{case}: prompt ids"
        );
        let want: Vec<i64> = cases[case]["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(
            ids(&dump.path().join("generated_ids.safetensors")),
            want,
            "{case}: `emu chat` answer ids"
        );
    }
}
