//! Shard indexes (`model.safetensors.index.json`): the input is the index,
//! next to the two shards of the loader fixture.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Once;

static SHARDS: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    let dir = emu_core_fuzz::scratch();
    SHARDS.call_once(|| {
        let fx = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/loader/safetensors_sharded");
        for n in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            std::fs::copy(format!("{fx}/{n}"), dir.join(n)).expect("fixture shard");
        }
    });
    emu_core_fuzz::run_file("model.safetensors.index.json", data);
});
