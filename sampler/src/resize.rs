//! Antialiased bicubic resize of RGB8 frames, as torchvision does it.
//!
//! torchvision resizes uint8 tensors with `BICUBIC, antialias=True` using the Keys kernel with
//! a = -0.5 and a support widened by the downscale factor (Pillow's weights), but unlike Pillow it
//! keeps the intermediate pass unrounded and unclamped and rounds once at the end. Pillow-style
//! 8-bit resizing (fast_image_resize on `U8x3`) therefore differs by up to 13 levels next to
//! sharp edges. We resize in f32 (fast_image_resize's SIMD `F32x3` convolution with the same
//! Catmull-Rom kernel) and round half to even into 0..=255, which matches torchvision within one
//! level.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::pixels::F32x3;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions};

use crate::SampleError;

/// A reusable resizer for RGB8 frames (keeps its scratch buffers between frames).
pub struct Resizer {
    inner: fast_image_resize::Resizer,
    options: ResizeOptions,
    src: Vec<F32x3>,
}

impl Default for Resizer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Resizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resizer").finish_non_exhaustive()
    }
}

impl Resizer {
    /// A resizer using antialiased bicubic (Catmull-Rom) convolution.
    pub fn new() -> Self {
        Resizer {
            inner: fast_image_resize::Resizer::new(),
            options: ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom)),
            src: Vec::new(),
        }
    }

    /// Resizes a packed RGB8 frame of `width x height` into `out_width x out_height`, writing the
    /// packed RGB8 result into `out` (resized to fit).
    pub fn resize_rgb(
        &mut self,
        rgb: &[u8],
        width: u32,
        height: u32,
        out_width: u32,
        out_height: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), SampleError> {
        let expected = width as usize * height as usize * 3;
        if rgb.len() != expected || width == 0 || height == 0 {
            return Err(SampleError::BufferSize { width, height, expected, got: rgb.len() });
        }
        if out_width == 0 || out_height == 0 {
            return Err(SampleError::FrameSize { width: out_width, height: out_height });
        }
        out.clear();
        out.resize(out_width as usize * out_height as usize * 3, 0);
        if (width, height) == (out_width, out_height) {
            out.copy_from_slice(rgb);
            return Ok(());
        }
        self.src.clear();
        self.src.extend(rgb.chunks_exact(3).map(|p| F32x3::new([p[0] as f32, p[1] as f32, p[2] as f32])));
        let src = ImageRef::from_pixels(width, height, &self.src)
            .map_err(|e| SampleError::InvalidParameter(format!("source frame: {e}")))?;
        let mut dst = Image::new(out_width, out_height, PixelType::F32x3);
        self.inner
            .resize(&src, &mut dst, &self.options)
            .map_err(|e| SampleError::InvalidParameter(format!("resize failed: {e}")))?;
        for (o, b) in out.iter_mut().zip(dst.buffer().chunks_exact(4)) {
            let v = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            *o = v.round_ties_even().clamp(0.0, 255.0) as u8;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant() {
        let mut r = Resizer::new();
        let src = vec![77u8; 100 * 60 * 3];
        let mut out = Vec::new();
        r.resize_rgb(&src, 100, 60, 64, 32, &mut out).unwrap();
        assert_eq!(out.len(), 64 * 32 * 3);
        assert!(out.iter().all(|&v| v == 77));
        r.resize_rgb(&src, 100, 60, 160, 96, &mut out).unwrap();
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn antialiasing_averages_fine_detail() {
        // A one-pixel checkerboard downscaled 4x becomes (nearly) flat grey: without antialiasing
        // a 4-tap bicubic would alias it.
        let (w, h) = (128u32, 128u32);
        let mut src = vec![0u8; (w * h * 3) as usize];
        for y in 0..h {
            for x in 0..w {
                let v = if (x + y) % 2 == 0 { 255 } else { 0 };
                let i = ((y * w + x) * 3) as usize;
                src[i..i + 3].fill(v);
            }
        }
        let mut out = Vec::new();
        Resizer::new().resize_rgb(&src, w, h, 32, 32, &mut out).unwrap();
        let interior: Vec<u8> =
            (4..28).flat_map(|y| (4..28).map(move |x| (y * 32 + x) * 3)).map(|i| out[i as usize]).collect();
        assert!(interior.iter().all(|&v| (120..=135).contains(&v)), "{interior:?}");
    }

    #[test]
    fn bad_buffer_is_an_error() {
        let mut out = Vec::new();
        assert!(Resizer::new().resize_rgb(&[0; 10], 4, 4, 2, 2, &mut out).is_err());
        assert!(Resizer::new().resize_rgb(&[0; 48], 4, 4, 0, 2, &mut out).is_err());
    }
}
