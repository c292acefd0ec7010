//! Normalize, pad and patchify frames into the `rows x 1536` matrix Qwen3-VL consumes.

use crate::{MERGE_SIZE, PATCH_DIM, PATCH_SIZE, SampleError, TEMPORAL_PATCH_SIZE};

/// Exactly what the model consumes for one video: patch rows, grid and timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    /// `grid_t * grid_h * grid_w` rows of [`PATCH_DIM`] values in `[-1, 1]`, row-major.
    pub pixel_values: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]`: temporal groups and patch rows/columns.
    pub grid_thw: [usize; 3],
    /// Stream time of each input frame in seconds (before temporal padding).
    pub frame_times: Vec<f64>,
    /// One timestamp per temporal group (mean of its first and last frame), in seconds.
    pub timestamps: Vec<f64>,
}

impl Clip {
    /// Number of patch rows.
    pub fn rows(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of LLM tokens the clip becomes (`rows / 4`).
    pub fn llm_tokens(&self) -> usize {
        self.rows() / (MERGE_SIZE * MERGE_SIZE)
    }
}

/// One timestamp per temporal group, as the transformers Qwen3-VL processor computes them:
/// the frame times are padded to a multiple of 2 by repeating the last, and each group gets the
/// mean of its first and last frame time.
pub fn timestamps(frame_times: &[f64]) -> Vec<f64> {
    let mut t = frame_times.to_vec();
    if let Some(&last) = t.last() {
        while !t.len().is_multiple_of(TEMPORAL_PATCH_SIZE) {
            t.push(last);
        }
    }
    t.chunks(TEMPORAL_PATCH_SIZE).map(|g| (g[0] + g[TEMPORAL_PATCH_SIZE - 1]) / 2.0).collect()
}

/// `(x - 127.5) / 127.5` in f32 for every byte: the fused rescale (1/255) and normalize
/// (mean = std = 0.5) of the reference, bit for bit.
fn normalize_table() -> [f32; 256] {
    let mut lut = [0f32; 256];
    for (i, v) in lut.iter_mut().enumerate() {
        *v = (i as f32 - 127.5) / 127.5;
    }
    lut
}

/// Collects resized RGB8 frames of one size and lays them out as patch rows.
#[derive(Debug)]
pub struct ClipBuilder {
    height: usize,
    width: usize,
    frames: Vec<Vec<u8>>,
    frame_times: Vec<f64>,
}

impl ClipBuilder {
    /// A builder for frames of `height x width`; both must be multiples of 32.
    pub fn new(height: u32, width: u32) -> Result<Self, SampleError> {
        let unit = (PATCH_SIZE * MERGE_SIZE) as u32;
        if height == 0 || width == 0 || !height.is_multiple_of(unit) || !width.is_multiple_of(unit) {
            return Err(SampleError::FrameSize { width, height });
        }
        Ok(ClipBuilder { height: height as usize, width: width as usize, frames: Vec::new(), frame_times: Vec::new() })
    }

    /// Adds one packed RGB8 frame shown at `time_s` seconds.
    pub fn push(&mut self, rgb: Vec<u8>, time_s: f64) -> Result<(), SampleError> {
        let expected = self.height * self.width * 3;
        if rgb.len() != expected {
            return Err(SampleError::BufferSize {
                width: self.width as u32,
                height: self.height as u32,
                expected,
                got: rgb.len(),
            });
        }
        self.frames.push(rgb);
        self.frame_times.push(time_s);
        Ok(())
    }

    /// Number of frames added so far.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when no frame was added.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Pads to an even frame count (repeating the last frame), normalizes and patchifies.
    pub fn finish(self) -> Result<Clip, SampleError> {
        if self.frames.is_empty() {
            return Err(SampleError::FrameCount { wanted: 0, available: 0 });
        }
        let (h, w) = (self.height, self.width);
        let grid_t = self.frames.len().div_ceil(TEMPORAL_PATCH_SIZE);
        let (grid_h, grid_w) = (h / PATCH_SIZE, w / PATCH_SIZE);
        let rows = grid_t * grid_h * grid_w;
        let mut out = vec![0f32; rows * PATCH_DIM];
        let lut = normalize_table();
        let last = self.frames.len() - 1;
        let group = grid_h * grid_w * PATCH_DIM;
        for (gt, dst) in out.chunks_exact_mut(group).enumerate() {
            let pair = [&self.frames[(2 * gt).min(last)][..], &self.frames[(2 * gt + 1).min(last)][..]];
            patchify_pair(dst, pair, grid_h, grid_w, w, &lut);
        }
        let timestamps = timestamps(&self.frame_times);
        Ok(Clip { pixel_values: out, grid_thw: [grid_t, grid_h, grid_w], frame_times: self.frame_times, timestamps })
    }
}

/// Writes the patch rows of one temporal group, in block-major order (2x2 merge units
/// contiguous). Each row's column is `((c * 2 + tt) * 16 + py) * 16 + px`.
#[multiversion::multiversion(targets("x86_64+avx2"))]
fn patchify_pair(dst: &mut [f32], pair: [&[u8]; 2], grid_h: usize, grid_w: usize, width: usize, lut: &[f32; 256]) {
    let mut rows = dst.chunks_exact_mut(PATCH_DIM);
    for bh in 0..grid_h / MERGE_SIZE {
        for bw in 0..grid_w / MERGE_SIZE {
            for ih in 0..MERGE_SIZE {
                for iw in 0..MERGE_SIZE {
                    let Some(row) = rows.next() else { return };
                    let y0 = (bh * MERGE_SIZE + ih) * PATCH_SIZE;
                    let x0 = (bw * MERGE_SIZE + iw) * PATCH_SIZE;
                    let mut cols = row.chunks_exact_mut(PATCH_SIZE);
                    for c in 0..3 {
                        for frame in pair {
                            for py in 0..PATCH_SIZE {
                                let start = ((y0 + py) * width + x0) * 3;
                                let src: &[u8; PATCH_SIZE * 3] = frame[start..start + PATCH_SIZE * 3]
                                    .try_into()
                                    .expect("a patch row lies inside the frame");
                                let Some(d) = cols.next() else { return };
                                for (px, v) in d.iter_mut().enumerate() {
                                    *v = lut[src[px * 3 + c] as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame whose every byte encodes (frame, channel, y, x) so the layout can be checked.
    fn coded_frame(t: usize, h: usize, w: usize) -> Vec<u8> {
        let mut v = vec![0u8; h * w * 3];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    v[(y * w + x) * 3 + c] = ((t * 7 + c * 31 + y * 3 + x * 5) % 251) as u8;
                }
            }
        }
        v
    }

    #[test]
    fn layout_matches_reference_formula() {
        let (h, w) = (64usize, 96usize);
        let mut b = ClipBuilder::new(h as u32, w as u32).unwrap();
        let frames: Vec<Vec<u8>> = (0..3).map(|t| coded_frame(t, h, w)).collect();
        for (t, f) in frames.iter().enumerate() {
            b.push(f.clone(), t as f64 / 10.0).unwrap();
        }
        let clip = b.finish().unwrap();
        assert_eq!(clip.grid_thw, [2, 4, 6]);
        assert_eq!(clip.pixel_values.len(), 2 * 4 * 6 * PATCH_DIM);
        let (gh, gw) = (4, 6);
        let lut = normalize_table();
        for gt in 0..2 {
            for bh in 0..gh / 2 {
                for bw in 0..gw / 2 {
                    for ih in 0..2 {
                        for iw in 0..2 {
                            let r = (((gt * (gh / 2) + bh) * (gw / 2) + bw) * 2 + ih) * 2 + iw;
                            for c in 0..3 {
                                for tt in 0..2 {
                                    for py in 0..16 {
                                        for px in 0..16 {
                                            let col = ((c * 2 + tt) * 16 + py) * 16 + px;
                                            // Frame 3 does not exist: the last frame repeats.
                                            let f = &frames[(2 * gt + tt).min(2)];
                                            let y = (2 * bh + ih) * 16 + py;
                                            let x = (2 * bw + iw) * 16 + px;
                                            let want = lut[f[(y * w + x) * 3 + c] as usize];
                                            assert_eq!(clip.pixel_values[r * PATCH_DIM + col], want);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Odd frame count: the last time is repeated for the last group.
        assert_eq!(clip.timestamps, vec![0.05, 0.2]);
    }

    #[test]
    fn normalization_is_exact() {
        let lut = normalize_table();
        assert_eq!(lut[0], -1.0);
        assert_eq!(lut[255], 1.0);
        assert_eq!(lut[128], 0.5 / 127.5);
    }

    #[test]
    fn timestamps_average_each_pair() {
        let t = timestamps(&[0.0, 1.0 / 30.0 * 16.0, 31.0 / 30.0, 47.0 / 30.0]);
        assert_eq!(t.len(), 2);
        assert_eq!(format!("{:.1}", t[0]), "0.3");
        assert_eq!(format!("{:.1}", t[1]), "1.3");
    }

    #[test]
    fn python_one_decimal_formatting() {
        // f"{x:.1f}" rounds the binary value; Rust's {:.1} agrees on these ties.
        for (v, s) in [(0.25, "0.2"), (0.75, "0.8"), (1.25, "1.2"), (3.75, "3.8"), (0.05, "0.1")] {
            assert_eq!(format!("{v:.1}"), s);
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(ClipBuilder::new(48, 64).is_err());
        let mut b = ClipBuilder::new(32, 32).unwrap();
        assert!(b.push(vec![0; 10], 0.0).is_err());
        assert!(ClipBuilder::new(32, 32).unwrap().finish().is_err());
    }
}
