//! Pure, I/O-free video sampling for Qwen3-VL.
//!
//! This crate turns decoded RGB frames into exactly the tensors Qwen3-VL consumes, following the
//! reference pipeline (qwen-vl-utils `fetch_video` with `image_patch_size = 16`, then the
//! transformers Qwen3-VL video processor with `do_resize = False`):
//!
//! 1. [`plan::plan_clip`] chooses the frame indices ([`frames::smart_nframes`] and the
//!    `video_start`/`video_end` range) and the per-frame pixel budget ([`budget`]), giving a
//!    [`plan::ClipPlan`] with the resized size.
//! 2. The caller decodes just those frames to RGB (the `ingest` crate does this).
//! 3. [`resize::Resizer`] resizes each frame with antialiased bicubic (Keys a = -0.5), as
//!    torchvision does on uint8 tensors.
//! 4. [`patchify::ClipBuilder`] normalizes (mean = std = 0.5), pads the frame count to a multiple
//!    of the temporal patch size and lays the pixels out as `rows x 1536` in the reference order.
//!
//! Every place where Python rounds uses round-half-to-even ([`f64::round_ties_even`]).
#![forbid(unsafe_code, clippy::print_stdout, clippy::print_stderr)]

pub mod budget;
pub mod frames;
pub mod patchify;
pub mod plan;
pub mod resize;
pub mod stream;

pub use budget::{PixelBudget, smart_resize};
pub use frames::{FrameRange, FrameSelection, frame_range, sample_indices, smart_nframes};
pub use patchify::{Clip, ClipBuilder, timestamps};
pub use plan::{ClipPlan, SampleOptions, VideoMeta, plan_clip};
pub use resize::Resizer;

/// Size of one vision patch side in pixels (Qwen3-VL).
pub const PATCH_SIZE: usize = 16;
/// Frames per temporal patch.
pub const TEMPORAL_PATCH_SIZE: usize = 2;
/// Spatial merge size (2x2 patches become one LLM token).
pub const MERGE_SIZE: usize = 2;
/// Resize factor: sizes are multiples of `PATCH_SIZE * MERGE_SIZE` = 32.
pub const FACTOR: u32 = (PATCH_SIZE * MERGE_SIZE) as u32;
/// Columns of one patch row: channels x temporal x patch x patch = 1536.
pub const PATCH_DIM: usize = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE;

/// Why a clip cannot be sampled. Each message says what was wrong with the input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SampleError {
    /// A parameter is out of its valid range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The requested time range selects no frames of the clip.
    #[error("invalid time range: {0}")]
    InvalidRange(String),
    /// Too few frames to sample.
    #[error(
        "cannot sample {wanted} frames from a clip (or range) of {available} frames: need between 2 and {available}"
    )]
    FrameCount {
        /// Frames the sampling rule asked for.
        wanted: usize,
        /// Frames available in the clip or range.
        available: usize,
    },
    /// The frame is too elongated for the model.
    #[error("aspect ratio {0:.1} is above the maximum of 200")]
    AspectRatio(f64),
    /// The frame size is degenerate.
    #[error("invalid frame size {width}x{height}")]
    FrameSize {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Pixel data did not match the declared size.
    #[error("frame buffer of {got} bytes does not match {width}x{height} RGB ({expected} bytes)")]
    BufferSize {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Expected byte length.
        expected: usize,
        /// Actual byte length.
        got: usize,
    },
}
