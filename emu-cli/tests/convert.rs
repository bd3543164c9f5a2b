//! `emu convert`: pickle shards to safetensors shards, loaded back bit-exactly.

mod common;

use common::*;
use emu_core::{Checkpoint, DType};
use safetensors::Dtype;
use std::path::Path;

/// Every tensor of `dst` equals the source read with `get_as(key, dtype)`
/// (floats) or `get(key)` (the rest), byte for byte.
fn assert_bit_exact(src: &Checkpoint, dst: &Checkpoint, dtype: DType) {
    assert_eq!(src.keys().collect::<Vec<_>>(), dst.keys().collect::<Vec<_>>());
    for k in src.keys() {
        let s = src.info(k).unwrap();
        let want = if s.dtype.is_float() {
            src.get_as(k, dtype).unwrap()
        } else {
            src.get(k).unwrap()
        };
        let got = dst.get(k).unwrap();
        assert_eq!(got.dtype(), want.dtype(), "{k}");
        assert_eq!(got.dims(), want.dims(), "{k}");
        assert_eq!(got.as_bytes(), want.as_bytes(), "{k}");
    }
}

/// The header is a multiple of 8 bytes, padded with spaces, and the file
/// parses with the reference `safetensors` crate.
fn assert_well_formed(file: &Path) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "{}", file.display());
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    assert!(header.trim_end_matches(' ').ends_with('}'), "{header:?}");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    // Data of each tensor is aligned to its element size.
    for (_, t) in st.tensors() {
        let off = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
        assert_eq!(off % (t.dtype().bitsize() / 8).max(1), 0);
    }
}

#[test]
fn pickle_shards_to_bf16_safetensors_shards() {
    let src_dir = loader_fixture("pickle_sharded");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    let out = emu_ok(&[
        &"convert",
        &src_dir,
        &dst,
        &"--dtype",
        &"bf16",
        &"--shard-size",
        &"100B",
    ]);
    assert!(out.contains("converted"), "{out}");
    let src = Checkpoint::open(&src_dir).unwrap();

    let index = json(&std::fs::read_to_string(dst.join("model.safetensors.index.json")).unwrap());
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), src.len());
    let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() > 1, "{shards:?}");
    let n = shards.len();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(*s, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        assert_well_formed(&dst.join(s));
    }
    // total_size is the bytes of tensor data, as in transformers.
    let total: u64 = src
        .keys()
        .map(|k| {
            let i = src.info(k).unwrap();
            let es = if i.dtype.is_float() { 2 } else { i.dtype.size_in_bytes() };
            i.dims.iter().product::<usize>() as u64 * es as u64
        })
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    // No shard is over the limit unless it holds one tensor.
    let dst_ckpt = Checkpoint::open(&dst).unwrap();
    for s in &shards {
        let keys: Vec<&str> = map.iter().filter(|(_, v)| v == s).map(|(k, _)| k.as_str()).collect();
        let bytes: usize = keys
            .iter()
            .map(|k| {
                let i = dst_ckpt.info(k).unwrap();
                i.dims.iter().product::<usize>() * i.dtype.size_in_bytes()
            })
            .sum();
        assert!(bytes <= 100 || keys.len() == 1, "{s}: {bytes} bytes in {keys:?}");
    }
    assert_bit_exact(&src, &dst_ckpt, DType::BF16);
    // Non-float tensors kept their dtype; floats are all bf16 now.
    for k in src.keys() {
        let (s, d) = (src.info(k).unwrap().dtype, dst_ckpt.info(k).unwrap().dtype);
        assert_eq!(d, if s.is_float() { DType::BF16 } else { s }, "{k}");
    }
}

#[test]
fn every_target_dtype_and_a_single_shard() {
    let src_dir = loader_fixture("pickle_sharded");
    let src = Checkpoint::open(&src_dir).unwrap();
    for (flag, dtype) in [("f32", DType::F32), ("f16", DType::F16), ("bfloat16", DType::BF16)] {
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join(flag);
        emu_ok(&[&"convert", &src_dir, &dst, &"--dtype", &flag, &"--quiet"]);
        // Everything fits in the default 5GB: one file, no index, as save_pretrained does.
        let names = std::fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        assert_eq!(names, ["model.safetensors"]);
        assert_well_formed(&dst.join("model.safetensors"));
        assert_bit_exact(&src, &Checkpoint::open(&dst).unwrap(), dtype);
    }
}

