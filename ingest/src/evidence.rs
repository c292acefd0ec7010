//! Evidence clips: short MP4s of what a live source or a file showed between two stream times,
//! made from the source's own encoded frames (remuxed, never re-encoded).
//!
//! - [`PacketRing`] keeps a live source's recent access units (bounded in bytes and in stream
//!   time, always starting at a key frame), filled by [`crate::live::LiveFeed`] as frames arrive.
//! - [`units_to_mp4`] writes such units as an MP4: they go through libav's raw H.264/H.265
//!   demuxer (which reads the in-band parameter sets), and each packet gets its unit's own time.
//! - [`cut_mp4`] copies a file's packets between two times (from the key frame at or before the
//!   start) into an MP4.
//!
//! VP8 (from WebRTC senders) has no standard place in MP4; such sources have no clips.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use ffmpeg_next as ff;

use crate::live::{Encoded, LiveCodec};

/// A live source's recent access units.
#[derive(Debug)]
pub struct PacketRing {
    max_bytes: usize,
    max_span: Duration,
    inner: Mutex<(VecDeque<Encoded>, usize)>,
}

impl PacketRing {
    /// A ring keeping at most `max_bytes` and `max_span` of stream time.
    pub fn new(max_bytes: usize, max_span: Duration) -> Self {
        PacketRing { max_bytes, max_span, inner: Mutex::new((VecDeque::new(), 0)) }
    }

    /// Adds a unit, dropping the oldest (whole groups of pictures) to stay within the bounds.
    pub fn push(&self, unit: &Encoded) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (units, bytes) = &mut *g;
        if units.is_empty() && !unit.key {
            return;
        }
        *bytes += unit.data.len();
        units.push_back(unit.clone());
        let newest = unit.pts;
        while *bytes > self.max_bytes || units.front().is_some_and(|u| newest.saturating_sub(u.pts) > self.max_span) {
            let Some(old) = units.pop_front() else { break };
            *bytes -= old.data.len();
            // Never start with a unit that cannot be decoded alone.
            while units.front().is_some_and(|u| !u.key) {
                if let Some(u) = units.pop_front() {
                    *bytes -= u.data.len();
                }
            }
        }
    }

    /// The units from the last key frame at or before `from` to the last one at or before `to`.
    pub fn units(&self, from: Duration, to: Duration) -> Vec<Encoded> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let units = &g.0;
        let start = units.iter().rposition(|u| u.key && u.pts <= from).unwrap_or(0);
        units.iter().skip(start).take_while(|u| u.pts <= to).cloned().collect()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

fn error(e: impl std::fmt::Display) -> String {
    format!("cannot write the clip: {e}")
}

/// Copies the video packets of `input` into `out` (MP4), retimed by `retime` (a packet's index
/// and time in seconds → its time in seconds, or `None` to stop).
fn remux(
    input: &Path,
    out: &Path,
    mut retime: impl FnMut(usize, Option<f64>) -> Option<Option<f64>>,
) -> Result<usize, String> {
    crate::init();
    let mut ictx = ff::format::input(&input).map_err(error)?;
    let stream = ictx.streams().best(ff::media::Type::Video).ok_or_else(|| error("no video"))?;
    let (index, itb) = (stream.index(), stream.time_base());
    let mut octx = ff::format::output_as(&out, "mp4").map_err(error)?;
    {
        let mut ost = octx.add_stream(ff::encoder::find(ff::codec::Id::None)).map_err(error)?;
        ost.set_parameters(stream.parameters());
        // The input container's codec tag (an AVI's `H264`, say) may not be valid in MP4: 0 lets
        // the muxer choose. ffmpeg-next has no safe setter for it.
        // SAFETY: the stream's codec parameters are allocated and owned by `octx`, which is
        // alive and borrowed mutably here; `codec_tag` is a plain integer field.
        unsafe {
            (*ost.parameters().as_mut_ptr()).codec_tag = 0;
        }
    }
    octx.write_header().map_err(error)?;
    let otb = octx.stream(0).map(|s| s.time_base()).ok_or_else(|| error("no output stream"))?;
    let tb = (itb.numerator(), itb.denominator());
    let mut n = 0;
    let mut last_dts: Option<i64> = None;
    for (s, mut packet) in ictx.packets() {
        if s.index() != index {
            continue;
        }
        let t = packet.pts().or(packet.dts()).map(|p| crate::file::pts_seconds(p, tb));
        let Some(at) = retime(n, t) else { break };
        let Some(at) = at else { continue };
        let ts = (at * f64::from(otb.denominator()) / f64::from(otb.numerator())).round() as i64;
        // Decode order must not go backwards in the file; B-frames keep their presentation time.
        let dts = last_dts.map_or(ts, |d| ts.max(d + 1));
        last_dts = Some(dts);
        packet.set_pts(Some(ts.max(dts)));
        packet.set_dts(Some(dts));
        packet.set_duration(0);
        packet.set_position(-1);
        packet.set_stream(0);
        packet.write_interleaved(&mut octx).map_err(error)?;
        n += 1;
    }
    octx.write_trailer().map_err(error)?;
    if n == 0 {
        let _ = std::fs::remove_file(out);
        return Err(error("no frames in that time"));
    }
    Ok(n)
}

