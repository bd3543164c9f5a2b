//! The guided sampling loop against the same loop written with diffusers
//! 0.42.1 components (fixtures_decoder.py, `build_sampling_io`).

mod common;

use common::*;
use emu_backend_cpu::CpuBackend;
use emu_core::{DType, Tensor};
use emu_decoder::{DiffusionDecoder, Progress, SamplingParams};

fn pipeline_dir() -> std::path::PathBuf {
    fixtures().join("pipeline")
}

#[test]
fn three_guided_steps_match_diffusers() {
    let be = CpuBackend::new();
    let dec = DiffusionDecoder::load_dir(&be, pipeline_dir(), None, DType::F32).unwrap();
    let io = load("sampling_io.safetensors");
    let p = f32s(&io, "params");
    let params = SamplingParams {
        num_inference_steps: p[0] as usize,
        guidance_scale: p[1] as f64,
        height: p[2] as usize,
        width: p[3] as usize,
        // The reference passes time ids [16, 16, 0, 0, 16, 16].
        original_size: (p[2] as usize, p[3] as usize),
        crop_coords: (0, 0),
    };
    assert_eq!(params.num_inference_steps, 3);
    let up = |k: &str| Tensor::from_f32(&be, &dims(&io, k), f32s(&io, k)).unwrap();
    let (cond, uncond, noise) = (up("cond"), up("uncond"), up("noise"));

    let mut seen = Vec::new();
    let latents = dec
        .denoise(&cond, Some(&uncond), &noise, &params, &mut |p: Progress| seen.push(p))
        .unwrap();
    assert_eq!(
        seen.iter().map(|p| (p.step, p.total)).collect::<Vec<_>>(),
        vec![(1, 3), (2, 3), (3, 3)]
    );
    assert_eq!(seen[0].timestep, 667.0);
    let e_lat = rel_err(&latents.to_f32_vec().unwrap(), &f32s(&io, "latents"));
    let image = dec.decode_latents(&latents).unwrap();
    let e_img = rel_err(&image.to_f32_vec().unwrap(), &f32s(&io, "image"));
    // Before the clamp to [0, 1], which hides differences in saturated pixels.
    let z = latents.affine(1.0 / dec.vae.config().scaling_factor, 0.0).unwrap();
    let e_dec = rel_err(
        &dec.vae.decode(&z).unwrap().to_f32_vec().unwrap(),
        &f32s(&io, "decoded"),
    );
    println!("sampling f32: latents rel err {e_lat:.3e}, decoded rel err {e_dec:.3e}, image rel err {e_img:.3e}");
    assert!(
        e_lat <= 1e-3 && e_dec <= 1e-3 && e_img <= 1e-3,
        "{e_lat} {e_dec} {e_img}"
    );

    let rgb = dec
        .generate(&cond, Some(&uncond), &noise, &params, &mut |_| {})
        .unwrap();
    assert_eq!(rgb.len(), 1);
    assert_eq!((rgb[0].width, rgb[0].height), (16, 16));
    let want = io.get("rgb8").unwrap().to_i64_vec().unwrap();
    let max_diff = rgb[0]
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as i64 - b).abs())
        .max()
        .unwrap();
    println!("sampling rgb8: max |diff| {max_diff}");
    assert!(max_diff <= 1, "rgb8 differs by {max_diff}");
}

#[test]
fn bad_arguments_are_errors() {
    let be = CpuBackend::new();
    let dec = DiffusionDecoder::load_dir(&be, pipeline_dir(), None, DType::F32).unwrap();
    let cond = Tensor::zeros(&be, &[1, 5, 20], DType::F32).unwrap();
    let noise = Tensor::zeros(&be, &[1, 4, 8, 8], DType::F32).unwrap();
    let params = SamplingParams {
        height: 16,
        width: 16,
        num_inference_steps: 1,
        ..Default::default()
    };
    // Guidance without unconditional embeddings.
    assert!(dec.denoise(&cond, None, &noise, &params, &mut |_| {}).is_err());
    // Noise of the wrong size, and a size the VAE cannot produce.
    let p2 = SamplingParams { height: 32, ..params };
    assert!(dec.denoise(&cond, Some(&cond), &noise, &p2, &mut |_| {}).is_err());
    let p3 = SamplingParams { height: 15, ..params };
    assert!(dec.denoise(&cond, Some(&cond), &noise, &p3, &mut |_| {}).is_err());
    // Without guidance only the conditional branch runs.
    let p4 = SamplingParams {
        guidance_scale: 1.0,
        ..params
    };
    let out = dec.denoise(&cond, None, &noise, &p4, &mut |_| {}).unwrap();
    assert_eq!(out.dims(), vec![1, 4, 8, 8]);
}

#[test]
fn loading_a_missing_variant_names_the_folder() {
    let be = CpuBackend::new();
    // The fixture has a bf16 variant for the VAE only.
    let err = DiffusionDecoder::load_dir(&be, pipeline_dir(), Some("bf16"), DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unet"), "{err}");
}

#[test]
fn time_ids_follow_upstream_defaults() {
    // EmuVisualGeneration.forward: original_size [1024, 1024] + crop_info [0, 0] + [height, width].
    let p = SamplingParams {
        height: 512,
        width: 768,
        ..Default::default()
    };
    assert_eq!(p.time_ids(), [1024.0, 1024.0, 0.0, 0.0, 512.0, 768.0]);
    assert_eq!((p.num_inference_steps, p.guidance_scale), (50, 3.0));
}

#[test]
fn a_batch_of_two_gives_each_row_its_own_image() {
    let be = CpuBackend::new();
    let dec = DiffusionDecoder::load_dir(&be, pipeline_dir(), None, DType::F32).unwrap();
    let io = load("sampling_io.safetensors");
    let up = |k: &str| Tensor::from_f32(&be, &dims(&io, k), f32s(&io, k)).unwrap();
    let (cond, uncond, noise) = (up("cond"), up("uncond"), up("noise"));
    let params = SamplingParams {
        height: 16,
        width: 16,
        num_inference_steps: 3,
        guidance_scale: 3.0,
        original_size: (16, 16),
        crop_coords: (0, 0),
    };
    // Row 0 is the reference prompt; row 1 swaps the prompts.
    let cond2 = Tensor::concat(&[&cond, &uncond], 0).unwrap();
    let uncond2 = Tensor::concat(&[&uncond, &cond], 0).unwrap();
    let noise2 = Tensor::concat(&[&noise, &noise], 0).unwrap();
    let latents = dec
        .denoise(&cond2, Some(&uncond2), &noise2, &params, &mut |_| {})
        .unwrap();
    let row0 = latents.narrow(0, 0, 1).unwrap().to_f32_vec().unwrap();
    let e = rel_err(&row0, &f32s(&io, "latents"));
    assert!(e <= 1e-3, "row 0 rel err {e}");
    let row1 = latents.narrow(0, 1, 1).unwrap().to_f32_vec().unwrap();
    assert!(rel_err(&row1, &row0) > 1e-2, "the rows did not get their own prompts");
    let images = dec
        .generate(&cond2, Some(&uncond2), &noise2, &params, &mut |_| {})
        .unwrap();
    assert_eq!(images.len(), 2);
}
