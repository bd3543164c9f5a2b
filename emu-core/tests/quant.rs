//! Q8_0 / Q4_K against the `gguf` package, bit for bit
//! (fixtures from tools/reference/fixtures_quant.py).

use emu_core::{HostTensor, QuantTensor, QuantType};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/quant")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&read("manifest.json")).unwrap()
}

/// Bitwise equality (so -0.0 vs 0.0 or a NaN would count as a difference).
fn assert_bits_eq(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let bad = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
    if let Some(i) = bad {
        panic!("{what}: element {i}: {} vs {}", a[i], b[i]);
    }
}

#[test]
fn quantize_and_dequantize_match_gguf_bit_for_bit() {
    let m = manifest();
    let cases = m["cases"].as_object().unwrap();
    assert!(cases.len() >= 9);
    for (name, shape) in cases {
        let dims: Vec<usize> = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let x = HostTensor::from_f32(&dims, f32s(&read(&format!("{name}.f32")))).unwrap();
        for qt in [QuantType::Q8_0, QuantType::Q4K] {
            let what = format!("{name} {qt}");
            let q = QuantTensor::quantize(name.as_str(), &x, qt).unwrap();
            let want = read(&format!("{name}.{qt}"));
            if let Some(i) = q.bytes().iter().zip(&want).position(|(a, b)| a != b) {
                panic!("{what}: byte {i} (block {}) differs", i / qt.type_size());
            }
            assert_eq!(q.bytes().len(), want.len(), "{what}: byte count");
            let deq = q.dequantize().unwrap().to_f32_vec().unwrap();
            assert_bits_eq(&what, &deq, &f32s(&read(&format!("{name}.{qt}.deq"))));
        }
    }
}

#[test]
fn dequantize_arbitrary_q4_k_blocks_like_gguf() {
    let m = manifest();
    let dims: Vec<usize> = m["q4_k_random_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let q = QuantTensor::from_bytes("random", QuantType::Q4K, &dims, read("q4_k_random_bytes.q4_k")).unwrap();
    let deq = q.dequantize().unwrap().to_f32_vec().unwrap();
    assert_bits_eq("random q4_k", &deq, &f32s(&read("q4_k_random_bytes.q4_k.deq")));
}

#[test]
fn fixtures_cover_zero_blocks_outliers_and_negative_ranges() {
    // The cases the issue asks for must stay in the fixture set.
    let m = manifest();
    for c in [
        "zero_blocks",
        "outliers",
        "negative",
        "mixed_ranges",
        "constant",
        "tiny",
    ] {
        assert!(m["cases"].get(c).is_some(), "fixture case {c} missing");
    }
    // An all-zero Q8_0 block quantizes to d = 0 and zeros, as ggml does.
    let zero = read("zero_blocks.q8_0");
    assert!(zero[..34].iter().all(|&b| b == 0));
}

mod gguf {
    use super::*;
    use emu_core::checkpoint::gguf_file::write_checkpoint_gguf;
    use emu_core::{Checkpoint, DType};
    use std::collections::BTreeMap;

    /// A file written by the `gguf` package's own GGUFWriter.
    #[test]
    fn reads_a_file_written_by_the_gguf_package() {
        let ckpt = Checkpoint::open(dir().join("gguf_writer.gguf")).unwrap();
        for (key, qt) in [
            ("lin.q8_0.weight", QuantType::Q8_0),
            ("lin.q4_k.weight", QuantType::Q4K),
        ] {
            assert_eq!(ckpt.quant_type(key).unwrap(), Some(qt));
            let q = ckpt.get_quant(key).unwrap().unwrap();
            assert_eq!(q.dims(), &[8, 256]);
            assert_eq!(q.bytes(), &read(&format!("normal.{qt}"))[..]);
            // Any other accessor sees the dequantized f32 values.
            let f = ckpt.get_as(key, DType::F32).unwrap().to_f32_vec().unwrap();
            assert_bits_eq(key, &f, &f32s(&read(&format!("normal.{qt}.deq"))));
            assert_eq!(ckpt.info(key).unwrap().dims, vec![8, 256]);
        }
        let norm = ckpt.get_as("norm.weight", DType::F32).unwrap().to_f32_vec().unwrap();
        assert_eq!(norm, f32s(&read("normal.f32"))[..16].to_vec());
        assert_eq!(ckpt.get_quant("norm.weight").unwrap(), None);
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("emu-core-gguf-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn streaming_writer_round_trips_and_selects_tensors() {
        let src = Checkpoint::open(dir().join("gguf_writer.gguf")).unwrap();
        let d = tmp("roundtrip");
        let out = d.join("model.gguf");
        // Re-quantize the dequantized Q8_0 tensor to Q4_K, keep the rest as floats.
        let select = |k: &str, _: &[usize]| Ok((k == "lin.q8_0.weight").then_some(QuantType::Q4K));
        let meta = BTreeMap::from([("general.name".to_string(), "t".to_string())]);
        write_checkpoint_gguf(&src, &out, DType::BF16, &select, &meta, |_, _, _| {}).unwrap();
        assert!(!d.join("model.gguf.partial").exists());
        let back = Checkpoint::open(&d).unwrap();
        assert_eq!(back.quant_type("lin.q8_0.weight").unwrap(), Some(QuantType::Q4K));
        let want =
            QuantTensor::quantize("x", &src.get_as("lin.q8_0.weight", DType::F32).unwrap(), QuantType::Q4K).unwrap();
        assert_eq!(
            back.get_quant("lin.q8_0.weight").unwrap().unwrap().bytes(),
            want.bytes()
        );
        // Not selected: stored in the float dtype (dequantized, then bf16).
        assert_eq!(back.info("lin.q4_k.weight").unwrap().dtype, DType::BF16);
        assert_eq!(
            back.get_as("norm.weight", DType::BF16).unwrap(),
            src.get_as("norm.weight", DType::BF16).unwrap()
        );

        // A truncated copy fails to open with a message naming the tensor.
        let bytes = std::fs::read(&out).unwrap();
        let cut = d.join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let e = Checkpoint::open(&cut).unwrap_err().to_string();
        assert!(e.contains("past the end of the file"), "{e}");
        // A tensor that cannot be quantized: an error naming it, and no file left behind.
        let bad = |k: &str, _: &[usize]| Ok((k == "norm.weight").then_some(QuantType::Q8_0));
        let out2 = d.join("bad.gguf");
        let e = write_checkpoint_gguf(&src, &out2, DType::F32, &bad, &meta, |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("norm.weight") && e.contains("not a multiple"), "{e}");
        assert!(!out2.exists() && !d.join("bad.gguf.partial").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unknown_quantization_type_is_named() {
        // Patch the Q8_0 tensor's ggml type (8) to Q5_1 (7) in a copy.
        let mut bytes = read("gguf_writer.gguf");
        let name = b"lin.q8_0.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        // rank (u32) + 2 dims (u64) then the type.
        let ty = at + 4 + 16;
        assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 8);
        bytes[ty..ty + 4].copy_from_slice(&7u32.to_le_bytes());
        let d = tmp("unknown");
        std::fs::write(d.join("m.gguf"), &bytes).unwrap();
        let ckpt = Checkpoint::open(d.join("m.gguf")).unwrap();
        let e = ckpt.get_as("lin.q8_0.weight", DType::F32).unwrap_err().to_string();
        assert!(e.contains("lin.q8_0.weight") && e.contains("ggml type 7"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