#[test]
fn hf_directory_copies_non_weight_files_and_respects_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("Emu2-Chat");
    std::fs::create_dir(&src_dir).unwrap();
    for e in std::fs::read_dir(loader_fixture("pickle_sharded")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), src_dir.join(e.file_name())).unwrap();
    }
    let others = [
        "config.json",
        "added_tokens.json",
        "tokenizer_config.json",
        "modeling_emu.py",
    ];
    for name in others {
        std::fs::write(src_dir.join(name), format!("{{\"file\": \"{name}\"}}")).unwrap();
    }
    // Another framework's weights are not copied.
    std::fs::write(src_dir.join("training_args.bin"), b"not needed").unwrap();
    let dst = tmp.path().join("Emu2-Chat-bf16");
    let out = emu_ok(&[&"convert", &src_dir, &dst, &"--shard-size", &"0.2kB", &"-q"]);
    assert!(out.contains("training_args.bin"), "{out}");
    for name in others {
        assert_eq!(
            std::fs::read(dst.join(name)).unwrap(),
            std::fs::read(src_dir.join(name)).unwrap()
        );
    }
    assert!(!dst.join("training_args.bin").exists());
    assert!(!dst.join("pytorch_model.bin.index.json").exists());
    let src = Checkpoint::open(&src_dir).unwrap();
    assert_bit_exact(&src, &Checkpoint::open(&dst).unwrap(), DType::BF16);

    // A second run into the same place needs --force.
    let e = emu_err(&[&"convert", &src_dir, &dst]);
    assert!(e.contains("--force"), "{e}");
    // With --force, stale shards of the first run do not survive next to the new single file.
    emu_ok(&[&"convert", &src_dir, &dst, &"--force", &"--dtype", &"f16", &"-q"]);
    let weights: Vec<String> = std::fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".index.json"))
        .collect();
    assert_eq!(weights, ["model.safetensors"]);
    assert_bit_exact(&src, &Checkpoint::open(&dst).unwrap(), DType::F16);
    // Converting a converted checkpoint changes nothing.
    let again = tmp.path().join("again");
    emu_ok(&[&"convert", &dst, &again, &"--dtype", &"f16", &"-q"]);
    assert_eq!(
        std::fs::read(again.join("model.safetensors")).unwrap(),
        std::fs::read(dst.join("model.safetensors")).unwrap()
    );
}

