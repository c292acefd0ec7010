//! Replaying a file as a live stream: frames are paced by their own timestamps (times a speed
//! factor), optionally looped, and pushed into a [`FrameRing`] from a dedicated thread. Only the
//! frames the caller admits (its sampling cadence) are converted to RGB. The thread stops at the
//! end of the clip, when the ring is closed, or at once on its pipeline's shutdown signal (it
//! paces by waiting on that signal, so a stopped replay never sleeps on).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base::shutdown;

use ff::util::frame::video::Video as VideoFrame;
use ffmpeg_next as ff;

use crate::convert::RgbConverter;
use crate::file::{FileSource, open_input, pts_seconds};
use crate::ring::{FrameRing, RingEnd};
use crate::{Frame, IngestError, VideoInfo};

/// How to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayOptions {
    /// 1.0 is real time; 2.0 twice as fast.
    pub speed: f64,
    /// Start over at the end.
    pub looped: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions { speed: 1.0, looped: false }
    }
}

/// Decides, from a frame's stream time, whether it is wanted.
pub type Admit = Box<dyn FnMut(Duration) -> bool + Send>;

/// A running replay. Dropping it does not stop it: signal its shutdown, close the ring, or let
/// it end.
#[derive(Debug)]
pub struct Replay {
    /// The clip's facts.
    pub info: VideoInfo,
    handle: JoinHandle<()>,
}

impl Replay {
    /// Starts replaying `path` into `ring` until `stop` is signalled. The thread holds `stop`
    /// while it runs (its pipeline's join waits for it).
    pub fn start(
        path: &Path,
        opts: ReplayOptions,
        ring: Arc<FrameRing>,
        admit: Admit,
        stop: shutdown::Receiver,
    ) -> Result<Self, IngestError> {
        let source = FileSource::open(path)?;
        if !(opts.speed.is_finite() && opts.speed > 0.0 && opts.speed <= 100.0) {
            return Err(IngestError::Decode {
                path: path.to_owned(),
                reason: format!("replay speed must be in (0, 100], got {}", opts.speed),
            });
        }
        let info = source.info().clone();
        let path: PathBuf = path.to_owned();
        let name = format!("replay:{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        // The thread logs in the span of whoever started it (the watch).
        let span = tracing::Span::current();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _entered = span.enter();
                let end = match run(&path, source.info(), opts, &ring, admit, &stop) {
                    Ok(end) => end,
                    Err(e) => RingEnd::Failed(e.to_string()),
                };
                ring.close(end);
            })
            .map_err(|e| IngestError::Decode { path: PathBuf::new(), reason: format!("cannot start thread: {e}") })?;
        Ok(Replay { info, handle })
    }

    /// Whether the replay thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Sleeps until `deadline`; false if the replay should stop instead (shutdown, or the reader
/// closed the ring).
fn pace(deadline: Instant, ring: &FrameRing, stop: &shutdown::Receiver) -> bool {
    stop.wait_until(deadline) && !ring.is_closed()
}

