//! Every config parser on the same JSON text: the Emu2 `config.json`
//! (LLaMA and EVA halves) and diffusers' UNet, VAE and scheduler configs.
//! Whatever parses must also survive what the pipelines compute from it
//! (scheduler tables, size multiples, memory estimates) without a panic.
#![no_main]

use emu_decoder::{AutoencoderKLConfig, EulerDiscreteConfig, EulerDiscreteScheduler, UNet2DConditionConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = emu_llm::LlamaConfig::from_json_str(text);
    let _ = emu_vision::EmuVisionConfig::from_json_str(text);
    if let Ok(u) = serde_json::from_str::<UNet2DConditionConfig>(text) {
        if u.validate().is_ok() {
            for side in [0, 1, 64, 128, usize::MAX] {
                let _ = u.attention_bytes(2, side, side);
            }
        }
    }
    if let Ok(v) = serde_json::from_str::<AutoencoderKLConfig>(text) {
        if v.validate().is_ok() {
            let _ = v.downscale_factor();
            let _ = v.attention_bytes(usize::MAX, 3);
        }
    }
    if let Ok(c) = serde_json::from_str::<EulerDiscreteConfig>(text) {
        if let Ok(mut s) = EulerDiscreteScheduler::new(&c) {
            for steps in [1, 2, 50, 1000] {
                let _ = s.set_timesteps(steps);
            }
        }
    }
});
