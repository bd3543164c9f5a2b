//! `emu inspect` on the loader fixtures and on layouts built in temp dirs.

mod common;

use common::*;
use emu_core::Checkpoint;
use safetensors::Dtype;
use std::collections::BTreeMap;

/// Per-dtype (tensors, params) and totals straight from the loader.
fn expected(ckpt: &Checkpoint) -> (BTreeMap<String, (u64, u64)>, u64) {
    let mut m = BTreeMap::new();
    let mut total = 0;
    for k in ckpt.keys() {
        let i = ckpt.info(k).unwrap();
        let n: u64 = i.dims.iter().map(|&d| d as u64).product();
        let e = m.entry(i.dtype.name().to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 += n;
        total += n;
    }
    (m, total)
}

fn dtype_stats(w: &serde_json::Value) -> BTreeMap<String, (u64, u64)> {
    w["dtypes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["dtype"].as_str().unwrap().to_string(),
                (d["tensors"].as_u64().unwrap(), d["params"].as_u64().unwrap()),
            )
        })
        .collect()
}

#[test]
fn pickle_shards_counts_match_the_index_and_headers() {
    let dir = loader_fixture("pickle_sharded");
    let index = json(&std::fs::read_to_string(dir.join("pytorch_model.bin.index.json")).unwrap());
    let n_index = index["weight_map"].as_object().unwrap().len() as u64;
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (by_dtype, params) = expected(&ckpt);

    let v = json(&emu_ok(&[&"inspect", &dir, &"--json"]));
    assert_eq!(v["layout"], "weights_directory");
    let c = &v["components"][0];
    let w = &c["weights"];
    assert_eq!(w["format"], "pickle");
    assert_eq!(w["index"], "pytorch_model.bin.index.json");
    assert_eq!(w["files"].as_array().unwrap().len(), 2);
    assert_eq!(w["tensors"].as_u64().unwrap(), n_index);
    assert_eq!(w["params"].as_u64().unwrap(), params);
    assert_eq!(dtype_stats(w), by_dtype);
    assert_eq!(v["totals"]["params"].as_u64().unwrap(), params);
    // Memory: floats at the target size, the rest as stored.
    let mut want = [0u64; 3];
    for k in ckpt.keys() {
        let i = ckpt.info(k).unwrap();
        let n: u64 = i.dims.iter().map(|&d| d as u64).product();
        for (slot, size) in want.iter_mut().zip([4u64, 2, 2]) {
            *slot += if i.dtype.is_float() {
                n * size
            } else {
                n * i.dtype.size_in_bytes() as u64
            };
        }
    }
    let m = &w["memory"];
    assert_eq!(
        [m["f32"].as_u64(), m["bf16"].as_u64(), m["f16"].as_u64()],
        want.map(Some)
    );

    let text = emu_ok(&[&"inspect", &dir]);
    assert!(text.contains(&format!("tensors: {n_index}")), "{text}");
    assert!(text.contains(&format!("parameters: {params}")), "{text}");
    assert!(text.contains("pytorch_model-00002-of-00002.bin"), "{text}");
    for (d, (t, _)) in &by_dtype {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().take(2).eq([d.as_str(), &t.to_string()])),
            "no `{d} {t}` row: {text}"
        );
    }
}

