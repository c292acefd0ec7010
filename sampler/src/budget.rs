//! Pixel budgets and `smart_resize` with qwen-vl-utils semantics for Qwen3-VL (factor 32).

use crate::{FACTOR, SampleError};

/// Maximum ratio of the long to the short side.
pub const MAX_RATIO: f64 = 200.0;
/// Default minimum pixels per video frame: 128 tokens of 32x32 pixels.
pub const VIDEO_FRAME_MIN_PIXELS: u64 = 128 * (FACTOR as u64) * (FACTOR as u64);
/// Maximum pixels per video frame: 768 tokens of 32x32 pixels.
pub const VIDEO_FRAME_MAX_PIXELS: u64 = 768 * (FACTOR as u64) * (FACTOR as u64);
/// Default model sequence length behind the default total budget.
pub const MODEL_SEQ_LEN: u64 = 128_000;

/// Default total pixel budget over all sampled frames (`MODEL_SEQ_LEN * 32 * 32 * 0.9`).
pub fn default_total_pixels() -> f64 {
    MODEL_SEQ_LEN as f64 * (FACTOR as f64) * (FACTOR as f64) * 0.9
}

/// The pixel budget of one video frame, given the user's limits and the number of sampled frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelBudget {
    /// Fewest pixels per frame.
    pub min_pixels: f64,
    /// Most pixels per frame.
    pub max_pixels: f64,
}

impl PixelBudget {
    /// qwen-vl-utils `fetch_video`: `max = max(min(768*32*32, total / n * 2), int(min * 1.05))`,
    /// lowered (never raised) by a user `max_pixels`.
    pub fn for_video(
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
        total_pixels: Option<u64>,
        nframes: usize,
    ) -> Result<Self, SampleError> {
        if nframes == 0 {
            return Err(SampleError::InvalidParameter("no frames to budget".into()));
        }
        let min = min_pixels.unwrap_or(VIDEO_FRAME_MIN_PIXELS) as f64;
        let total = total_pixels.map_or_else(default_total_pixels, |t| t as f64);
        if total <= 0.0 {
            return Err(SampleError::InvalidParameter("total_pixels must be positive".into()));
        }
        let computed = (VIDEO_FRAME_MAX_PIXELS as f64)
            .min(total / nframes as f64 * crate::frames::FRAME_FACTOR as f64)
            .max((min * 1.05).floor());
        let max = match max_pixels {
            Some(m) => (m as f64).min(computed),
            None => computed,
        };
        if max < min {
            return Err(SampleError::InvalidParameter(format!("min_pixels ({min}) is above max_pixels ({max})")));
        }
        Ok(PixelBudget { min_pixels: min, max_pixels: max })
    }
}

/// qwen-vl-utils `smart_resize` (the image variant, also used per video frame): both sides become
/// multiples of `factor`, the area lands in `[min_pixels, max_pixels]`, and the aspect ratio is
/// kept as closely as possible. Returns `(height, width)`.
pub fn smart_resize(height: u32, width: u32, factor: u32, budget: PixelBudget) -> Result<(u32, u32), SampleError> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(SampleError::FrameSize { width, height });
    }
    if budget.max_pixels < budget.min_pixels {
        return Err(SampleError::InvalidParameter(format!(
            "min_pixels ({}) is above max_pixels ({})",
            budget.min_pixels, budget.max_pixels
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_RATIO {
        return Err(SampleError::AspectRatio(ratio));
    }
    let mut h_bar = f.max((h / f).round_ties_even() * f);
    let mut w_bar = f.max((w / f).round_ties_even() * f);
    if h_bar * w_bar > budget.max_pixels {
        let beta = (h * w / budget.max_pixels).sqrt();
        h_bar = (h / beta / f).floor() * f;
        w_bar = (w / beta / f).floor() * f;
    } else if h_bar * w_bar < budget.min_pixels {
        let beta = (budget.min_pixels / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < f || w_bar < f {
        // The reference would produce an empty frame here; say why instead.
        return Err(SampleError::InvalidParameter(format!(
            "a pixel budget of {} per frame is too small for a {width}x{height} frame",
            budget.max_pixels
        )));
    }
    Ok((h_bar as u32, w_bar as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(nframes: usize) -> PixelBudget {
        PixelBudget::for_video(None, None, None, nframes).unwrap()
    }

    #[test]
    fn worked_examples() {
        // 10 s 720p at fps 2: 20 frames, per-frame cap 786432 -> 640x1152 (spec 2.6, pipeline B).
        assert_eq!(smart_resize(720, 1280, 32, budget(20)), Ok((640, 1152)));
        // 60 s 1080p: 120 frames -> 640x1152.
        assert_eq!(smart_resize(1080, 1920, 32, budget(120)), Ok((640, 1152)));
        // 480x640 stays.
        assert_eq!(smart_resize(480, 640, 32, budget(14)), Ok((480, 640)));
    }

    #[test]
    fn python_rounding_half_to_even() {
        // 720 / 32 = 22.5 -> 22 in Python (704), not 23.
        let b = PixelBudget { min_pixels: 0.0, max_pixels: 1e12 };
        assert_eq!(smart_resize(720, 720, 32, b), Ok((704, 704)));
        // 208 / 32 = 6.5 -> 6.
        assert_eq!(smart_resize(208, 80, 32, b), Ok((192, 64)));
    }

    #[test]
    fn budget_follows_total_pixels() {
        // 1000 frames: total/n*2 = 235929.6 -> the per-frame max.
        let b = budget(1000);
        assert!((b.max_pixels - 235_929.6).abs() < 1e-6);
        // Never below int(min * 1.05).
        let b = PixelBudget::for_video(Some(131072), None, Some(1000), 100).unwrap();
        assert_eq!(b.max_pixels, (131072.0f64 * 1.05).floor());
        // A user max only lowers it.
        let b = PixelBudget::for_video(Some(1000), Some(10_000_000), None, 4).unwrap();
        assert_eq!(b.max_pixels, VIDEO_FRAME_MAX_PIXELS as f64);
        assert!(PixelBudget::for_video(Some(5000), Some(4000), None, 4).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let b = budget(4);
        assert!(matches!(smart_resize(10, 2100, 32, b), Err(SampleError::AspectRatio(_))));
        assert!(smart_resize(0, 10, 32, b).is_err());
        let tiny = PixelBudget { min_pixels: 1.0, max_pixels: 10.0 };
        assert!(smart_resize(100, 100, 32, tiny).is_err());
    }

    #[test]
    fn upscales_small_frames() {
        // 256x144 under the default minimum of 131072 grows.
        let (h, w) = smart_resize(144, 256, 32, budget(4)).unwrap();
        assert!(h * w >= 131072);
        assert_eq!((h % 32, w % 32), (0, 0));
    }
}
