//! Live sources: encoded frames that arrive from the network (RTSP, WebRTC) are decoded with
//! libav on a dedicated thread and the admitted ones pushed, as RGB, into a [`FrameRing`].
//!
//! The network side never waits for the decoder: [`LiveFeed::push`] hands a frame over a bounded
//! channel without blocking. When the decoder falls behind and the channel is full, frames are
//! dropped until the next key frame (a frame that depends on a lost one cannot be decoded), and
//! every dropped frame is counted on the ring ([`FrameRing::lost_upstream`]). After the decoder,
//! the ring itself overwrites its oldest frame when the reader (the model) falls behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use ff::util::frame::video::Video as VideoFrame;
use ffmpeg_next as ff;

use crate::Frame;
use crate::convert::RgbConverter;
use crate::replay::Admit;
use crate::ring::{FrameRing, RingEnd};

/// Codecs the live sources deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveCodec {
    /// H.264 in Annex B byte-stream form (parameter sets in band).
    H264,
    /// H.265 in Annex B byte-stream form (parameter sets in band).
    H265,
    /// VP8 frames.
    Vp8,
}

impl LiveCodec {
    /// The libav decoder name.
    pub fn name(self) -> &'static str {
        match self {
            LiveCodec::H264 => "h264",
            LiveCodec::H265 => "hevc",
            LiveCodec::Vp8 => "vp8",
        }
    }

    /// Whether decoding can start at this frame (Annex B for H.264/H.265).
    pub fn is_key_frame(self, data: &[u8]) -> bool {
        let nal_types = || data.windows(4).filter(|w| w[..3] == [0, 0, 1]).map(|w| w[3]);
        match self {
            // An IDR slice (5) or a sequence parameter set (7) ahead of one.
            LiveCodec::H264 => nal_types().any(|h| matches!(h & 0x1f, 5 | 7)),
            // IRAP pictures (16..=21) or parameter sets (32..=34).
            LiveCodec::H265 => nal_types().any(|h| matches!((h >> 1) & 0x3f, 16..=21 | 32..=34)),
            // The VP8 frame tag's lowest bit is 0 on key frames (RFC 6386 §9.1).
            LiveCodec::Vp8 => data.first().is_some_and(|b| b & 1 == 0),
        }
    }

    fn id(self) -> ff::codec::Id {
        match self {
            LiveCodec::H264 => ff::codec::Id::H264,
            LiveCodec::H265 => ff::codec::Id::HEVC,
            LiveCodec::Vp8 => ff::codec::Id::VP8,
        }
    }
}

/// One encoded frame (an access unit).
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Its codec.
    pub codec: LiveCodec,
    /// The bitstream.
    pub data: Vec<u8>,
    /// Stream time (from the sender's clock, continued across reconnects).
    pub pts: Duration,
    /// Whether decoding can start here.
    pub key: bool,
}

/// What a live source reports besides frames.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// The first frame was decoded.
    Started {
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// Codec name.
        codec: String,
        /// The sender's nominal frame rate, when it says (0 when unknown).
        fps: f64,
    },
    /// The connection was lost; the source retries after `retry_in`.
    Reconnecting {
        /// Attempt number (1 for the first retry).
        attempt: u32,
        /// Why the connection was lost (or the last attempt failed).
        error: String,
        /// Wait before the next attempt.
        retry_in: Duration,
    },
    /// The connection is back; stream time between `from` and `to` has no frames.
    Resumed {
        /// Stream time of the last frame before the gap.
        from: Duration,
        /// Stream time of the first frame after it.
        to: Duration,
    },
}