#[test]
fn variants_and_sharded_safetensors() {
    // Only a bf16 variant exists: it is found and reported.
    let v = json(&emu_ok(&[&"inspect", &loader_fixture("diffusers_variant"), &"--json"]));
    let w = &v["components"][0]["weights"];
    assert_eq!(w["variant"], "bf16");
    assert_eq!(w["dtypes"][0]["dtype"], "bf16");
    // Both plain and bf16 files: plain by default, bf16 on request.
    let dir = loader_fixture("hf_variant");
    let plain = json(&emu_ok(&[&"inspect", &dir, &"--json"]));
    assert!(plain["components"][0]["weights"]["variant"].is_null());
    let bf16 = json(&emu_ok(&[&"inspect", &dir, &"--json", &"--variant", &"bf16"]));
    let w = &bf16["components"][0]["weights"];
    assert_eq!(w["index"], "model.safetensors.index.bf16.json");
    assert_eq!(w["files"].as_array().unwrap().len(), 2);
    let ckpt = Checkpoint::open(dir.join("model.safetensors.index.bf16.json")).unwrap();
    assert_eq!(w["params"].as_u64().unwrap(), expected(&ckpt).1);
    // An index file given directly.
    let v = json(&emu_ok(&[
        &"inspect",
        &loader_fixture("safetensors_sharded").join("model.safetensors.index.json"),
        &"--json",
    ]));
    assert_eq!(v["layout"], "index_file");
    let ckpt = Checkpoint::open(loader_fixture("safetensors_sharded")).unwrap();
    assert_eq!(v["totals"]["tensors"].as_u64().unwrap(), ckpt.len() as u64);
}

#[test]
fn hf_emu2_chat_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let config = match shared_reference("hf-configs/Emu2-Chat.config.json") {
        Some(p) => std::fs::read_to_string(p).unwrap(),
        None => r#"{"architectures": ["EmuForCausalLM"], "model_version": "chat"}"#.to_string(),
    };
    std::fs::write(d.join("config.json"), config).unwrap();
    std::fs::write(d.join("added_tokens.json"), "{}").unwrap();
    write_safetensors(
        &d.join("model.safetensors"),
        &[
            T::new("model.visual.cls_token", Dtype::F32, &[1, 1, 8]),
            T::new("model.visual.blocks.0.attn.qkv.weight", Dtype::F32, &[24, 8]),
            T::new("model.visual.blocks.1.attn.qkv.weight", Dtype::F32, &[24, 8]),
            T::new("model.decoder.lm.model.embed_tokens.weight", Dtype::BF16, &[10, 6]),
            T::new(
                "model.decoder.lm.model.layers.0.self_attn.q_proj.weight",
                Dtype::BF16,
                &[6, 6],
            ),
            T::new("model.decoder.lm.lm_head.weight", Dtype::BF16, &[10, 6]),
            T::new(
                "model.decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq",
                Dtype::F32,
                &[3],
            ),
            T::new("project_up.weight", Dtype::F32, &[6, 8]),
            T::new("project_down.weight", Dtype::F32, &[8, 6]),
        ],
    );
    let v = json(&emu_ok(&[&"inspect", &d, &"--json"]));
    assert_eq!(v["layout"], "hf_model");
    assert_eq!(v["model"], "Emu2-Chat");
    let names: Vec<&str> = v["other_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["added_tokens.json", "config.json"]);
    let c = &v["components"][0];
    assert_eq!(c["class"], "EmuForCausalLM");
    let w = &c["weights"];
    let prefixes: BTreeMap<&str, (u64, u64)> = w["prefixes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["prefix"].as_str().unwrap(),
                (p["tensors"].as_u64().unwrap(), p["params"].as_u64().unwrap()),
            )
        })
        .collect();
    let want: BTreeMap<&str, (u64, u64)> = [
        ("model.visual", (3, 8 + 2 * 192)),
        ("model.decoder.lm", (4, 60 + 36 + 60 + 3)),
        ("project_up", (1, 48)),
        ("project_down", (1, 48)),
    ]
    .into();
    assert_eq!(prefixes, want);
    let params = 8 + 2 * 192 + 60 + 36 + 60 + 3 + 48 + 48;
    assert_eq!(w["params"].as_u64().unwrap(), params);
    let by_dtype = dtype_stats(w);
    assert_eq!(by_dtype["f32"], (6, 8 + 2 * 192 + 3 + 96));
    assert_eq!(by_dtype["bf16"], (3, 156));
    assert_eq!(w["memory"]["f32"].as_u64().unwrap(), params * 4);
    assert_eq!(w["memory"]["bf16"].as_u64().unwrap(), params * 2);

    let text = emu_ok(&[&"inspect", &d]);
    assert!(text.contains("Hugging Face model directory (Emu2-Chat)"), "{text}");
    for p in ["model.visual", "model.decoder.lm", "project_up", "project_down"] {
        assert!(text.contains(p), "{p}: {text}");
    }
    assert!(text.contains(&format!("parameters: {params}")), "{text}");
}