#[test]
fn diffusers_pipeline_components_are_converted_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("gen");
    for sub in ["unet", "scheduler"] {
        std::fs::create_dir_all(src.join(sub)).unwrap();
    }
    std::fs::write(
        src.join("model_index.json"),
        r#"{"_class_name": "EmuVisualGenerationPipeline"}"#,
    )
    .unwrap();
    std::fs::write(src.join("unet/config.json"), "{}").unwrap();
    std::fs::write(src.join("scheduler/scheduler_config.json"), "{}").unwrap();
    write_safetensors(
        &src.join("unet/diffusion_pytorch_model.safetensors"),
        &[
            T::new("conv_in.weight", Dtype::F32, &[4, 4, 3, 3]),
            T::new("conv_in.bias", Dtype::F32, &[4]),
            T::new("steps", Dtype::I64, &[3]),
        ],
    );
    let dst = tmp.path().join("gen-bf16");
    emu_ok(&[&"convert", &src, &dst, &"-q"]);
    for f in [
        "model_index.json",
        "unet/config.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dst.join(f).is_file(), "{f}");
    }
    let out = dst.join("unet/diffusion_pytorch_model.safetensors");
    assert_well_formed(&out);
    let s = Checkpoint::open(src.join("unet")).unwrap();
    let d = Checkpoint::open(dst.join("unet")).unwrap();
    assert_bit_exact(&s, &d, DType::BF16);
    assert_eq!(d.info("steps").unwrap().dtype, DType::I64);
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let src = loader_fixture("pickle_sharded");
    let e = emu_err(&[&"convert", &d.join("missing"), &d.join("out")]);
    assert!(e.contains("does not exist"), "{e}");
    let e = emu_err(&[&"convert", &d, &d.join("out")]);
    assert!(e.contains("not a checkpoint"), "{e}");
    let e = emu_err(&[&"convert", &src, &d.join("o1"), &"--dtype", &"int8"]);
    assert!(e.contains("bf16, f16 or f32"), "{e}");
    let e = emu_err(&[&"convert", &src, &d.join("o2"), &"--shard-size", &"5XB"]);
    assert!(e.contains("5GB"), "{e}");
    let e = emu_err(&[&"convert", &src, &d.join("o3"), &"--shard-size", &"0"]);
    assert!(e.contains("shard-size"), "{e}");
    // Nothing was created by the refused runs.
    for o in ["o1", "o2", "o3", "out"] {
        assert!(!d.join(o).exists(), "{o}");
    }
    // A file as destination; the source itself; a directory inside the source.
    std::fs::write(d.join("file"), "x").unwrap();
    let e = emu_err(&[&"convert", &src, &d.join("file")]);
    assert!(e.contains("directory"), "{e}");
    let copy = d.join("copy");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let e = emu_err(&[&"convert", &copy, &copy, &"--force"]);
    assert!(e.contains("separate directory"), "{e}");
    let e = emu_err(&[&"convert", &copy, &copy.join("sub")]);
    assert!(e.contains("separate directory"), "{e}");
    assert!(!copy.join("sub").exists());
    // A corrupt shard: reported by file name, and no index is left behind.
    let bad = d.join("bad");
    std::fs::create_dir(&bad).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let shard = bad.join("pytorch_model-00002-of-00002.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let e = emu_err(&[&"convert", &bad, &d.join("bad-out")]);
    assert!(e.contains("pytorch_model-00002-of-00002.bin"), "{e}");
    assert!(!d.join("bad-out/model.safetensors.index.json").exists());
    // Missing arguments.
    let e = emu_err(&[&"convert", &src]);
    assert!(e.contains("<DST>"), "{e}");
}

#[test]
fn a_chosen_variant_is_converted_and_the_others_are_reported() {
    let src = loader_fixture("hf_variant");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    let out = emu_ok(&[&"convert", &src, &dst, &"--variant", &"bf16", &"--dtype", &"f32", &"-q"]);
    assert!(
        out.contains("model.safetensors"),
        "the plain file is not converted: {out}"
    );
    let s = Checkpoint::open(src.join("model.safetensors.index.bf16.json")).unwrap();
    assert_bit_exact(&s, &Checkpoint::open(&dst).unwrap(), DType::F32);
}

#[test]
fn tensors_of_unsupported_dtypes_are_listed_by_inspect_and_refused_by_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("i16");
    std::fs::create_dir(&src).unwrap();
    write_safetensors(
        &src.join("model.safetensors"),
        &[T::new("ok", Dtype::F32, &[2, 2]), T::new("odd", Dtype::I16, &[3])],
    );
    let v = json(&emu_ok(&[&"inspect", &src, &"--json"]));
    let w = &v["components"][0]["weights"];
    assert_eq!(w["tensors"].as_u64(), Some(1));
    assert_eq!(w["params"].as_u64(), Some(4));
    assert_eq!(w["unsupported"][0]["key"], "odd");
    let e = emu_err(&[&"convert", &src, &tmp.path().join("out")]);
    assert!(e.contains("`odd`") && e.contains("I16"), "{e}");
    assert!(
        !tmp.path().join("out").exists(),
        "nothing is created for a refused conversion"
    );
}

