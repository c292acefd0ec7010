//! Stream mode: sliding windows over a live or replayed stream, as pure, I/O-free types.
//!
//! A window of fixed length at a fixed sampling rate has a fixed frame count, and its frame size
//! is fixed per stream, so a stream's windows all have one shape. Three pieces, each used where
//! its decision is made:
//!
//! 1. [`WindowPlan::new`] checks a [`WindowPolicy`] before anything is opened: frames per window,
//!    stride, sampling interval and pixel budget, none of which depends on the frame size.
//! 2. [`Cadence::observe`] runs where frames arrive (the source's thread): from a frame's stream
//!    time alone it says whether the frame is admitted at the sampling rate.
//! 3. [`StreamWindows`] is made once the first frame says the source's size. Each admitted frame,
//!    resized to [`WindowShape`] by the caller, is [`push`](StreamWindows::push)ed; the window
//!    rule (which admitted frame closes a window) lives here and nowhere else. At the end of the
//!    stream [`finish`](StreamWindows::finish) turns the frames after the last window into a
//!    last, shorter window, or says why there is none.
//!
//! Window `k` holds admitted frames `k * stride .. k * stride + frames`. A stride of an even
//! number of frames keeps temporal pairs aligned across windows.

use std::collections::VecDeque;

use crate::budget::{PixelBudget, smart_resize};
use crate::patchify::{Clip, ClipBuilder};
use crate::{FACTOR, SampleError, TEMPORAL_PATCH_SIZE};

/// Window policy of a stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowPolicy {
    /// Window length, seconds.
    pub window_s: f64,
    /// Seconds between consecutive windows.
    pub stride_s: f64,
    /// Sampling rate inside windows.
    pub fps: f64,
    /// Fewest pixels per frame.
    pub min_pixels: Option<u64>,
    /// Most pixels per frame.
    pub max_pixels: Option<u64>,
}

impl WindowPolicy {
    /// Server defaults of stream mode: 4 s windows every 4 s at 2 frames/s, small frames
    /// (4096 to 262144 pixels) so that a window stays cheap on a live stream.
    pub const DEFAULT: WindowPolicy = WindowPolicy {
        window_s: 4.0,
        stride_s: 4.0,
        fps: 2.0,
        min_pixels: Some(4096),
        max_pixels: Some(256 * 32 * 32),
    };
}

impl Default for WindowPolicy {
    fn default() -> Self {
        WindowPolicy::DEFAULT
    }
}

/// The most frames one window may hold (the reference's frame limit).
pub const MAX_WINDOW_FRAMES: usize = 768;

/// The size-independent part of a stream's windows, checked before the source is opened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowPlan {
    frames: usize,
    stride: usize,
    interval: f64,
    budget: PixelBudget,
}

impl WindowPlan {
    /// Checks `policy`; every error says which setting to change.
    pub fn new(policy: &WindowPolicy) -> Result<Self, SampleError> {
        let positive = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(SampleError::InvalidParameter(format!("{name} must be a positive number of seconds, got {v}")))
            }
        };
        positive(policy.window_s, "the window length (window.seconds)")?;
        positive(policy.stride_s, "the window stride (window.stride_seconds)")?;
        if !(policy.fps.is_finite() && policy.fps > 0.0) {
            return Err(SampleError::InvalidParameter(format!(
                "the window sampling rate (window.fps) must be positive, got {}",
                policy.fps
            )));
        }
        let f = TEMPORAL_PATCH_SIZE as f64;
        let frames = ((policy.window_s * policy.fps / f).round() * f).max(f);
        if frames > MAX_WINDOW_FRAMES as f64 {
            return Err(SampleError::InvalidParameter(format!(
                "a window of {frames} frames ({} s at {} frames/s) is above {MAX_WINDOW_FRAMES}: \
                 shorten window.seconds or lower window.fps",
                policy.window_s, policy.fps
            )));
        }
        let frames = frames as usize;
        let stride = (policy.stride_s * policy.fps).round().max(1.0);
        if stride > 1e9 {
            return Err(SampleError::InvalidParameter(format!(
                "the window stride of {} s is too long",
                policy.stride_s
            )));
        }
        let budget = PixelBudget::for_video(policy.min_pixels, policy.max_pixels, None, frames)?;
        Ok(WindowPlan { frames, stride: stride as usize, interval: 1.0 / policy.fps, budget })
    }

    /// Frames per full window (even).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Admitted frames between window starts.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Seconds between admitted frames.
    pub fn interval_s(&self) -> f64 {
        self.interval
    }

    /// The admission cadence of a new stream.
    pub fn cadence(&self) -> Cadence {
        Cadence { interval: self.interval, next_at: None }
    }

    /// The window geometry for a `width x height` source.
    pub fn shape(&self, width: u32, height: u32) -> Result<WindowShape, SampleError> {
        let (h, w) = smart_resize(height, width, FACTOR, self.budget)?;
        Ok(WindowShape { frames: self.frames, stride: self.stride, height: h, width: w })
    }
}

