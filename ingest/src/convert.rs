//! YUV (or any libav pixel format) to packed RGB24, the way torchcodec converts on the CPU.
//!
//! - Widths that are a multiple of 32: libswscale directly, with `SWS_BILINEAR`, output at the
//!   input size, and the frame's own colour matrix installed as both the source and destination
//!   table with the default ranges.
//! - Other widths: a libavfilter graph `buffer -> scale=W:H:sws_flags=bilinear -> buffersink
//!   (rgb24)`, which converts slightly differently (the filter sets up its own swscale context).
//!
//! Both paths are kept so that frames are bit-identical with the reference reader.

use ffmpeg_next as ff;
use ffmpeg_next::ffi;
use ffmpeg_next::util::frame::video::Video as VideoFrame;

/// Converts decoded frames to packed RGB24, caching its conversion context between frames.
pub(crate) struct RgbConverter {
    ctx: *mut ffi::SwsContext,
    key: (i32, i32, i32, i32),
    graph: Option<FilterPath>,
}

/// The filter-graph path, keyed by input geometry, format and time base.
struct FilterPath {
    graph: ff::filter::Graph,
    key: (i32, i32, i32, i32, i32),
    out: VideoFrame,
}

// SAFETY: the context is only used from the thread that owns the converter; it is moved between
// threads only as a whole (never shared).
unsafe impl Send for RgbConverter {}

impl RgbConverter {
    pub(crate) fn new() -> Self {
        RgbConverter { ctx: std::ptr::null_mut(), key: (0, 0, -1, -1), graph: None }
    }

    /// Converts `frame` (in `time_base`) to packed RGB24 (`height * width * 3` bytes, no row
    /// padding). The frame may be left empty afterwards (the filter path takes its buffers).
    pub(crate) fn convert(&mut self, frame: &mut VideoFrame, time_base: ff::Rational) -> Result<Vec<u8>, String> {
        if frame.width().is_multiple_of(32) { self.convert_sws(frame) } else { self.convert_graph(frame, time_base) }
    }

    fn convert_graph(&mut self, frame: &VideoFrame, time_base: ff::Rational) -> Result<Vec<u8>, String> {
        let (w, h) = (frame.width(), frame.height());
        // SAFETY: reading plain fields of a valid decoded frame.
        let (fmt, sar) = unsafe {
            let f = frame.as_ptr();
            ((*f).format, (*f).sample_aspect_ratio)
        };
        let key = (w as i32, h as i32, fmt, time_base.numerator(), time_base.denominator());
        if self.graph.as_ref().is_none_or(|g| g.key != key) {
            self.graph = Some(FilterPath::new(key, sar).map_err(|e| format!("colour conversion graph: {e}"))?);
        }
        let path = self.graph.as_mut().ok_or("no conversion graph")?;
        let mut input = path.graph.get("in").ok_or("conversion graph lost its input")?;
        input.source().add(frame).map_err(|e| format!("colour conversion: {e}"))?;
        let mut output = path.graph.get("out").ok_or("conversion graph lost its output")?;
        output.sink().frame(&mut path.out).map_err(|e| format!("colour conversion: {e}"))?;
        let (ow, oh) = (path.out.width() as usize, path.out.height() as usize);
        if (ow, oh) != (w as usize, h as usize) {
            return Err(format!("colour conversion produced {ow}x{oh}, expected {w}x{h}"));
        }
        let stride = path.out.stride(0);
        let data = path.out.data(0);
        let mut out = Vec::with_capacity(ow * oh * 3);
        for y in 0..oh {
            out.extend_from_slice(&data[y * stride..y * stride + ow * 3]);
        }
        Ok(out)
    }

