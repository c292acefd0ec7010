//! WebRTC ingest with webrtc-rs (the 0.2x line, on its sans-I/O core): the WHIP resource
//! lifecycle (RFC 9725) without HTTP. The server maps `POST /v1/whip` to [`Whip::publish`],
//! `DELETE` to [`Whip::delete`], and a watch's `{kind: "webrtc", resource}` to [`Whip::attach`].
//!
//! A resource is a receive-only peer connection for H.264 or VP8 video. The answer carries every
//! ICE candidate (no trickle). Any number of watches may attach to one resource: the track's RTP
//! is reassembled into frames once (webrtc-rs' sample builder, tolerating reordering and loss),
//! and each frame is handed to every attached watch's [`LiveFeed`], stamped with stream time from
//! the RTP clock (90 kHz, counted from the first frame that watch sees). A key frame is requested
//! (PLI) when a watch attaches and whenever a decoder waits for one. Network I/O runs on the tokio
//! runtime; decoding runs on each feed's thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::media::io::sample_builder::SampleBuilder;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::codec::vp8::Vp8Packet;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState, RTCSessionDescription, Registry,
    register_default_interceptors,
};

use crate::live::{Encoded, EventSink, FeedOptions, LiveCodec, LiveFeed};
use crate::replay::Admit;
use crate::ring::{FrameRing, RingEnd};

/// An ICE server (STUN or TURN) offered to peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port?transport=udp`, ...
    pub urls: Vec<String>,
    /// TURN user name.
    pub username: String,
    /// TURN password.
    pub credential: String,
}

impl std::str::FromStr for IceServer {
    type Err = String;
    /// `stun:host:port`, or `turn:user:password@host:port[?transport=...]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s.split_once(':').ok_or_else(|| format!("ICE server {s:?}: expected stun:… or turn:…"))?;
        if !matches!(scheme, "stun" | "stuns" | "turn" | "turns") {
            return Err(format!("ICE server {s:?}: the scheme must be stun, stuns, turn or turns"));
        }
        match rest.rsplit_once('@') {
            Some((creds, host)) if scheme.starts_with("turn") => {
                let (user, pass) = creds.split_once(':').unwrap_or((creds, ""));
                Ok(IceServer {
                    urls: vec![format!("{scheme}:{host}")],
                    username: user.to_owned(),
                    credential: pass.to_owned(),
                })
            }
            _ => Ok(IceServer { urls: vec![s.to_owned()], ..Default::default() }),
        }
    }
}

/// WebRTC settings.
#[derive(Debug, Clone)]
pub struct WebrtcConfig {
    /// STUN/TURN servers for ICE.
    pub ice_servers: Vec<IceServer>,
    /// Local UDP addresses for media; `0.0.0.0:0` means every non-loopback interface, on
    /// ephemeral ports.
    pub udp_addrs: Vec<String>,
    /// Most resources at once.
    pub max_resources: usize,
    /// Longest wait for ICE candidate gathering before answering.
    pub gather_timeout: Duration,
    /// A resource whose publisher has not connected this long after the answer is removed (a
    /// client that posted an offer and went away, or cannot reach any candidate).
    pub connect_timeout: Duration,
    /// ICE: no traffic this long makes a connection disconnected...
    pub ice_disconnected_timeout: Duration,
    /// ...and this much longer failed, which ends its resource: a publisher that vanished
    /// without DELETE is reaped after both.
    pub ice_failed_timeout: Duration,
}

impl Default for WebrtcConfig {
    fn default() -> Self {
        WebrtcConfig {
            ice_servers: Vec::new(),
            udp_addrs: vec!["0.0.0.0:0".into()],
            max_resources: 16,
            gather_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            ice_disconnected_timeout: Duration::from_secs(5),
            ice_failed_timeout: Duration::from_secs(25),
        }
    }
}

/// Why an offer was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum WhipError {
    /// The offer is not valid SDP, or cannot be answered.
    #[error("bad SDP offer: {0}")]
    BadOffer(String),
    /// The offer has no video this server receives.
    #[error("the offer has no video this server can receive (H.264 or VP8)")]
    NoVideo,
    /// Every resource slot is taken.
    #[error("all {0} WHIP resources are in use; DELETE one or try later")]
    Full(usize),
    /// Something failed locally.
    #[error("{0}")]
    Internal(String),
}