#[test]
fn emu2_gen_diffusers_pipeline_with_bf16_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("model_index.json"),
        r#"{"_class_name": "EmuVisualGenerationPipeline", "_diffusers_version": "0.21.2",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "multimodal_encoder": ["transformers_modules.modeling_emu", "EmuForCausalLM"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}"#,
    )
    .unwrap();
    for sub in ["unet", "vae", "scheduler", "multimodal_encoder", "feature_extractor"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("unet/config.json"), r#"{"_class_name": "UNet2DConditionModel"}"#).unwrap();
    write_safetensors(
        &d.join("unet/diffusion_pytorch_model.bf16.safetensors"),
        &[
            T::new("conv_in.weight", Dtype::BF16, &[4, 4, 3, 3]),
            T::new("conv_in.bias", Dtype::BF16, &[4]),
            T::new("down_blocks.0.resnets.0.conv1.weight", Dtype::BF16, &[4, 4, 3, 3]),
        ],
    );
    std::fs::write(d.join("vae/config.json"), r#"{"_class_name": "AutoencoderKL"}"#).unwrap();
    write_safetensors(
        &d.join("vae/diffusion_pytorch_model.bf16.safetensors"),
        &[T::new("encoder.conv_in.weight", Dtype::BF16, &[2, 3, 3, 3])],
    );
    std::fs::write(
        d.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "EulerDiscreteScheduler"}"#,
    )
    .unwrap();
    let enc = d.join("multimodal_encoder");
    let config = shared_reference("hf-configs/Emu2-Gen.multimodal_encoder.config.json")
        .map(|p| std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|| r#"{"architectures": ["EmuForCausalLM"], "model_version": "base"}"#.into());
    std::fs::write(enc.join("config.json"), config).unwrap();
    write_safetensors(
        &enc.join("model.bf16-00001-of-00002.safetensors"),
        &[T::new("model.visual.cls_token", Dtype::BF16, &[1, 1, 8])],
    );
    write_safetensors(
        &enc.join("model.bf16-00002-of-00002.safetensors"),
        &[T::new("project_up.weight", Dtype::BF16, &[6, 8])],
    );
    let index = |shard: &str| {
        format!(
            r#"{{"metadata": {{"total_size": 112}}, "weight_map": {{
                "model.visual.cls_token": "model{shard}-00001-of-00002.safetensors",
                "project_up.weight": "model{shard}-00002-of-00002.safetensors"}}}}"#
        )
    };
    std::fs::write(enc.join("model.safetensors.index.bf16.json"), index(".bf16")).unwrap();
    // As on the Hub: an fp32 index whose shards are not in the repo.
    std::fs::write(enc.join("model.safetensors.index.json"), index("")).unwrap();

    let v = json(&emu_ok(&[&"inspect", &d, &"--json"]));
    assert_eq!(v["layout"], "diffusers_pipeline");
    assert_eq!(v["model"], "Emu2-Gen");
    let comps: BTreeMap<&str, &serde_json::Value> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c))
        .collect();
    assert_eq!(
        comps.keys().copied().collect::<Vec<_>>(),
        ["feature_extractor", "multimodal_encoder", "scheduler", "unet", "vae"]
    );
    assert!(comps["scheduler"]["weights"].is_null());
    assert_eq!(comps["scheduler"]["class"], "EulerDiscreteScheduler");
    let unet = &comps["unet"]["weights"];
    assert_eq!(
        (unet["tensors"].as_u64(), unet["params"].as_u64()),
        (Some(3), Some(292))
    );
    assert_eq!(unet["variant"], "bf16");
    let me = &comps["multimodal_encoder"]["weights"];
    assert_eq!(me["variant"], "bf16");
    assert_eq!(me["index"], "model.safetensors.index.bf16.json");
    assert_eq!(me["params"].as_u64(), Some(56));
    assert_eq!(v["totals"]["params"].as_u64(), Some(292 + 54 + 56));
    assert_eq!(v["totals"]["memory"]["f32"].as_u64(), Some((292 + 54 + 56) * 4));

    let text = emu_ok(&[&"inspect", &d]);
    assert!(text.contains("component unet (UNet2DConditionModel)"), "{text}");
    assert!(text.contains("total: 6 tensors, 402 parameters"), "{text}");
}

