//! Decoder configs whose values are outside any sane range are refused by
//! name instead of loading (upstream's configs, read from ../shared, with
//! one field broken at a time); the memory estimate behind `emu generate`'s
//! refusal of huge sizes grows as attention does.

use emu_decoder::{AutoencoderKLConfig, EulerDiscreteScheduler, UNet2DConditionConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const CONF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/emu2-conf/diffusion_config"
);

fn upstream(rel: &str) -> Option<Value> {
    let p = Path::new(CONF).join(rel);
    match std::fs::read_to_string(&p) {
        Ok(t) => Some(serde_json::from_str(&t).unwrap()),
        Err(_) => {
            eprintln!("skipping: {} not present", p.display());
            None
        }
    }
}

fn write(tag: &str, v: &Value) -> PathBuf {
    let p = std::env::temp_dir().join(format!("emu-decoder-range-{tag}-{}.json", std::process::id()));
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

fn with(base: &Value, field: &str, value: Value) -> Value {
    let mut v = base.clone();
    v[field] = value;
    v
}

#[test]
fn scheduler_values_out_of_range_are_refused() {
    let Some(base) = upstream("scheduler/scheduler_config.json") else {
        return;
    };
    let p = write("sched-ok", &base);
    EulerDiscreteScheduler::from_config_file(&p).unwrap();
    for (field, value, needle) in [
        ("beta_start", json!(-0.1), "beta_start"),
        ("beta_end", json!(1.5), "beta_end"),
        ("beta_end", json!(0.0001), "beta_start"),
        ("num_train_timesteps", json!(1u64 << 40), "num_train_timesteps"),
        ("num_train_timesteps", json!(1), "num_train_timesteps"),
    ] {
        let p = write("sched", &with(&base, field, value.clone()));
        let e = EulerDiscreteScheduler::from_config_file(&p)
            .err()
            .map(|e| e.to_string());
        let m = e.unwrap_or_else(|| panic!("{field} = {value} loaded"));
        assert!(m.contains(needle), "{field} = {value}: {m}");
    }
}

#[test]
fn vae_values_out_of_range_are_refused() {
    let Some(base) = upstream("vae/config.json") else {
        return;
    };
    AutoencoderKLConfig::from_file(write("vae-ok", &base)).unwrap();
    for (field, value, needle) in [
        ("scaling_factor", json!(0.0), "scaling_factor"),
        ("scaling_factor", json!(-1.0), "scaling_factor"),
        ("block_out_channels", json!([]), "`block_out_channels` is empty"),
        ("latent_channels", json!(0), "latent_channels"),
    ] {
        let e = AutoencoderKLConfig::from_file(write("vae", &with(&base, field, value.clone()))).err();
        let m = e.unwrap_or_else(|| panic!("{field} = {value} loaded")).to_string();
        assert!(m.contains(needle), "{field} = {value}: {m}");
    }
}

#[test]
fn an_empty_unet_block_list_says_so() {
    let Some(base) = upstream("unet/config.json") else {
        return;
    };
    let e = UNet2DConditionConfig::from_file(write("unet", &with(&base, "block_out_channels", json!([])))).err();
    let m = e.expect("empty block_out_channels loaded").to_string();
    assert!(m.contains("`block_out_channels` is empty"), "{m}");
}

#[test]
fn attention_estimates_grow_with_the_fourth_power_of_the_side() {
    let Some(unet) = upstream("unet/config.json") else {
        return;
    };
    let Some(vae) = upstream("vae/config.json") else { return };
    let unet = UNet2DConditionConfig::from_file(write("unet-est", &unet)).unwrap();
    let vae = AutoencoderKLConfig::from_file(write("vae-est", &vae)).unwrap();
    // SDXL at 1024 px: 128x128 latents; the UNet attends at 64x64 and 32x32.
    let u = unet.attention_bytes(2, 128, 128).unwrap();
    assert_eq!(unet.attention_bytes(2, 256, 256).unwrap(), 16 * u);
    assert!(u > 0);
    let v = vae.attention_bytes(128, 128);
    assert_eq!(v, 128u64.pow(4) * 8);
    // Absurd sizes saturate instead of overflowing.
    assert_eq!(vae.attention_bytes(usize::MAX, usize::MAX), u64::MAX);
}
