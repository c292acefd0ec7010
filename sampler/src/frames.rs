//! Frame selection with qwen-vl-utils semantics (`smart_nframes`, `calculate_video_frame_range`,
//! `torch.linspace(...).round()`).

use crate::SampleError;

/// Default sampling rate in frames per second.
pub const DEFAULT_FPS: f64 = 2.0;
/// Default minimum number of sampled frames when sampling by rate.
pub const DEFAULT_MIN_FRAMES: usize = 4;
/// Default maximum number of sampled frames when sampling by rate.
pub const DEFAULT_MAX_FRAMES: usize = 768;
/// Frames per temporal group; sampled counts are multiples of it.
pub const FRAME_FACTOR: usize = 2;

/// How many frames to take from a clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FrameSelection {
    /// A fixed count, rounded (half to even) to a multiple of [`FRAME_FACTOR`].
    Count(usize),
    /// A rate, clamped to `[min_frames, max_frames]` and floored to a multiple of [`FRAME_FACTOR`].
    Fps {
        /// Target rate in frames per second.
        fps: f64,
        /// Lower clamp (default 4), rounded up to even.
        min_frames: Option<usize>,
        /// Upper clamp (default `min(768, frames)`), rounded down to even.
        max_frames: Option<usize>,
    },
}

impl Default for FrameSelection {
    fn default() -> Self {
        FrameSelection::Fps { fps: DEFAULT_FPS, min_frames: None, max_frames: None }
    }
}

/// The number of frames to sample from `total_frames` frames at `video_fps`
/// (qwen-vl-utils `smart_nframes`).
pub fn smart_nframes(selection: FrameSelection, total_frames: usize, video_fps: f64) -> Result<usize, SampleError> {
    let f = FRAME_FACTOR as f64;
    let nframes = match selection {
        FrameSelection::Count(n) => ((n as f64 / f).round_ties_even() * f) as usize,
        FrameSelection::Fps { fps, min_frames, max_frames } => {
            if !(fps.is_finite() && fps > 0.0) {
                return Err(SampleError::InvalidParameter(format!("fps must be positive, got {fps}")));
            }
            if !(video_fps.is_finite() && video_fps > 0.0) {
                return Err(SampleError::InvalidParameter(format!(
                    "the clip's frame rate must be positive, got {video_fps}"
                )));
            }
            let min_f = (min_frames.unwrap_or(DEFAULT_MIN_FRAMES) as f64 / f).ceil() * f;
            let max_f = (max_frames.unwrap_or(DEFAULT_MAX_FRAMES.min(total_frames)) as f64 / f).floor() * f;
            let n = total_frames as f64 / video_fps * fps;
            let n = n.max(min_f).min(max_f).min(total_frames as f64);
            ((n / f).floor() * f) as usize
        }
    };
    if nframes < FRAME_FACTOR || nframes > total_frames {
        return Err(SampleError::FrameCount { wanted: nframes, available: total_frames });
    }
    Ok(nframes)
}

/// An inclusive range of frame indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRange {
    /// First frame index.
    pub start: usize,
    /// Last frame index (inclusive).
    pub end: usize,
}

impl FrameRange {
    /// Number of frames in the range.
    pub fn len(&self) -> usize {
        self.end - self.start + 1
    }