#[test]
fn native_single_file_is_recognised() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("Emu2-Chat_pytorch_model.bf16.safetensors");
    write_safetensors(
        &f,
        &[
            T::new("visual.cls_token", Dtype::BF16, &[1, 1, 4]),
            T::new("decoder.lm.model.embed_tokens.weight", Dtype::BF16, &[32274, 1]),
            T::new("project_up.weight", Dtype::BF16, &[1, 4]),
        ],
    );
    let v = json(&emu_ok(&[&"inspect", &f, &"--json"]));
    assert_eq!(v["layout"], "native_file");
    assert_eq!(v["model"], "Emu2-Chat");
    assert_eq!(v["totals"]["params"].as_u64(), Some(32274 + 8));
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let e = emu_err(&[&"inspect", &d.join("nope")]);
    assert!(e.contains("does not exist"), "{e}");
    let e = emu_err(&[&"inspect", &d]);
    assert!(e.contains("not a checkpoint"), "{e}");
    std::fs::write(d.join("notes.txt"), "hello").unwrap();
    let e = emu_err(&[&"inspect", &d.join("notes.txt")]);
    assert!(e.contains("notes.txt"), "{e}");
    let bad = d.join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(
        bad.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage}",
    )
    .unwrap();
    let e = emu_err(&[&"inspect", &bad]);
    assert!(e.contains("model.safetensors"), "{e}");
    // Truncated pickle shard.
    let trunc = d.join("trunc");
    std::fs::create_dir(&trunc).unwrap();
    let src = std::fs::read(loader_fixture("pickle_sharded/pytorch_model-00001-of-00002.bin")).unwrap();
    std::fs::write(trunc.join("pytorch_model.bin"), &src[..src.len() / 2]).unwrap();
    let e = emu_err(&[&"inspect", &trunc]);
    assert!(e.contains("pytorch_model.bin"), "{e}");
    // Broken config.json next to valid weights.
    let cfg = d.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    write_safetensors(&cfg.join("model.safetensors"), &[T::new("a", Dtype::F32, &[2])]);
    std::fs::write(cfg.join("config.json"), "{ not json").unwrap();
    let e = emu_err(&[&"inspect", &cfg]);
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
    // Shards without their index.
    let shards = d.join("shards");
    std::fs::create_dir(&shards).unwrap();
    write_safetensors(
        &shards.join("model-00001-of-00002.safetensors"),
        &[T::new("a", Dtype::F32, &[2])],
    );
    let e = emu_err(&[&"inspect", &shards]);
    assert!(e.contains("index"), "{e}");
    // Unknown variant.
    let e = emu_err(&[&"inspect", &loader_fixture("hf_variant"), &"--variant", &"fp16"]);
    assert!(e.contains("fp16"), "{e}");
    // Usage errors are one line too.
    let e = emu_err(&[&"inspect"]);
    assert!(e.contains("<PATH>"), "{e}");
    let e = emu_err(&[&"inspect", &d, &"--bogus"]);
    assert!(e.contains("--bogus"), "{e}");
}
