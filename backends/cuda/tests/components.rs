//! Every component on the CUDA backend against the PyTorch reference
//! fixtures and greedy decoding against the CPU backend (the checks are in
//! `tests/backend_components.rs`, shared by the GPU backends).
//!
//! Skips with a message where there is no NVIDIA driver, device or CUDA library.

mod common;
#[path = "../../../tests/backend_components.rs"]
mod shared;

use common::backend;

#[test]
fn llm_prefill_and_cached_decode_match_transformers() {
    let Some(be) = backend() else { return };
    shared::llm_prefill_and_cached_decode_match_transformers(&be);
}

#[test]
fn greedy_tokens_are_identical_to_the_cpu_backend() {
    let Some(be) = backend() else { return };
    shared::greedy_tokens_are_identical_to_the_cpu_backend(&be);
}

#[test]
fn vision_encoder_matches_the_reference() {
    let Some(be) = backend() else { return };
    shared::vision_encoder_matches_the_reference(&be);
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    let Some(be) = backend() else { return };
    shared::vae_decode_and_encode_match_diffusers(&be);
}

#[test]
fn unet_noise_prediction_matches_diffusers() {
    let Some(be) = backend() else { return };
    shared::unet_noise_prediction_matches_diffusers(&be);
}