/// The fixed geometry of a stream's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowShape {
    /// Frames per full window (even).
    pub frames: usize,
    /// Admitted frames between window starts.
    pub stride: usize,
    /// Target height.
    pub height: u32,
    /// Target width.
    pub width: u32,
}

impl WindowShape {
    /// `[t, h, w]` patch grid of a window of `frames` frames.
    pub fn grid_for(&self, frames: usize) -> [usize; 3] {
        [frames.div_ceil(TEMPORAL_PATCH_SIZE), self.height as usize / 16, self.width as usize / 16]
    }

    /// `[t, h, w]` patch grid of a full window.
    pub fn grid_thw(&self) -> [usize; 3] {
        self.grid_for(self.frames)
    }
}

/// What to do with an arriving frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not on the sampling cadence; drop it.
    Skip,
    /// On the cadence: resize it and push it into the stream's windows.
    Admit,
}

/// Admission at the sampling rate, from frame times alone.
#[derive(Debug, Clone)]
pub struct Cadence {
    interval: f64,
    next_at: Option<f64>,
}

impl Cadence {
    /// Considers a frame shown at `t` seconds (stream time, non-decreasing).
    pub fn observe(&mut self, t: f64) -> Admission {
        let next = *self.next_at.get_or_insert(t);
        // A small tolerance absorbs timestamp rounding (e.g. 1/30 s steps at 2 fps).
        if t + 1e-6 < next {
            return Admission::Skip;
        }
        // Stay on the grid; after a gap, resume from this frame.
        let mut n = next + self.interval;
        if n <= t {
            n = t + self.interval;
        }
        self.next_at = Some(n);
        Admission::Admit
    }
}

/// A window ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamWindow {
    /// Window number within the stream (0, 1, ...).
    pub index: u64,
    /// Stream time of its first frame, seconds.
    pub start_s: f64,
    /// Stream time of its last frame, seconds (the window spans until one sampling interval
    /// after it).
    pub end_s: f64,
    /// The frames' numbers in the stream (what identifies a temporal pair's content).
    pub frame_ids: Vec<u64>,
    /// Whether this is the shorter last window cut at the end of the stream.
    pub last: bool,
    /// The window's last frame, resized (RGB8 of the window shape): its thumbnail.
    pub last_rgb: Vec<u8>,
    /// The model input; its timestamps count from the window's first frame.
    pub clip: Clip,
}

/// What is left when a stream ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Tail {
    /// The frames after the last window, as a last, shorter window.
    Window(StreamWindow),
    /// Every admitted frame was in a window (or between windows, when the stride is longer than
    /// a window).
    Covered,
    /// Fewer frames remain than one temporal pair.
    TooShort {
        /// Admitted frames not in any window.
        frames: usize,
    },
}

#[derive(Debug)]
struct Held {
    index: u64,
    seq: u64,
    t: f64,
    rgb: Vec<u8>,
}

/// Cuts a stream's admitted, resized frames into windows.
#[derive(Debug)]
pub struct StreamWindows {
    shape: WindowShape,
    held: VecDeque<Held>,
    /// Frames pushed so far (the next frame's index).
    admitted: u64,
    /// Index of the next window.
    next_window: u64,
}

impl StreamWindows {
    /// Windows of `plan` over a `width x height` source.
    pub fn new(plan: &WindowPlan, width: u32, height: u32) -> Result<Self, SampleError> {
        let shape = plan.shape(width, height)?;
        Ok(StreamWindows { shape, held: VecDeque::with_capacity(shape.frames), admitted: 0, next_window: 0 })
    }

    /// The window geometry (every pushed frame must have this size).
    pub fn shape(&self) -> WindowShape {
        self.shape
    }

    /// Windows cut so far.
    pub fn windows(&self) -> u64 {
        self.next_window
    }

    /// Frames pushed so far.
    pub fn admitted(&self) -> u64 {
        self.admitted
    }

    fn window_start(&self, k: u64) -> u64 {
        k * self.shape.stride as u64
    }

    /// Adds an admitted frame (stream number `seq`, shown at `t` seconds, resized to
    /// [`shape`](Self::shape)). Returns the window it closes, if any.
    pub fn push(&mut self, seq: u64, t: f64, rgb: Vec<u8>) -> Result<Option<StreamWindow>, SampleError> {
        let expected = self.shape.width as usize * self.shape.height as usize * 3;
        if rgb.len() != expected {
            return Err(SampleError::BufferSize {
                width: self.shape.width,
                height: self.shape.height,
                expected,
                got: rgb.len(),
            });
        }
        let index = self.admitted;
        self.admitted += 1;
        // Keep only frames that a coming window can still use.
        let start = self.window_start(self.next_window);
        if index >= start {
            if self.held.len() == self.shape.frames {
                self.held.pop_front();
            }
            self.held.push_back(Held { index, seq, t, rgb });
        }
        if index + 1 == start + self.shape.frames as u64 {
            let w = self.cut(start, false)?;
            return Ok(Some(w));
        }
        Ok(None)
    }

