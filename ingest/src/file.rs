//! Files (and anything else libav opens by name): probe, then decode chosen frames on a thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use ff::codec::threading;
use ff::util::frame::video::Video as VideoFrame;
use ffmpeg_next as ff;

use crate::convert::RgbConverter;
use crate::{Frame, IngestError};

/// Stream facts of a video, as torchcodec reports them in its exact mode.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Codec name as libav spells it (`h264`, `hevc`, `vp9`, `av1`, ...).
    pub codec: String,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Frames in the stream (its packets, counted).
    pub frame_count: usize,
    /// Average frame rate: frames / (end - begin) of the stream's own timestamps.
    pub fps: f64,
    /// Stream duration in seconds (end - begin).
    pub duration_s: f64,
    /// First presentation time in seconds.
    pub start_s: f64,
    /// How frames are turned for display (`width` and `height` are the turned size, as the
    /// frames are delivered turned).
    pub rotation: crate::orientation::Rotation,
}

/// How to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Decoder threads (libav frame threading); 0 lets libav choose.
    pub threads: usize,
    /// Capacity of the channel between the decode thread and its reader.
    pub queue: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { threads: 1, queue: 4 }
    }
}

/// An opened, scanned video file.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    info: VideoInfo,
    stream_index: usize,
    time_base: (i32, i32),
    /// Presentation timestamps of every frame, sorted: frame `i` is the one at `pts[i]`.
    pts: Arc<Vec<i64>>,
    all_timed: bool,
}

/// Reads the stream facts of a video file.
pub fn probe(path: impl AsRef<Path>) -> Result<VideoInfo, IngestError> {
    FileSource::open(path).map(|s| s.info)
}

pub(crate) fn pts_seconds(pts: i64, tb: (i32, i32)) -> f64 {
    pts as f64 * tb.0 as f64 / tb.1 as f64
}

pub(crate) fn open_input(path: &Path) -> Result<ff::format::context::Input, IngestError> {
    crate::init();
    if let Err(source) = std::fs::metadata(path) {
        return Err(IngestError::Io { path: path.to_owned(), source });
    }
    ff::format::input(&path).map_err(|e| IngestError::NotMedia { path: path.to_owned(), reason: e.to_string() })
}

/// Reads the next packet into `packet`, giving up the one it held first. `av_read_frame`
/// overwrites a packet without unreferencing it, so reusing one `Packet` across reads leaked
/// every packet's buffer (about 60 KiB/s of RSS for a looped 480x270 replay, found with
/// heaptrack); dropping the old one here unreferences it.
pub(crate) fn read_packet(ictx: &mut ff::format::context::Input, packet: &mut ff::Packet) -> Result<(), ff::Error> {
    *packet = ff::Packet::empty();
    packet.read(ictx)
}

impl FileSource {
    /// Opens a file and scans its packets (no decoding) to count frames and time them.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IngestError> {
        let path = path.as_ref().to_owned();
        let mut ictx = open_input(&path)?;
        let stream =
            ictx.streams().best(ff::media::Type::Video).ok_or_else(|| IngestError::NoVideo { path: path.clone() })?;
        let stream_index = stream.index();
        let tb = stream.time_base();
        let time_base = (tb.numerator(), tb.denominator());
        let params = stream.parameters();
        let codec_id = params.id();
        let codec = codec_id.name().to_owned();
        if ff::codec::decoder::find(codec_id).is_none() {
            return Err(IngestError::UnsupportedCodec { path, codec });
        }
        let header_rate = stream.rate();
        let rotation = crate::orientation::Rotation::of(&stream);
        let (width, height) = {
            let ctx = ff::codec::context::Context::from_parameters(params)
                .map_err(|e| IngestError::Decode { path: path.clone(), reason: e.to_string() })?;
            let dec =
                ctx.decoder().video().map_err(|e| IngestError::Decode { path: path.clone(), reason: e.to_string() })?;
            (dec.width(), dec.height())
        };
        if time_base.1 == 0 {
            return Err(IngestError::Decode { path, reason: "the video stream has no time base".into() });
        }

