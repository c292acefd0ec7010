//! Stream mode: sliding windows over a live or replayed stream.
//!
//! A window of fixed length at a fixed sampling rate has a fixed frame count, so the target size
//! is fixed per stream. [`Windower::observe`] decides, for each arriving frame, whether it is
//! admitted at the sampling cadence; admitted frames are resized once (by the caller) and kept;
//! every `stride` admitted frames a window of the newest `frames_per_window` is due. A stride of an
//! even number of frames keeps temporal pairs aligned across windows.

use crate::budget::{PixelBudget, smart_resize};
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

impl Default for WindowPolicy {
    fn default() -> Self {
        WindowPolicy { window_s: 4.0, stride_s: 4.0, fps: 2.0, min_pixels: None, max_pixels: None }
    }
}

/// The fixed geometry of a stream's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowShape {
    /// Frames per window (even).
    pub frames: usize,
    /// Admitted frames between window starts.
    pub stride: usize,
    /// Target height.
    pub height: u32,
    /// Target width.
    pub width: u32,
}

impl WindowShape {
    /// `[t, h, w]` patch grid of every window.
    pub fn grid_thw(&self) -> [usize; 3] {
        [self.frames / TEMPORAL_PATCH_SIZE, self.height as usize / 16, self.width as usize / 16]
    }
}

/// What to do with an arriving frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not on the sampling cadence; drop it.
    Skip,
    /// Keep it (resize to the window size); `window_due` says a window ends with it.
    Admit {
        /// A window of the newest `frames` admitted frames is complete.
        window_due: bool,
    },
}

/// Decides admission and window boundaries from frame timestamps alone (no I/O).
#[derive(Debug, Clone)]
pub struct Windower {
    shape: WindowShape,
    interval: f64,
    next_at: Option<f64>,
    admitted: u64,
}

impl Windower {
    /// Plans windows for a `width x height` source.
    pub fn new(policy: &WindowPolicy, width: u32, height: u32) -> Result<Self, SampleError> {
        let positive = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(SampleError::InvalidParameter(format!("{name} must be positive, got {v}")))
            }
        };
        positive(policy.window_s, "window length")?;
        positive(policy.stride_s, "window stride")?;
        positive(policy.fps, "window fps")?;
        let f = TEMPORAL_PATCH_SIZE as f64;
        let frames = ((policy.window_s * policy.fps / f).round() * f).max(f) as usize;
        if frames > 768 {
            return Err(SampleError::InvalidParameter(format!("a window of {frames} frames is above 768")));
        }
        let stride = ((policy.stride_s * policy.fps).round() as usize).max(1);
        let budget = PixelBudget::for_video(policy.min_pixels, policy.max_pixels, None, frames)?;
        let (height, width) = smart_resize(height, width, FACTOR, budget)?;
        Ok(Windower {
            shape: WindowShape { frames, stride, height, width },
            interval: 1.0 / policy.fps,
            next_at: None,
            admitted: 0,
        })
    }

    /// The window geometry.
    pub fn shape(&self) -> WindowShape {
        self.shape
    }

    /// Frames admitted so far.
    pub fn admitted(&self) -> u64 {
        self.admitted
    }

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
        self.admitted += 1;
        let a = self.admitted as usize;
        let due = a >= self.shape.frames && (a - self.shape.frames).is_multiple_of(self.shape.stride);
        Admission::Admit { window_due: due }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_at_the_sampling_rate_and_cuts_windows() {
        let policy =
            WindowPolicy { window_s: 2.0, stride_s: 1.0, fps: 2.0, min_pixels: Some(4096), max_pixels: Some(20_000) };
        let mut w = Windower::new(&policy, 640, 360).unwrap();
        assert_eq!(w.shape().frames, 4);
        assert_eq!(w.shape().stride, 2);
        let mut admitted = Vec::new();
        let mut due = Vec::new();
        for i in 0..150 {
            let t = i as f64 / 30.0;
            if let Admission::Admit { window_due } = w.observe(t) {
                admitted.push(i);
                if window_due {
                    due.push(i);
                }
            }
        }
        // Every 15th frame of a 30 fps stream at 2 fps.
        assert_eq!(admitted, (0..150).step_by(15).collect::<Vec<_>>());
        // First window after 4 admitted frames, then every 2.
        assert_eq!(due, vec![45, 75, 105, 135]);
        let [t, h, ww] = w.shape().grid_thw();
        assert_eq!(t, 2);
        assert!(h * 16 * ww * 16 <= 20_000);
    }

    #[test]
    fn gaps_restart_the_cadence() {
        let mut w = Windower::new(&WindowPolicy::default(), 320, 240).unwrap();
        assert!(matches!(w.observe(0.0), Admission::Admit { .. }));
        assert_eq!(w.observe(0.2), Admission::Skip);
        // A 10 s gap (camera reconnect): the next frame is admitted and the grid restarts there.
        assert!(matches!(w.observe(10.0), Admission::Admit { .. }));
        assert_eq!(w.observe(10.3), Admission::Skip);
        assert!(matches!(w.observe(10.5), Admission::Admit { .. }));
    }

    #[test]
    fn bad_policies_are_errors() {
        let bad = WindowPolicy { fps: 0.0, ..Default::default() };
        assert!(Windower::new(&bad, 320, 240).is_err());
        let huge = WindowPolicy { window_s: 1000.0, fps: 2.0, ..Default::default() };
        assert!(Windower::new(&huge, 320, 240).is_err());
        assert!(Windower::new(&WindowPolicy::default(), 0, 240).is_err());
    }
}
