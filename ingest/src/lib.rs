//! Video sources for Lookout.
//!
//! This crate opens video, demuxes and decodes it with libav (through ffmpeg-next) on dedicated
//! threads, and converts to RGB only the frames that are asked for. It knows nothing of models,
//! HTTP or storage.
//!
//! - [`probe`] reads a file's stream facts ([`VideoInfo`]): codec, size, frame count and average
//!   frame rate, counted from the packets themselves (as torchcodec's exact mode does), so that
//!   frame indices mean the same thing here as in the Python reference.
//! - [`FileSource::frames`] decodes the requested frame indices on its own thread and hands them
//!   over through a bounded channel as [`Frame`]s (clip mode).
//! - Stream mode: every source feeds a [`ring::FrameRing`] (bounded; the producer never waits).
//!   [`replay`] paces a file as if it were live; [`rtsp`] pulls a camera with retina and
//!   reconnects; [`webrtc`] is the WHIP resource lifecycle (any number of watches per stream);
//!   [`live`] is their shared decoder thread. Each takes its pipeline's
//!   [`base::shutdown::Receiver`], stops at once on the signal, and holds the receiver while it
//!   runs, so the pipeline's owner can join it.
//!
//! - [`evidence`]: short MP4 clips remuxed from a live source's recent access units or cut from
//!   a file, never re-encoded.
//!
//! The YUV to RGB conversion uses libswscale with the settings torchcodec uses (bilinear, the
//! frame's own colour matrix), so frames are bit-identical with the reference reader.

mod convert;
mod error;
pub mod evidence;
mod file;
pub mod live;
pub mod orientation;
pub mod replay;
pub mod ring;
pub mod rtsp;
pub mod webrtc;

pub use error::IngestError;
pub use file::{DecodeOptions, FileSource, FrameStream, VideoInfo, probe};

use std::sync::Arc;
use std::time::Duration;

/// One decoded frame in packed RGB8.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// Index of the frame in presentation order within its stream.
    pub seq: u64,
    /// Presentation time from the stream's clock (not the wall clock).
    pub pts: Duration,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `height * width * 3` bytes, row-major RGB.
    pub rgb: Arc<[u8]>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("seq", &self.seq)
            .field("pts", &self.pts)
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

/// Initializes libav once. Its own log is silenced: every failure surfaces as an [`IngestError`]. Called by every entry point; cheap after the first.
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = ffmpeg_next::init() {
            tracing::warn!(error = %e, "libav initialisation failed");
        }
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);
    });
}