    /// Always false: a range holds at least one frame.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The frames between `video_start` and `video_end` seconds
/// (qwen-vl-utils `calculate_video_frame_range`: start rounds up, end rounds down, both clamped
/// to the clip).
pub fn frame_range(
    video_start: Option<f64>,
    video_end: Option<f64>,
    total_frames: usize,
    video_fps: f64,
) -> Result<FrameRange, SampleError> {
    if total_frames == 0 {
        return Err(SampleError::InvalidRange("the clip has no frames".into()));
    }
    if !(video_fps.is_finite() && video_fps > 0.0) {
        return Err(SampleError::InvalidParameter(format!("the clip's frame rate must be positive, got {video_fps}")));
    }
    for (name, v) in [("video_start", video_start), ("video_end", video_end)] {
        if let Some(v) = v
            && !v.is_finite()
        {
            return Err(SampleError::InvalidParameter(format!("{name} must be a finite number of seconds")));
        }
    }
    if video_start.is_none() && video_end.is_none() {
        return Ok(FrameRange { start: 0, end: total_frames - 1 });
    }
    let max_duration = total_frames as f64 / video_fps;
    let start = match video_start {
        Some(s) => (s.min(max_duration).max(0.0) * video_fps).ceil() as usize,
        None => 0,
    };
    let end = match video_end {
        Some(e) => ((e.min(max_duration).max(0.0) * video_fps).floor() as usize).min(total_frames - 1),
        None => total_frames - 1,
    };
    if start >= end {
        return Err(SampleError::InvalidRange(format!(
            "start frame {start} is not before end frame {end} (clip of {max_duration:.2} s, {total_frames} frames at {video_fps} fps)"
        )));
    }
    Ok(FrameRange { start, end })
}

/// `torch.linspace(start, end, n).round().long()`: float32 linspace computed from both ends
/// (as torch does), rounded half to even.
pub fn sample_indices(range: FrameRange, n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let start = range.start as f32;
    let end = range.end as f32;
    if n == 1 {
        return vec![start.round_ties_even() as usize];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            let v = if i < halfway { start + step * i as f32 } else { end - step * (n - i - 1) as f32 };
            v.round_ties_even().max(0.0) as usize
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_rounds_half_to_even() {
        // round(5/2) = 2 in Python, so 5 frames -> 4; round(7/2) = 4 -> 8.
        assert_eq!(smart_nframes(FrameSelection::Count(5), 100, 30.0), Ok(4));
        assert_eq!(smart_nframes(FrameSelection::Count(7), 100, 30.0), Ok(8));
        assert_eq!(smart_nframes(FrameSelection::Count(6), 100, 30.0), Ok(6));
    }

    #[test]
    fn fps_rule_matches_worked_examples() {
        // 10 s at 30 fps, fps 2 -> 20 frames; 7 s at 25 fps -> 14 frames (spec section 2.6).
        assert_eq!(smart_nframes(FrameSelection::default(), 300, 30.0), Ok(20));
        assert_eq!(smart_nframes(FrameSelection::default(), 175, 25.0), Ok(14));
        // 60 s at 30 fps -> 120 frames.
        assert_eq!(smart_nframes(FrameSelection::default(), 1800, 30.0), Ok(120));
        // Short clip: the minimum of 4 applies.
        assert_eq!(smart_nframes(FrameSelection::default(), 24, 30.0), Ok(4));
        // Odd max_frames floors to even.
        let sel = FrameSelection::Fps { fps: 30.0, min_frames: None, max_frames: Some(9) };
        assert_eq!(smart_nframes(sel, 300, 30.0), Ok(8));
    }

    #[test]
    fn too_few_frames_is_an_error() {
        assert!(matches!(smart_nframes(FrameSelection::default(), 1, 30.0), Err(SampleError::FrameCount { .. })));
        assert!(smart_nframes(FrameSelection::Count(0), 10, 30.0).is_err());
        assert!(smart_nframes(FrameSelection::Count(12), 10, 30.0).is_err());
        let sel = FrameSelection::Fps { fps: 0.0, min_frames: None, max_frames: None };
        assert!(smart_nframes(sel, 10, 30.0).is_err());
    }

    #[test]
    fn linspace_indices_match_worked_example() {
        let idx = sample_indices(FrameRange { start: 0, end: 299 }, 20);
        assert_eq!(
            idx,
            vec![0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268, 283, 299]
        );
        let idx = sample_indices(FrameRange { start: 0, end: 174 }, 14);
        assert_eq!(idx, vec![0, 13, 27, 40, 54, 67, 80, 94, 107, 120, 134, 147, 161, 174]);
        // 1.5 rounds to 2 (half to even), 4.5 to 4.
        assert_eq!(sample_indices(FrameRange { start: 0, end: 3 }, 3), vec![0, 2, 3]);
        assert_eq!(sample_indices(FrameRange { start: 0, end: 9 }, 3), vec![0, 4, 9]);
    }

    #[test]
    fn range_rounds_start_up_and_end_down() {
        let r = frame_range(Some(0.5), Some(1.9), 90, 30.0).unwrap();
        assert_eq!(r, FrameRange { start: 15, end: 57 });
        assert_eq!(r.len(), 43);
        // Clamped to the clip.
        let r = frame_range(Some(-3.0), Some(100.0), 90, 30.0).unwrap();
        assert_eq!(r, FrameRange { start: 0, end: 89 });
        assert!(frame_range(Some(2.0), Some(1.0), 90, 30.0).is_err());
        assert!(frame_range(Some(5.0), None, 90, 30.0).is_err());
        assert!(frame_range(Some(f64::NAN), None, 90, 30.0).is_err());
    }
}
