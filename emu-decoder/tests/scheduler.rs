//! EulerDiscreteScheduler against diffusers 0.42.1 (fixtures_decoder.py).

mod common;

use common::*;
use emu_backend_cpu::CpuBackend;
use emu_core::Tensor;
use emu_decoder::{EulerDiscreteConfig, EulerDiscreteScheduler};

fn emu_config() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("pipeline/scheduler/scheduler_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn with_overrides(overrides: &serde_json::Value) -> EulerDiscreteConfig {
    let mut cfg = emu_config();
    for (k, v) in overrides.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    serde_json::from_value(cfg).unwrap()
}

/// Timesteps agree exactly; sigmas within 2 float32 ulps. Every rounding
/// step of diffusers is mirrored except torch's float32 `sqrt` on the CPU,
/// which goes through MKL's vector math and is not correctly rounded (it
/// differs from the exact f32 square root by 1 ulp on ~19% of the 1000
/// training sigmas).
fn assert_ulps(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let mut exact = 0;
    for (x, y) in a.iter().zip(b) {
        let ulp = f32::EPSILON * y.abs();
        assert!((x - y).abs() <= 2.0 * ulp, "{what}: {x} vs {y}\n{a:?}\n{b:?}");
        exact += (x == y) as usize;
    }
    // Most values are bit-identical; a systematic error would not be.
    assert!(
        a.len() < 4 || exact * 2 >= a.len(),
        "{what}: only {exact} of {} identical",
        a.len()
    );
}

#[test]
fn timesteps_sigmas_and_init_noise_sigma_match_diffusers_exactly() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("scheduler/cases.json")).unwrap()).unwrap();
    let expected = load("scheduler/schedules.safetensors");
    assert!(cases.len() >= 24);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let mut s = EulerDiscreteScheduler::new(&with_overrides(&case["overrides"])).unwrap();
        s.set_timesteps(steps).unwrap();
        assert_eq!(
            s.timesteps(),
            f32s(&expected, &format!("{name}.timesteps")),
            "{name} timesteps"
        );
        assert_ulps(
            s.sigmas(),
            &f32s(&expected, &format!("{name}.sigmas")),
            &format!("{name} sigmas"),
        );
        assert_ulps(
            &[s.init_noise_sigma().unwrap()],
            &f32s(&expected, &format!("{name}.init_noise_sigma")),
            &format!("{name} init_noise_sigma"),
        );
    }
}

#[test]
fn the_real_emu2_gen_scheduler_config_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/emu2-conf/diffusion_config/scheduler/scheduler_config.json");
    if !path.exists() {
        eprintln!("skipping: {} not found", path.display());
        return;
    }
    let mut s = EulerDiscreteScheduler::from_config_file(&path).unwrap();
    s.set_timesteps(50).unwrap();
    let mut fixture = EulerDiscreteScheduler::new(&with_overrides(&serde_json::json!({}))).unwrap();
    fixture.set_timesteps(50).unwrap();
    assert_eq!(s.sigmas(), fixture.sigmas());
    assert_eq!(s.timesteps(), fixture.timesteps());
}

#[test]
fn scale_model_input_and_step_match_diffusers() {
    let be = CpuBackend::new();
    let io = load("scheduler/steps.safetensors");
    for (pred, spacing) in [
        ("epsilon", "leading"),
        ("epsilon", "linspace"),
        ("v_prediction", "leading"),
        ("v_prediction", "linspace"),
        ("sample", "trailing"),
    ] {
        let key = format!("{pred}_{spacing}");
        let mut s = EulerDiscreteScheduler::new(&with_overrides(
            &serde_json::json!({"prediction_type": pred, "timestep_spacing": spacing}),
        ))
        .unwrap();
        s.set_timesteps(10).unwrap();
        let up = |k: &str| Tensor::from_f32(&be, &dims(&io, k), f32s(&io, k)).unwrap();
        let mut sample = up(&format!("{key}.sample0"));
        for i in 0..3 {
            let scaled = s.scale_model_input(&sample, i).unwrap();
            let e = rel_err(&scaled.to_f32_vec().unwrap(), &f32s(&io, &format!("{key}.scaled{i}")));
            assert!(e <= 1e-6, "{key} scaled{i}: {e}");
            sample = s.step(&up(&format!("{key}.model_output{i}")), i, &sample).unwrap();
            let e = rel_err(
                &sample.to_f32_vec().unwrap(),
                &f32s(&io, &format!("{key}.sample{}", i + 1)),
            );
            assert!(e <= 1e-6, "{key} sample{}: {e}", i + 1);
        }
    }
}
