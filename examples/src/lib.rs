//! Runnable examples of the emu-rs library API, written the way a project
//! that depends on emu-rs would write them. Each one runs on the built-in
//! tiny model (random weights: its answers and images are meaningless, it
//! only shows the calls working) or on a checkpoint directory you give it:
//!
//! | example | what it shows |
//! |---|---|
//! | `chat` | Emu2-Chat: a question about an image, the answer streamed |
//! | `few_shot` | Emu2 (base): an interleaved image/text few-shot prompt, completed |
//! | `text_to_image` | Emu2-Gen: a prompt to a PNG |
//! | `encode_image` | the EVA-CLIP encoder alone: features, pooled tokens, projected embeddings |
//! | `llama_greedy` | the LLaMA decoder alone: greedy decoding from token ids |
//! | `diffusion_decoder` | the UNet + VAE alone: an image from random visual embeddings |
//!
//! ```sh
//! cargo run -p emu-examples --example chat -- tiny ../shared/reference/emu2-examples/dog.jpg "what is this?"
//! cargo run --release -p emu-examples --example chat -- ~/models/Emu2-Chat photo.jpg "what is in the picture?"
//! ```
//!
//! Every example keeps its work in a `run` function that `tests/examples.rs`
//! calls on the tiny model, so the examples cannot silently rot.

/// The compute dtype the examples use for a model: f32 for the tiny one
/// (its reference outputs are f32), bf16 for real checkpoints (half the
/// memory of f32, and what the checkpoints were trained in).
pub fn dtype_for(model: &str) -> emu_core::DType {
    if model == "tiny" {
        emu_core::DType::F32
    } else {
        emu_core::DType::BF16
    }
}
