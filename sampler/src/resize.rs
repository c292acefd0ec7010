//! Antialiased bicubic resize of RGB8 frames, as torchvision does it.
//!
//! torchvision resizes uint8 tensors with `BICUBIC, antialias=True`: a separable convolution with
//! the Keys kernel (a = -0.5) whose support widens with the downscale factor, with weights
//! normalized to sum to one (the same weights as Pillow). Unlike Pillow it neither rounds nor
//! clamps between the two passes; it rounds once at the end. Pillow-style 8-bit resizing (for
//! example fast_image_resize on `U8x3`) therefore differs by up to 13 levels next to sharp edges.
//! This resizer accumulates both passes in f32 and rounds half to even into 0..=255, matching
//! torchvision within one level.
//!
//! The vertical pass runs first, over whole interleaved rows (it vectorizes and shrinks the
//! number of rows the horizontal pass touches); the order changes results only in the last bits
//! of the f32 intermediate.

use crate::SampleError;

/// Keys cubic convolution kernel with a = -0.5 (torch `aa_filter` for bicubic, Pillow `bicubic`).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-index taps of a 1-D antialiased bicubic resampling.
#[derive(Debug, Clone, PartialEq)]
struct Taps {
    /// First input index for each output index.
    start: Vec<usize>,
    /// Number of taps per output index (at most `stride`).
    len: Vec<usize>,
    /// `stride` weights per output index, zero-padded.
    weights: Vec<f32>,
    stride: usize,
}

impl Taps {
    /// torch `_compute_indices_min_size_weights_aa` with `align_corners = False`.
    fn new(input: usize, output: usize) -> Self {
        let scale = input as f64 / output as f64;
        let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let stride = (support.ceil() as usize) * 2 + 1;
        let mut t = Taps {
            start: Vec::with_capacity(output),
            len: Vec::with_capacity(output),
            weights: vec![0.0; output * stride],
            stride,
        };
        let mut w = vec![0f64; stride];
        for i in 0..output {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5).trunc().max(0.0)) as usize;
            let xmax = ((center + support + 0.5).trunc() as usize).min(input);
            let n = xmax.saturating_sub(xmin).min(stride);
            let mut total = 0.0;
            for (j, wj) in w.iter_mut().enumerate().take(n) {
                *wj = cubic((j as f64 + xmin as f64 - center + 0.5) * invscale);
                total += *wj;
            }
            for (dst, &wj) in t.weights[i * stride..i * stride + n].iter_mut().zip(&w) {
                *dst = if total != 0.0 { (wj / total) as f32 } else { 0.0 };
            }
            t.start.push(xmin);
            t.len.push(n);
        }
        t
    }

    fn get(&self, i: usize) -> (usize, &[f32]) {
        (self.start[i], &self.weights[i * self.stride..i * self.stride + self.len[i]])
    }
}

/// A reusable resizer for RGB8 frames. It caches the taps for the last geometry, so resizing
/// every frame of a clip to one size computes them once.
#[derive(Debug, Default)]
pub struct Resizer {
    key: (u32, u32, u32, u32),
    rows: Option<Taps>,
    cols: Option<Taps>,
    line: Vec<f32>,
}

impl Resizer {
    /// A resizer with no cached geometry.
    pub fn new() -> Self {
        Self::default()
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
        if (width, height) == (out_width, out_height) {
            out.extend_from_slice(rgb);
            return Ok(());
        }
        out.resize(out_width as usize * out_height as usize * 3, 0);
        let key = (width, height, out_width, out_height);
        if self.key != key || self.rows.is_none() {
            self.rows = Some(Taps::new(height as usize, out_height as usize));
            self.cols = Some(Taps::new(width as usize, out_width as usize));
            self.key = key;
        }
        let (Some(rows), Some(cols)) = (&self.rows, &self.cols) else {
            return Err(SampleError::InvalidParameter("resize taps missing".into()));
        };
        self.line.resize(width as usize * 3, 0.0);
        resample(rgb, width as usize, rows, cols, &mut self.line, out, out_width as usize);
        Ok(())
    }
}