/// Why a watch could not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No such resource.
    #[error("no WHIP resource {0:?}; publish with POST /v1/whip first")]
    NotFound(String),
    /// The decoder could not start.
    #[error("cannot start a decoder: {0}")]
    Internal(String),
}

/// What [`Whip::list`] says of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceInfo {
    /// Resource id.
    pub id: String,
    /// Negotiated video codec, once the track arrived.
    pub codec: Option<LiveCodec>,
    /// Whether the peer connection is up.
    pub connected: bool,
    /// How many watches are attached.
    pub watchers: usize,
    /// Time since it was published.
    pub age: Duration,
}

/// The WHIP resources of a server.
pub struct Whip {
    config: WebrtcConfig,
    resources: Mutex<HashMap<String, Arc<Resource>>>,
    /// Set once mDNS could not open its multicast socket (a host without a multicast route):
    /// later peers go without it.
    no_mdns: AtomicBool,
}

impl std::fmt::Debug for Whip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Whip").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A watch's hold on a resource.
struct Subscriber {
    /// The watch's name (to detach it).
    name: String,
    feed: LiveFeed,
    /// RTP timestamp (extended to 64 bits) of the first frame handed to this subscriber.
    first_ts: Option<u64>,
}

/// One published stream.
struct Resource {
    id: String,
    pc: Arc<dyn PeerConnection>,
    subscribers: Mutex<Vec<Subscriber>>,
    codec: Mutex<Option<LiveCodec>>,
    connected: AtomicBool,
    ended: AtomicBool,
    /// Set when a watch attaches or a decoder waits for a key frame: the track task sends a PLI.
    want_key: AtomicBool,
    created: Instant,
}

impl Resource {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the stream for its watches and closes the peer connection.
    async fn end(&self, why: &str) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!(resource = %self.id, why, "WHIP resource ended");
        let subscribers = std::mem::take(&mut *self.lock());
        for s in subscribers {
            s.feed.finish(RingEnd::EndOfStream);
        }
        let _ = self.pc.close().await;
    }

    /// Hands one reassembled frame to every attached watch.
    fn deliver(&self, codec: LiveCodec, data: Vec<u8>, rtp_ts: u64) {
        let mut subs = self.lock();
        if subs.is_empty() {
            return;
        }
        let key = codec.is_key_frame(&data);
        let last = subs.len() - 1;
        let mut data = Some(data);
        let mut i = 0;
        subs.retain_mut(|sub| {
            // The last watch gets the buffer itself; the others a copy.
            let bytes = if i == last { data.take().unwrap_or_default() } else { data.clone().unwrap_or_default() };
            i += 1;
            let first = *sub.first_ts.get_or_insert(rtp_ts);
            let pts = Duration::from_micros(rtp_ts.saturating_sub(first) * 1_000_000 / 90_000);
            // A watch that has gone closed its ring: let go of it.
            let alive = sub.feed.push(Encoded { codec, data: bytes, pts, key });
            if alive && sub.feed.waiting_for_key() {
                self.want_key.store(true, Ordering::Relaxed);
            }
            alive
        });
    }
}

