//! Checkpoints a careless or hostile user could hand over: special files,
//! corrupted zip entries, pickles whose views reach past their storage or
//! that call something other than a tensor rebuild, text in a weight slot.
//! Each must be a clear error that names the file and what was expected;
//! none may block, panic or load silently.

use emu_core::checkpoint::{Checkpoint, Weights};
use emu_core::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/loader");

struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("emu-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn message(r: Result<Checkpoint, Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A torch.save zip archive with `data.pkl` = `pickle` and the given storages.
fn torch_zip(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pickle).unwrap();
        z.start_file("archive/byteorder", opts).unwrap();
        z.write_all(b"little").unwrap();
        for (key, data) in storages {
            z.start_file(format!("archive/data/{key}"), opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// Pickle protocol 2 of `{"w": _rebuild_tensor_v2(storage("0", FloatStorage,
/// numel), 0, (size,), (1,))}`.
fn one_tensor_pickle(numel: u8, size: u8) -> Vec<u8> {
    let mut p = b"\x80\x02}X\x01\x00\x00\x00w".to_vec();
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK");
    p.extend_from_slice(&[numel, b't', b'Q']);
    p.extend_from_slice(&[b'K', 0, b'(', b'K', size, b't', b'(', b'K', 1, b't']);
    p.extend_from_slice(b"tRs.");
    p
}

#[test]
fn a_well_formed_crafted_archive_loads() {
    // The crafting helpers themselves are right: the same archive with a
    // consistent storage loads and reads back.
    let t = Tmp::new("ok");
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let p = t.write(
        "pytorch_model.bin",
        &torch_zip(&one_tensor_pickle(4, 4), &[("0", &data)]),
    );
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.get("w").unwrap().to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn a_view_past_its_storage_is_refused_even_inside_the_entry() {
    // The storage says 2 floats, the view reads 4; the entry holds 4 floats
    // of bytes, which used to hide the lie.
    let t = Tmp::new("view");
    let data = [0u8; 16];
    let p = t.write(
        "pytorch_model.bin",
        &torch_zip(&one_tensor_pickle(2, 4), &[("0", &data)]),
    );
    let m = message(Checkpoint::open(&p));
    assert!(
        m.contains("reaches past its storage") && m.contains("pytorch_model.bin"),
        "{m}"
    );
}

#[test]
fn corrupted_storage_bytes_fail_their_crc_when_read() {
    let t = Tmp::new("crc");
    let mut bytes = std::fs::read(Path::new(FIXTURES).join("pickle_sharded/pytorch_model-00001-of-00002.bin")).unwrap();
    let (start, len) = {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
        let mut found = None;
        for i in 0..z.len() {
            let f = z.by_index_raw(i).unwrap();
            if f.name().is_ok_and(|n| n.contains("/data/")) && f.compressed_size() >= 4 {
                found = Some((f.data_start().unwrap() as usize, f.compressed_size() as usize));
                break;
            }
        }
        found.unwrap()
    };
    bytes[start + len / 2] ^= 0x5a;
    let p = t.write("pytorch_model.bin", &bytes);
    let ck = Checkpoint::open(&p).unwrap();
    let failures: Vec<String> = ck
        .keys()
        .filter_map(|k| ck.get(k).err().map(|e| e.to_string()))
        .collect();
    assert!(!failures.is_empty(), "a corrupted storage loaded silently");
    assert!(
        failures
            .iter()
            .all(|m| m.contains("CRC-32") && m.contains("pytorch_model.bin")),
        "{failures:?}"
    );
    // The intact original reads.
    let ck = Checkpoint::open(Path::new(FIXTURES).join("pickle_sharded/pytorch_model-00001-of-00002.bin")).unwrap();
    for k in ck.keys() {
        ck.get(k).unwrap();
    }
}

#[test]
fn a_refused_pickle_call_is_named() {
    let t = Tmp::new("global");
    let pickle = b"\x80\x02cposix\nsystem\nX\x05\x00\x00\x00echo \x85R.";
    let p = t.write("pytorch_model.bin", &torch_zip(pickle, &[]));
    let m = message(Checkpoint::open(&p));
    assert!(m.contains("`posix.system`") && m.contains("refuses"), "{m}");
}

#[test]
fn text_in_a_weight_slot_is_not_a_checkpoint() {
    let t = Tmp::new("text");
    let p = t.write(
        "pytorch_model.bin",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
    );
    let m = message(Checkpoint::open(&p));
    assert!(m.contains("not a checkpoint") && m.contains("version"), "{m}");
}

#[test]
fn special_files_as_checkpoints_or_shards_are_named_not_opened() {
    let t = Tmp::new("special");
    // A shard that is a directory.
    std::fs::create_dir(t.0.join("model-00001-of-00001.safetensors")).unwrap();
    let idx = t.write(
        "model.safetensors.index.json",
        br#"{"weight_map": {"w": "model-00001-of-00001.safetensors"}}"#,
    );
    let m = message(Checkpoint::open(&idx));
    assert!(m.contains("is a directory"), "{m}");
    #[cfg(unix)]
    {
        let m = message(Checkpoint::open("/dev/zero"));
        assert!(m.contains("character device"), "{m}");
        let lp = t.0.join("loop.safetensors");
        std::os::unix::fs::symlink(&lp, &lp).unwrap();
        let m = message(Checkpoint::open(&lp));
        assert!(m.contains("symlink loop"), "{m}");
        let fifo = t.0.join("fifo.safetensors");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // Opening it for reading would block this test forever.
            let m = message(Checkpoint::open(&fifo));
            assert!(m.contains("FIFO"), "{m}");
            let idx = t.write(
                "model.safetensors.index.json",
                br#"{"weight_map": {"w": "fifo.safetensors"}}"#,
            );
            let m = message(Checkpoint::open(&idx));
            assert!(m.contains("FIFO") && m.contains("fifo.safetensors"), "{m}");
        }
    }
}

#[test]
fn a_config_with_fewer_layers_than_the_weights_is_refused() {
    let t = Tmp::new("layers");
    let mut header = String::from("{");
    for i in 0..3 {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""model.layers.{i}.w":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}"#,
            4 * i,
            4 * i + 4
        ));
    }
    header.push('}');
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header.as_bytes());
    f.extend_from_slice(&[0u8; 12]);
    let p = t.write("model.safetensors", &f);
    let ck = Checkpoint::open(&p).unwrap();
    let layers = Weights::new(&ck).pp("model").pp("layers");
    layers.check_layer_count(3, "num_hidden_layers").unwrap();
    layers.check_layer_count(4, "num_hidden_layers").unwrap();
    let m = layers
        .check_layer_count(2, "num_hidden_layers")
        .unwrap_err()
        .to_string();
    assert!(m.contains("3 layers") && m.contains("`num_hidden_layers` is 2"), "{m}");
}
