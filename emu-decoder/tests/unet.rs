//! UNet2DConditionModel against diffusers 0.42.1 (fixtures_decoder.py).

mod common;

use common::*;
use emu_backend_cpu::CpuBackend;
use emu_core::Checkpoint;
use emu_core::{DType, Tensor};
use emu_decoder::{TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};

fn unet_dir() -> std::path::PathBuf {
    fixtures().join("pipeline/unet")
}

fn load_unet(be: &CpuBackend, dtype: DType) -> UNet2DConditionModel<CpuBackend> {
    let cfg = UNet2DConditionConfig::from_file(unet_dir().join("config.json")).unwrap();
    let ckpt = Checkpoint::open_dir(unet_dir(), None).unwrap();
    UNet2DConditionModel::load(be, &ckpt.weights(), &cfg, dtype).unwrap()
}

fn time_ids(io: &Checkpoint, rows: usize) -> Vec<[f32; 6]> {
    f32s(io, "time_ids")
        .chunks(6)
        .take(rows)
        .map(|c| c.try_into().unwrap())
        .collect()
}

fn run(
    unet: &UNet2DConditionModel<CpuBackend>,
    io: &Checkpoint,
    sample: &str,
    t: f32,
    rows: usize,
    dtype: DType,
) -> Vec<f32> {
    let be = CpuBackend::new();
    let up = |k: &str| {
        Tensor::from_f32(&be, &dims(io, k), f32s(io, k))
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let ehs = up("encoder_hidden_states").narrow(0, 0, rows).unwrap();
    let cond = TextTimeCond {
        text_embeds: up("text_embeds").narrow(0, 0, rows).unwrap(),
        time_ids: time_ids(io, rows),
    };
    let y = unet.forward(&up(sample), t, &ehs, Some(&cond)).unwrap();
    assert_eq!(y.dtype(), dtype);
    y.to_f32_vec().unwrap()
}

#[test]
fn noise_prediction_matches_diffusers_f32() {
    let be = CpuBackend::new();
    let unet = load_unet(&be, DType::F32);
    let io = load("unet_io.safetensors");
    let t = f32s(&io, "timestep")[0];
    let e = rel_err(&run(&unet, &io, "sample", t, 2, DType::F32), &f32s(&io, "out"));
    println!("unet f32 rel err (batch 2, t={t}) {e:.3e}");
    assert!(e <= 1e-4, "rel err {e}");
    // A fractional timestep and a 6x10 latent, whose odd 3x5 level makes the
    // up blocks resize to the skip sizes instead of doubling.
    let t2 = f32s(&io, "timestep2")[0];
    let e2 = rel_err(&run(&unet, &io, "sample2", t2, 1, DType::F32), &f32s(&io, "out2"));
    println!("unet f32 rel err (6x10, t={t2}) {e2:.3e}");
    assert!(e2 <= 1e-4, "rel err {e2}");
}

#[test]
fn unsupported_config_values_are_rejected_by_name() {
    let text = std::fs::read_to_string(unet_dir().join("config.json")).unwrap();
    for (key, value) in [
        ("addition_embed_type", serde_json::json!("text")),
        ("use_linear_projection", serde_json::json!(false)),
        (
            "down_block_types",
            serde_json::json!(["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]),
        ),
        (
            "up_block_types",
            serde_json::json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
        ),
        ("mid_block_type", serde_json::json!("UNetMidBlock2DSimpleCrossAttn")),
        ("num_attention_heads", serde_json::json!(8)),
        ("class_embed_type", serde_json::json!("timestep")),
        ("resnet_time_scale_shift", serde_json::json!("scale_shift")),
        ("time_embedding_type", serde_json::json!("fourier")),
        (
            "transformer_layers_per_block",
            serde_json::json!([[1, 1], [2, 2], [2, 2]]),
        ),
        ("encoder_hid_dim_type", serde_json::json!("text_proj")),
        ("attention_type", serde_json::json!("gated")),
        ("act_fn", serde_json::json!("mish")),
        ("only_cross_attention", serde_json::json!(true)),
        ("dual_cross_attention", serde_json::json!(true)),
        ("upcast_attention", serde_json::json!(true)),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[key] = value.clone();
        let cfg: UNet2DConditionConfig = serde_json::from_value(v).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{key}={value}: {err}");
    }
}

#[test]
fn the_real_emu2_gen_unet_config_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/emu2-conf/diffusion_config/unet/config.json");
    if !path.exists() {
        eprintln!("skipping: {} not found", path.display());
        return;
    }
    let cfg = UNet2DConditionConfig::from_file(&path).unwrap();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280]);
    assert_eq!(cfg.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!(cfg.projection_class_embeddings_input_dim, Some(1792 + 6 * 256));
}

/// `load_quantized` against a dense UNet whose selected linears hold their
/// quantize-then-dequantize round trip: the same network, so the outputs
/// agree to the kernels' rounding. The fixture's widths (16, 24, 32; cross
/// attention 20) leave some linears without a whole Q8_0 block per row: they
/// stay dense, and the copy keeps them as they are too. The counts are the
/// fixture's (72 attention and 29 feed-forward linears with rows of 32k).
#[test]
fn quantized_transformer_linears_match_their_dequantized_weights() {
    use emu_core::{BlockQuant, QuantType};
    use emu_decoder::unet_linear_group;
    let be = CpuBackend::new();
    let cfg = UNet2DConditionConfig::from_file(unet_dir().join("config.json")).unwrap();
    let src = Checkpoint::open_dir(unet_dir(), None).unwrap();
    let io = load("unet_io.safetensors");
    let t = f32s(&io, "timestep")[0];
    let original = run(&load_unet(&be, DType::F32), &io, "sample", t, 2, DType::F32);
    let cases = [
        (BlockQuant::all(QuantType::Q8_0), 101),
        (BlockQuant::all(QuantType::Q4K), 101),
        (
            BlockQuant {
                attention: None,
                mlp: Some(QuantType::Q8_0),
            },
            29,
        ),
    ];
    for (i, (quant, expected)) in cases.into_iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("emu-unet-quant-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("diffusion_pytorch_model.safetensors");
        let select = |k: &str, d: &[usize]| quant.format(unet_linear_group(k)?, *d.last()?);
        let replaced = emu_core::testing::write_dequantized_copy(&src, &file, &select).unwrap();
        let reference = Checkpoint::open(&file).unwrap();
        let dense = UNet2DConditionModel::load(&be, &reference.weights(), &cfg, DType::F32).unwrap();
        let want = run(&dense, &io, "sample", t, 2, DType::F32);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(replaced, expected, "{quant:?}: linears with whole blocks");
        let q = UNet2DConditionModel::load_quantized(&be, &src.weights(), &cfg, DType::F32, quant).unwrap();
        let got = run(&q, &io, "sample", t, 2, DType::F32);
        let (e, moved) = (rel_err(&got, &want), rel_err(&want, &original));
        println!("unet {quant:?}: vs dequantized weights {e:.2e}, quantization moved the output {moved:.2e}");
        assert!(e <= 1e-5, "{quant:?}: rel err {e:.2e}");
        assert!(
            moved > 1e-4,
            "{quant:?}: quantization left the output unchanged ({moved:.2e})"
        );
    }
}