        let mut pts = Vec::new();
        let mut all_timed = true;
        let (mut begin, mut end) = (i64::MAX, i64::MIN);
        let mut packet = ff::Packet::empty();
        loop {
            match read_packet(&mut ictx, &mut packet) {
                Ok(()) => {}
                Err(ff::Error::Eof) => break,
                Err(e) => {
                    return Err(IngestError::Decode { path, reason: format!("demuxing failed: {e}") });
                }
            }
            if packet.stream() != stream_index {
                continue;
            }
            match packet.pts().or(packet.dts()) {
                Some(p) => {
                    pts.push(p);
                    begin = begin.min(p);
                    end = end.max(p.saturating_add(packet.duration()));
                }
                None => {
                    all_timed = false;
                    pts.push(pts.last().map_or(0, |p| p + 1));
                }
            }
        }
        if pts.is_empty() {
            return Err(IngestError::Empty { path });
        }
        pts.sort_unstable();
        let frame_count = pts.len();
        let (start_s, duration_s) = if begin <= end {
            let b = pts_seconds(begin, time_base);
            (b, pts_seconds(end, time_base) - b)
        } else {
            (0.0, 0.0)
        };
        let rate = if header_rate.denominator() != 0 {
            header_rate.numerator() as f64 / header_rate.denominator() as f64
        } else {
            0.0
        };
        let fps = if duration_s != 0.0 { frame_count as f64 / duration_s } else { rate };
        let (width, height) = rotation.turned(width, height);
        let info = VideoInfo { codec, width, height, frame_count, fps, duration_s, start_s, rotation };
        Ok(FileSource { path, info, stream_index, time_base, pts: Arc::new(pts), all_timed })
    }

    /// The stream facts.
    pub fn info(&self) -> &VideoInfo {
        &self.info
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decodes the frames at `indices` (non-decreasing, each below the frame count) on a new
    /// thread and returns them, in order, through a bounded channel. Frames that are not asked
    /// for are decoded only as far as the codec needs them and never converted to RGB.
    pub fn frames(&self, indices: &[usize], opts: DecodeOptions) -> Result<FrameStream, IngestError> {
        let frames = self.info.frame_count;
        if let Some(&bad) = indices.iter().find(|&&i| i >= frames) {
            return Err(IngestError::FrameIndex { index: bad, frames });
        }
        if indices.windows(2).any(|w| w[0] > w[1]) {
            return Err(IngestError::Decode {
                path: self.path.clone(),
                reason: "frame indices must be in increasing order".into(),
            });
        }
        let (tx, rx) = sync_channel(opts.queue.max(1));
        let job = DecodeJob { src: self.clone(), indices: indices.to_vec(), opts };
        let name = format!("decode:{}", self.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        std::thread::Builder::new().name(name).spawn(move || job.run(tx)).map_err(|e| IngestError::Decode {
            path: self.path.clone(),
            reason: format!("cannot start thread: {e}"),
        })?;
        Ok(FrameStream { rx, remaining: indices.len() })
    }
}

/// The frames of one [`FileSource::frames`] call. Dropping it stops the decode thread.
#[derive(Debug)]
pub struct FrameStream {
    rx: Receiver<Result<Frame, IngestError>>,
    remaining: usize,
}

impl Iterator for FrameStream {
    type Item = Result<Frame, IngestError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        match self.rx.recv() {
            Ok(Ok(f)) => {
                self.remaining -= 1;
                Some(Ok(f))
            }
            Ok(Err(e)) => {
                self.remaining = 0;
                Some(Err(e))
            }
            Err(_) => {
                self.remaining = 0;
                None
            }
        }
    }
}

struct DecodeJob {
    src: FileSource,
    indices: Vec<usize>,
    opts: DecodeOptions,
}

impl DecodeJob {
    fn run(self, tx: SyncSender<Result<Frame, IngestError>>) {
        let path = self.src.path.clone();
        if let Err(e) = self.decode(&tx) {
            let _ = tx.send(Err(e));
        }
        tracing::trace!(path = %path.display(), "decode thread done");
    }

