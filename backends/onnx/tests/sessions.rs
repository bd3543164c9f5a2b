//! Loops reuse their compiled sessions: every greedy decode step after the
//! prefill runs one cached graph (the KV-cache write position, the RoPE row
//! and the causal offset are fed, not baked in), and the guided sampling loop
//! (timestep embeddings and sigmas are uploads, so fed) compiles a bounded
//! number of sessions once: a second run with new noise compiles nothing.

use emu_backend_cpu::CpuBackend;
use emu_backend_onnx::OnnxBackend;
use emu_core::checkpoint::Checkpoint;
use emu_core::{Backend, DType, HostTensor, Tensor};
use emu_decoder::{
    DiffusionDecoder, EulerDiscreteScheduler, SamplingParams, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel,
};
use emu_llm::{generate, GenerationConfig, Llama, LlamaConfig};
use std::path::PathBuf;

fn fixtures(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(sub)
}

fn backend() -> Option<OnnxBackend> {
    emu_core::testing::available(OnnxBackend::new())
}

fn llama<B: Backend>(be: &B, set: &str) -> Llama<B> {
    let d = fixtures("llm").join(set);
    let cfg = LlamaConfig::from_file(d.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(d.join("model.safetensors")).unwrap();
    Llama::load(be, &emu_llm::lm_weights(&ckpt).unwrap(), &cfg, DType::F32).unwrap()
}

#[test]
fn greedy_decoding_runs_one_session_for_every_step_and_gives_the_cpu_tokens() {
    let cpu = CpuBackend::new();
    for set in ["mha", "gqa"] {
        // A fresh backend per config: its session count is this test's alone.
        let Some(be) = backend() else { return };
        let cases = Checkpoint::open(fixtures("llm").join(set).join("cases.safetensors")).unwrap();
        let h = cases.get("gen.embeds.0").unwrap().to_dtype(DType::F32).unwrap();
        let (m_onnx, m_cpu) = (llama(&be, set), llama(&cpu, set));
        let mut sessions = Vec::new();
        for new in [10, 16] {
            let cfg = GenerationConfig {
                max_new_tokens: new,
                // No end-of-sequence ids (the default): every step runs.
                ..Default::default()
            };
            let before = be.cached_sessions();
            let got = generate(&m_onnx, &Tensor::from_host(&be, &h).unwrap(), &[], &cfg, None).unwrap();
            let want = generate(&m_cpu, &Tensor::from_host(&cpu, &h).unwrap(), &[], &cfg, None).unwrap();
            assert_eq!(got, want, "{set}: {new} tokens differ from the cpu backend");
            assert_eq!(got[0].len(), new, "{set}: generation stopped early");
            sessions.push(be.cached_sessions() - before);
        }
        // Prefill and one decode graph per cache capacity, however many tokens.
        assert_eq!(sessions, vec![2, 2], "{set}: sessions compiled per generation");
    }
}

fn f32s(c: &Checkpoint, k: &str) -> HostTensor {
    c.get(k).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn the_sampling_loop_compiles_once_and_runs_again_on_new_noise_without_compiling() {
    let Some(be) = backend() else { return };
    let cpu = CpuBackend::new();
    let io = Checkpoint::open(fixtures("decoder/sampling_io.safetensors")).unwrap();
    let p = f32s(&io, "params").to_f32_vec().unwrap();
    let params = SamplingParams {
        num_inference_steps: p[0] as usize,
        guidance_scale: p[1] as f64,
        height: p[2] as usize,
        width: p[3] as usize,
        original_size: (p[2] as usize, p[3] as usize),
        crop_coords: (0, 0),
    };
    assert!(params.num_inference_steps >= 3);
    let dir = fixtures("decoder/pipeline");
    let dec = DiffusionDecoder::load_dir(&be, &dir, None, DType::F32).unwrap();
    let dec_cpu = DiffusionDecoder::load_dir(&cpu, &dir, None, DType::F32).unwrap();
    let (cond, uncond) = (f32s(&io, "cond"), f32s(&io, "uncond"));
    let noise = f32s(&io, "noise");
    let other: Vec<f32> = noise.to_f32_vec().unwrap().iter().map(|x| -0.5 * x).collect();
    let other = HostTensor::from_f32(noise.dims(), other).unwrap();
    let mut compiled = Vec::new();
    for n in [&noise, &other] {
        let run = |be: &_| {
            let up = |h: &HostTensor| Tensor::from_host(be, h).unwrap();
            dec.denoise(&up(&cond), Some(&up(&uncond)), &up(n), &params, &mut |_| {})
                .unwrap()
                .to_f32_vec()
                .unwrap()
        };
        let before = be.cached_sessions();
        let got = run(&be);
        compiled.push(be.cached_sessions() - before);
        let up = |h: &HostTensor| Tensor::from_host(&cpu, h).unwrap();
        let want = dec_cpu
            .denoise(&up(&cond), Some(&up(&uncond)), &up(n), &params, &mut |_| {})
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let num = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let den = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(num / den <= 1e-4, "latents vs cpu rel err {}", num / den);
    }
    // `denoise` materializes the latents after every step, so the first step
    // (whose graph also builds the conditioning) and all later steps are two
    // graphs, whatever the number of steps; a second run compiles nothing.
    assert!(
        compiled[0] <= 2 && compiled[1] == 0,
        "sessions compiled by the first and second sampling run: {compiled:?}"
    );
    // More steps reuse the same two sessions.
    let more = SamplingParams {
        num_inference_steps: params.num_inference_steps + 2,
        ..params
    };
    let before = be.cached_sessions();
    let up = |h: &HostTensor| Tensor::from_host(&be, h).unwrap();
    dec.denoise(&up(&cond), Some(&up(&uncond)), &up(&noise), &more, &mut |_| {})
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert_eq!(be.cached_sessions() - before, 0, "a longer loop compiled new sessions");
}

/// Euler sampling without guidance, downloading the latents after every step
/// (as a caller that shows progress or streams intermediate images does):
/// final latents and the number of sessions after each step.
fn euler_downloading_each_step<B: Backend>(be: &B, steps: usize, count: &dyn Fn() -> usize) -> (Vec<f32>, Vec<usize>) {
    let dir = fixtures("decoder/pipeline");
    let io = Checkpoint::open(fixtures("decoder/sampling_io.safetensors")).unwrap();
    let cfg = UNet2DConditionConfig::from_file(dir.join("unet/config.json")).unwrap();
    let unet = UNet2DConditionModel::load(
        be,
        &Checkpoint::open(dir.join("unet")).unwrap().weights(),
        &cfg,
        DType::F32,
    )
    .unwrap();
    let mut sched = EulerDiscreteScheduler::from_config_file(dir.join("scheduler/scheduler_config.json")).unwrap();
    sched.set_timesteps(steps).unwrap();
    let ctx = Tensor::from_host(be, &f32s(&io, "cond")).unwrap();
    let cond = TextTimeCond {
        text_embeds: ctx.mean(1, false).unwrap(),
        time_ids: vec![[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]],
    };
    let sigma0 = sched.init_noise_sigma().unwrap();
    let noise: Vec<f32> = f32s(&io, "noise")
        .to_f32_vec()
        .unwrap()
        .iter()
        .map(|x| x * sigma0)
        .collect();
    let mut latents = HostTensor::from_f32(&[1, 4, 8, 8], noise).unwrap();
    let mut sessions = Vec::new();
    for i in 0..sched.num_steps() {
        let x = Tensor::from_host(be, &latents).unwrap();
        let input = sched.scale_model_input(&x, i).unwrap();
        let eps = unet.forward(&input, sched.timesteps()[i], &ctx, Some(&cond)).unwrap();
        latents = sched.step(&eps, i, &x).unwrap().to_host().unwrap();
        sessions.push(count());
    }
    (latents.to_f32_vec().unwrap(), sessions)
}

#[test]
fn a_sampling_loop_that_downloads_every_step_compiles_the_unet_step_once() {
    let Some(be) = backend() else { return };
    let cpu = CpuBackend::new();
    let (got, sessions) = euler_downloading_each_step(&be, 6, &|| be.cached_sessions());
    let (want, _) = euler_downloading_each_step(&cpu, 6, &|| 0);
    // The timestep embedding and the sigmas are uploads, so fed: every step
    // after the first (whose graph also pools the conditioning, which later
    // steps then read as a value) runs one session.
    assert_eq!(sessions, vec![1, 2, 2, 2, 2, 2], "sessions after each step");
    let num = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let den = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(num / den <= 1e-4, "latents vs cpu rel err {}", num / den);
}
