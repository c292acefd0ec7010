//! The window stage of a watch: a thread that reads the frame ring, resizes each admitted frame
//! once, cuts windows with [`sampler::stream::StreamWindows`] and posts each due window to a
//! one-slot [`Mailbox`] for the watch's task. A newer window replaces one the model has not
//! claimed yet (the newest wins) and the replaced one is counted as skipped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base::shutdown;
use ingest::ring::{FrameRing, RingEnd};
use sampler::Resizer;
use sampler::stream::{StreamWindow, StreamWindows, Tail, WindowPlan};
use tokio::sync::Notify;

/// How the stream ended, as the window stage saw it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StreamEnd {
    /// Why the ring closed.
    pub(crate) end: RingEnd,
    /// Frames admitted into windows over the whole stream.
    pub(crate) admitted: u64,
    /// Windows cut (the last, shorter one included).
    pub(crate) windows: u64,
    /// When nothing at all could be analysed: why not, for people.
    pub(crate) nothing_because: Option<String>,
}

#[derive(Debug, Default)]
struct Slot {
    window: Option<StreamWindow>,
    end: Option<StreamEnd>,
}

/// One-slot hand-off between the window thread and the watch's task.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    slot: Mutex<Slot>,
    notify: Notify,
    skipped: AtomicU64,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts a window; an unclaimed older one is dropped and counted.
    pub(crate) fn put(&self, w: StreamWindow) {
        if self.lock().window.replace(w).is_some() {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify_one();
    }

    /// The stream is over (after its last window, if any, was put).
    pub(crate) fn close(&self, end: StreamEnd) {
        self.lock().end = Some(end);
        self.notify.notify_one();
    }

    /// Waits until something was posted.
    pub(crate) async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Takes the pending window, and the end once no window is pending.
    pub(crate) fn take(&self) -> (Option<StreamWindow>, Option<StreamEnd>) {
        let mut s = self.lock();
        let w = s.window.take();
        let end = if w.is_none() { s.end.clone() } else { None };
        (w, end)
    }

    /// A window cut while the one taken last waited for the engine: it replaces that one,
    /// which is counted as skipped.
    pub(crate) fn take_newer(&self) -> Option<StreamWindow> {
        let newer = self.lock().window.take()?;
        self.skipped.fetch_add(1, Ordering::Relaxed);
        Some(newer)
    }

    /// Windows dropped so far because a newer one replaced them.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Wakes the taker again (a window may have arrived while the last one ran).
    pub(crate) fn poke(&self) {
        self.notify.notify_one();
    }
}

/// What the window stage reports as it goes (read by the status messages and the live view).
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Frames overwritten in the ring before this stage read them.
    pub(crate) missed: AtomicU64,
    /// Stream time of the newest frame read, ms.
    pub(crate) last_frame_ms: AtomicU64,
    /// The newest frame read (the live view).
    latest: Mutex<Option<ingest::Frame>>,
}

impl Progress {
    /// The newest frame the stage has read.
    pub(crate) fn latest(&self) -> Option<ingest::Frame> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_latest(&self, f: ingest::Frame) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
}

/// Starts the window thread of watch `name`. It runs until the ring closes and holds `stop`.
pub(crate) fn spawn(
    name: &str,
    ring: Arc<FrameRing>,
    plan: WindowPlan,
    mailbox: Arc<Mailbox>,
    progress: Arc<Progress>,
    stop: shutdown::Receiver,
) -> std::io::Result<()> {
    let span = tracing::Span::current();
    std::thread::Builder::new().name(format!("window:{name}")).spawn(move || {
        let _entered = span.enter();
        let end = cut(&ring, plan, &mailbox, &progress);
        if let RingEnd::Failed(e) = &end.end {
            tracing::debug!(error = %e, "window stage ended by a failure");
        }
        // A failure here (a frame size the model cannot take) must stop the source too.
        ring.close(end.end.clone());
        mailbox.close(end);
        drop(stop);
    })?;
    Ok(())
}

fn cut(ring: &Arc<FrameRing>, plan: WindowPlan, mailbox: &Mailbox, progress: &Progress) -> StreamEnd {
    let mut reader = ring.reader();
    let mut resizer = Resizer::new();
    let mut windows: Option<StreamWindows> = None;
    let failed = |e: String, w: &Option<StreamWindows>| StreamEnd {
        end: RingEnd::Failed(e),
        admitted: w.as_ref().map_or(0, StreamWindows::admitted),
        windows: w.as_ref().map_or(0, StreamWindows::windows),
        nothing_because: None,
    };
    loop {
        let (frame, missed) = match reader.recv() {
            Ok(f) => f,
            Err(end) => return finish(end, windows, &plan, mailbox),
        };
        progress.missed.fetch_add(missed, Ordering::Relaxed);
        let t = frame.pts.as_secs_f64();
        progress.last_frame_ms.store((t * 1000.0) as u64, Ordering::Relaxed);
        progress.set_latest(frame.clone());
        // The first frame says the source's size; the window size follows from it.
        let w = match &mut windows {
            Some(w) => w,
            None => match StreamWindows::new(&plan, frame.width, frame.height) {
                Ok(w) => windows.insert(w),
                Err(e) => {
                    return failed(
                        format!("the source's {}x{} frames cannot be analysed: {e}", frame.width, frame.height),
                        &None,
                    );
                }
            },
        };
        let shape = w.shape();
        let mut out = Vec::new();
        if let Err(e) = resizer.resize_rgb(&frame.rgb, frame.width, frame.height, shape.width, shape.height, &mut out) {
            return failed(e.to_string(), &windows);
        }
        match w.push(frame.seq, t, out) {
            Ok(Some(window)) => mailbox.put(window),
            Ok(None) => {}
            Err(e) => return failed(e.to_string(), &windows),
        }
    }
}

