//! safetensors files: the header (length, JSON, dtypes, shapes, offsets)
//! and the data ranges it claims.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    emu_core_fuzz::run_file("model.safetensors", data);
});
