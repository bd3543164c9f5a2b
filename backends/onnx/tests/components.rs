//! Whole components on ONNX Runtime against the PyTorch reference fixtures
//! (f32, rel err <= 1e-4), each also exported to a standalone `.onnx` file with
//! named inputs, loaded back with ONNX Runtime and run on the same input; the
//! CPU backend runs the same work for timings.

use emu_backend_cpu::CpuBackend;
use emu_backend_onnx::{run_model_file, OnnxBackend};
use emu_core::checkpoint::Checkpoint;
use emu_core::{Backend, DType, HostTensor, Tensor};
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use emu_vision::VisionEncoder;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn fixtures(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(sub)
}

fn backend() -> Option<OnnxBackend> {
    emu_core::testing::available(OnnxBackend::new())
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    num / b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12)
}

fn get(c: &Checkpoint, key: &str) -> HostTensor {
    c.get(key).unwrap().to_dtype(DType::F32).unwrap()
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// Checks the in-process result against the reference, exports the graph with
/// `inputs` as named graph inputs, runs the file and checks it again.
fn check_and_export(
    be: &OnnxBackend,
    name: &str,
    inputs: &[(&str, &Tensor<OnnxBackend>, &HostTensor)],
    out: &Tensor<OnnxBackend>,
    want: &[f32],
    times: (Duration, Duration, Duration),
) {
    let got = out.to_f32_vec().unwrap();
    let e = rel_err(&got, want);
    let named: Vec<(&str, &<OnnxBackend as Backend>::Tensor)> = inputs.iter().map(|(n, t, _)| (*n, t.raw())).collect();
    let model = be.export(&named, &[("output", out.raw())], name).unwrap();
    let path = std::env::temp_dir().join(format!("emu-onnx-{name}-{}.onnx", std::process::id()));
    std::fs::write(&path, &model).unwrap();
    let feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, _, h)| (*n, *h)).collect();
    let (outs, t_file) = timed(|| run_model_file(&path, &feeds).unwrap());
    let _ = std::fs::remove_file(&path);
    let e_file = rel_err(&outs[0].to_f32_vec().unwrap(), want);
    eprintln!(
        "{name}: onnx rel err {e:.3e}, exported file ({} KiB) rel err {e_file:.3e}; \
         onnx {:.1} ms first (session compile), {:.1} ms again (cached session), file load+run {:.1} ms, cpu {:.1} ms",
        model.len() / 1024,
        times.0.as_secs_f64() * 1e3,
        times.2.as_secs_f64() * 1e3,
        t_file.as_secs_f64() * 1e3,
        times.1.as_secs_f64() * 1e3,
    );
    assert!(e <= 1e-4, "{name}: rel err {e}");
    assert!(e_file <= 1e-4, "{name}: exported file rel err {e_file}");
}

#[test]
fn vision_encoder_matches_the_reference_and_exports() {
    let Some(be) = backend() else { return };
    let exp = Checkpoint::open(fixtures("vision/expected_model.safetensors")).unwrap();
    let px = get(&exp, "pixels");
    let want = get(&exp, "features").to_f32_vec().unwrap();
    let enc = VisionEncoder::from_dir(&be, fixtures("vision/hf"), DType::F32).unwrap();
    let x = Tensor::from_host(&be, &px).unwrap();
    let (y, t_onnx) = timed(|| {
        let y = enc.encode(&x).unwrap();
        y.to_f32_vec().unwrap();
        y
    });
    let (_, t_warm) = timed(|| {
        enc.encode(&Tensor::from_host(&be, &px).unwrap())
            .unwrap()
            .to_f32_vec()
            .unwrap()
    });
    let cpu = CpuBackend::new();
    let enc_cpu = VisionEncoder::from_dir(&cpu, fixtures("vision/hf"), DType::F32).unwrap();
    let (_, t_cpu) = timed(|| {
        enc_cpu
            .encode(&Tensor::from_host(&cpu, &px).unwrap())
            .unwrap()
            .to_f32_vec()
            .unwrap()
    });
    check_and_export(
        &be,
        "vision_encode",
        &[("pixels", &x, &px)],
        &y,
        &want,
        (t_onnx, t_cpu, t_warm),
    );
}