    fn convert_sws(&mut self, frame: &VideoFrame) -> Result<Vec<u8>, String> {
        // SAFETY: `frame` wraps a valid decoded AVFrame; we only read its fields.
        let (w, h, fmt, cs) = unsafe {
            let f = frame.as_ptr();
            ((*f).width, (*f).height, (*f).format, (*f).colorspace as i32)
        };
        if w <= 0 || h <= 0 {
            return Err(format!("decoder produced an empty {w}x{h} frame"));
        }
        if self.ctx.is_null() || self.key != (w, h, fmt, cs) {
            self.reset(w, h, fmt, cs)?;
        }
        let mut out = vec![0u8; w as usize * h as usize * 3];
        let dst = [out.as_mut_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut()];
        let dst_stride = [w * 3, 0, 0, 0];
        // SAFETY: the context was made for exactly this geometry and format; `out` holds
        // h rows of w*3 bytes, matching `dst_stride`; the source planes come from the frame.
        let rows = unsafe {
            let f = frame.as_ptr();
            ffi::sws_scale(
                self.ctx,
                (*f).data.as_ptr() as *const *const u8,
                (*f).linesize.as_ptr(),
                0,
                h,
                dst.as_ptr(),
                dst_stride.as_ptr(),
            )
        };
        if rows != h {
            return Err(format!("colour conversion produced {rows} of {h} rows"));
        }
        Ok(out)
    }

    fn reset(&mut self, w: i32, h: i32, fmt: i32, colorspace: i32) -> Result<(), String> {
        self.free();
        // SAFETY: plain libswscale calls with valid sizes; `fmt` comes from a decoded frame.
        // (The flag constant's integer type differs between libav versions, hence the cast.)
        #[allow(clippy::unnecessary_cast)]
        unsafe {
            let src_fmt: ffi::AVPixelFormat = std::mem::transmute::<i32, ffi::AVPixelFormat>(fmt);
            let ctx = ffi::sws_getContext(
                w,
                h,
                src_fmt,
                w,
                h,
                ffi::AVPixelFormat::AV_PIX_FMT_RGB24,
                ffi::SWS_BILINEAR as i32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null(),
            );
            if ctx.is_null() {
                return Err(format!("no colour conversion from pixel format {fmt} at {w}x{h}"));
            }
            let mut inv_table: *mut i32 = std::ptr::null_mut();
            let mut table: *mut i32 = std::ptr::null_mut();
            let (mut src_range, mut dst_range, mut brightness, mut contrast, mut saturation) = (0, 0, 0, 0, 0);
            let got = ffi::sws_getColorspaceDetails(
                ctx,
                &mut inv_table,
                &mut src_range,
                &mut table,
                &mut dst_range,
                &mut brightness,
                &mut contrast,
                &mut saturation,
            );
            if got != -1 {
                let coefficients = ffi::sws_getCoefficients(colorspace);
                ffi::sws_setColorspaceDetails(
                    ctx,
                    coefficients,
                    src_range,
                    coefficients,
                    dst_range,
                    brightness,
                    contrast,
                    saturation,
                );
            }
            self.ctx = ctx;
        }
        self.key = (w, h, fmt, colorspace);
        Ok(())
    }

    fn free(&mut self) {
        if !self.ctx.is_null() {
            // SAFETY: the context came from sws_getContext and is freed once.
            unsafe { ffi::sws_freeContext(self.ctx) };
            self.ctx = std::ptr::null_mut();
        }
    }
}

impl FilterPath {
    fn new(key: (i32, i32, i32, i32, i32), sar: ffi::AVRational) -> Result<Self, ff::Error> {
        let (w, h, fmt, tb_num, tb_den) = key;
        let mut graph = ff::filter::Graph::new();
        let buffer = ff::filter::find("buffer").ok_or(ff::Error::FilterNotFound)?;
        let sink = ff::filter::find("buffersink").ok_or(ff::Error::FilterNotFound)?;
        let args = format!(
            "video_size={w}x{h}:pix_fmt={fmt}:time_base={tb_num}/{tb_den}:pixel_aspect={}/{}",
            sar.num,
            sar.den.max(1)
        );
        graph.add(&buffer, "in", &args)?;
        graph.add(&sink, "out", "")?;
        graph.get("out").ok_or(ff::Error::Bug)?.set_pixel_format(ff::format::Pixel::RGB24);
        graph.output("in", 0)?.input("out", 0)?.parse(&format!("scale={w}:{h}:sws_flags=bilinear"))?;
        graph.validate()?;
        Ok(FilterPath { graph, key, out: VideoFrame::empty() })
    }
}

impl Drop for RgbConverter {
    fn drop(&mut self) {
        self.free();
    }
}