impl Whip {
    /// No resources yet.
    pub fn new(config: WebrtcConfig) -> Arc<Whip> {
        Arc::new(Whip { config, resources: Mutex::new(HashMap::new()), no_mdns: AtomicBool::new(false) })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Resource>>> {
        self.resources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers an SDP offer: creates a resource and returns its id and the SDP answer.
    pub async fn publish(self: &Arc<Self>, offer_sdp: String) -> Result<(String, String), WhipError> {
        let cfg = &self.config;
        if self.map().len() >= cfg.max_resources {
            return Err(WhipError::Full(cfg.max_resources));
        }
        let offer = RTCSessionDescription::offer(offer_sdp).map_err(|e| WhipError::BadOffer(e.to_string()))?;
        let id = new_id();
        let ice: Vec<RTCIceServer> = cfg
            .ice_servers
            .iter()
            .map(|s| RTCIceServer {
                urls: s.urls.clone(),
                username: s.username.clone(),
                credential: s.credential.clone(),
            })
            .collect();
        let (gathered_tx, mut gathered) = tokio::sync::watch::channel(false);
        let handler = Arc::new(Handler {
            whip: Arc::downgrade(self),
            id: id.clone(),
            gathered: gathered_tx,
            resource: Mutex::new(None),
        });
        let build = |mdns: bool| {
            let ice = ice.clone();
            let handler = handler.clone();
            async move {
                let mut engine = media_engine().map_err(WhipError::Internal)?;
                let registry = register_default_interceptors(Registry::new(), &mut engine)
                    .map_err(|e| WhipError::Internal(e.to_string()))?;
                let mut builder = PeerConnectionBuilder::new()
                    .with_configuration(RTCConfigurationBuilder::new().with_ice_servers(ice).build())
                    .with_media_engine(engine)
                    .with_interceptor_registry(registry)
                    .with_handler(handler as Arc<dyn PeerConnectionEventHandler>)
                    .with_udp_addrs(cfg.udp_addrs.clone());
                let mut settings = SettingEngineBuilder::new().with_ice_timeouts(
                    Some(cfg.ice_disconnected_timeout),
                    Some(cfg.ice_failed_timeout),
                    None,
                );
                if !mdns {
                    settings = settings.with_multicast_dns_mode(MulticastDnsMode::Disabled);
                }
                builder = builder.with_setting_engine(settings.build());
                builder.build().await.map_err(|e| WhipError::Internal(format!("cannot create a peer connection: {e}")))
            }
        };
        // mDNS (to resolve the `.local` candidates browsers send) needs a multicast route; a
        // host without one still takes publishers, whose other candidates work.
        let pc = if self.no_mdns.load(Ordering::Relaxed) {
            build(false).await?
        } else {
            match build(true).await {
                Ok(pc) => pc,
                Err(first) => {
                    let pc = build(false).await.map_err(|_| first)?;
                    self.no_mdns.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        "mDNS is unavailable on this host (no multicast route?); WHIP goes on without it, \
                         so publishers' .local candidates are not resolved"
                    );
                    pc
                }
            }
        };
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let resource = Arc::new(Resource {
            id: id.clone(),
            pc: pc.clone(),
            subscribers: Mutex::new(Vec::new()),
            codec: Mutex::new(None),
            connected: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            want_key: AtomicBool::new(false),
            created: Instant::now(),
        });
        *handler.resource.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&resource));
        let negotiated = async {
            pc.set_remote_description(offer).await.map_err(|e| WhipError::BadOffer(e.to_string()))?;
            let answer = pc.create_answer(None).await.map_err(|e| WhipError::BadOffer(e.to_string()))?;
            pc.set_local_description(answer).await.map_err(|e| WhipError::Internal(e.to_string()))?;
            // No trickle: the answer carries every candidate.
            let _ = tokio::time::timeout(cfg.gather_timeout, gathered.wait_for(|g| *g)).await;
            pc.local_description().await.ok_or_else(|| WhipError::Internal("no local description".into()))
        }
        .await;
        let answer = match negotiated {
            Ok(a) if a.sdp.lines().any(|l| l.starts_with("m=video") && !l.starts_with("m=video 0 ")) => a,
            Ok(_) => {
                let _ = pc.close().await;
                return Err(WhipError::NoVideo);
            }
            Err(e) => {
                let _ = pc.close().await;
                return Err(e);
            }
        };
        self.map().insert(id.clone(), resource.clone());
        tracing::info!(resource = %id, "WHIP resource created");
        // A publisher that never connects does not keep its resource.
        let (whip, limit) = (Arc::downgrade(self), cfg.connect_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            if resource.connected.load(Ordering::Relaxed) || resource.ended.load(Ordering::Relaxed) {
                return;
            }
            let removed = whip.upgrade().and_then(|w| w.map().remove(&resource.id));
            if let Some(r) = removed {
                r.end(&format!("the publisher did not connect within {limit:?}")).await;
            }
        });
        Ok((id, answer.sdp))
    }

    /// Attaches watch `name`: from now on the resource's frames also go to `ring` (those
    /// `admit` takes), decoded on a thread of the watch's own that holds `stop`.
    pub fn attach(
        &self,
        id: &str,
        name: &str,
        ring: Arc<FrameRing>,
        admit: Admit,
        events: EventSink,
        stop: base::shutdown::Receiver,
    ) -> Result<(), AttachError> {
        let res = self.map().get(id).cloned().ok_or_else(|| AttachError::NotFound(id.to_owned()))?;
        let feed = LiveFeed::start(name, ring, admit, events, FeedOptions::default(), stop)
            .map_err(|e| AttachError::Internal(e.to_string()))?;
        let mut subs = res.lock();
        subs.retain(|s| !s.feed.is_closed());
        subs.push(Subscriber { name: name.to_owned(), feed, first_ts: None });
        res.want_key.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Detaches watch `name` from resource `id` (its decoder drains and exits). Nothing happens
    /// if either is gone.
    pub fn detach(&self, id: &str, name: &str) {
        let Some(res) = self.map().get(id).cloned() else { return };
        let mut subs = res.lock();
        // Dropping the feed closes its decoder's queue; the thread then exits.
        subs.retain(|s| s.name != name);
    }

    /// Ends resource `id` (its session sees the end of the stream). False if there is none.
    pub async fn delete(&self, id: &str) -> bool {
        let removed = self.map().remove(id);
        match removed {
            Some(r) => {
                r.end("deleted by the publisher").await;
                true
            }
            None => false,
        }
    }

    /// The resources, newest first.
    pub fn list(&self) -> Vec<ResourceInfo> {
        let all: Vec<Arc<Resource>> = self.map().values().cloned().collect();
        let mut out: Vec<ResourceInfo> = all
            .iter()
            .map(|r| ResourceInfo {
                id: r.id.clone(),
                codec: *r.codec.lock().unwrap_or_else(|e| e.into_inner()),
                connected: r.connected.load(Ordering::Relaxed),
                watchers: r.lock().iter().filter(|s| !s.feed.is_closed()).count(),
                age: r.created.elapsed(),
            })
            .collect();
        out.sort_by_key(|r| r.age);
        out
    }

    /// Ends every resource (server shutdown).
    pub async fn close_all(&self) {
        let all: Vec<_> = self.map().drain().map(|(_, r)| r).collect();
        for r in all {
            r.end("the server is shutting down").await;
        }
    }
}