fn run(
    path: &Path,
    info: &VideoInfo,
    opts: ReplayOptions,
    ring: &FrameRing,
    mut admit: Admit,
    stop: &shutdown::Receiver,
) -> Result<RingEnd, IngestError> {
    let err = |reason: String| IngestError::Decode { path: path.to_owned(), reason };
    let start = Instant::now();
    let frame_step = if info.fps > 0.0 { 1.0 / info.fps } else { 1.0 / 30.0 };
    let mut offset = 0.0f64; // stream time added by earlier loops
    let mut seq = 0u64;
    let mut converter = RgbConverter::new();
    loop {
        let mut ictx = open_input(path)?;
        let stream = ictx
            .streams()
            .best(ff::media::Type::Video)
            .ok_or_else(|| IngestError::NoVideo { path: path.to_owned() })?;
        let index = stream.index();
        let rotation = crate::orientation::Rotation::of(&stream);
        let tb = stream.time_base();
        let time_base = (tb.numerator(), tb.denominator());
        let mut decoder = ff::codec::context::Context::from_parameters(stream.parameters())
            .and_then(|c| c.decoder().video())
            .map_err(|e| err(e.to_string()))?;
        decoder.set_packet_time_base(tb);
        let mut first: Option<f64> = None;
        let mut last_t = 0.0f64;
        let mut decoded = VideoFrame::empty();
        let mut packet = ff::Packet::empty();
        let mut eof = false;
        loop {
            if !eof {
                match crate::file::read_packet(&mut ictx, &mut packet) {
                    Ok(()) if packet.stream() == index => {
                        let _ = decoder.send_packet(&packet);
                    }
                    Ok(()) => continue,
                    Err(ff::Error::Eof) => {
                        eof = true;
                        let _ = decoder.send_eof();
                    }
                    Err(e) => return Err(err(format!("demuxing failed: {e}"))),
                }
            }
            loop {
                match decoder.receive_frame(&mut decoded) {
                    Ok(()) => {}
                    Err(ff::Error::Eof) => break,
                    Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => break,
                    Err(e) => return Err(err(e.to_string())),
                }
                let pts = decoded.pts().map_or(last_t, |p| pts_seconds(p, time_base));
                let first_pts = *first.get_or_insert(pts);
                let t = offset + (pts - first_pts).max(0.0);
                last_t = t;
                // Every frame arrives at its own time, as from a camera (only admitted ones are
                // converted).
                if !pace(start + Duration::from_secs_f64(t / opts.speed), ring, stop) {
                    return Ok(RingEnd::Stopped);
                }
                ring.count_arrival();
                let at = Duration::from_secs_f64(t);
                if !admit(at) {
                    continue;
                }
                let (width, height) = (decoded.width(), decoded.height());
                let rgb = converter.convert(&mut decoded, tb).map_err(err)?;
                let (rgb, width, height) = rotation.apply(rgb, width, height);
                let rgb: Arc<[u8]> = rgb.into();
                if !ring.push(Frame { seq, pts: at, width, height, rgb }) {
                    return Ok(RingEnd::Stopped);
                }
                seq += 1;
            }
            if eof {
                break;
            }
        }
        if !opts.looped {
            return Ok(RingEnd::EndOfStream);
        }
        if first.is_none() {
            return Err(err("the clip produced no frames".into()));
        }
        offset = last_t + frame_step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Read;

    fn clip() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/preprocess/clips/h264_short_30fps_256x144.mp4")
    }

    #[test]
    fn replays_in_real_time_with_admission() {
        let ring = FrameRing::new(64);
        let mut reader = ring.reader();
        let started = Instant::now();
        // Every third frame of a 0.8 s, 30 fps clip, at 2x speed.
        let mut n = 0;
        let admit: Admit = Box::new(move |_| {
            n += 1;
            (n - 1) % 3 == 0
        });
        let replay = Replay::start(
            &clip(),
            ReplayOptions { speed: 2.0, looped: false },
            ring.clone(),
            admit,
            shutdown::Receiver::never(),
        )
        .unwrap();
        assert_eq!(replay.info.frame_count, 24);
        let mut times = Vec::new();
        loop {
            match reader.next(Duration::from_secs(5)) {
                Read::Frame { frame, missed } => {
                    assert_eq!(missed, 0);
                    times.push(frame.pts.as_secs_f64());
                }
                Read::Closed(end) => {
                    assert_eq!(end, RingEnd::EndOfStream);
                    break;
                }
                Read::Timeout => panic!("replay stalled"),
            }
        }
        assert_eq!(times.len(), 8);
        assert!((times[1] - 0.1).abs() < 1e-6, "{times:?}");
        // 0.7 s of stream at 2x takes at least 0.35 s of wall time.
        assert!(started.elapsed() >= Duration::from_millis(340));
    }

    #[test]
    fn loops_continue_the_clock_and_stop_on_shutdown() {
        let ring = FrameRing::new(8);
        let mut reader = ring.reader();
        let admit: Admit = Box::new(|_| true);
        let (stop, rx) = shutdown::channel();
        let _replay =
            Replay::start(&clip(), ReplayOptions { speed: 20.0, looped: true }, ring.clone(), admit, rx).unwrap();
        let mut last = -1.0;
        let mut count = 0;
        while count < 60 {
            if let Read::Frame { frame, .. } = reader.next(Duration::from_secs(5)) {
                let t = frame.pts.as_secs_f64();
                assert!(t > last, "time must keep increasing across loops: {t} after {last}");
                last = t;
                count += 1;
            }
        }
        assert!(last > 1.5, "two loops of a 0.8 s clip: {last}");
        // The shutdown signal stops it: the ring closes as stopped, and the join returns.
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), stop.join()).await }).unwrap();
        loop {
            match reader.next(Duration::from_secs(5)) {
                Read::Frame { .. } => {}
                Read::Closed(end) => break assert_eq!(end, RingEnd::Stopped),
                Read::Timeout => panic!("the ring was not closed"),
            }
        }
    }

    #[test]
    fn bad_speed_is_an_error() {
        let ring = FrameRing::new(2);
        let e = Replay::start(
            &clip(),
            ReplayOptions { speed: 0.0, looped: false },
            ring,
            Box::new(|_| true),
            shutdown::Receiver::never(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("speed"), "{e}");
    }
}
