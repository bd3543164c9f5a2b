//! The Emu2-Chat grounding parser on arbitrary answers: no panic, and every box it accepts is
//! in range, ordered, and reads back from its own span.
#![no_main]

use emu_prompt::parse_boxes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let w = u16::from_le_bytes([data[0], data[1]]) as u32;
    let h = u16::from_le_bytes([data[2], data[3]]) as u32;
    let Ok(s) = std::str::from_utf8(&data[4..]) else { return };
    let g = parse_boxes(s, w, h);
    for b in &g.boxes {
        assert!(b.grid.iter().all(|v| (0.0..=224.0).contains(v)));
        assert!(b.grid[0] <= b.grid[2] && b.grid[1] <= b.grid[3]);
        let again = parse_boxes(&s[b.span.clone()], w, h);
        assert_eq!(again.boxes.len(), 1);
        assert_eq!(again.boxes[0].grid, b.grid);
    }
    for p in &g.problems {
        assert!(s.is_char_boundary(p.span.start) && s.is_char_boundary(p.span.end));
    }
});