/// Both passes for every output row. Compiled for AVX2+FMA too and picked at run time, since the
/// baseline x86-64 target vectorizes the u8 to f32 accumulation poorly.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn resample(rgb: &[u8], width: usize, rows: &Taps, cols: &Taps, line: &mut [f32], out: &mut [u8], out_width: usize) {
    let in_row = width * 3;
    let out_row = out_width * 3;
    for (oy, dst) in out.chunks_exact_mut(out_row).enumerate() {
        // Vertical pass: one f32 line from the input rows under this output row.
        let (y0, wy) = rows.get(oy);
        line.fill(0.0);
        for (j, &w) in wy.iter().enumerate() {
            let src = &rgb[(y0 + j) * in_row..(y0 + j + 1) * in_row];
            for (acc, &v) in line.iter_mut().zip(src) {
                *acc += w * v as f32;
            }
        }
        // Horizontal pass over that line, rounded once.
        for (ox, px) in dst.chunks_exact_mut(3).enumerate() {
            let (x0, wx) = cols.get(ox);
            let taps = &line[x0 * 3..(x0 + wx.len()) * 3];
            let (mut r, mut g, mut b) = (0f32, 0f32, 0f32);
            for (&w, p) in wx.iter().zip(taps.chunks_exact(3)) {
                r += w * p[0];
                g += w * p[1];
                b += w * p[2];
            }
            px[0] = to_u8(r);
            px[1] = to_u8(g);
            px[2] = to_u8(b);
        }
    }
}

/// Rounds half to even and clamps into 0..=255. Adding and removing 1.5 * 2^23 makes the FPU
/// round to the nearest even integer (exact for |v| < 2^22), without a libm call.
#[inline(always)]
fn to_u8(v: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    let v = v.clamp(0.0, 255.0);
    ((v + MAGIC) - MAGIC) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_normalized_and_symmetric() {
        let t = Taps::new(1920, 1152);
        for i in 0..1152 {
            let (_, w) = t.get(i);
            let s: f32 = w.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "{i}: {s}");
        }
        // Upscaling keeps the 4-tap kernel; identity size is the identity.
        let t = Taps::new(100, 100);
        for i in 1..99 {
            let (x0, w) = t.get(i);
            let peak = w.iter().position(|&v| v == 1.0).unwrap();
            assert_eq!(x0 + peak, i);
        }
    }

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
    fn overshoot_is_clamped_once_at_the_end() {
        // A hard edge overshoots with a = -0.5; the result must stay in 0..=255 and show the
        // ringing that an 8-bit intermediate would have clipped away.
        let (w, h) = (64u32, 8u32);
        let mut src = vec![0u8; (w * h * 3) as usize];
        for y in 0..h as usize {
            for x in 32..w as usize {
                src[(y * w as usize + x) * 3..][..3].fill(200);
            }
        }
        let mut out = Vec::new();
        Resizer::new().resize_rgb(&src, w, h, 24, 4, &mut out).unwrap();
        let row: Vec<u8> = (0..24).map(|x| out[x * 3]).collect();
        assert!(row.iter().any(|&v| v > 200), "{row:?}");
    }

    #[test]
    fn rounding_is_half_to_even() {
        for (v, want) in
            [(0.5f32, 0u8), (1.5, 2), (2.5, 2), (254.5, 254), (253.5, 254), (3.49, 3), (-4.0, 0), (300.0, 255)]
        {
            assert_eq!(to_u8(v), want, "{v}");
            assert_eq!(to_u8(v), v.round_ties_even().clamp(0.0, 255.0) as u8);
        }
    }

    #[test]
    fn bad_buffer_is_an_error() {
        let mut out = Vec::new();
        assert!(Resizer::new().resize_rgb(&[0; 10], 4, 4, 2, 2, &mut out).is_err());
        assert!(Resizer::new().resize_rgb(&[0; 48], 4, 4, 0, 2, &mut out).is_err());
    }
}