/// Writes access units of a live source as an MP4 at `out`, times relative to the first.
/// Returns the number of frames written.
pub fn units_to_mp4(units: &[Encoded], out: &Path) -> Result<usize, String> {
    let first = units.first().ok_or_else(|| error("no frames in that time"))?;
    if !matches!(first.codec, LiveCodec::H264 | LiveCodec::H265) {
        return Err(format!("{} has no standard place in an MP4; no clip", first.codec.name()));
    }
    let raw = out.with_extension(if first.codec == LiveCodec::H264 { "h264.part" } else { "hevc.part" });
    let mut bytes = Vec::with_capacity(units.iter().map(|u| u.data.len()).sum());
    for u in units {
        bytes.extend_from_slice(&u.data);
    }
    std::fs::write(&raw, bytes).map_err(error)?;
    let t0 = first.pts;
    let times: Vec<f64> = units.iter().map(|u| u.pts.saturating_sub(t0).as_secs_f64()).collect();
    // The raw demuxer gives one packet per access unit, in order.
    let r = remux(&raw, out, |i, _| times.get(i).map(|t| Some(*t)));
    let _ = std::fs::remove_file(&raw);
    r
}

/// Copies `input`'s video between `from_s` and `to_s` (seconds of its own timeline, from the
/// key frame at or before `from_s`) into an MP4 at `out`. Returns the number of frames written.
pub fn cut_mp4(input: &Path, from_s: f64, to_s: f64, out: &Path) -> Result<usize, String> {
    crate::init();
    // First pass: the key frames' times (packets only, nothing is decoded).
    let mut keys: Vec<f64> = Vec::new();
    {
        let mut ictx = ff::format::input(&input).map_err(error)?;
        let stream = ictx.streams().best(ff::media::Type::Video).ok_or_else(|| error("no video"))?;
        let (index, tb) = (stream.index(), stream.time_base());
        for (s, packet) in ictx.packets() {
            if s.index() == index
                && packet.is_key()
                && let Some(p) = packet.pts().or(packet.dts())
            {
                keys.push(crate::file::pts_seconds(p, (tb.numerator(), tb.denominator())));
            }
        }
    }
    let begin = keys
        .iter()
        .copied()
        .filter(|k| *k <= from_s + 1e-6)
        .reduce(f64::max)
        .or_else(|| keys.first().copied())
        .ok_or_else(|| error("the file has no key frame"))?;
    // Second pass: from that key frame (in decode order) until a frame after `to_s`.
    let mut started = false;
    remux(input, out, |_, t| {
        let t = t.unwrap_or(begin);
        if !started {
            if t + 1e-6 < begin {
                return Some(None);
            }
            started = true;
        }
        (t <= to_s + 1e-6).then_some(Some((t - begin).max(0.0)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(pts_ms: u64, key: bool, len: usize) -> Encoded {
        Encoded { codec: LiveCodec::H264, data: vec![0; len], pts: Duration::from_millis(pts_ms), key }
    }

    #[test]
    fn the_ring_keeps_whole_groups_within_its_bounds_and_starts_at_a_key_frame() {
        let ring = PacketRing::new(1000, Duration::from_secs(2));
        ring.push(&unit(0, false, 10));
        assert_eq!(ring.bytes(), 0, "nothing before the first key frame");
        for i in 0..40u64 {
            ring.push(&unit(i * 100, i % 10 == 0, 50));
        }
        let all = ring.units(Duration::ZERO, Duration::from_secs(10));
        assert!(all[0].key, "starts at a key frame");
        assert!(ring.bytes() <= 1000);
        let span = all.last().unwrap().pts - all[0].pts;
        assert!(span <= Duration::from_secs(2), "{span:?}");
        // A range starts at the key frame at or before its start.
        let some = ring.units(Duration::from_millis(3500), Duration::from_millis(3700));
        assert_eq!(some[0].pts, Duration::from_millis(3000));
        assert_eq!(some.last().unwrap().pts, Duration::from_millis(3700));
    }
}
