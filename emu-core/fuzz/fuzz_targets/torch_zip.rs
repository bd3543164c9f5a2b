//! torch.save zip archives as a whole: the zip directory, entry ranges and
//! CRCs, data.pkl and the storages it names.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    emu_core_fuzz::run_file("pytorch_model.bin", data);
});