/// Splits an H.264 Annex B byte stream whose access units each begin with an access unit
/// delimiter (NAL type 9, as `ffmpeg -bsf:v h264_metadata=aud=insert` writes) into those units.
/// Bytes before the first delimiter are dropped.
pub fn split_access_units(data: &[u8]) -> Vec<&[u8]> {
    let mut starts: Vec<usize> = (0..data.len().saturating_sub(3))
        .filter(|&i| data[i..i + 4] == [0, 0, 1, 9])
        // Keep the fourth byte of a 4-byte start code with its unit.
        .map(|i| if i > 0 && data[i - 1] == 0 { i - 1 } else { i })
        .collect();
    starts.push(data.len());
    starts.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

/// Receives [`SourceEvent`]s (must not block).
pub type EventSink = Arc<dyn Fn(SourceEvent) + Send + Sync>;

/// The network side's handle on a live decoder.
pub struct LiveFeed {
    tx: Option<SyncSender<Encoded>>,
    ring: Arc<FrameRing>,
    waiting_key: bool,
    /// The sender's nominal frame rate (f64 bits), reported with the first frame.
    nominal_fps: Arc<AtomicU64>,
    packets: Option<Arc<crate::evidence::PacketRing>>,
}

impl std::fmt::Debug for LiveFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveFeed").field("waiting_key", &self.waiting_key).finish_non_exhaustive()
    }
}

/// Options of a live decoder.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// Encoded frames that may wait for the decoder.
    pub queue: usize,
    /// The sender's nominal frame rate, reported in [`SourceEvent::Started`] (0 when unknown).
    pub nominal_fps: f64,
    /// Where every received access unit is also kept (evidence clips).
    pub packets: Option<Arc<crate::evidence::PacketRing>>,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions { queue: 32, nominal_fps: 0.0, packets: None }
    }
}

impl LiveFeed {
    /// Starts a decoder thread that feeds `ring` with the frames `admit` accepts. The thread
    /// runs until this feed is dropped or finished (or the ring closes), holding `stop` (its
    /// pipeline's join waits for it).
    pub fn start(
        name: &str,
        ring: Arc<FrameRing>,
        admit: Admit,
        events: EventSink,
        opts: FeedOptions,
        stop: base::shutdown::Receiver,
    ) -> std::io::Result<LiveFeed> {
        crate::init();
        let (tx, rx) = std::sync::mpsc::sync_channel(opts.queue.max(1));
        let thread_ring = ring.clone();
        let nominal_fps = Arc::new(AtomicU64::new(opts.nominal_fps.to_bits()));
        let fps = nominal_fps.clone();
        // The thread logs in the span of whoever started it (the watch).
        let span = tracing::Span::current();
        std::thread::Builder::new().name(format!("decode:{name}")).spawn(move || {
            let _entered = span.enter();
            let end = decode_loop(rx, &thread_ring, admit, &events, &fps);
            if let Err(e) = end {
                thread_ring.close(RingEnd::Failed(e));
            }
            drop(stop);
        })?;
        Ok(LiveFeed { tx: Some(tx), ring, waiting_key: true, nominal_fps, packets: opts.packets })
    }

    /// Sets the sender's nominal frame rate (from its SDP or SPS) before the first frame.
    pub fn set_nominal_fps(&self, fps: f64) {
        if fps.is_finite() && fps > 0.0 {
            self.nominal_fps.store(fps.to_bits(), Ordering::Relaxed);
        }
    }

    /// Hands a frame to the decoder without waiting. Frames before the first key frame, and
    /// after an overflow until the next key frame, are dropped and counted. Returns false once
    /// the ring is closed (nobody wants frames any more).
    pub fn push(&mut self, frame: Encoded) -> bool {
        if self.ring.is_closed() {
            return false;
        }
        if let Some(p) = &self.packets {
            p.push(&frame);
        }
        if self.waiting_key && !frame.key {
            self.ring.count_lost_upstream(1);
            return true;
        }
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(frame) {
            Ok(()) => self.waiting_key = false,
            Err(TrySendError::Full(_)) => {
                self.ring.count_lost_upstream(1);
                self.waiting_key = true;
            }
            Err(TrySendError::Disconnected(_)) => return false,
        }
        true
    }

    /// Whether the decoder is discarding frames until the next key frame (ask the sender for
    /// one).
    pub fn waiting_for_key(&self) -> bool {
        self.waiting_key
    }

    /// After a gap in the stream: drop frames until the next key frame.
    pub fn resync(&mut self) {
        self.waiting_key = true;
    }

