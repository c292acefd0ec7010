//! Clip-mode planning: which frames to decode and what size to resize them to.

use serde::Serialize;

use crate::budget::{PixelBudget, smart_resize};
use crate::frames::{FrameSelection, frame_range, sample_indices, smart_nframes};
use crate::{FACTOR, PATCH_SIZE, SampleError, TEMPORAL_PATCH_SIZE};

/// User options for sampling a whole clip; `None` means the reference default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleOptions {
    /// Sampling rate (default 2.0). Exclusive with `nframes`.
    pub fps: Option<f64>,
    /// A fixed number of frames. Exclusive with `fps`.
    pub nframes: Option<usize>,
    /// Lower clamp on the sampled count (default 4).
    pub min_frames: Option<usize>,
    /// Upper clamp on the sampled count (default 768).
    pub max_frames: Option<usize>,
    /// Fewest pixels per frame (default 131072).
    pub min_pixels: Option<u64>,
    /// Most pixels per frame (may only lower the computed budget).
    pub max_pixels: Option<u64>,
    /// Pixel budget over all frames (default 117964800).
    pub total_pixels: Option<u64>,
    /// Start of the range to sample, in seconds.
    pub video_start: Option<f64>,
    /// End of the range to sample, in seconds.
    pub video_end: Option<f64>,
}

/// What the source reports about a clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoMeta {
    /// Frames in the stream.
    pub total_frames: usize,
    /// Average frame rate.
    pub fps: f64,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
}

/// The plan for one clip: frames to decode, their target size and the resulting grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipPlan {
    /// Absolute indices of the frames to decode, in order.
    pub frame_indices: Vec<usize>,
    /// The clip's average frame rate.
    pub video_fps: f64,
    /// Frames in the sampled range (the whole clip when no range is given).
    pub total_num_frames: usize,
    /// Height every frame is resized to.
    pub resized_height: u32,
    /// Width every frame is resized to.
    pub resized_width: u32,
    /// `[grid_t, grid_h, grid_w]` of the resulting clip.
    pub grid_thw: [usize; 3],
    /// One timestamp per temporal group, seconds.
    pub timestamps: Vec<f64>,
}

impl ClipPlan {
    /// Seconds at which frame `index` is shown (index / fps, as the reference computes it).
    pub fn frame_time(&self, index: usize) -> f64 {
        index as f64 / self.video_fps
    }
}

/// Plans a clip with qwen-vl-utils semantics (`fetch_video`, `image_patch_size = 16`).
pub fn plan_clip(opts: &SampleOptions, meta: &VideoMeta) -> Result<ClipPlan, SampleError> {
    let selection = match (opts.fps, opts.nframes) {
        (Some(_), Some(_)) => {
            return Err(SampleError::InvalidParameter("give either fps or nframes, not both".into()));
        }
        (None, Some(n)) => FrameSelection::Count(n),
        (fps, None) => FrameSelection::Fps {
            fps: fps.unwrap_or(crate::frames::DEFAULT_FPS),
            min_frames: opts.min_frames,
            max_frames: opts.max_frames,
        },
    };
    if let (Some(lo), Some(hi)) = (opts.min_pixels, opts.max_pixels)
        && lo > hi
    {
        return Err(SampleError::InvalidParameter(format!("min_pixels ({lo}) is above max_pixels ({hi})")));
    }
    if let (Some(lo), Some(hi)) = (opts.min_frames, opts.max_frames)
        && lo > hi
    {
        return Err(SampleError::InvalidParameter(format!("min_frames ({lo}) is above max_frames ({hi})")));
    }
    let range = frame_range(opts.video_start, opts.video_end, meta.total_frames, meta.fps)?;
    let n = smart_nframes(selection, range.len(), meta.fps)?;
    let frame_indices = sample_indices(range, n);
    let budget = PixelBudget::for_video(opts.min_pixels, opts.max_pixels, opts.total_pixels, n)?;
    let (h, w) = smart_resize(meta.height, meta.width, FACTOR, budget)?;
    let times: Vec<f64> = frame_indices.iter().map(|&i| i as f64 / meta.fps).collect();
    Ok(ClipPlan {
        grid_thw: [n.div_ceil(TEMPORAL_PATCH_SIZE), h as usize / PATCH_SIZE, w as usize / PATCH_SIZE],
        timestamps: crate::patchify::timestamps(&times),
        frame_indices,
        video_fps: meta.fps,
        total_num_frames: range.len(),
        resized_height: h,
        resized_width: w,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_10s_720p() {
        let meta = VideoMeta { total_frames: 300, fps: 30.0, width: 1280, height: 720 };
        let plan = plan_clip(&SampleOptions::default(), &meta).unwrap();
        assert_eq!(plan.grid_thw, [10, 40, 72]);
        let ts: Vec<String> = plan.timestamps.iter().map(|t| format!("{t:.1}")).collect();
        assert_eq!(ts, ["0.3", "1.3", "2.4", "3.4", "4.5", "5.5", "6.6", "7.6", "8.7", "9.7"]);
    }

    #[test]
    fn conflicting_options_are_errors() {
        let meta = VideoMeta { total_frames: 300, fps: 30.0, width: 1280, height: 720 };
        let both = SampleOptions { fps: Some(1.0), nframes: Some(4), ..Default::default() };
        assert!(plan_clip(&both, &meta).is_err());
        let px = SampleOptions { min_pixels: Some(10_000), max_pixels: Some(5_000), ..Default::default() };
        assert!(plan_clip(&px, &meta).is_err());
        let out = SampleOptions { video_start: Some(20.0), ..Default::default() };
        assert!(plan_clip(&out, &meta).is_err());
    }
}