#[test]
fn unet_matches_diffusers_and_exports() {
    let Some(be) = backend() else { return };
    let dir = fixtures("decoder/pipeline/unet");
    let io = Checkpoint::open(fixtures("decoder/unet_io.safetensors")).unwrap();
    let t = get(&io, "timestep").to_f32_vec().unwrap()[0];
    let time_ids: Vec<[f32; 6]> = get(&io, "time_ids")
        .to_f32_vec()
        .unwrap()
        .chunks(6)
        .map(|c| c.try_into().unwrap())
        .collect();
    let sample = get(&io, "sample");
    let ehs = get(&io, "encoder_hidden_states");
    let text = get(&io, "text_embeds");
    let want = get(&io, "out").to_f32_vec().unwrap();
    fn go<B: Backend>(
        be: &B,
        dir: &std::path::Path,
        h: (&HostTensor, &HostTensor, &HostTensor),
        t: f32,
        time_ids: &[[f32; 6]],
    ) -> (Tensor<B>, Tensor<B>, Tensor<B>) {
        let cfg = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
        let ckpt = Checkpoint::open_dir(dir, None).unwrap();
        let unet = UNet2DConditionModel::load(be, &ckpt.weights(), &cfg, DType::F32).unwrap();
        let (s, e) = (Tensor::from_host(be, h.0).unwrap(), Tensor::from_host(be, h.1).unwrap());
        let cond = TextTimeCond {
            text_embeds: Tensor::from_host(be, h.2).unwrap(),
            time_ids: time_ids.to_vec(),
        };
        let y = unet.forward(&s, t, &e, Some(&cond)).unwrap();
        y.to_f32_vec().unwrap();
        (s, e, y)
    }
    let ((s, e, y), t_onnx) = timed(|| go(&be, &dir, (&sample, &ehs, &text), t, &time_ids));
    let (_, t_warm) = timed(|| go(&be, &dir, (&sample, &ehs, &text), t, &time_ids));
    let (_, t_cpu) = timed(|| go(&CpuBackend::new(), &dir, (&sample, &ehs, &text), t, &time_ids));
    check_and_export(
        &be,
        "unet",
        &[("sample", &s, &sample), ("encoder_hidden_states", &e, &ehs)],
        &y,
        &want,
        (t_onnx, t_cpu, t_warm),
    );
}

#[test]
fn vae_decoder_matches_diffusers_and_exports() {
    let Some(be) = backend() else { return };
    let dir = fixtures("decoder/pipeline/vae");
    let io = Checkpoint::open(fixtures("decoder/vae_io.safetensors")).unwrap();
    let z = get(&io, "latents");
    let want = get(&io, "decoded").to_f32_vec().unwrap();
    fn go<B: Backend>(be: &B, dir: &std::path::Path, z: &HostTensor) -> (Tensor<B>, Tensor<B>) {
        let cfg = AutoencoderKLConfig::from_file(dir.join("config.json")).unwrap();
        let ckpt = Checkpoint::open_dir(dir, None).unwrap();
        let vae = AutoencoderKL::load(be, &ckpt.weights(), &cfg, DType::F32).unwrap();
        let x = Tensor::from_host(be, z).unwrap();
        let y = vae.decode(&x).unwrap();
        y.to_f32_vec().unwrap();
        (x, y)
    }
    let ((x, y), t_onnx) = timed(|| go(&be, &dir, &z));
    let (_, t_warm) = timed(|| go(&be, &dir, &z));
    let (_, t_cpu) = timed(|| go(&CpuBackend::new(), &dir, &z));
    check_and_export(
        &be,
        "vae_decode",
        &[("latents", &x, &z)],
        &y,
        &want,
        (t_onnx, t_cpu, t_warm),
    );
}
