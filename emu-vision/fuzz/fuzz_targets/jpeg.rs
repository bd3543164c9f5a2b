//! The project's own JPEG decoder on arbitrary bytes behind a JPEG start
//! marker: an image or an error, never a panic, a hang or a huge allocation.
#![no_main]

use emu_vision::{decode_image, DecodeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = vec![0xFF, 0xD8];
    bytes.extend_from_slice(data);
    // Small limits keep each run fast; the limit checks themselves are exercised.
    let opts = DecodeOptions {
        max_pixels: 1 << 20,
        max_side: 4096,
        ..DecodeOptions::default()
    };
    if let Ok(img) = decode_image(&bytes, &opts) {
        assert_eq!(img.as_bytes().len(), img.width() as usize * img.height() as usize * 3);
    }
});
