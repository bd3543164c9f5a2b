//! Every model component on a GPU backend against the PyTorch reference
//! fixtures (`tests/fixtures/`), and greedy decoding against the CPU
//! backend: the models are generic over the backend and run unchanged.
//! Shared by the GPU backends' `components` tests, which include this file
//! with `#[path]` and wrap each check in a `#[test]` that skips where their
//! backend cannot start.
#![allow(dead_code)] // each including test binary may use a subset

use emu_backend_cpu::CpuBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::{Backend, DType, Tensor};
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use emu_llm::{generate, GenerationConfig, Llama, LlamaConfig, Logits, SlotIds};
use emu_vision::VisionEncoder;
use std::path::{Path, PathBuf};

pub fn fixtures(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(set)
}

/// max|a - b| / max|b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| (*y as f64).abs()).fold(1e-30, f64::max);
    num / den
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-4
    } else {
        2e-2
    }
}

fn check(backend: &str, what: &str, got: &[f32], want: &[f32], dtype: DType) {
    let e = rel_err(got, want);
    println!("{backend} {what} ({dtype}): rel err {e:.3e}");
    assert!(
        e <= tol(dtype),
        "{backend} {what} ({dtype}): rel err {e:.3e} > {:.0e}",
        tol(dtype)
    );
}

fn f32s(c: &Checkpoint, key: &str) -> Vec<f32> {
    c.get_as(key, DType::F32).unwrap().to_f32_vec().unwrap()
}

fn upload<B: Backend>(be: &B, c: &Checkpoint, key: &str, dtype: DType) -> Tensor<B> {
    let h = c.get(key).unwrap().to_dtype(dtype).unwrap();
    Tensor::from_host(be, &h).unwrap()
}

const SLOTS: SlotIds = SlotIds { image: 390, video: 391 };

fn load_llm<B: Backend>(be: &B, set: &str, dtype: DType) -> (Llama<B>, Checkpoint) {
    let dir = fixtures("llm").join(set);
    let cfg = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(dir.join("model.safetensors")).unwrap();
    let root = emu_llm::lm_weights(&ckpt).unwrap();
    let model = Llama::load(be, &root, &cfg, dtype).unwrap();
    (model, Checkpoint::open(dir.join("cases.safetensors")).unwrap())
}

fn llm_prefill_and_decode<B: Backend>(be: &B, set: &str, dtype: DType) {
    let (m, cases) = load_llm(be, set, dtype);
    let expected = |key: &str| match dtype {
        DType::BF16 => f32s(&cases, &format!("bf16.{key}")),
        _ => f32s(&cases, key),
    };
    let ids: Vec<u32> = cases
        .get("slots.ids")
        .unwrap()
        .to_i64_vec()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let image = upload(be, &cases, "slots.image", dtype);
    let video = upload(be, &cases, "slots.video", dtype);
    let embeds = m.embed_with_visual(&ids, 1, Some(&image), Some(&video), SLOTS).unwrap();
    let mut cache = m.new_cache(1, 40).unwrap();
    let out = m.forward_embeds(&embeds, &mut cache, Logits::All).unwrap();
    check(
        be.name(),
        &format!("llm {set} prefill hidden"),
        &out.hidden.to_f32_vec().unwrap(),
        &expected("prefill.hidden"),
        dtype,
    );
    check(
        be.name(),
        &format!("llm {set} prefill logits"),
        &out.logits.unwrap().to_f32_vec().unwrap(),
        &expected("prefill.logits"),
        dtype,
    );
    let steps = upload(be, &cases, "decode.embeds", dtype);
    let mut logits = Vec::new();
    for s in 0..steps.dim(1).unwrap() {
        let o = m
            .forward_embeds(&steps.narrow(1, s, 1).unwrap(), &mut cache, Logits::Last)
            .unwrap();
        logits.extend(o.logits.unwrap().to_f32_vec().unwrap());
    }
    check(
        be.name(),
        &format!("llm {set} decode logits"),
        &logits,
        &expected("decode.logits"),
        dtype,
    );
}

/// LLaMA prefill and cached decode (MHA and GQA, f32 and bf16) against transformers.
pub fn llm_prefill_and_cached_decode_match_transformers<B: Backend>(be: &B) {
    for set in ["mha", "gqa"] {
        for dtype in [DType::F32, DType::BF16] {
            llm_prefill_and_decode(be, set, dtype);
        }
    }
}

