//! What an incident keeps as evidence: key frames (the newest analysed frame when a window is
//! decided) and a clip of the confirming windows with pre-roll, from the source's own encoded
//! frames: a monitored camera's recent access units, or the uploaded file itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Seconds of video before the first confirming window.
pub(crate) const PREROLL_S: f64 = 3.0;

/// Where a monitor's evidence comes from.
pub(crate) trait Evidence: Send + Sync {
    /// The newest frame the monitor's watch analysed.
    fn frame(&self) -> Option<ingest::Frame>;
    /// Writes the video between two stream times as an MP4 at `out` (blocking). Returns the
    /// number of frames written.
    fn clip(&self, from_s: f64, to_s: f64, out: &Path) -> Result<usize, String>;
}

/// An uploaded clip replayed (maybe looped) as the source: stream time maps back to the file.
#[derive(Debug, Clone)]
pub(crate) struct FileClip {
    /// The file.
    pub(crate) path: PathBuf,
    /// Whether the replay loops.
    pub(crate) looped: bool,
}

impl FileClip {
    /// Cuts the file for a stream-time range (a looped replay's time wraps at the clip's length).
    pub(crate) fn cut(&self, from_s: f64, to_s: f64, out: &Path) -> Result<usize, String> {
        let info = ingest::probe(&self.path).map_err(|e| e.to_string())?;
        let (mut from, mut to) = (from_s.max(0.0), to_s.max(0.0));
        if self.looped && info.fps > 0.0 && info.frame_count > 0 {
            // The replay's loop is the clip's frames at its rate (see ingest::replay). A span
            // that crosses the loop point, or is longer than the clip, is the whole clip.
            let length = info.frame_count as f64 / info.fps;
            let span = to - from;
            let end = to % length;
            (from, to) = if span < length && end >= span { (end - span, end) } else { (0.0, length) };
        }
        ingest::evidence::cut_mp4(&self.path, info.start_s + from, info.start_s + to, out)
    }
}

/// Live cameras: the watch's packet ring.
pub(crate) fn live_clip(
    packets: &Arc<ingest::evidence::PacketRing>,
    from_s: f64,
    to_s: f64,
    out: &Path,
) -> Result<usize, String> {
    let secs = |s: f64| std::time::Duration::from_secs_f64(s.max(0.0));
    let units = packets.units(secs(from_s), secs(to_s));
    ingest::evidence::units_to_mp4(&units, out)
}
