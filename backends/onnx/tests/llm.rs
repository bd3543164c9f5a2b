//! The LLaMA decoder of emu-llm run on ONNX Runtime against transformers'
//! reference outputs (tests/fixtures/llm): prefill and cached decode steps,
//! MHA and GQA configs, f32; timed against the CPU backend on the same work.

use emu_backend_cpu::CpuBackend;
use emu_backend_onnx::OnnxBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::{Backend, DType, Tensor};
use emu_llm::{generate, GenerationConfig, Llama, LlamaConfig, Logits, SlotIds};
use std::path::PathBuf;
use std::time::Instant;

const SLOTS: SlotIds = SlotIds { image: 390, video: 391 };

fn dir(set: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llm")
        .join(set)
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    num / b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12)
}

struct Outputs {
    prefill_hidden: Vec<f32>,
    prefill_logits: Vec<f32>,
    decode_hidden: Vec<f32>,
    decode_logits: Vec<f32>,
}

/// Slot filling, a prefill with every position's logits, then one-token decode
/// steps against the cache, as the emu-llm fixture test does on the CPU.
fn run<B: Backend>(be: &B, set: &str, cases: &Checkpoint) -> Outputs {
    let d = dir(set);
    let cfg = LlamaConfig::from_file(d.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(d.join("model.safetensors")).unwrap();
    let m = Llama::load(be, &emu_llm::lm_weights(&ckpt).unwrap(), &cfg, DType::F32).unwrap();
    let up = |k: &str| Tensor::from_host(be, &cases.get(k).unwrap().to_dtype(DType::F32).unwrap()).unwrap();
    let ids: Vec<u32> = cases
        .get("slots.ids")
        .unwrap()
        .to_i64_vec()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let embeds = m
        .embed_with_visual(&ids, 1, Some(&up("slots.image")), Some(&up("slots.video")), SLOTS)
        .unwrap();
    let mut cache = m.new_cache(1, 40).unwrap();
    let out = m.forward_embeds(&embeds, &mut cache, Logits::All).unwrap();
    let prefill_hidden = out.hidden.to_f32_vec().unwrap();
    let prefill_logits = out.logits.unwrap().to_f32_vec().unwrap();
    let steps = up("decode.embeds");
    let (mut hs, mut ls) = (Vec::new(), Vec::new());
    for s in 0..steps.dim(1).unwrap() {
        let o = m
            .forward_embeds(&steps.narrow(1, s, 1).unwrap(), &mut cache, Logits::Last)
            .unwrap();
        hs.extend(o.hidden.to_f32_vec().unwrap());
        ls.extend(o.logits.unwrap().to_f32_vec().unwrap());
    }
    Outputs {
        prefill_hidden,
        prefill_logits,
        decode_hidden: hs,
        decode_logits: ls,
    }
}

fn decoder_matches_transformers(set: &str) {
    let Some(be) = emu_core::testing::available(OnnxBackend::new()) else {
        return;
    };
    let cases = Checkpoint::open(dir(set).join("cases.safetensors")).unwrap();
    let t = Instant::now();
    let got = run(&be, set, &cases);
    let t_onnx = t.elapsed();
    let t = Instant::now();
    let cpu = run(&CpuBackend::new(), set, &cases);
    let t_cpu = t.elapsed();
    let want = |k: &str| cases.get(k).unwrap().to_f32_vec().unwrap();
    for (what, g, w) in [
        ("prefill hidden", &got.prefill_hidden, want("prefill.hidden")),
        ("prefill logits", &got.prefill_logits, want("prefill.logits")),
        ("decode hidden", &got.decode_hidden, want("decode.hidden")),
        ("decode logits", &got.decode_logits, want("decode.logits")),
    ] {
        let e = rel_err(g, &w);
        eprintln!("{set} {what} (onnx f32): rel err {e:.3e}");
        assert!(e <= 1e-4, "{set} {what}: rel err {e}");
    }
    let vs_cpu = rel_err(&got.decode_logits, &cpu.decode_logits);
    eprintln!(
        "{set}: onnx {:.1} ms (first run, sessions compiled), cpu {:.1} ms; decode logits onnx vs cpu {vs_cpu:.2e}",
        t_onnx.as_secs_f64() * 1e3,
        t_cpu.as_secs_f64() * 1e3
    );
}

#[test]
fn mha_decoder_matches_transformers_on_onnx_runtime() {
    decoder_matches_transformers("mha");
}

#[test]
fn gqa_decoder_matches_transformers_on_onnx_runtime() {
    decoder_matches_transformers("gqa");
}

fn load<B: Backend>(be: &B, set: &str) -> Llama<B> {
    let d = dir(set);
    let cfg = LlamaConfig::from_file(d.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(d.join("model.safetensors")).unwrap();
    Llama::load(be, &emu_llm::lm_weights(&ckpt).unwrap(), &cfg, DType::F32).unwrap()
}

#[test]
fn greedy_generation_gives_the_cpu_backends_tokens() {
    let Ok(be) = OnnxBackend::new() else {
        return eprintln!("skipping: ONNX Runtime unavailable");
    };
    let cpu = CpuBackend::new();
    let greedy = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let mut checked = 0;
    for set in ["mha", "gqa"] {
        let cases = Checkpoint::open(dir(set).join("cases.safetensors")).unwrap();
        let (m_onnx, m_cpu) = (load(&be, set), load(&cpu, set));
        // Three prompts per config keep this at a few seconds: each prompt
        // length compiles its own prefill and decode graphs.
        for i in 0..3 {
            let Ok(h) = cases.get(&format!("gen.embeds.{i}")) else {
                break;
            };
            let h = h.to_dtype(DType::F32).unwrap();
            let t = Instant::now();
            let got = generate(&m_onnx, &Tensor::from_host(&be, &h).unwrap(), &[], &greedy, None).unwrap();
            let t_onnx = t.elapsed();
            let t = Instant::now();
            let want = generate(&m_cpu, &Tensor::from_host(&cpu, &h).unwrap(), &[], &greedy, None).unwrap();
            let t_cpu = t.elapsed();
            assert_eq!(got, want, "{set} prompt {i}");
            eprintln!(
                "{set} prompt {i}: {} tokens equal; onnx {:.1} ms, cpu {:.1} ms",
                got[0].len(),
                t_onnx.as_secs_f64() * 1e3,
                t_cpu.as_secs_f64() * 1e3
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "no generation prompts in the fixtures");
}