/// Greedy decoding gives the CPU backend's tokens exactly.
pub fn greedy_tokens_are_identical_to_the_cpu_backend<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    for set in ["mha", "gqa"] {
        let (mg, cases) = load_llm(be, set, DType::F32);
        let (mc, _) = load_llm(&cpu, set, DType::F32);
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            ..Default::default()
        };
        let g = generate(&mg, &upload(be, &cases, "prefill.embeds", DType::F32), &[], &cfg, None).unwrap();
        let c = generate(
            &mc,
            &upload(&cpu, &cases, "prefill.embeds", DType::F32),
            &[],
            &cfg,
            None,
        )
        .unwrap();
        println!("llm {set} greedy: {} {g:?}, cpu {c:?}", be.name());
        assert_eq!(g, c, "{set}: greedy tokens differ");
    }
}

/// The EVA encoder's features and pooled projections against the reference.
pub fn vision_encoder_matches_the_reference<B: Backend>(be: &B) {
    let dir = fixtures("vision");
    let exp = Checkpoint::open(dir.join("expected_model.safetensors")).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let enc = VisionEncoder::from_dir(be, dir.join("hf"), dtype).unwrap();
        let pixels = upload(be, &exp, "pixels", DType::F32);
        let feats = enc.encode(&pixels).unwrap();
        check(
            be.name(),
            "vision features",
            &feats.to_f32_vec().unwrap(),
            &f32s(&exp, "features"),
            dtype,
        );
        for nq in [1, 4, 16] {
            let projected = enc.project(&enc.pool(&feats, nq).unwrap()).unwrap();
            check(
                be.name(),
                &format!("vision projected_{nq}"),
                &projected.to_f32_vec().unwrap(),
                &f32s(&exp, &format!("projected_{nq}")),
                dtype,
            );
        }
    }
}

/// AutoencoderKL decode and encode against diffusers.
pub fn vae_decode_and_encode_match_diffusers<B: Backend>(be: &B) {
    let dir = fixtures("decoder").join("pipeline/vae");
    let cfg = AutoencoderKLConfig::from_file(dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open_dir(&dir, None).unwrap();
    let vae = AutoencoderKL::load(be, &ckpt.weights(), &cfg, DType::F32).unwrap();
    let io = Checkpoint::open(fixtures("decoder").join("vae_io.safetensors")).unwrap();
    let y = vae.decode(&upload(be, &io, "latents", DType::F32)).unwrap();
    check(
        be.name(),
        "vae decode",
        &y.to_f32_vec().unwrap(),
        &f32s(&io, "decoded"),
        DType::F32,
    );
    let post = vae.encode(&upload(be, &io, "image", DType::F32)).unwrap();
    check(
        be.name(),
        "vae encode mean",
        &post.mean.to_f32_vec().unwrap(),
        &f32s(&io, "posterior_mean"),
        DType::F32,
    );
    check(
        be.name(),
        "vae encode logvar",
        &post.logvar.to_f32_vec().unwrap(),
        &f32s(&io, "posterior_logvar"),
        DType::F32,
    );
}

/// One UNet noise prediction against diffusers.
pub fn unet_noise_prediction_matches_diffusers<B: Backend>(be: &B) {
    let dir = fixtures("decoder").join("pipeline/unet");
    let cfg = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open_dir(&dir, None).unwrap();
    let unet = UNet2DConditionModel::load(be, &ckpt.weights(), &cfg, DType::F32).unwrap();
    let io = Checkpoint::open(fixtures("decoder").join("unet_io.safetensors")).unwrap();
    let time_ids: Vec<[f32; 6]> = f32s(&io, "time_ids")
        .chunks(6)
        .take(2)
        .map(|c| c.try_into().unwrap())
        .collect();
    let cond = TextTimeCond {
        text_embeds: upload(be, &io, "text_embeds", DType::F32).narrow(0, 0, 2).unwrap(),
        time_ids,
    };
    let ehs = upload(be, &io, "encoder_hidden_states", DType::F32)
        .narrow(0, 0, 2)
        .unwrap();
    let t = f32s(&io, "timestep")[0];
    let y = unet
        .forward(&upload(be, &io, "sample", DType::F32), t, &ehs, Some(&cond))
        .unwrap();
    check(
        be.name(),
        "unet noise prediction",
        &y.to_f32_vec().unwrap(),
        &f32s(&io, "out"),
        DType::F32,
    );
}
