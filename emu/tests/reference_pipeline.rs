//! The library pipelines against the PyTorch reference pipeline of
//! `tools/reference/fixtures_pipeline.py`, on tiny random checkpoints in the
//! three real layouts (tests/fixtures/pipeline/):
//!
//! * `chat/`: Hugging Face Emu2-Chat (fp32 pickle shards + index, SentencePiece
//!   `tokenizer.model` only);
//! * `native/Emu2-Chat_pytorch_model.bf16.bin`: upstream's native single file
//!   (bf16 `EmuModel` state dict);
//! * `gen/`: Hugging Face Emu2-Gen (diffusers folders, `bf16` variant files,
//!   `tokenizer/tokenizer.json`).
//!
//! Models are found with [`ModelDir::resolve`], as the `emu` commands do, and
//! run with `--dump`; every dumped stage is compared with the reference's
//! tensor of the same name. Everything computes in f32 (bf16 files are
//! widened on load, as the reference does), so float stages must agree to
//! 1e-4 of the reference's largest magnitude, token ids exactly, final
//! latents to 1e-3 and decoded pixels to one step of 255.

use emu::pipeline::{
    upstream_generation, ChatOptions, ChatPipeline, Component, Dump, EncodePipeline, GenerationOptions,
    GenerationPipeline, ModelDir, ModelFamily,
};
use emu_backend_cpu::CpuBackend;
use emu_core::{DType, HostTensor};
use emu_prompt::{Item, Prompt, Role, Turn, Video};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// Relative tolerance of f32 stages (max |rust - reference| / max |reference|).
const F32_TOL: f64 = 1e-4;
/// Relative tolerance of the final latents after the whole generation.
const LATENTS_TOL: f64 = 1e-3;
/// bf16 end to end against PyTorch's bf16 run: relative error of every
/// stage (a few bf16 roundings of 2^-8 each), and pixel levels of 255.
const BF16_TOL: f64 = 5e-2;
const BF16_IMAGE_TOL: f64 = 16.0;
/// The bf16 run's error against the f32 reference, at most this multiple of
/// PyTorch bf16's.
const BF16_VS_TORCH: f64 = 2.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pipeline")
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("reference/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A tensor read from a one-tensor safetensors file, widened to f64.
struct Stage {
    dtype: Dtype,
    shape: Vec<usize>,
    values: Vec<f64>,
}

fn read_stage(path: &Path) -> Stage {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert_eq!(names.len(), 1, "{}: one tensor expected", path.display());
    let t = st.tensor(names[0]).unwrap();
    let data = t.data();
    let values: Vec<f64> = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::U32 => data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::U8 => data.iter().map(|&b| b as f64).collect(),
        d => panic!("{}: unexpected dtype {d:?}", path.display()),
    };
    Stage {
        dtype: t.dtype(),
        shape: t.shape().to_vec(),
        values,
    }
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64)
}

/// Compares dumped stage `name` with the reference; returns the measured
/// error (relative for floats, absolute for integers).
fn check_stage(reference: &Path, dump: &Path, name: &str, tol: f64) -> f64 {
    let err = stage_error(reference, dump, name);
    eprintln!("  {name:<24} {err:.3e}");
    assert!(err <= tol, "{name}: error {err:.3e} above {tol:e}");
    err
}

