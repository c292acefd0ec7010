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
    /// The clip needs more memory than the server grants (`never`: it could never fit).
    #[error("{message}")]
    Budget {
        /// It can never fit (rather than: not now).
        never: bool,
        /// What to change.
        message: String,
    },
}

/// Bytes of full-size decoded frames that may wait for the resizer.
const DECODED_BYTES: usize = 128 << 20;

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
    sample_file_within(path, opts, decode, |_| Ok(())).map(|(s, ())| s)
}

/// Memory a clip takes to sample and to hold until the model has it, estimated from its plan:
/// full-size frames in the decoder, the RGB conversion and the queue (measured: an 8K H.264 clip
/// peaked at about eight full RGB frames), and the sampled frames twice (RGB, then the f32 patch
/// rows the model takes).
pub fn memory_estimate(info: &VideoInfo, plan: &ClipPlan) -> u64 {
    let full = info.width as u64 * info.height as u64 * 3;
    let sampled = plan.frame_indices.len() as u64 * plan.resized_width as u64 * plan.resized_height as u64 * 3;
    8 * full + sampled * (1 + 4)
}

/// [`sample_file`], with `reserve` asked for [`memory_estimate`] bytes after planning and before
/// decoding: it may wait for memory, or refuse (the error is the request's). What it returns is
/// handed back with the clip (hold it until the clip's memory is freed).
pub fn sample_file_within<R>(
    path: &Path,
    opts: &SampleOptions,
    decode: DecodeOptions,
    reserve: impl FnOnce(u64) -> Result<R, ClipError>,
) -> Result<(SampledClip, R), ClipError> {
    let source = FileSource::open(path)?;
    let info = source.info().clone();
    let meta = VideoMeta { total_frames: info.frame_count, fps: info.fps, width: info.width, height: info.height };
    let plan = plan_clip(opts, &meta)?;
    let held = reserve(memory_estimate(&info, &plan))?;
    let started = std::time::Instant::now();
    let mut builder = ClipBuilder::new(plan.resized_height, plan.resized_width)?;
    let mut resizer = Resizer::new();
    // Frames wait for the resizer at full size (the reference resizes the full RGB frame, so we
    // do too): at most DECODED_BYTES of them (an 8K frame is 100 MB of RGB).
    let frame_bytes = (info.width as usize * info.height as usize * 3).max(1);
    let decode = DecodeOptions { queue: decode.queue.min((DECODED_BYTES / frame_bytes).max(1)), ..decode };
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
    Ok((SampledClip { info, plan, clip }, held))
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
