//! A stream's display rotation (the container's display matrix, as phones write it), applied to
//! decoded RGB frames the way the reference reader does: torchcodec rounds the matrix's angle to
//! a multiple of 90 degrees and turns every frame upright (`transpose=cclock`, `transpose=clock`
//! or `hflip,vflip` after the conversion to RGB), reporting the turned size.

use ffmpeg_next as ff;

/// How a stream's frames are turned for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rotation {
    /// Upright as coded.
    #[default]
    None,
    /// A quarter turn counter-clockwise (the matrix says 90 degrees).
    Ccw90,
    /// A quarter turn clockwise (-90 degrees: a phone held upright, rotate=90 in ffmpeg's tag).
    Cw90,
    /// Half a turn.
    Half,
}

impl Rotation {
    /// From a display matrix (nine 32-bit fixed-point numbers, as libav stores it).
    pub fn from_display_matrix(data: &[u8]) -> Rotation {
        if data.len() < 36 {
            return Rotation::None;
        }
        let m: Vec<f64> = data
            .chunks_exact(4)
            .take(9)
            .map(|b| f64::from(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])) / 65536.0)
            .collect();
        let (s0, s1) = (m[0].hypot(m[3]), m[1].hypot(m[4]));
        if s0 == 0.0 || s1 == 0.0 {
            return Rotation::None;
        }
        // libav's av_display_rotation_get: the counter-clockwise angle that displays it upright.
        let degrees = -(m[1] / s1).atan2(m[0] / s0).to_degrees();
        match ((degrees / 90.0).round() as i64).rem_euclid(4) {
            1 => Rotation::Ccw90,
            2 => Rotation::Half,
            3 => Rotation::Cw90,
            _ => Rotation::None,
        }
    }

    /// The rotation of a video stream (none when it has no display matrix).
    pub(crate) fn of(stream: &ff::format::stream::Stream<'_>) -> Rotation {
        stream
            .side_data()
            .find(|d| d.kind() == ff::codec::packet::side_data::Type::DisplayMatrix)
            .map_or(Rotation::None, |d| Rotation::from_display_matrix(d.data()))
    }

    /// The size of a `width x height` frame once turned.
    pub fn turned(self, width: u32, height: u32) -> (u32, u32) {
        match self {
            Rotation::Ccw90 | Rotation::Cw90 => (height, width),
            Rotation::None | Rotation::Half => (width, height),
        }
    }

    /// Turns a packed RGB frame; returns it with its new size.
    pub fn apply(self, rgb: Vec<u8>, width: u32, height: u32) -> (Vec<u8>, u32, u32) {
        if self == Rotation::None || rgb.len() != width as usize * height as usize * 3 {
            return (rgb, width, height);
        }
        let (w, h) = (width as usize, height as usize);
        let (nw, nh) = self.turned(width, height);
        let mut out = vec![0u8; rgb.len()];
        for r in 0..nh as usize {
            for c in 0..nw as usize {
                // Where the new pixel (r, c) comes from.
                let (sr, sc) = match self {
                    Rotation::Ccw90 => (c, w - 1 - r),
                    Rotation::Cw90 => (h - 1 - c, r),
                    Rotation::Half => (h - 1 - r, w - 1 - c),
                    Rotation::None => (r, c),
                };
                let (d, s) = ((r * nw as usize + c) * 3, (sr * w + sc) * 3);
                out[d..d + 3].copy_from_slice(&rgb[s..s + 3]);
            }
        }
        (out, nw, nh)
    }
}

#[cfg(test)]
mod tests {
    use super::Rotation;

    fn matrix(degrees_ccw: f64) -> Vec<u8> {
        // A rotation matrix that libav's reading (`-atan2(m1, m0)`) takes as `degrees_ccw`.
        let r = degrees_ccw.to_radians();
        let fp = |v: f64| ((v * 65536.0).round() as i32).to_ne_bytes();
        let w = (1i32 << 30).to_ne_bytes();
        let mut m = Vec::new();
        for v in [fp(r.cos()), fp(-r.sin()), [0; 4], fp(r.sin()), fp(r.cos()), [0; 4], [0; 4], [0; 4], w] {
            m.extend_from_slice(&v);
        }
        m
    }

    #[test]
    fn matrices_round_to_quarter_turns() {
        assert_eq!(Rotation::from_display_matrix(&matrix(90.0)), Rotation::Ccw90);
        assert_eq!(Rotation::from_display_matrix(&matrix(-90.0)), Rotation::Cw90);
        assert_eq!(Rotation::from_display_matrix(&matrix(180.0)), Rotation::Half);
        assert_eq!(Rotation::from_display_matrix(&matrix(2.0)), Rotation::None);
        assert_eq!(Rotation::from_display_matrix(&[1, 2, 3]), Rotation::None);
    }

    #[test]
    fn turning_moves_each_pixel_where_it_is_seen() {
        // 3 wide, 2 high: pixel values are their (row, col) index.
        let px = |i: u8| [i, i, i];
        let rgb: Vec<u8> = (0..6).flat_map(px).collect();
        let (cw, w, h) = Rotation::Cw90.apply(rgb.clone(), 3, 2);
        assert_eq!((w, h), (2, 3));
        // Clockwise: the bottom-left pixel (row 1, col 0 = 3) comes to the top-left.
        assert_eq!(cw.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), [3, 0, 4, 1, 5, 2]);
        let (ccw, ..) = Rotation::Ccw90.apply(rgb.clone(), 3, 2);
        assert_eq!(ccw.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), [2, 5, 1, 4, 0, 3]);
        let (half, ..) = Rotation::Half.apply(rgb, 3, 2);
        assert_eq!(half.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), [5, 4, 3, 2, 1, 0]);
    }
}
