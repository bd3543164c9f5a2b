//! The checkpoint loader against fixtures written by PyTorch / safetensors
//! (tools/reference/fixtures_loader.py): every tensor must come back bit for
//! bit, and every broken input must give a clear error, never a panic.

use emu_backend_cpu::CpuBackend;
use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::{DType, Error, HostTensor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/loader");

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

fn expected() -> Checkpoint {
    Checkpoint::open(fixture("expected.safetensors")).unwrap()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        Self::new_in(std::env::temp_dir(), tag)
    }

    /// In memory where the system has a tmpfs at /dev/shm: the corruption
    /// sweep rewrites a file thousands of times, which is slow on a disk.
    fn new_in_memory(tag: &str) -> Self {
        let shm = Path::new("/dev/shm");
        Self::new_in(
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            },
            tag,
        )
    }

    fn new_in(base: PathBuf, tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = base.join(format!(
            "emu-loader-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    fn copy(&self, from: &Path) -> PathBuf {
        self.write(
            from.file_name().unwrap().to_str().unwrap(),
            &std::fs::read(from).unwrap(),
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Largest absolute difference between a loaded tensor and its expected value
/// (f32 for floats, i64 for integers); 0 only when the bytes are identical.
fn max_abs_diff(got: &Checkpoint, key: &str, exp: &HostTensor) -> f64 {
    let g = got.get_as(key, exp.dtype()).unwrap();
    assert_eq!(g.dims(), exp.dims(), "{key}");
    if g.as_bytes() == exp.as_bytes() {
        return 0.0;
    }
    let (a, b) = (g.to_f64_vec().unwrap(), exp.to_f64_vec().unwrap());
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    // Bytes differ but values compare equal (signed zeros, NaN payloads).
    if d > 0.0 {
        d
    } else {
        f64::NAN
    }
}

/// Checks every `<group>/<key>` of expected.safetensors against `ckpt`,
/// which must hold exactly those keys.
fn check_group(ckpt: &Checkpoint, group: &str) -> usize {
    let exp = expected();
    let prefix = format!("{group}/");
    let want: Vec<&str> = exp.keys_with_prefix(&prefix).map(|k| &k[prefix.len()..]).collect();
    let have: Vec<&str> = ckpt.keys().collect();
    assert_eq!(have, want, "{group}: key sets differ");
    for key in &want {
        let e = exp.get(&format!("{prefix}{key}")).unwrap();
        let d = max_abs_diff(ckpt, key, &e);
        assert_eq!(d, 0.0, "{group}/{key}: max abs diff {d}");
    }
    want.len()
}

#[test]
fn sharded_safetensors_match_bit_for_bit() {
    let ckpt = Checkpoint::open(fixture("safetensors_sharded")).unwrap();
    assert_eq!(ckpt.files().count(), 2);
    assert_eq!(check_group(&ckpt, "safetensors_sharded"), 7);
    let dt = |k: &str| ckpt.info(k).unwrap().dtype;
    assert_eq!(dt("model.layers.0.bias"), DType::F16);
    assert_eq!(dt("model.layers.1.weight"), DType::BF16);
    assert_eq!(dt("model.position_ids"), DType::I64);
    assert_eq!(dt("model.embed_tokens.weight"), DType::F32);
    // Opening the index file itself is the same as opening the directory.
    let by_index = Checkpoint::open(fixture("safetensors_sharded/model.safetensors.index.json")).unwrap();
    assert_eq!(by_index.keys().collect::<Vec<_>>(), ckpt.keys().collect::<Vec<_>>());
    // Native-dtype reads keep the stored bytes.
    assert_eq!(ckpt.get("model.layers.1.bias").unwrap().dtype(), DType::BF16);
    // Floats are never silently truncated to integers.
    assert!(matches!(
        ckpt.get_as("model.norm.weight", DType::I64),
        Err(Error::DType(_))
    ));
}

#[test]
fn pickle_shards_match_bit_for_bit_including_views() {
    let ckpt = Checkpoint::open(fixture("pickle_sharded")).unwrap();
    assert_eq!(ckpt.files().count(), 2);
    assert_eq!(check_group(&ckpt, "pickle_sharded"), 16);
    let info = |k: &str| ckpt.info(k).unwrap();
    assert_eq!(info("transposed").dims, vec![5, 3]);
    assert_eq!(info("narrowed").dims, vec![3, 3]);
    assert_eq!(info("column").dims, vec![4]);
    assert_eq!(info("scalar").dims, Vec::<usize>::new());
    assert_eq!(info("bf16_t").dtype, DType::BF16);
    assert_eq!(info("half").dtype, DType::F16);
    assert_eq!(info("double").dtype, DType::F64);
    assert_eq!(info("i32").dtype, DType::I32);
    assert_eq!(info("mask").dtype, DType::Bool);
    assert_eq!(info("bytes").dtype, DType::U8);
    // A module's state_dict() (an OrderedDict restored with BUILD) and a bare nn.Parameter.
    assert_eq!(info("block.bias").dims, vec![2]);
    assert_eq!(info("param").dims, vec![3]);
    // uint32 is written as an UntypedStorage + dtype (`_rebuild_tensor_v3`).
    assert_eq!(info("u32").dtype, DType::U32);
    assert_eq!(
        ckpt.get("u32").unwrap().to_i64_vec().unwrap(),
        vec![1, 7, 4_000_000_000]
    );
    // A shard opened on its own is a complete `pytorch_model.bin`.
    let one = Checkpoint::open(fixture("pickle_sharded/pytorch_model-00001-of-00002.bin")).unwrap();
    assert_eq!(
        one.keys().collect::<Vec<_>>(),
        vec!["column", "full", "half", "narrowed", "param", "transposed"]
    );
}

#[test]
fn diffusers_bf16_variant_folder() {
    let dir = fixture("diffusers_variant");
    let ckpt = Checkpoint::open_dir(&dir, None).unwrap();
    assert_eq!(
        ckpt.files()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["diffusion_pytorch_model.bf16.safetensors"]
    );
    assert_eq!(check_group(&ckpt, "diffusers_variant"), 3);
    assert_eq!(
        ckpt.info("conv_in.weight").unwrap(),
        emu_core::checkpoint::TensorInfo {
            dims: vec![4, 2, 3, 3],
            dtype: DType::BF16
        }
    );
    let asked = Checkpoint::open_dir(&dir, Some("bf16")).unwrap();
    assert_eq!(asked.files().collect::<Vec<_>>(), ckpt.files().collect::<Vec<_>>());
    let err = Checkpoint::open_dir(&dir, Some("fp16")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("fp16") && msg.contains("diffusion_pytorch_model.bf16.safetensors"),
        "{msg}"
    );
}

#[test]
fn hf_variant_precedence() {
    let dir = fixture("hf_variant");
    // Without a variant the plain file wins over the bf16 shards ...
    let plain = Checkpoint::open_dir(&dir, None).unwrap();
    assert_eq!(
        plain
            .files()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect::<Vec<_>>(),
        vec!["model.safetensors"]
    );
    assert_eq!(check_group(&plain, "hf_variant"), 3);
    // ... and asking for bf16 gives the sharded variant.
    let bf16 = Checkpoint::open_dir(&dir, Some("bf16")).unwrap();
    assert_eq!(bf16.files().count(), 2);
    assert!(bf16.origin().ends_with("model.safetensors.index.bf16.json"));
    assert_eq!(check_group(&bf16, "hf_variant.bf16"), 3);
    assert_eq!(bf16.info("model.project_up.weight").unwrap().dtype, DType::BF16);
    // Converting the bf16 copy to f32 is exact; the f32 original rounds to it.
    let k = "model.decoder.lm.lm_head.weight";
    let rounded = plain.get_as(k, DType::BF16).unwrap();
    assert_eq!(rounded, bf16.get(k).unwrap());
}

#[test]
fn safetensors_win_over_pickle_and_several_variants_need_a_choice() {
    let tmp = TempDir::new("precedence");
    for f in [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ] {
        tmp.copy(&fixture(&format!("pickle_sharded/{f}")));
    }
    let only_pickle = Checkpoint::open_dir(&tmp.0, None).unwrap();
    assert!(only_pickle.origin().ends_with("pytorch_model.bin.index.json"));
    tmp.copy(&fixture("hf_variant/model.safetensors"));
    let ckpt = Checkpoint::open_dir(&tmp.0, None).unwrap();
    assert!(ckpt.origin().ends_with("model.safetensors"), "{:?}", ckpt.origin());

    let tmp = TempDir::new("variants");
    let bytes = std::fs::read(fixture("diffusers_variant/diffusion_pytorch_model.bf16.safetensors")).unwrap();
    tmp.write("diffusion_pytorch_model.bf16.safetensors", &bytes);
    tmp.write("diffusion_pytorch_model.fp16.safetensors", &bytes);
    let msg = Checkpoint::open_dir(&tmp.0, None).unwrap_err().to_string();
    assert!(msg.contains("bf16") && msg.contains("fp16"), "{msg}");
    assert!(Checkpoint::open_dir(&tmp.0, Some("fp16")).is_ok());

    let empty = TempDir::new("empty");
    let msg = Checkpoint::open_dir(&empty.0, None).unwrap_err().to_string();
    assert!(msg.contains("no checkpoint files"), "{msg}");
}

#[test]
fn missing_key_names_key_and_checkpoint() {
    let ckpt = Checkpoint::open(fixture("safetensors_sharded")).unwrap();
    match ckpt.get("model.nope.weight") {
        Err(Error::MissingTensor { key, location }) => {
            assert_eq!(key, "model.nope.weight");
            assert!(location.contains("safetensors_sharded"), "{location}");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let w = Weights::new(&ckpt).pp("model").pp("layers").pp(7);
    let msg = w.get_as("weight", DType::F32).unwrap_err().to_string();
    assert!(msg.contains("`model.layers.7.weight`"), "{msg}");
    assert!(w.get_opt("weight").unwrap().is_none());
    let cpu = CpuBackend::new();
    assert!(w.tensor_opt(&cpu, "weight", &[4, 3], DType::F32).unwrap().is_none());
}

#[test]
fn weights_tensor_checks_shape_converts_and_uploads() {
    let ckpt = Checkpoint::open(fixture("safetensors_sharded")).unwrap();
    let cpu = CpuBackend::new();
    let w = Weights::resolve_prefix(&ckpt, &["model."], "layers.0.weight")
        .unwrap()
        .pp("layers")
        .pp(0);
    let t = w.tensor(&cpu, "weight", &[4, 3], DType::BF16).unwrap();
    assert_eq!((t.dims(), t.dtype()), (vec![4, 3], DType::BF16));
    let exact = ckpt.get_as("model.layers.0.weight", DType::BF16).unwrap();
    assert_eq!(t.to_host().unwrap(), exact);
    let b = w.tensor_opt(&cpu, "bias", &[4], DType::F32).unwrap().unwrap();
    assert_eq!(
        b.to_host().unwrap(),
        ckpt.get_as("model.layers.0.bias", DType::F32).unwrap()
    );

    match w.tensor(&cpu, "weight", &[3, 4], DType::F32) {
        Err(Error::ShapeMismatch {
            key,
            location,
            expected,
            found,
        }) => {
            assert_eq!(key, "model.layers.0.weight");
            assert!(location.ends_with(".safetensors"), "{location}");
            assert_eq!((expected, found), (vec![3, 4], vec![4, 3]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let msg = w.tensor(&cpu, "weight", &[3, 4], DType::F32).unwrap_err().to_string();
    assert!(
        msg.contains("[3, 4]") && msg.contains("[4, 3]") && msg.contains("model.layers.0.weight"),
        "{msg}"
    );
}

#[test]
fn prefix_resolution() {
    let hf = Checkpoint::open(fixture("safetensors_sharded")).unwrap();
    let native = Checkpoint::open(fixture("pickle_sharded")).unwrap();
    let cands = ["multimodal_encoder.", "model.", ""];
    assert_eq!(
        Weights::resolve_prefix(&hf, &cands, "layers.0.weight")
            .unwrap()
            .prefix(),
        "model."
    );
    let w = Weights::resolve_prefix(&native, &cands, "block.weight").unwrap();
    assert_eq!(w.prefix(), "");
    assert_eq!(w.pp("block").keys(), vec!["bias", "weight"]);
    assert_eq!(
        Weights::resolve_prefix(&hf, &cands, "norm.weight")
            .unwrap()
            .pp("layers")
            .keys(),
        vec!["0.bias", "0.weight", "1.bias", "1.weight"]
    );
    // Resolution below a view, relative to its prefix.
    let root = Weights::new(&hf);
    let layers = root.resolve(&["decoder.", "model.layers."], "0.weight").unwrap();
    assert_eq!(layers.prefix(), "model.layers.");
    assert_eq!(layers.resolve(&["1."], "bias").unwrap().prefix(), "model.layers.1.");
    let msg = layers.resolve(&["9."], "bias").unwrap_err().to_string();
    assert!(msg.contains("`model.layers.9.bias`"), "{msg}");
    let h = layers.pp(0).get_checked("weight", &[4, 3], DType::F32).unwrap();
    assert_eq!(h, hf.get_as("model.layers.0.weight", DType::F32).unwrap());
    assert!(matches!(
        layers.pp(0).get_checked("weight", &[12], DType::F32),
        Err(Error::ShapeMismatch { .. })
    ));
    // The first candidate that matches wins, even when a later one would too.
    assert_eq!(
        Weights::resolve_prefix(&hf, &["", "model."], "model.norm.weight")
            .unwrap()
            .prefix(),
        ""
    );
    match Weights::resolve_prefix(&hf, &cands, "decoder.lm.model.embed_tokens.weight") {
        Err(Error::MissingTensor { location, .. }) => {
            assert!(
                location.contains("`multimodal_encoder.decoder.lm.model.embed_tokens.weight`"),
                "{location}"
            );
            assert!(
                location.contains("`decoder.lm.model.embed_tokens.weight`"),
                "{location}"
            );
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

fn assert_format_error(r: Result<Checkpoint, Error>, file: &Path, needle: &str) {
    match r {
        Err(Error::CheckpointFormat { path, message }) => {
            assert_eq!(path, file, "{message}");
            assert!(message.contains(needle), "`{needle}` not in: {message}");
        }
        other => panic!(
            "expected a format error for {} containing `{needle}`, got {other:?}",
            file.display()
        ),
    }
}

#[test]
fn truncated_files_are_clear_errors() {
    let tmp = TempDir::new("truncated");
    let st = std::fs::read(fixture("safetensors_sharded/model-00001-of-00002.safetensors")).unwrap();
    let header = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    for (len, needle) in [
        (0, "empty"),
        (5, "shorter than"),
        (8 + header / 2, "past the end"),
        (8 + header + 3, "does not end at the end"),
        (st.len() - 1, "does not end at the end"),
    ] {
        let p = tmp.write("model.safetensors", &st[..len]);
        assert_format_error(Checkpoint::open(&p), &p, needle);
    }
    let pk = std::fs::read(fixture("pickle_sharded/pytorch_model-00001-of-00002.bin")).unwrap();
    for len in [4, 100, pk.len() / 2, pk.len() - 30, pk.len() - 1] {
        let p = tmp.write("pytorch_model.bin", &pk[..len]);
        assert_format_error(Checkpoint::open(&p), &p, "zip");
    }
    // A shard that is truncated is reported through the index too.
    let set = TempDir::new("truncated-set");
    set.copy(&fixture("safetensors_sharded/model.safetensors.index.json"));
    set.copy(&fixture("safetensors_sharded/model-00002-of-00002.safetensors"));
    let shard1 = set.write("model-00001-of-00002.safetensors", &st[..st.len() - 8]);
    assert_format_error(Checkpoint::open(&set.0), &shard1, "does not end");
}

#[test]
fn corrupt_headers_and_indexes_are_clear_errors() {
    let tmp = TempDir::new("corrupt");
    let st = std::fs::read(fixture("safetensors_sharded/model-00002-of-00002.safetensors")).unwrap();

    // A header length of 2^60 must not be believed (nor allocated).
    let mut huge = st.clone();
    huge[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let p = tmp.write("huge.safetensors", &huge);
    assert_format_error(Checkpoint::open(&p), &p, "header length");

    // Broken JSON inside the header.
    let mut bad = st.clone();
    bad[8] = b'[';
    let p = tmp.write("badjson.safetensors", &bad);
    assert_format_error(Checkpoint::open(&p), &p, "header");

    // Data offsets past the end of the file, and offsets that disagree with the shape.
    let craft = |header: &str, data: &[u8]| {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(data);
        f
    };
    let p = tmp.write(
        "offsets.safetensors",
        &craft(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 4]),
    );
    assert_format_error(Checkpoint::open(&p), &p, "does not end at the end of the file");
    let p = tmp.write(
        "shape.safetensors",
        &craft(
            r#"{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    assert_format_error(Checkpoint::open(&p), &p, "header");
    let p = tmp.write(
        "good.safetensors",
        &craft(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]),
    );
    assert_eq!(
        Checkpoint::open(&p).unwrap().get("w").unwrap().to_f32_vec().unwrap(),
        vec![0.0, 0.0]
    );

    // Not a checkpoint at all, and a legacy (non-zip) torch file.
    let p = tmp.write("noise.bin", b"this is not a checkpoint, just some text");
    assert!(matches!(Checkpoint::open(&p), Err(Error::CheckpointFormat { .. })));
    let legacy = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.";
    let p = tmp.write("legacy.bin", legacy);
    assert_format_error(Checkpoint::open(&p), &p, "legacy");

    // Garbage inside data.pkl of a valid zip (the zip reader does not check CRCs of raw entries).
    let mut pk = std::fs::read(fixture("pickle_sharded/pytorch_model-00001-of-00002.bin")).unwrap();
    let at = pk.windows(3).position(|w| w == b"\x80\x02}").unwrap();
    pk[at + 2] = 0xff;
    let p = tmp.write("garbage.bin", &pk);
    assert_format_error(Checkpoint::open(&p), &p, "pickle");
    pk[at + 2] = b'}';
    pk[at + 1] = 9;
    let p = tmp.write("protocol.bin", &pk);
    assert_format_error(Checkpoint::open(&p), &p, "protocol");

    // Indexes: bad JSON, a missing shard, a key its shard does not hold.
    let idx = tmp.write("model.safetensors.index.json", b"{\"weight_map\": {\"a\": ");
    assert_format_error(Checkpoint::open(&idx), &idx, "index JSON");
    let idx = tmp.write(
        "model.safetensors.index.json",
        br#"{"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}"#,
    );
    assert_format_error(Checkpoint::open(&idx), &idx, "model-00009-of-00009.safetensors");
    tmp.write("model-00002-of-00002.safetensors", &st);
    let idx = tmp.write(
        "model.safetensors.index.json",
        br#"{"weight_map": {"model.ghost": "model-00002-of-00002.safetensors"}}"#,
    );
    assert_format_error(Checkpoint::open(&idx), &idx, "model.ghost");
    let idx = tmp.write(
        "model.safetensors.index.json",
        br#"{"weight_map": {"x": "../../etc/passwd"}}"#,
    );
    assert_format_error(Checkpoint::open(&idx), &idx, "outside");
}

#[test]
fn missing_file_is_an_io_error_with_the_path() {
    let p = fixture("does/not/exist.safetensors");
    match Checkpoint::open(&p) {
        Err(Error::Io { path, .. }) => assert_eq!(path, p),
        other => panic!("expected Io, got {other:?}"),
    }
}

/// Opens and fully reads `path`; any outcome but a panic is acceptable.
fn open_and_read_everything(path: &Path) -> bool {
    let Ok(ckpt) = Checkpoint::open(path) else { return false };
    for key in ckpt.keys() {
        let _ = ckpt.get(key);
        let _ = ckpt.get_as(key, DType::F32);
    }
    true
}

#[test]
fn every_truncation_and_random_corruption_is_survived() {
    let tmp = TempDir::new_in_memory("fuzz");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (rel, name) in [
        ("pickle_sharded/pytorch_model-00002-of-00002.bin", "pytorch_model.bin"),
        ("pickle_sharded/pytorch_model-00001-of-00002.bin", "pytorch_model.bin"),
        (
            "safetensors_sharded/model-00001-of-00002.safetensors",
            "model.safetensors",
        ),
    ] {
        let orig = std::fs::read(fixture(rel)).unwrap();
        let mut opened = 0;
        for len in 0..orig.len() {
            let p = tmp.write(name, &orig[..len]);
            opened += open_and_read_everything(&p) as usize;
        }
        // No proper prefix of a file is a valid checkpoint.
        assert_eq!(opened, 0, "{rel}");
        for _ in 0..3000 {
            let mut bytes = orig.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let p = tmp.write(name, &bytes);
            open_and_read_everything(&p);
        }
    }
}

#[test]
fn large_sparse_file_opens_without_reading_its_data() {
    // A 6 GiB tensor (a sparse file: no disk used) followed by a small one, so
    // that the small one lies past 4 GiB. Opening reads the header only, and
    // reading the small tensor touches only its own pages.
    let tmp = TempDir::new("sparse");
    let big: usize = 6 << 30;
    let header = format!(
        r#"{{"big":{{"dtype":"U8","shape":[{big}],"data_offsets":[0,{big}]}},"small":{{"dtype":"F32","shape":[2],"data_offsets":[{big},{}]}}}}"#,
        big + 8
    );
    let path = tmp.0.join("model.safetensors");
    let mut f = std::fs::File::create(&path).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    f.seek(SeekFrom::Current(big as i64)).unwrap();
    f.write_all(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]).unwrap();
    drop(f);
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.info("big").unwrap().dims, vec![big]);
    assert_eq!(ckpt.get("small").unwrap().to_f32_vec().unwrap(), vec![1.0, -2.0]);
}

#[test]
fn load_observer_sees_opening_and_every_read() {
    use emu_core::checkpoint::{set_load_observer, LoadEvent};
    use std::sync::{Arc, Mutex};
    // A private copy: other tests in this binary open the fixtures concurrently.
    let tmp = TempDir::new("observer");
    for f in std::fs::read_dir(fixture("safetensors_sharded")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.0.join(f.file_name().unwrap())).unwrap();
    }
    let dir = tmp.0.clone();
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let log = seen.clone();
    let ours = dir.clone();
    let prev = set_load_observer(Some(Arc::new(move |e: &LoadEvent<'_>| match *e {
        LoadEvent::Opened { origin, tensors, bytes } if origin.starts_with(&ours) => {
            log.lock().unwrap().push((format!("open {tensors}"), bytes))
        }
        LoadEvent::Read { origin, key, bytes } if origin.starts_with(&ours) => {
            log.lock().unwrap().push((key.to_string(), bytes))
        }
        _ => {}
    })));
    let ckpt = Checkpoint::open(&dir).unwrap();
    let keys: Vec<String> = ckpt.keys().map(str::to_string).collect();
    for k in &keys {
        ckpt.get_as(k, DType::F32).unwrap();
    }
    set_load_observer(prev);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, format!("open {}", keys.len()));
    let read: Vec<&String> = seen[1..].iter().map(|(k, _)| k).collect();
    assert_eq!(read, keys.iter().collect::<Vec<_>>());
    let total: u64 = seen[1..].iter().map(|(_, b)| b).sum();
    let expected: u64 = keys
        .iter()
        .map(|k| {
            let i = ckpt.info(k).unwrap();
            i.dims.iter().product::<usize>() as u64 * i.dtype.size_in_bytes() as u64
        })
        .sum();
    assert_eq!((seen[0].1, total), (expected, expected));
    assert!(expected > 0);
}

/// A safetensors file whose header length has 0x80 as its low byte begins
/// with the same byte as a pickle; it must still open as safetensors.
#[test]
fn safetensors_header_length_with_low_byte_0x80_is_not_taken_for_a_pickle() {
    let tmp = TempDir::new("st-0x80");
    let mut header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_vec();
    header.resize(0x180, b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    assert_eq!(bytes[0], 0x80);
    bytes.extend_from_slice(&header);
    for v in [1.5f32, -2.0] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let p = tmp.write("model.safetensors", &bytes);
    let ckpt = Checkpoint::open(&p).unwrap();
    assert_eq!(ckpt.get("w").unwrap().to_f32_vec().unwrap(), vec![1.5, -2.0]);
}