    /// Whether the ring was closed.
    pub fn is_closed(&self) -> bool {
        self.ring.is_closed()
    }

    /// The ring this feed fills.
    pub fn ring(&self) -> &Arc<FrameRing> {
        &self.ring
    }

    /// Ends the stream: the decoder drains what it holds, then closes the ring with `end`.
    pub fn finish(mut self, end: RingEnd) {
        self.tx = None;
        // The decoder thread sees the channel close; the ring's end is set here so that it is
        // `end` whatever the decoder does with its last frames.
        self.ring.close(end);
    }
}

fn open_decoder(codec: LiveCodec) -> Result<ff::decoder::Video, String> {
    let c = ff::decoder::find(codec.id()).ok_or_else(|| format!("this libav has no {} decoder", codec.name()))?;
    let mut ctx = ff::codec::context::Context::new_with_codec(c);
    // Slice threads add no latency (frame threads would hold frames back).
    ctx.set_threading(ff::codec::threading::Config {
        kind: ff::codec::threading::Type::Slice,
        count: 2,
        ..Default::default()
    });
    let mut dec = ctx.decoder().video().map_err(|e| format!("cannot open the {} decoder: {e}", codec.name()))?;
    dec.set_packet_time_base(ff::Rational(1, 1_000_000));
    Ok(dec)
}