/// The error of `dump`'s stage `name` against `reference`'s: max |difference|
/// over max |reference| for floats, max |difference| for integers.
fn stage_error(reference: &Path, dump: &Path, name: &str) -> f64 {
    let file = format!("{name}.safetensors");
    let want = read_stage(&reference.join(&file));
    let got = read_stage(&dump.join(&file));
    // Ids are u32 in the dump and i64 in the reference; only values matter.
    let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
    assert_eq!(
        squeeze(&got.shape),
        squeeze(&want.shape),
        "{name}: shape {:?}, reference {:?}{}",
        got.shape,
        want.shape,
        if is_float(want.dtype) {
            String::new()
        } else {
            format!(": {:?} vs reference {:?}", got.values, want.values)
        }
    );
    let max_diff = got
        .values
        .iter()
        .zip(&want.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    assert!(got.values.iter().all(|v| v.is_finite()), "{name}: non-finite values");
    let err = if is_float(want.dtype) {
        let scale = want.values.iter().map(|v| v.abs()).fold(0.0f64, f64::max).max(1e-30);
        max_diff / scale
    } else {
        max_diff
    };
    err
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32_cpu() -> Component<CpuBackend> {
    Component::new(CpuBackend::new(), DType::F32)
}

fn input(name: &str) -> String {
    fixtures().join("inputs").join(name).to_string_lossy().into_owned()
}

/// One question about one picture (reference cases `chat`, `native`).
fn single_turn() -> Prompt {
    Prompt::new(vec![
        Item::Image(input("picture.png")),
        Item::Text("What is in this picture?".into()),
    ])
}

/// Two user turns around an assistant answer: a two-frame video, then a
/// picture (reference cases `chat_multi`, `native_multi`).
fn multi_turn() -> Prompt {
    let turn = |role, items| Turn { role, items };
    Prompt {
        turns: vec![
            turn(
                Role::User,
                vec![
                    Item::Video(Video {
                        frames: vec![input("picture.png"), input("frame2.png")],
                    }),
                    Item::Text("What happens in this video?".into()),
                ],
            ),
            turn(Role::Assistant, vec![Item::Text("A red box moves.".into())]),
            turn(
                Role::User,
                vec![
                    Item::Image(input("picture2.png")),
                    Item::Text("And in this picture?".into()),
                ],
            ),
        ],
    }
}

const CHAT_STAGES: [&str; 8] = [
    "pixel_values",
    "vision_features",
    "pooled_tokens",
    "projected_tokens",
    "input_ids",
    "input_embeds",
    "prefill_hidden",
    "prefill_logits",
];

const FRAME_STAGES: [&str; 4] = [
    "frame_values",
    "frame_features",
    "frame_pooled_tokens",
    "frame_projected_tokens",
];

/// The chat pipeline on `model` (a directory or a native file) against reference case `case`.
fn check_chat(model: &Path, case: &str, prompt: &Prompt, frames: bool) {
    let cases = cases();
    let dir = ModelDir::resolve(model.to_str().unwrap(), ModelFamily::Emu2Chat).unwrap();
    let cpu = f32_cpu();
    let mut pipe = ChatPipeline::load(&dir, &cpu, &cpu).unwrap();
    let dump_dir = tempfile::tempdir().unwrap();
    pipe.set_dump(Some(Dump::new(dump_dir.path()).unwrap()));
    let reference = fixtures().join("reference").join(case);
    eprintln!("{case}: {}", model.display());
    for (name, beams, penalty) in [("greedy", 1, 1.0), ("beam5_lp-1", 5, -1.0), ("beam3_lp2", 3, 2.0)] {
        let opts = ChatOptions {
            generation: emu_llm::GenerationConfig {
                max_new_tokens: cases["chat"]["max_new_tokens"].as_u64().unwrap() as usize,
                num_beams: beams,
                length_penalty: penalty,
                ..upstream_generation()
            },
            ..ChatOptions::default()
        };
        let answer = pipe.answer(prompt, &opts, None).unwrap();
        if name == "greedy" {
            // The stages up to the prefill are the same for every decoding.
            let frame_stages = if frames { &FRAME_STAGES[..] } else { &[] };
            for &stage in CHAT_STAGES.iter().chain(frame_stages) {
                let tol = if stage == "input_ids" { 0.0 } else { F32_TOL };
                check_stage(&reference, dump_dir.path(), stage, tol);
            }
        }
        let want = ids_of(&cases[case][name]);
        assert_eq!(answer.ids, want, "{case} {name}: generated ids");
        let dumped = read_stage(&dump_dir.path().join("generated_ids.safetensors"));
        assert_eq!(dumped.values, want.iter().map(|&i| i as f64).collect::<Vec<_>>());
        eprintln!("  {name}: {} tokens identical", want.len());
    }
}

#[test]
fn hf_chat_pickle_shards_match_the_reference() {
    let model = fixtures().join("chat");
    check_chat(&model, "chat", &single_turn(), false);
    check_chat(&model, "chat_multi", &multi_turn(), true);
}

#[test]
fn native_single_file_matches_the_reference() {
    let model = fixtures().join("native/Emu2-Chat_pytorch_model.bf16.bin");
    check_chat(&model, "native", &single_turn(), false);
    check_chat(&model, "native_multi", &multi_turn(), true);
}

/// Runs the Emu2-Gen fixture with every part in `dtype`; returns the dump folder.
fn run_gen(dtype: DType) -> tempfile::TempDir {
    let cases = cases();
    let gen = &cases["gen"];
    let dir = ModelDir::resolve(fixtures().join("gen").to_str().unwrap(), ModelFamily::Emu2Gen).unwrap();
    let cpu = Component::new(CpuBackend::new(), dtype);
    let mut pipe = GenerationPipeline::load(&dir, &cpu, &cpu, &cpu).unwrap();
    let dump_dir = tempfile::tempdir().unwrap();
    pipe.set_dump(Some(Dump::new(dump_dir.path()).unwrap()));
    let noise = read_stage(&fixtures().join("inputs/gen_noise.safetensors"));
    let noise = HostTensor::from_f32(&noise.shape, noise.values.iter().map(|&v| v as f32).collect()).unwrap();
    let size = gen["size"].as_u64().unwrap() as usize;
    let opts = GenerationOptions {
        steps: gen["steps"].as_u64().unwrap() as usize,
        guidance: gen["guidance"].as_f64().unwrap() as f32,
        size: Some((size, size)),
        latents: Some(noise),
        ..GenerationOptions::default()
    };
    let prompt = Prompt::new(vec![
        Item::Image(input("picture.png")),
        Item::Text("a red cube on the grass".into()),
    ]);
    let image = pipe.generate(&prompt, &opts, None).unwrap();
    assert_eq!((image.width, image.height), (size, size));
    dump_dir
}

/// Every stage of an Emu2-Gen run, in pipeline order.
const GEN_STAGES: [&str; 11] = [
    "pixel_values",
    "vision_features",
    "pooled_tokens",
    "projected_tokens",
    "input_ids",
    "input_embeds",
    "condition",
    "negative_input_ids",
    "negative_input_embeds",
    "negative_condition",
    "initial_latents",
];

#[test]
fn hf_gen_bf16_variants_match_the_reference() {
    let dump = run_gen(DType::F32);
    let reference = fixtures().join("reference/gen");
    eprintln!("gen (f32 compute on the bf16 files)");
    for name in GEN_STAGES {
        let tol = if name.ends_with("input_ids") { 0.0 } else { F32_TOL };
        check_stage(&reference, dump.path(), name, tol);
    }
    check_stage(&reference, dump.path(), "final_latents", LATENTS_TOL);
    check_stage(&reference, dump.path(), "image", 1.0);
}

/// Upstream runs Emu2-Gen in bf16 throughout; so does the reference in
/// `reference/gen_bf16` (weights, pixels and latents in bf16). Two bf16
/// implementations round differently (summation order, where results are
/// rounded: emu-rs computes norms and softmax in f32 and rounds once, keeps
/// the latents in f32 between steps), so every stage must agree to
/// [`BF16_TOL`] relative, the decoded picture to [`BF16_IMAGE_TOL`] levels;
/// and the bf16 run must be about as accurate as PyTorch's against the f32
/// reference (at most [`BF16_VS_TORCH`] times its error, plus one rounding).
#[test]
fn hf_gen_in_bf16_matches_the_bf16_reference() {
    let dump = run_gen(DType::BF16);
    let torch_bf16 = fixtures().join("reference/gen_bf16");
    let exact = fixtures().join("reference/gen");
    eprintln!("gen (bf16 compute) against PyTorch bf16");
    for name in GEN_STAGES.iter().copied().chain(["final_latents"]) {
        let tol = if name.ends_with("input_ids") { 0.0 } else { BF16_TOL };
        check_stage(&torch_bf16, dump.path(), name, tol);
    }
    check_stage(&torch_bf16, dump.path(), "image", BF16_IMAGE_TOL);
    eprintln!("  error against the f32 reference (PyTorch bf16's in brackets)");
    for name in ["condition", "negative_condition", "final_latents", "image"] {
        let ours = stage_error(&exact, dump.path(), name);
        let torch = stage_error(&exact, &torch_bf16, name);
        let floor = if name == "image" { 1.0 } else { 2f64.powi(-8) };
        eprintln!("  {name:<24} {ours:.3e} ({torch:.3e})");
        assert!(
            ours <= BF16_VS_TORCH * torch + floor,
            "{name}: bf16 error {ours:.3e} against the f32 reference, PyTorch's bf16 has {torch:.3e}"
        );
    }
}

#[test]
fn native_file_resolution_errors_say_what_to_change() {
    let native = fixtures().join("native/Emu2-Chat_pytorch_model.bf16.bin");
    let err = ModelDir::resolve(native.to_str().unwrap(), ModelFamily::Emu2Gen)
        .unwrap_err()
        .to_string();
    assert!(err.contains("BAAI/Emu2-Chat") && err.contains("emu chat"), "{err}");
    // A shard of a Hugging Face checkpoint is a file, but not a native one.
    let shard = fixtures().join("chat/pytorch_model-00001-of-00002.bin");
    let err = ModelDir::resolve(shard.to_str().unwrap(), ModelFamily::Emu2Chat)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no native Emu2 weights") && err.contains("model directory"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn native_file_without_a_tokenizer_says_where_one_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("Emu2-Chat_pytorch_model.bf16.bin");
    std::fs::copy(fixtures().join("native/Emu2-Chat_pytorch_model.bf16.bin"), &file).unwrap();
    // No config.json either: upstream's configuration is assumed, and the
    // tokenizer is looked for before any weight is read.
    let dir = ModelDir::resolve(file.to_str().unwrap(), ModelFamily::Emu2Chat).unwrap();
    let cpu = f32_cpu();
    let err = ChatPipeline::load(&dir, &cpu, &cpu).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.model") && err.contains("beside the checkpoint"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}

/// `EncodePipeline` (what `emu encode` runs) on the native file: the vision
/// encoder does not see `decoder.lm.project_up`, the pipeline finds it.
#[test]
fn encode_pipeline_on_the_native_file_matches_the_reference() {
    let native = fixtures().join("native/Emu2-Chat_pytorch_model.bf16.bin");
    let dir = ModelDir::resolve_any(native.to_str().unwrap(), ModelFamily::Emu2Chat).unwrap();
    let pipe = EncodePipeline::load(&dir, &f32_cpu()).unwrap();
    let out = pipe.encode(&[input("picture.png")], None).unwrap();
    let dump = tempfile::tempdir().unwrap();
    let d = Dump::new(dump.path()).unwrap();
    d.put("vision_features", &out.features).unwrap();
    d.put("pooled_tokens", &out.pooled).unwrap();
    d.put(
        "projected_tokens",
        &out.projected.expect("project_up of the native file"),
    )
    .unwrap();
    let reference = fixtures().join("reference/native");
    eprintln!("encode (native file)");
    for name in ["vision_features", "pooled_tokens", "projected_tokens"] {
        check_stage(&reference, dump.path(), name, F32_TOL);
    }
}