struct Handler {
    whip: Weak<Whip>,
    id: String,
    gathered: tokio::sync::watch::Sender<bool>,
    resource: Mutex<Option<Weak<Resource>>>,
}

impl Handler {
    fn resource(&self) -> Option<Arc<Resource>> {
        self.resource.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(Weak::upgrade)
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, s: RTCPeerConnectionState) {
        tracing::info!(resource = %self.id, state = %s, "WHIP peer connection");
        match s {
            RTCPeerConnectionState::Connected => {
                if let Some(r) = self.resource() {
                    r.connected.store(true, Ordering::Relaxed);
                }
            }
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                let removed = self.whip.upgrade().and_then(|w| w.map().remove(&self.id));
                if let Some(r) = removed {
                    r.end(&format!("the peer connection is {s}")).await;
                }
            }
            _ => {}
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if track.kind().await != RtpCodecKind::Video {
            return;
        }
        let Some(resource) = self.resource() else { return };
        tokio::spawn(read_track(resource, track));
    }
}

enum Builder {
    H264(Box<SampleBuilder<H264Packet>>),
    Vp8(Box<SampleBuilder<Vp8Packet>>),
}

/// Reads one video track: RTP packets → frames → the attached session.
async fn read_track(resource: Arc<Resource>, track: Arc<dyn TrackRemote>) {
    let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
    let mime = track.codec(ssrc).await.map(|c| c.mime_type.to_ascii_lowercase()).unwrap_or_default();
    let (codec, mut builder) = match mime.as_str() {
        "video/h264" => (LiveCodec::H264, Builder::H264(Box::new(new_builder(H264Packet::default())))),
        "video/vp8" => (LiveCodec::Vp8, Builder::Vp8(Box::new(new_builder(Vp8Packet::default())))),
        other => {
            tracing::warn!(resource = %resource.id, codec = other, "unsupported WebRTC video codec");
            return;
        }
    };
    *resource.codec.lock().unwrap_or_else(|e| e.into_inner()) = Some(codec);
    tracing::info!(resource = %resource.id, codec = codec.name(), "WHIP video track");
    let mut ext = RtpClock::default();
    let mut last_pli: Option<Instant> = None;
    loop {
        if resource.want_key.load(Ordering::Relaxed)
            && last_pli.is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
        {
            resource.want_key.store(false, Ordering::Relaxed);
            last_pli = Some(Instant::now());
            let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: ssrc };
            let _ = track.write_rtcp(vec![Box::new(pli)]).await;
        }
        let event = match tokio::time::timeout(Duration::from_millis(500), track.poll()).await {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(_) => continue,
        };
        match event {
            TrackRemoteEvent::OnRtpPacket(p) => {
                let now = Instant::now();
                match &mut builder {
                    Builder::H264(b) => {
                        b.push(now, p);
                        while let Some((s, ts)) = b.pop_with_timestamp(now) {
                            resource.deliver(codec, s.data.to_vec(), ext.extend(ts));
                        }
                    }
                    Builder::Vp8(b) => {
                        b.push(now, p);
                        while let Some((s, ts)) = b.pop_with_timestamp(now) {
                            resource.deliver(codec, s.data.to_vec(), ext.extend(ts));
                        }
                    }
                }
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    tracing::info!(resource = %resource.id, "WHIP video track ended");
}

fn new_builder<T: rtc::rtp::packetizer::Depacketizer>(d: T) -> SampleBuilder<T> {
    // Up to 256 packets of reordering, and at most 200 ms of waiting for a lost one.
    SampleBuilder::new(256, d, 90_000).with_max_time_delay(Duration::from_millis(200))
}

/// Extends 32-bit RTP timestamps to 64 bits across wrap-around. Each timestamp is placed at the
/// signed 32-bit distance from the newest one seen (as retina does), so a late packet from just
/// before a wrap lands just before it, not 13 hours (2^32 ticks at 90 kHz) ahead.
#[derive(Default)]
struct RtpClock {
    /// The newest timestamp and its extension.
    newest: Option<(u32, i64)>,
}

impl RtpClock {
    fn extend(&mut self, ts: u32) -> u64 {
        let ext = match self.newest {
            None => i64::from(ts),
            Some((prev, prev_ext)) => prev_ext + i64::from(ts.wrapping_sub(prev) as i32),
        };
        if self.newest.is_none_or(|(_, e)| ext > e) {
            self.newest = Some((ts, ext));
        }
        ext.max(0) as u64
    }
}

fn media_engine() -> Result<MediaEngine, String> {
    let mut m = MediaEngine::default();
    let feedback = vec![
        RTCPFeedback { typ: "goog-remb".into(), parameter: String::new() },
        RTCPFeedback { typ: "ccm".into(), parameter: "fir".into() },
        RTCPFeedback { typ: "nack".into(), parameter: String::new() },
        RTCPFeedback { typ: "nack".into(), parameter: "pli".into() },
    ];
    let codecs = [
        ("video/H264", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f", 102u8),
        ("video/H264", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f", 106),
        ("video/H264", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640032", 112),
        ("video/VP8", "", 96),
    ];
    for (mime, fmtp, pt) in codecs {
        m.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: mime.into(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: fmtp.into(),
                    rtcp_feedback: feedback.clone(),
                },
                payload_type: pt,
            },
            RtpCodecKind::Video,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(m)
}

/// 16 random characters of [a-z0-9] from the OS's generator (ids are capabilities: whoever knows
/// one can watch or end the stream).
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock (still unique, not secret).
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        bytes.copy_from_slice(&n.to_le_bytes());
    }
    bytes.iter().map(|b| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[usize::from(*b) % 36])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_servers_parse_with_and_without_credentials() {
        let s: IceServer = "stun:stun.example.org:3478".parse().unwrap();
        assert_eq!(s.urls, ["stun:stun.example.org:3478"]);
        assert!(s.username.is_empty());
        let t: IceServer = "turn:alice:pw@turn.example.org:3478?transport=udp".parse().unwrap();
        assert_eq!(t.urls, ["turn:turn.example.org:3478?transport=udp"]);
        assert_eq!((t.username.as_str(), t.credential.as_str()), ("alice", "pw"));
        assert!("http://x".parse::<IceServer>().is_err());
    }

    #[test]
    fn rtp_clock_extends_across_wrap() {
        let mut c = RtpClock::default();
        assert_eq!(c.extend(u32::MAX - 10), u64::from(u32::MAX - 10));
        assert_eq!(c.extend(5), (1u64 << 32) + 5);
        // Reordering just after the wrap does not count as another wrap.
        assert_eq!(c.extend(3), (1u64 << 32) + 3);
        // A late packet from just before the wrap is placed before it, not 2^32 ticks ahead,
        // and the clock goes on from the newest.
        assert_eq!(c.extend(u32::MAX - 3), u64::from(u32::MAX - 3));
        assert_eq!(c.extend(6), (1u64 << 32) + 6);
        // Forward jumps of up to half the range are time passing; the next wrap counts once.
        assert_eq!(c.extend(u32::MAX / 2), (1u64 << 32) + u64::from(u32::MAX / 2));
        assert_eq!(c.extend(u32::MAX - 1), (1u64 << 32) + u64::from(u32::MAX - 1));
        assert_eq!(c.extend(2), (2u64 << 32) + 2);
        // Nothing before the first timestamp goes below zero.
        let mut c = RtpClock::default();
        assert_eq!(c.extend(10), 10);
        assert_eq!(c.extend(u32::MAX), 0);
    }

    proptest::proptest! {
        /// Any stream that advances by less than half the range per packet, with packets late
        /// by less than that, extends to its true 64-bit times.
        #[test]
        fn rtp_clock_recovers_true_times(start in 0u64..(1 << 32), steps in proptest::collection::vec((0u64..1 << 30, 0u64..1 << 28), 1..200)) {
            let mut c = RtpClock::default();
            let mut t = start;
            assert_eq!(c.extend(t as u32), t);
            for (step, late) in steps {
                t += step;
                assert_eq!(c.extend(t as u32), t);
                if late <= t - start {
                    let old = t - late;
                    assert_eq!(c.extend(old as u32), old);
                }
            }
        }
    }

    #[test]
    fn ids_are_random_and_url_safe() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    }

    /// SDP-ish text: lines of the kinds an offer has, with arbitrary values.
    fn sdp_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let line = (
            proptest::sample::select(vec![
                "v=",
                "o=",
                "s=",
                "t=",
                "m=video ",
                "a=rtpmap:",
                "a=fmtp:",
                "a=mid:",
                "c=",
                "a=ice-ufrag:",
                "a=fingerprint:sha-256 ",
                "a=setup:",
                "a=group:BUNDLE ",
            ]),
            "[ -~]{0,40}",
        )
            .prop_map(|(k, v)| format!("{k}{v}"));
        proptest::collection::vec(line, 0..24).prop_map(|l| l.join("\r\n") + "\r\n")
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
        /// Whatever a WHIP client posts, the answer is an error that names the offer (or an
        /// answer), never a panic, and nothing is left registered.
        #[test]
        fn any_offer_text_is_answered_or_refused(text in proptest::prop_oneof![sdp_like(), "\\PC{0,200}"]) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let whip = Whip::new(WebrtcConfig { udp_addrs: vec!["127.0.0.1:0".into()], ..Default::default() });
            let outcome = rt.block_on(whip.publish(text));
            if let Err(e) = &outcome {
                proptest::prop_assert!(matches!(e, WhipError::BadOffer(_) | WhipError::NoVideo), "{e}");
            }
            if outcome.is_err() {
                proptest::prop_assert!(whip.list().is_empty());
            }
        }

        /// ICE server settings: any text parses or is refused, without a panic.
        #[test]
        fn any_ice_server_text_parses_or_is_refused(text in "\\PC{0,80}") {
            let _ = text.parse::<IceServer>();
        }
    }
}
