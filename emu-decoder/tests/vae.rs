//! AutoencoderKL against diffusers 0.42.1 (fixtures_decoder.py).

mod common;

use common::*;
use emu_backend_cpu::CpuBackend;
use emu_core::Checkpoint;
use emu_core::{DType, Tensor};
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig};

fn load_vae(be: &CpuBackend, variant: Option<&str>, dtype: DType) -> AutoencoderKL<CpuBackend> {
    let dir = fixtures().join("pipeline/vae");
    let cfg = AutoencoderKLConfig::from_file(dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open_dir(&dir, variant).unwrap();
    AutoencoderKL::load(be, &ckpt.weights(), &cfg, dtype).unwrap()
}

#[test]
fn decode_matches_diffusers_f32() {
    let be = CpuBackend::new();
    let vae = load_vae(&be, None, DType::F32);
    assert_eq!(vae.config().scaling_factor, 0.13025);
    let io = load("vae_io.safetensors");
    let z = Tensor::from_f32(&be, &dims(&io, "latents"), f32s(&io, "latents")).unwrap();
    let y = vae.decode(&z).unwrap();
    assert_eq!(y.dims(), dims(&io, "decoded"));
    let e = rel_err(&y.to_f32_vec().unwrap(), &f32s(&io, "decoded"));
    println!("vae decode f32 rel err {e:.3e}");
    assert!(e <= 1e-4, "rel err {e}");
}

#[test]
fn decode_matches_diffusers_bf16_variant() {
    let be = CpuBackend::new();
    let vae = load_vae(&be, Some("bf16"), DType::BF16);
    let io = load("vae_io.safetensors");
    let z = Tensor::from_f32(&be, &dims(&io, "latents"), f32s(&io, "latents"))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let y = vae.decode(&z).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let e = rel_err(&y.to_f32_vec().unwrap(), &f32s(&io, "decoded_bf16"));
    println!("vae decode bf16 rel err {e:.3e}");
    assert!(e <= 2e-2, "rel err {e}");
}

#[test]
fn encode_matches_diffusers_f32() {
    let be = CpuBackend::new();
    let vae = load_vae(&be, None, DType::F32);
    let io = load("vae_io.safetensors");
    let x = Tensor::from_f32(&be, &dims(&io, "image"), f32s(&io, "image")).unwrap();
    let post = vae.encode(&x).unwrap();
    let e_mean = rel_err(&post.mean.to_f32_vec().unwrap(), &f32s(&io, "posterior_mean"));
    let e_logvar = rel_err(&post.logvar.to_f32_vec().unwrap(), &f32s(&io, "posterior_logvar"));
    println!("vae encode f32 rel err mean {e_mean:.3e} logvar {e_logvar:.3e}");
    assert!(e_mean <= 1e-4 && e_logvar <= 1e-4, "{e_mean} {e_logvar}");
}

#[test]
fn config_errors_name_the_field() {
    let dir = fixtures().join("pipeline/vae");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    for (key, value) in [
        ("act_fn", serde_json::json!("gelu")),
        (
            "up_block_types",
            serde_json::json!(["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ),
        ("norm_num_groups", serde_json::json!(5)),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[key] = value;
        let cfg: AutoencoderKLConfig = serde_json::from_value(v).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
    // A config that does not fit the weights names the first key that differs.
    let be = CpuBackend::new();
    let mut cfg = AutoencoderKLConfig::from_file(dir.join("config.json")).unwrap();
    cfg.latent_channels = 8;
    let ckpt = Checkpoint::open_dir(&dir, None).unwrap();
    let err = AutoencoderKL::load(&be, &ckpt.weights(), &cfg, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.conv_out.weight") && err.contains("expected"),
        "{err}"
    );
}

#[test]
fn the_real_emu2_gen_vae_config_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/emu2-conf/diffusion_config/vae/config.json");
    if !path.exists() {
        eprintln!("skipping: {} not found", path.display());
        return;
    }
    let cfg = AutoencoderKLConfig::from_file(&path).unwrap();
    assert_eq!(cfg.scaling_factor, 0.13025);
    assert_eq!(cfg.block_out_channels, vec![128, 256, 512, 512]);
    assert_eq!(cfg.downscale_factor(), 8);
}
