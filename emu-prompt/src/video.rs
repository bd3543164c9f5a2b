//! Uniform frame sampling, as upstream's demo does it (`common/utils.py`, `extract_frames`).

use crate::error::{Error, Result};

/// Frame indices to take from a video of `total` frames when `num_frames` are wanted.
///
/// The segment length is `total / num_frames` (integer division); the indices are
/// `segment / 2`, `segment / 2 + segment`, … while below `total` (SPEC §6). When `total` is
/// not a multiple of `num_frames` this yields more frames than asked — one more for long
/// videos, up to `total` for short ones (50 frames, 26 asked: segment 1, all 50) — exactly as
/// the rule reads; callers that need at most `num_frames` truncate. A video shorter than
/// `num_frames` is an error (the segment length would be 0).
pub fn sample_frame_indices(total: usize, num_frames: usize) -> Result<Vec<usize>> {
    if num_frames == 0 {
        return Err(Error::InvalidArgument("num_frames must be at least 1".into()));
    }
    let segment = total / num_frames;
    if segment == 0 {
        return Err(Error::InvalidArgument(format!(
            "a video of {total} frames is too short to sample {num_frames} frames"
        )));
    }
    Ok((segment / 2..total).step_by(segment).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_segments() {
        assert_eq!(
            sample_frame_indices(80, 8).unwrap(),
            vec![5, 15, 25, 35, 45, 55, 65, 75]
        );
        assert_eq!(sample_frame_indices(8, 8).unwrap(), (0..8).collect::<Vec<_>>());
        // 10 frames / 4: segment 2, indices 1,3,5,7,9 -> one more than asked, as upstream.
        assert_eq!(sample_frame_indices(10, 4).unwrap(), vec![1, 3, 5, 7, 9]);
        assert_eq!(sample_frame_indices(100, 1).unwrap(), vec![50]);
        assert!(sample_frame_indices(3, 8).is_err());
        assert!(sample_frame_indices(10, 0).is_err());
    }
}