    fn decode(&self, tx: &SyncSender<Result<Frame, IngestError>>) -> Result<(), IngestError> {
        let src = &self.src;
        let path = &src.path;
        let err = |reason: String| IngestError::Decode { path: path.clone(), reason };
        if self.indices.is_empty() {
            return Ok(());
        }
        // How many times each frame index is wanted (duplicates are allowed).
        let mut wanted: HashMap<usize, usize> = HashMap::new();
        for &i in &self.indices {
            *wanted.entry(i).or_default() += 1;
        }
        let wanted_pts: HashMap<i64, usize> = wanted.keys().map(|&i| (src.pts[i], i)).collect();
        let last_wanted = *self.indices.last().unwrap_or(&0);

        let mut ictx = open_input(path)?;
        let stream = ictx.stream(src.stream_index).ok_or_else(|| err("the video stream disappeared".into()))?;
        let mut ctx =
            ff::codec::context::Context::from_parameters(stream.parameters()).map_err(|e| err(e.to_string()))?;
        ctx.set_threading(threading::Config {
            kind: threading::Type::Frame,
            count: self.opts.threads,
            ..Default::default()
        });
        let mut decoder = ctx.decoder().video().map_err(|e| err(e.to_string()))?;
        decoder.set_packet_time_base(stream.time_base());
        // Skipping non-reference frames nobody asked for leaves every other frame bit-identical;
        // it needs reliable timestamps and synchronous decoding.
        let skip_unwanted = src.all_timed && self.opts.threads == 1;

        let mut converter = RgbConverter::new();
        let mut decoded = VideoFrame::empty();
        let mut out_count = 0usize;
        let mut emitted = 0usize;
        let mut packet = ff::Packet::empty();
        let mut at_eof = false;
        loop {
            if !at_eof {
                match read_packet(&mut ictx, &mut packet) {
                    Ok(()) => {
                        if packet.stream() != src.stream_index {
                            continue;
                        }
                        if skip_unwanted {
                            let needed = packet.pts().or(packet.dts()).is_some_and(|p| wanted_pts.contains_key(&p));
                            decoder.skip_frame(if needed { ff::Discard::Default } else { ff::Discard::NonReference });
                        }
                        if let Err(e) = decoder.send_packet(&packet) {
                            // A corrupt packet is reported by libav and skipped, as players do.
                            tracing::debug!(error = %e, "packet rejected by decoder");
                        }
                    }
                    Err(ff::Error::Eof) => {
                        at_eof = true;
                        decoder.skip_frame(ff::Discard::Default);
                        let _ = decoder.send_eof();
                    }
                    Err(e) => return Err(err(format!("demuxing failed: {e}"))),
                }
            }
            loop {
                match decoder.receive_frame(&mut decoded) {
                    Ok(()) => {}
                    Err(ff::Error::Eof) => {
                        return self.finish(emitted, path);
                    }
                    Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => break,
                    Err(e) => return Err(err(e.to_string())),
                }
                let index = match decoded.pts().and_then(|p| src.pts.binary_search(&p).ok()) {
                    Some(i) if src.all_timed => i,
                    _ => out_count,
                };
                out_count += 1;
                let Some(&times) = wanted.get(&index) else {
                    continue;
                };
                let pts_s = decoded.pts().map_or(0.0, |p| pts_seconds(p, src.time_base)).max(0.0);
                let (width, height) = (decoded.width(), decoded.height());
                // The conversion may take the frame's buffers (the filter path does).
                let rgb = converter.convert(&mut decoded, decoder.packet_time_base()).map_err(err)?;
                let (rgb, width, height) = src.info.rotation.apply(rgb, width, height);
                let rgb: Arc<[u8]> = rgb.into();
                let frame = Frame { seq: index as u64, pts: Duration::from_secs_f64(pts_s), width, height, rgb };
                for _ in 0..times {
                    if tx.send(Ok(frame.clone())).is_err() {
                        return Ok(()); // the reader is gone
                    }
                    emitted += 1;
                }
                if index >= last_wanted && emitted == self.indices.len() {
                    return Ok(());
                }
            }
            if at_eof {
                // The decoder asked for more input after EOF: nothing more will come.
                return self.finish(emitted, path);
            }
        }
    }

    fn finish(&self, emitted: usize, path: &Path) -> Result<(), IngestError> {
        if emitted < self.indices.len() {
            return Err(IngestError::MissingFrame { path: path.to_owned(), index: self.indices[emitted] });
        }
        Ok(())
    }
}
