//! Clip mode: a whole file sampled into one [`sampler::Clip`], exactly as the reference
//! pipeline does (qwen-vl-utils `fetch_video` then the Qwen3-VL processor with `do_resize=False`).

use std::path::Path;

use ingest::{DecodeOptions, FileSource, IngestError, VideoInfo};
use sampler::{Clip, ClipBuilder, ClipPlan, Resizer, SampleError, SampleOptions, VideoMeta, plan_clip};

/// Why a clip could not be sampled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClipError {
    /// The file could not be opened or decoded.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The sampling parameters do not fit the clip.
    #[error(transparent)]
    Sample(#[from] SampleError),
}

/// A sampled clip together with the plan that produced it.
#[derive(Debug, Clone)]
pub struct SampledClip {
    /// What the source reported.
    pub info: VideoInfo,
    /// Frames chosen, target size, grid and timestamps.
    pub plan: ClipPlan,
    /// The model input.
    pub clip: Clip,
}

/// Plans, decodes (only the chosen frames are converted to RGB), resizes and patchifies a file.
pub fn sample_file(path: &Path, opts: &SampleOptions, decode: DecodeOptions) -> Result<SampledClip, ClipError> {
    let source = FileSource::open(path)?;
    let info = source.info().clone();
    let meta = VideoMeta { total_frames: info.frame_count, fps: info.fps, width: info.width, height: info.height };
    let plan = plan_clip(opts, &meta)?;
    let started = std::time::Instant::now();
    let mut builder = ClipBuilder::new(plan.resized_height, plan.resized_width)?;
    let mut resizer = Resizer::new();
    for frame in source.frames(&plan.frame_indices, decode)? {
        let frame = frame?;
        let mut out = Vec::new();
        resizer.resize_rgb(&frame.rgb, frame.width, frame.height, plan.resized_width, plan.resized_height, &mut out)?;
        builder.push(out, plan.frame_time(frame.seq as usize))?;
    }
    if builder.len() != plan.frame_indices.len() {
        return Err(SampleError::FrameCount { wanted: plan.frame_indices.len(), available: builder.len() }.into());
    }
    let decoded = started.elapsed();
    let clip = builder.finish()?;
    tracing::debug!(
        decode_resize_ms = decoded.as_millis() as u64,
        patchify_ms = (started.elapsed() - decoded).as_millis() as u64,
        frames = plan.frame_indices.len(),
        "clip sampled"
    );
    Ok(SampledClip { info, plan, clip })
}

impl SampledClip {
    /// The clip as the engine takes it (moves the pixel data).
    pub fn into_video_input(self) -> inference::VideoInput {
        inference::VideoInput {
            pixel_values: self.clip.pixel_values,
            grid_thw: self.clip.grid_thw,
            timestamps: self.clip.timestamps,
        }
    }
}