/// At the end of the stream, the frames after the last window become a last, shorter window.
fn finish(end: RingEnd, windows: Option<StreamWindows>, plan: &WindowPlan, mailbox: &Mailbox) -> StreamEnd {
    let Some(mut w) = windows else {
        let nothing_because =
            (end == RingEnd::EndOfStream).then(|| "the source ended before its first frame".to_owned());
        return StreamEnd { end, admitted: 0, windows: 0, nothing_because };
    };
    // Only a stream that ended by itself is finished with a last window; a stopped or failed
    // one is not analysed further.
    let mut nothing_because = None;
    if end == RingEnd::EndOfStream {
        match w.finish() {
            Ok(Tail::Window(last)) => mailbox.put(last),
            Ok(Tail::Covered) => {}
            Ok(Tail::TooShort { frames }) if w.windows() == 0 => {
                nothing_because = Some(format!(
                    "the stream ended after {frames} sampled frame{} at {} frames/s; a window needs at least 2: \
                     use a longer clip or a higher window.fps",
                    if frames == 1 { "" } else { "s" },
                    1.0 / plan.interval_s()
                ));
            }
            Ok(Tail::TooShort { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "cannot cut the last window"),
        }
    }
    StreamEnd { end, admitted: w.admitted(), windows: w.windows(), nothing_because }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn frame(seq: u64, t: f64) -> ingest::Frame {
        ingest::Frame {
            seq,
            pts: Duration::from_secs_f64(t),
            width: 64,
            height: 64,
            rgb: Arc::from(vec![90u8; 64 * 64 * 3]),
        }
    }

    fn plan(window_s: f64, fps: f64) -> WindowPlan {
        WindowPlan::new(&sampler::stream::WindowPolicy {
            window_s,
            stride_s: window_s,
            fps,
            min_pixels: Some(4096),
            max_pixels: Some(4096),
        })
        .unwrap()
    }

    async fn run_stage(plan: WindowPlan, frames: Vec<ingest::Frame>, end: RingEnd) -> (Vec<StreamWindow>, StreamEnd) {
        let ring = FrameRing::new(64);
        let mailbox = Arc::new(Mailbox::default());
        let (stop, rx) = shutdown::channel();
        spawn("test", ring.clone(), plan, mailbox.clone(), Arc::new(Progress::default()), rx).unwrap();
        let mut got = Vec::new();
        for f in frames {
            ring.push(f);
            // One window at a time, as the model would claim them.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let (Some(w), _) = mailbox.take() {
                got.push(w);
            }
        }
        ring.close(end);
        stop.join().await;
        let (w, _) = mailbox.take();
        got.extend(w);
        let (_, end) = mailbox.take();
        (got, end.expect("the stage closes the mailbox"))
    }

    #[tokio::test]
    async fn full_windows_then_the_rest_at_the_end_of_the_stream() {
        let frames = (0..10).map(|i| frame(i, i as f64 * 0.5)).collect();
        let (windows, end) = run_stage(plan(2.0, 2.0), frames, RingEnd::EndOfStream).await;
        let sizes: Vec<(usize, bool)> = windows.iter().map(|w| (w.frame_ids.len(), w.last)).collect();
        assert_eq!(sizes, [(4, false), (4, false), (2, true)]);
        assert_eq!(windows[2].frame_ids, [8, 9]);
        assert_eq!((end.admitted, end.windows, end.nothing_because), (10, 3, None));
    }

    #[tokio::test]
    async fn a_stopped_stream_is_not_finished_and_one_frame_says_why_nothing_was_analysed() {
        let frames = (0..6).map(|i| frame(i, i as f64 * 0.5)).collect();
        let (windows, end) = run_stage(plan(2.0, 2.0), frames, RingEnd::Stopped).await;
        assert_eq!(windows.len(), 1);
        assert_eq!(end.end, RingEnd::Stopped);
        let (windows, end) = run_stage(plan(4.0, 2.0), vec![frame(0, 0.0)], RingEnd::EndOfStream).await;
        assert!(windows.is_empty());
        let why = end.nothing_because.unwrap();
        assert!(why.contains("1 sampled frame ") && why.contains("window.fps"), "{why}");
    }

    #[tokio::test]
    async fn a_frame_size_the_model_cannot_take_fails_the_stage_and_closes_the_ring() {
        let ring = FrameRing::new(4);
        let mailbox = Arc::new(Mailbox::default());
        let (stop, rx) = shutdown::channel();
        spawn("test", ring.clone(), plan(2.0, 2.0), mailbox.clone(), Arc::new(Progress::default()), rx).unwrap();
        ring.push(ingest::Frame {
            seq: 0,
            pts: Duration::ZERO,
            width: 4000,
            height: 2,
            rgb: Arc::from(vec![0u8; 24_000]),
        });
        stop.join().await;
        let (_, end) = mailbox.take();
        let RingEnd::Failed(e) = end.unwrap().end else { panic!() };
        assert!(e.contains("4000x2"), "{e}");
        assert!(ring.is_closed());
    }
}
