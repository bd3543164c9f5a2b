//! Image decoding as a user's file reaches it (format sniffing, PNG and
//! JPEG headers, EXIF orientation): an image or an error, never a panic.
#![no_main]

use emu_vision::{decode_image, DecodeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = DecodeOptions {
        max_pixels: 1 << 20,
        max_side: 4096,
        ..DecodeOptions::default()
    };
    if let Ok(img) = decode_image(data, &opts) {
        assert_eq!(img.as_bytes().len(), img.width() as usize * img.height() as usize * 3);
    }
});