fn decode_loop(
    rx: Receiver<Encoded>,
    ring: &FrameRing,
    mut admit: Admit,
    events: &EventSink,
    nominal_fps: &AtomicU64,
) -> Result<(), String> {
    let mut decoder: Option<(LiveCodec, ff::decoder::Video)> = None;
    let mut converter = RgbConverter::new();
    let mut decoded = VideoFrame::empty();
    let mut started = false;
    let mut seq = 0u64;
    let mut last_pts: Option<Duration> = None;
    let mut consecutive_errors = 0u32;
    while let Ok(enc) = rx.recv() {
        if decoder.as_ref().is_none_or(|(c, _)| *c != enc.codec) {
            decoder = Some((enc.codec, open_decoder(enc.codec)?));
        }
        let Some((codec, dec)) = decoder.as_mut() else { continue };
        let mut packet = ff::Packet::copy(&enc.data);
        packet.set_pts(Some(enc.pts.as_micros() as i64));
        if enc.key {
            packet.set_flags(ff::packet::Flags::KEY);
        }
        if let Err(e) = dec.send_packet(&packet) {
            // A corrupt frame (lost packets) is routine on a live stream; persistent failure is not.
            consecutive_errors += 1;
            tracing::debug!(error = %e, "live decoder rejected a frame");
            if consecutive_errors > 300 {
                return Err(format!("the {} stream cannot be decoded: {e}", codec.name()));
            }
            continue;
        }
        consecutive_errors = 0;
        loop {
            match dec.receive_frame(&mut decoded) {
                Ok(()) => {}
                Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => break,
                Err(ff::Error::Eof) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "live decoder error");
                    break;
                }
            }
            let pts =
                decoded.timestamp().or(decoded.pts()).map_or(enc.pts, |us| Duration::from_micros(us.max(0) as u64));
            // Stream time never goes backwards (a sender's clock may jitter at a restart).
            let pts = match last_pts {
                Some(l) if pts <= l => l + Duration::from_micros(1),
                _ => pts,
            };
            last_pts = Some(pts);
            ring.count_arrival();
            let (width, height) = (decoded.width(), decoded.height());
            if !started {
                started = true;
                let fps = f64::from_bits(nominal_fps.load(Ordering::Relaxed));
                events(SourceEvent::Started { width, height, codec: codec.name().to_owned(), fps });
            }
            if !admit(pts) {
                continue;
            }
            let rgb: Arc<[u8]> = converter.convert(&mut decoded, ff::Rational(1, 1_000_000))?.into();
            if !ring.push(Frame { seq, pts, width, height, rgb }) {
                return Ok(());
            }
            seq += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Read;

    /// A 1 s, 30 fps, 320x240 H.264 test stream in Annex B, with an access unit delimiter in
    /// front of each frame (ffmpeg's encoder, no B-frames, a key frame every 10 frames), split
    /// into access units.
    pub(crate) fn annexb_frames() -> Vec<(Vec<u8>, bool, Duration)> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lookout-live-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("test.h264");
        let status = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30", "-t", "1"])
            .args(["-c:v", "libx264", "-bf", "0", "-g", "10", "-pix_fmt", "yuv420p"])
            .args(["-bsf:v", "h264_metadata=aud=insert", "-f", "h264"])
            .arg(&out)
            .status()
            .expect("ffmpeg (installed by scripts/setup.sh)");
        assert!(status.success());
        let data = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        split_access_units(&data)
            .into_iter()
            .enumerate()
            .map(|(i, au)| {
                let key = LiveCodec::H264.is_key_frame(au);
                (au.to_vec(), key, Duration::from_secs_f64(i as f64 / 30.0))
            })
            .collect()
    }

    #[test]
    fn decodes_annexb_h264_into_the_ring_with_admission() {
        let frames = annexb_frames();
        assert_eq!(frames.len(), 30);
        assert_eq!(frames.iter().filter(|f| f.1).count(), 3);
        let ring = FrameRing::new(64);
        let mut reader = ring.reader();
        let started = Arc::new(std::sync::Mutex::new(None));
        let s2 = started.clone();
        let events: EventSink = Arc::new(move |e| {
            if let SourceEvent::Started { width, height, .. } = e {
                *s2.lock().unwrap() = Some((width, height));
            }
        });
        let mut n = 0;
        let admit: Admit = Box::new(move |_| {
            n += 1;
            (n - 1) % 2 == 0
        });
        let mut feed = LiveFeed::start(
            "test",
            ring.clone(),
            admit,
            events,
            FeedOptions::default(),
            base::shutdown::Receiver::never(),
        )
        .unwrap();
        for (data, key, pts) in frames {
            assert!(feed.push(Encoded { codec: LiveCodec::H264, data, pts, key }));
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut got = Vec::new();
        while got.len() < 15 {
            match reader.next(Duration::from_secs(10)) {
                Read::Frame { frame, .. } => {
                    assert_eq!((frame.width, frame.height), (320, 240));
                    assert_eq!(frame.rgb.len(), 320 * 240 * 3);
                    got.push(frame.pts);
                }
                other => panic!("{other:?} after {got:?}"),
            }
        }
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        assert_eq!(*started.lock().unwrap(), Some((320, 240)));
        assert!(ring.arrived() >= 22);
        feed.finish(RingEnd::EndOfStream);
    }

    #[test]
    fn access_units_split_at_delimiters_and_key_frames_are_recognised() {
        let stream = [0, 0, 0, 1, 9, 0xf0, 0, 0, 0, 1, 0x67, 1, 0, 0, 1, 0x65, 2, 0, 0, 1, 9, 0xf0, 0, 0, 1, 0x41, 3];
        let aus = split_access_units(&stream);
        assert_eq!(aus.len(), 2);
        assert_eq!(aus[0], &stream[..17]);
        assert_eq!(aus[1], &stream[17..]);
        assert!(LiveCodec::H264.is_key_frame(aus[0]));
        assert!(!LiveCodec::H264.is_key_frame(aus[1]));
        assert!(LiveCodec::Vp8.is_key_frame(&[0x10, 0, 0]));
        assert!(!LiveCodec::Vp8.is_key_frame(&[0x11, 0, 0]));
        assert!(LiveCodec::H265.is_key_frame(&[0, 0, 1, 0x40, 1])); // VPS
        assert!(!LiveCodec::H265.is_key_frame(&[0, 0, 1, 0x02, 1])); // TRAIL_R
    }

    #[test]
    fn a_slow_decoder_never_blocks_the_network_side() {
        let frames = annexb_frames();
        let ring = FrameRing::new(4);
        let opts = FeedOptions { queue: 2, nominal_fps: 30.0, packets: None };
        let mut feed = LiveFeed::start(
            "test",
            ring.clone(),
            Box::new(|_| true),
            Arc::new(|_| {}),
            opts,
            base::shutdown::Receiver::never(),
        )
        .unwrap();
        // A burst far faster than real time into a two-frame queue, nobody reading the ring.
        let started = std::time::Instant::now();
        for _ in 0..3 {
            for (data, key, pts) in frames.iter().cloned() {
                assert!(feed.push(Encoded { codec: LiveCodec::H264, data, pts, key }));
            }
        }
        let took = started.elapsed();
        assert!(took < Duration::from_millis(200), "pushing 90 frames took {took:?}");
        // The overflow dropped frames up to the next key frame, and they are counted.
        assert!(ring.lost_upstream() > 0);
        std::thread::sleep(Duration::from_millis(300));
        // At a pace the decoder keeps up with, nobody reading: the ring keeps its newest frames
        // and counts the ones it overwrote.
        let before = ring.arrived();
        for (data, key, pts) in frames.iter().cloned() {
            assert!(feed.push(Encoded { codec: LiveCodec::H264, data, pts: pts + Duration::from_secs(10), key }));
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(ring.arrived() - before >= 20, "arrived {}", ring.arrived() - before);
        assert_eq!(ring.overwritten(), ring.pushed() - 4);
        feed.finish(RingEnd::Stopped);
    }

    #[test]
    fn frames_before_a_key_frame_are_dropped_and_counted() {
        let frames = annexb_frames();
        let ring = FrameRing::new(8);
        let mut feed = LiveFeed::start(
            "test",
            ring.clone(),
            Box::new(|_| true),
            Arc::new(|_| {}),
            FeedOptions::default(),
            base::shutdown::Receiver::never(),
        )
        .unwrap();
        // Skip the key frame: nothing can be decoded until the next one.
        for (data, key, pts) in frames.into_iter().skip(1).take(5) {
            assert!(!key);
            feed.push(Encoded { codec: LiveCodec::H264, data, pts, key });
        }
        assert_eq!(ring.lost_upstream(), 5);
        assert!(feed.waiting_for_key());
        ring.close(RingEnd::Stopped);
        assert!(!feed.push(Encoded { codec: LiveCodec::H264, data: vec![0, 0, 1], pts: Duration::ZERO, key: true }));
    }

    proptest::proptest! {
        /// Any bytes: no panic; the units are the stream from its first delimiter on, each
        /// beginning with one.
        #[test]
        fn access_units_cover_the_stream_from_the_first_delimiter(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let units = split_access_units(&data);
            let joined: Vec<u8> = units.concat();
            proptest::prop_assert!(data.ends_with(&joined));
            for u in &units {
                proptest::prop_assert!(u.starts_with(&[0, 0, 1, 9]) || u.starts_with(&[0, 0, 0, 1, 9]));
            }
            for codec in [LiveCodec::H264, LiveCodec::H265, LiveCodec::Vp8] {
                let _ = codec.is_key_frame(&data);
            }
        }

        /// Units made of a delimiter and payloads free of start codes come back as they were,
        /// and a unit is a key frame exactly when it holds an IDR slice or an SPS.
        #[test]
        fn access_units_round_trip(units in proptest::collection::vec(
            (proptest::collection::vec(1u8..=255, 0..64), proptest::sample::select(vec![1u8, 5, 7, 8, 6])), 1..20)) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (payload, nal) in &units {
                let mut u = vec![0, 0, 0, 1, 9, 0xf0, 0, 0, 1, 0x60 | nal];
                u.extend_from_slice(payload);
                stream.extend_from_slice(&u);
                expected.push((u, matches!(nal, 5 | 7)));
            }
            let got = split_access_units(&stream);
            proptest::prop_assert_eq!(got.len(), expected.len());
            for (g, (e, key)) in got.iter().zip(&expected) {
                proptest::prop_assert_eq!(*g, e.as_slice());
                proptest::prop_assert_eq!(LiveCodec::H264.is_key_frame(g), *key);
            }
        }
    }
}
