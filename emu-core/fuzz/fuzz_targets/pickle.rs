//! The pickle interpreter directly: the input becomes `data.pkl` of a
//! well-formed archive whose storages `0`..`3` hold 64 bytes each, so every
//! input reaches the opcodes, tensor rebuilds and view checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(data).unwrap();
        for k in 0..4 {
            z.start_file(format!("archive/data/{k}"), opts).unwrap();
            z.write_all(&[k as u8; 64]).unwrap();
        }
        z.finish().unwrap();
    }
    emu_core_fuzz::run_file("pytorch_model.bin", &buf.into_inner());
});