    /// The end of the stream: the frames of the next window that did arrive, if they add at
    /// least one new temporal pair.
    pub fn finish(&mut self) -> Result<Tail, SampleError> {
        let start = self.window_start(self.next_window);
        let covered =
            if self.next_window == 0 { 0 } else { self.window_start(self.next_window - 1) + self.shape.frames as u64 };
        let fresh = self.admitted.saturating_sub(covered.max(start));
        let have = self.held.iter().filter(|h| h.index >= start).count();
        if fresh == 0 {
            return Ok(Tail::Covered);
        }
        if have < TEMPORAL_PATCH_SIZE {
            return Ok(Tail::TooShort { frames: fresh as usize });
        }
        Ok(Tail::Window(self.cut(start, true)?))
    }

    fn cut(&mut self, start: u64, last: bool) -> Result<StreamWindow, SampleError> {
        let frames: Vec<&Held> = self.held.iter().filter(|h| h.index >= start).collect();
        let first_t = frames.first().map_or(0.0, |h| h.t);
        let end_s = frames.last().map_or(0.0, |h| h.t);
        let mut b = ClipBuilder::new(self.shape.height, self.shape.width)?;
        for h in &frames {
            // Timestamps inside the prompt count from the window's first frame.
            b.push(h.rgb.clone(), h.t - first_t)?;
        }
        let frame_ids = frames.iter().map(|h| h.seq).collect();
        let last_rgb = frames.last().map(|h| h.rgb.clone()).unwrap_or_default();
        let clip = b.finish()?;
        let index = self.next_window;
        self.next_window += 1;
        // Frames before the next window's start are of no further use.
        let next_start = self.window_start(self.next_window);
        self.held.retain(|h| h.index >= next_start);
        Ok(StreamWindow { index, start_s: first_t, end_s, frame_ids, last, last_rgb, clip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(window_s: f64, stride_s: f64, fps: f64) -> WindowPolicy {
        WindowPolicy { window_s, stride_s, fps, min_pixels: Some(4096), max_pixels: Some(20_000) }
    }

    /// Feeds a `seconds`-long 30 fps stream through cadence and windows; returns the windows'
    /// (start, end, frames, last) and the tail.
    fn run(p: &WindowPolicy, seconds: f64) -> (Vec<(f64, f64, usize, bool)>, Tail) {
        let plan = WindowPlan::new(p).unwrap();
        let mut cadence = plan.cadence();
        let mut windows = StreamWindows::new(&plan, 320, 240).unwrap();
        let shape = windows.shape();
        let bytes = shape.width as usize * shape.height as usize * 3;
        let mut out = Vec::new();
        let n = (seconds * 30.0).round() as u64;
        for seq in 0..n {
            let t = seq as f64 / 30.0;
            if cadence.observe(t) == Admission::Admit
                && let Some(w) = windows.push(seq, t, vec![128; bytes]).unwrap()
            {
                out.push(w);
            }
        }
        let tail = windows.finish().unwrap();
        if let Tail::Window(w) = &tail {
            out.push(w.clone());
        }
        for (k, w) in out.iter().enumerate() {
            assert_eq!(w.index, k as u64);
            assert_eq!(w.clip.grid_thw, shape.grid_for(w.frame_ids.len()));
            assert_eq!(w.clip.frame_times[0], 0.0, "prompt timestamps count from the window's first frame");
        }
        (out.iter().map(|w| (w.start_s, w.end_s, w.frame_ids.len(), w.last)).collect(), tail)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn admits_at_the_sampling_rate() {
        let plan = WindowPlan::new(&policy(2.0, 1.0, 2.0)).unwrap();
        assert_eq!((plan.frames(), plan.stride()), (4, 2));
        let mut c = plan.cadence();
        let admitted: Vec<u32> = (0..150).filter(|&i| c.observe(f64::from(i) / 30.0) == Admission::Admit).collect();
        // Every 15th frame of a 30 fps stream at 2 fps.
        assert_eq!(admitted, (0..150).step_by(15).collect::<Vec<_>>());
    }

    #[test]
    fn sliding_windows_overlap_by_window_minus_stride() {
        // 2 s windows every 1 s at 2 fps over 5 s: frames at 0, 0.5, ..., 4.5.
        let (w, tail) = run(&policy(2.0, 1.0, 2.0), 5.0);
        let starts: Vec<f64> = w.iter().map(|w| w.0).collect();
        assert_eq!(starts.len(), 4, "{w:?}");
        for (s, want) in starts.iter().zip([0.0, 1.0, 2.0, 3.0]) {
            assert!(close(*s, want), "{w:?}");
        }
        assert!(w.iter().all(|w| w.2 == 4 && !w.3));
        // The last window ended with the last frame: nothing is left over.
        assert_eq!(tail, Tail::Covered, "{w:?}");
    }

    #[test]
    fn a_ten_second_clip_gives_windows_0_4_8_and_a_short_last_one() {
        let (w, _) = run(&policy(4.0, 4.0, 2.0), 10.0);
        assert_eq!(w.len(), 3, "{w:?}");
        for ((s, e, n, last), (ws, we, wn, wl)) in
            w.iter().zip([(0.0, 3.5, 8, false), (4.0, 7.5, 8, false), (8.0, 9.5, 4, true)])
        {
            assert!(close(*s, ws) && close(*e, we) && *n == wn && *last == wl, "{w:?}");
        }
    }

    #[test]
    fn a_clip_shorter_than_a_window_is_one_short_window() {
        let (w, _) = run(&policy(4.0, 4.0, 2.0), 3.0);
        assert_eq!(w.len(), 1);
        let (s, e, n, last) = w[0];
        assert!(close(s, 0.0) && close(e, 2.5) && n == 6 && last, "{w:?}");
    }

    #[test]
    fn a_single_frame_is_too_short_and_says_so() {
        let (w, tail) = run(&policy(4.0, 4.0, 2.0), 0.4);
        assert!(w.is_empty());
        assert_eq!(tail, Tail::TooShort { frames: 1 });
        let (w, tail) = run(&policy(1.0, 1.0, 2.0), 1.2);
        // One window of 0 and 0.5; the frame at 1.0 alone is not a pair.
        assert_eq!(w.len(), 1);
        assert_eq!(tail, Tail::TooShort { frames: 1 });
    }

    #[test]
    fn strides_longer_than_windows_leave_gaps_and_odd_tails_are_padded() {
        // 1 s windows every 3 s at 2 fps over 7.9 s: windows at 0, 3, 6 (+ nothing after).
        let (w, tail) = run(&policy(1.0, 3.0, 2.0), 7.9);
        let starts: Vec<f64> = w.iter().map(|w| w.0).collect();
        assert_eq!(starts.len(), 3, "{w:?}");
        assert!(close(starts[2], 6.0));
        assert_eq!(tail, Tail::Covered);
        // 3 frames left at the end: one window with the last frame repeated to a pair.
        let (w, _) = run(&policy(4.0, 4.0, 2.0), 5.4);
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].2, 3);
        let plan = WindowPlan::new(&policy(4.0, 4.0, 2.0)).unwrap();
        assert_eq!(plan.shape(320, 240).unwrap().grid_for(3)[0], 2);
    }

    #[test]
    fn gaps_restart_the_cadence() {
        let mut c = WindowPlan::new(&WindowPolicy::default()).unwrap().cadence();
        assert_eq!(c.observe(0.0), Admission::Admit);
        assert_eq!(c.observe(0.2), Admission::Skip);
        // A 10 s gap (camera reconnect): the next frame is admitted and the grid restarts there.
        assert_eq!(c.observe(10.0), Admission::Admit);
        assert_eq!(c.observe(10.3), Admission::Skip);
        assert_eq!(c.observe(10.5), Admission::Admit);
    }

    #[test]
    fn bad_policies_are_errors_that_name_the_setting() {
        let e = WindowPlan::new(&WindowPolicy { fps: 0.0, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("window.fps"), "{e}");
        let e = WindowPlan::new(&WindowPolicy { window_s: 1000.0, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("above 768"), "{e}");
        let e = WindowPlan::new(&WindowPolicy { stride_s: f64::NAN, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("stride_seconds"), "{e}");
        let swapped = WindowPolicy { min_pixels: Some(100_000), max_pixels: Some(5000), ..Default::default() };
        assert!(WindowPlan::new(&swapped).is_err());
        let plan = WindowPlan::new(&WindowPolicy::default()).unwrap();
        assert!(StreamWindows::new(&plan, 0, 240).is_err());
        assert!(StreamWindows::new(&plan, 320, 1).is_err(), "aspect ratio above 200");
    }

    #[test]
    fn a_frame_of_the_wrong_size_is_an_error() {
        let plan = WindowPlan::new(&WindowPolicy::default()).unwrap();
        let mut w = StreamWindows::new(&plan, 320, 240).unwrap();
        assert!(matches!(w.push(0, 0.0, vec![0; 10]), Err(SampleError::BufferSize { .. })));
    }
}
