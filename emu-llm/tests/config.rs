//! The upstream Emu2 configs (in `../shared/reference`, beside the checkout) parse
//! into the values of SPEC §3.1.

use emu_llm::LlamaConfig;
use std::path::PathBuf;

fn reference(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference")
        .join(rel)
}

fn check_emu2_llm(c: &LlamaConfig, vocab: usize) {
    assert_eq!(c.hidden_size, 6656);
    assert_eq!(c.intermediate_size, 17920);
    assert_eq!(c.num_hidden_layers, 60);
    assert_eq!(c.num_attention_heads, 52);
    assert_eq!(c.num_key_value_heads, 52);
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.max_position_embeddings, 2048);
    assert_eq!(c.vocab_size, vocab);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_id, vec![2]);
}

#[test]
fn hf_emu2_configs() {
    for (file, vocab) in [
        ("hf-configs/Emu2.config.json", 32272),
        ("hf-configs/Emu2-Chat.config.json", 32274),
        ("hf-configs/Emu2-Gen.multimodal_encoder.config.json", 32272),
    ] {
        let c = LlamaConfig::from_file(reference(file)).unwrap();
        check_emu2_llm(&c, vocab);
        assert_eq!(c.pad_token_id, Some(32000), "{file}");
    }
}

#[test]
fn native_llama_config() {
    let c = LlamaConfig::from_file(reference("emu2-conf/llama_config/config.json")).unwrap();
    // The LLaMA-1 base vocabulary; Emu2 adds its special tokens on top.
    check_emu2_llm(&c, 32000);
    assert_eq!(c.pad_token_id, Some(0));
}

#[test]
fn missing_file_is_named() {
    let e = LlamaConfig::from_file("/nonexistent/config.json").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/config.json"), "{e}");
}
