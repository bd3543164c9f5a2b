//! Emu2-Chat's grounding answers: `[x1, y1, x2, y2]` boxes in the 0–224 range.
//!
//! In grounding mode Emu2-Chat answers with boxes written as plain text, `[x1, y1, x2, y2]`,
//! whose coordinates range from 0 to 224 over the image squashed to a square (upstream README,
//! SPEC §5.2); a box maps back to the original image by `x × width / 224`,
//! `y × height / 224`.
//!
//! [`parse_boxes`] finds every bracketed group that looks like a box: it holds only numbers,
//! commas, signs, decimal points and spaces. Other bracketed text (`[USER]`, `[a dog]`) is
//! ordinary text and ignored. A box-like group that is not exactly four numbers, has a
//! coordinate outside 0–224, has `x1 > x2` or `y1 > y2`, or is cut off by the end of the text,
//! is reported as a [`BoxProblem`] — never repaired or guessed.

use std::ops::Range;

/// The coordinate range of Emu2-Chat's boxes.
pub const GRID: f64 = 224.0;

/// One box read from the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundedBox {
    /// As written, in the 0–224 grid: `[x1, y1, x2, y2]`.
    pub grid: [f64; 4],
    /// In pixels of the original image: `[left, top, right, bottom]`.
    pub pixels: [f64; 4],
    /// Byte range of the bracketed text in the answer.
    pub span: Range<usize>,
}

/// A box-like group that could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxProblem {
    /// Byte range of the offending text.
    pub span: Range<usize>,
    /// What is wrong.
    pub message: String,
}

/// Everything found in one answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grounding {
    /// Well-formed boxes, in order of appearance.
    pub boxes: Vec<GroundedBox>,
    /// Malformed or out-of-range boxes, in order of appearance.
    pub problems: Vec<BoxProblem>,
}

fn box_like(c: char) -> bool {
    c.is_ascii_digit() || matches!(c, ',' | '.' | '-' | '+' | ' ' | '\t')
}

/// Reads the boxes of an Emu2-Chat grounding answer about an image of `width × height` pixels.
pub fn parse_boxes(answer: &str, width: u32, height: u32) -> Grounding {
    let mut out = Grounding::default();
    let mut i = 0;
    while let Some(off) = answer[i..].find('[') {
        let start = i + off;
        let body_start = start + 1;
        let body_len = answer[body_start..]
            .find(|c: char| !box_like(c))
            .unwrap_or(answer.len() - body_start);
        let body = &answer[body_start..body_start + body_len];
        let end = body_start + body_len;
        let has_digit = body.chars().any(|c| c.is_ascii_digit());
        match answer[end..].chars().next() {
            Some(']') if has_digit => {
                let span = start..end + 1;
                match read_box(body) {
                    Ok(grid) => {
                        let (w, h) = (width as f64, height as f64);
                        out.boxes.push(GroundedBox {
                            grid,
                            pixels: [
                                grid[0] * w / GRID,
                                grid[1] * h / GRID,
                                grid[2] * w / GRID,
                                grid[3] * h / GRID,
                            ],
                            span,
                        });
                    }
                    Err(message) => out.problems.push(BoxProblem { span, message }),
                }
                i = end + 1;
            }
            None if has_digit => {
                out.problems.push(BoxProblem {
                    span: start..end,
                    message: "box cut off by the end of the answer: expected ']'".into(),
                });
                i = end;
            }
            _ => i = body_start,
        }
    }
    out
}

fn read_box(body: &str) -> std::result::Result<[f64; 4], String> {
    let parts: Vec<&str> = body.split(',').map(str::trim).collect();
    if parts.len() != 4 {
        return Err(format!(
            "expected four comma-separated coordinates, found {}",
            parts.len()
        ));
    }
    let mut v = [0f64; 4];
    for (k, p) in parts.iter().enumerate() {
        let x: f64 = p
            .parse()
            .map_err(|_| format!("coordinate {} is {p:?}: expected a number", k + 1))?;
        if !(0.0..=GRID).contains(&x) {
            return Err(format!("coordinate {} is {x}: outside 0..=224", k + 1));
        }
        v[k] = x;
    }
    if v[0] > v[2] || v[1] > v[3] {
        return Err(format!(
            "corners out of order: x1 {} > x2 {} or y1 {} > y2 {}",
            v[0], v[2], v[1], v[3]
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_boxes_and_maps_to_pixels() {
        let g = parse_boxes(
            "<phrase>the dog</phrase> [12, 40, 100, 200] and [0,0,224,224].",
            448,
            896,
        );
        assert!(g.problems.is_empty(), "{:?}", g.problems);
        assert_eq!(g.boxes.len(), 2);
        assert_eq!(g.boxes[0].grid, [12.0, 40.0, 100.0, 200.0]);
        assert_eq!(g.boxes[0].pixels, [24.0, 160.0, 200.0, 800.0]);
        assert_eq!(g.boxes[1].pixels, [0.0, 0.0, 448.0, 896.0]);
        assert_eq!(
            &"<phrase>the dog</phrase> [12, 40, 100, 200]"[g.boxes[0].span.clone()],
            "[12, 40, 100, 200]"
        );
        let g = parse_boxes("[10.5, 20, 30.25, 40]", 224, 224);
        assert_eq!(g.boxes[0].pixels, [10.5, 20.0, 30.25, 40.0]);
    }

    #[test]
    fn reports_instead_of_guessing() {
        let cases = [
            ("[12, 40, 100]", "four"),
            ("[12, 40, 100, 200, 5]", "four"),
            ("[12, 40, 300, 200]", "outside"),
            ("[-1, 40, 100, 200]", "outside"),
            ("[100, 40, 12, 200]", "out of order"),
            ("[12, , 100, 200]", "expected a number"),
            ("[1.2.3, 0, 5, 5]", "expected a number"),
            ("answer: [12, 40, 1", "cut off"),
        ];
        for (text, why) in cases {
            let g = parse_boxes(text, 100, 100);
            assert!(g.boxes.is_empty(), "{text}");
            assert_eq!(g.problems.len(), 1, "{text}");
            assert!(g.problems[0].message.contains(why), "{text}: {}", g.problems[0].message);
        }
    }

    #[test]
    fn other_brackets_are_text() {
        let g = parse_boxes("[USER] [a dog] [] [ , ] [[3, 4, 5, 6]]", 10, 10);
        assert!(g.problems.is_empty(), "{:?}", g.problems);
        assert_eq!(g.boxes.len(), 1);
        assert_eq!(g.boxes[0].grid, [3.0, 4.0, 5.0, 6.0]);
    }
}
