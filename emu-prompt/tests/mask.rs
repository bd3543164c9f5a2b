//! Box masks against cv2.rectangle(thickness=3) from OpenCV 4.10.

mod common;

use common::*;
use emu_prompt::BoxMask;

#[test]
fn masks_equal_opencv_pixel_for_pixel() {
    let fx = load_json("masks.json");
    let canvas = fx["canvas"].as_u64().unwrap() as usize;
    let masks = fx["masks"].as_array().unwrap();
    assert!(masks.len() >= 30);
    let mut total_white = 0;
    for m in masks {
        let bbox: Vec<i64> = m["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let mask = BoxMask::from_demo([bbox[0], bbox[1], bbox[2], bbox[3]]);
        let drawn: Vec<u32> = m["drawn"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(vec![mask.left, mask.top, mask.right, mask.bottom], drawn, "{bbox:?}");
        let mut want = vec![0u8; canvas * canvas];
        let runs = ids(&m["white_runs"]);
        for r in runs.chunks(3) {
            let (y, x, n) = (r[0] as usize, r[1] as usize, r[2] as usize);
            want[y * canvas + x..y * canvas + x + n].fill(255);
        }
        let got = mask.to_gray();
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{bbox:?}: {diff} pixels differ");
        total_white += want.iter().filter(|v| **v == 255).count();
        let rgb = mask.to_rgb();
        assert_eq!(rgb.len(), canvas * canvas * 3);
        assert!(rgb.chunks(3).zip(&got).all(|(px, g)| px == [*g, *g, *g]));
    }
    assert!(total_white > 10_000);
}
