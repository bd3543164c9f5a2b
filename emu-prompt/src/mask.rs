//! Grounding boxes drawn as mask images, pixel for pixel as upstream's demo draws them.
//!
//! Emu2-Gen reads a box as an image: a black 448×448 canvas with the box outline drawn in
//! white by `cv2.rectangle(canvas, (l, t), (r, b), (255, 255, 255), 3)` (demo `meta.py`,
//! SPEC §5.1), after clamping the coordinates to `[0, 448]` and sorting them.
//!
//! OpenCV draws a thickness-3 outline as four thick lines with round joins: each edge becomes
//! a polygon reaching 2 px to either side of it (`ThickLine`: half-width (3 + 1) / 2 in its
//! fixed-point arithmetic), and each corner gets a filled circle of radius 2, which on the
//! pixel grid is the diamond |dx| + |dy| <= 2. Pixels outside the canvas are clipped. So a
//! pixel is white when it is within 2 px of an edge, measured across the edge and inside the
//! edge's extent, or within the diamond of a corner. The fixture set checks this against
//! OpenCV for boxes that are degenerate, touch the border or lie outside it.

/// Side of the mask canvas (the vision input size).
pub const CANVAS: u32 = 448;
/// How far the outline reaches across each edge (cv2 thickness 3).
const HALF: i64 = 2;

/// A box in canvas pixels, clamped to `[0, canvas]` and sorted: `left <= right`, `top <= bottom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BoxMask {
    /// Left x (inclusive, may equal the canvas size).
    pub left: u32,
    /// Top y.
    pub top: u32,
    /// Right x.
    pub right: u32,
    /// Bottom y.
    pub bottom: u32,
    /// Canvas side in pixels.
    pub canvas: u32,
}

impl BoxMask {
    /// Upstream demo semantics on the 448 canvas: clamp each coordinate to `[0, 448]`, then sort.
    pub fn from_demo(bbox: [i64; 4]) -> Self {
        Self::with_canvas(bbox, CANVAS)
    }

    /// Same for another canvas size.
    pub fn with_canvas(bbox: [i64; 4], canvas: u32) -> Self {
        let c = |v: i64| v.clamp(0, canvas as i64) as u32;
        let (x1, y1, x2, y2) = (c(bbox[0]), c(bbox[1]), c(bbox[2]), c(bbox[3]));
        BoxMask {
            left: x1.min(x2),
            top: y1.min(y2),
            right: x1.max(x2),
            bottom: y1.max(y2),
            canvas,
        }
    }

    /// Whether the outline covers pixel `(x, y)`.
    pub fn covers(&self, x: i64, y: i64) -> bool {
        let (l, t, r, b) = (self.left as i64, self.top as i64, self.right as i64, self.bottom as i64);
        let near = |v: i64, edge: i64| (v - edge).abs() <= HALF;
        let horizontal = (near(y, t) || near(y, b)) && (l..=r).contains(&x);
        let vertical = (near(x, l) || near(x, r)) && (t..=b).contains(&y);
        let corner = [(l, t), (r, t), (r, b), (l, b)]
            .iter()
            .any(|&(cx, cy)| (x - cx).abs() + (y - cy).abs() <= HALF);
        horizontal || vertical || corner
    }

    /// The mask as one channel, row-major `canvas × canvas`, 255 on the outline and 0 elsewhere.
    pub fn to_gray(&self) -> Vec<u8> {
        let n = self.canvas as usize;
        let mut out = vec![0u8; n * n];
        // Only rows near the box can be touched.
        let y0 = (self.top as i64 - HALF).max(0) as usize;
        let y1 = ((self.bottom as i64 + HALF) as usize).min(n.saturating_sub(1));
        for y in y0..=y1.min(n.saturating_sub(1)) {
            for x in 0..n {
                if self.covers(x as i64, y as i64) {
                    out[y * n + x] = 255;
                }
            }
        }
        out
    }

    /// The mask as the RGB image upstream feeds the vision encoder (`canvas × canvas × 3`, HWC).
    pub fn to_rgb(&self) -> Vec<u8> {
        self.to_gray().into_iter().flat_map(|v| [v, v, v]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_and_sorts_like_the_demo() {
        let m = BoxMask::from_demo([500, -3, 20, 30]);
        assert_eq!((m.left, m.top, m.right, m.bottom), (20, 0, 448, 30));
    }

    #[test]
    fn single_point_is_a_diamond() {
        let m = BoxMask::with_canvas([5, 5, 5, 5], 12);
        let g = m.to_gray();
        let count = g.iter().filter(|v| **v == 255).count();
        assert_eq!(count, 13);
        assert_eq!(g[3 * 12 + 5], 255);
        assert_eq!(g[4 * 12 + 4], 255);
        assert_eq!(g[3 * 12 + 4], 0);
    }
}