/// `--quantize`: one GGUF whose LLaMA linears are Q8_0 blocks (the fixture's
/// rows are 64 wide, so q4_k falls back to Q8_0) and everything else in
/// --dtype; a tensor that cannot be quantized fails naming it, leaving nothing.
#[test]
fn quantize_writes_one_gguf_with_block_linears() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm/mha/model.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("q");
    emu_ok(&[&"convert", &src, &dst, &"--quantize", &"q4_k", &"--quiet"]);
    let names = std::fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(names, ["model.gguf"]);
    let q = Checkpoint::open(&dst).unwrap();
    let s = Checkpoint::open(&src).unwrap();
    assert_eq!(q.len(), s.len());
    let key = "model.layers.1.mlp.down_proj.weight";
    let blocks = q.get_quant(key).unwrap().unwrap();
    assert_eq!(blocks.qtype(), emu_core::QuantType::Q8_0);
    let want =
        emu_core::QuantTensor::quantize(key, &s.get_as(key, DType::F32).unwrap(), emu_core::QuantType::Q8_0).unwrap();
    assert_eq!(blocks.bytes(), want.bytes());
    assert_eq!(q.quant_type("model.embed_tokens.weight").unwrap(), None);
    assert_eq!(q.info("model.embed_tokens.weight").unwrap().dtype, DType::BF16);
    let e = emu_err(&[&"convert", &src, &tmp.path().join("bad"), &"--quantize", &"q3_k"]);
    assert!(e.contains("q3_k"), "{e}");
    assert!(!tmp.path().join("bad").exists());
}

/// `--quantize-components all` on a whole Emu2-Gen folder: the EVA blocks'
/// and the UNet transformer blocks' linears become blocks beside the
/// LLaMA's (where a row holds whole Q8_0 blocks; the tiny model's narrower
/// ones stay dense, as the loaders keep them), the VAE stays float, and
/// `generate` on the converted folder draws exactly what quantizing while
/// loading draws, and not what the float model draws.
#[test]
fn quantize_components_reach_the_vision_encoder_and_the_unet() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("gen");
    emu::tiny::write_model(&src, emu::tiny::TinyKind::Gen).unwrap();
    let dst = tmp.path().join("q");
    emu_ok(&[
        &"convert",
        &src,
        &dst,
        &"--quantize",
        &"q8_0",
        &"--quantize-components",
        &"all",
        &"--quiet",
    ]);
    let blocks = |sub: &str| {
        let c = Checkpoint::open(dst.join(sub)).unwrap();
        let mut keys: Vec<String> = c
            .keys()
            .filter(|k| c.quant_type(k).unwrap().is_some())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    };
    let enc = blocks("multimodal_encoder");
    let vision: Vec<&String> = enc.iter().filter(|k| k.contains("visual.")).collect();
    // The tiny EVA is 16 wide: only fc2 (32 inputs) has whole blocks.
    assert_eq!(vision.len(), 2, "{vision:?}");
    assert!(vision.iter().all(|k| k.ends_with("mlp.fc2.weight")), "{vision:?}");
    assert!(enc.iter().any(|k| k.ends_with("self_attn.q_proj.weight")), "{enc:?}");
    let unet = blocks("unet");
    assert!(!unet.is_empty());
    assert!(
        unet.iter()
            .all(|k| emu_decoder::unet_linear_group(k).is_some() && k.ends_with("ff.net.2.weight")),
        "{unet:?}"
    );
    assert!(blocks("vae").is_empty());

    let draw = |model: &Path, extra: &[&str], name: &str| {
        let out = tmp.path().join(name);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"generate", &"--model", &model];
        let steps = ["a red cube", "--steps", "2", "--seed", "3", "-o"];
        args.extend(steps.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>));
        args.push(&out);
        args.extend(extra.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>));
        emu_ok(&args);
        std::fs::read(&out).unwrap()
    };
    let converted = draw(&dst, &[], "converted.png");
    let at_load = draw(
        &src,
        &["--quantize", "q8_0", "--quantize-components", "all"],
        "at_load.png",
    );
    let float = draw(&src, &[], "float.png");
    assert!(
        converted == at_load,
        "the converted folder draws what quantizing while loading draws"
    );
    assert!(converted != float, "quantization changed nothing");
}
