//! RTSP cameras through retina: `DESCRIBE`/`SETUP`/`PLAY`, H.264 or H.265 frames depacketized
//! into Annex B access units (parameter sets in front of every key frame) and handed to a
//! [`LiveFeed`] for decoding.
//!
//! Stream time comes from the RTP clock (retina's timestamps, counted from the start of the
//! connection). When the camera drops, the source reconnects with exponential backoff; stream
//! time continues across the gap by the wall-clock time the gap lasted, and the gap is reported as
//! [`SourceEvent::Reconnecting`] then [`SourceEvent::Resumed`].
//!
//! The source stops at once on its pipeline's shutdown signal, whatever it is waiting for (the
//! camera's answer, the next frame, the next attempt).

use std::time::{Duration, Instant};

use base::shutdown;
use futures_util::StreamExt;
use retina::client::{Credentials, PlayOptions, SessionOptions, SetupOptions, TcpTransportOptions, Transport};
use retina::codec::{CodecItem, FrameFormat};
use url::Url;

use crate::live::{Encoded, EventSink, LiveCodec, LiveFeed, SourceEvent};
use crate::ring::RingEnd;

/// How RTP travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RtspTransport {
    /// Interleaved in the RTSP TCP connection (works through NAT and firewalls).
    #[default]
    Tcp,
    /// UDP (a LAN only: no reordering).
    Udp,
}

impl std::str::FromStr for RtspTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(RtspTransport::Tcp),
            "udp" => Ok(RtspTransport::Udp),
            other => Err(format!("unknown RTSP transport {other:?}; use \"tcp\" or \"udp\"")),
        }
    }
}

/// RTSP source settings.
#[derive(Debug, Clone)]
pub struct RtspOptions {
    /// RTP transport.
    pub transport: RtspTransport,
    /// Longest wait for the camera to answer a request, and for the first frame.
    pub connect_timeout: Duration,
    /// No frame for this long counts as a dropped connection.
    pub stall_timeout: Duration,
    /// First wait before reconnecting; doubled after each failed attempt.
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
    /// Let camera URLs reach link-local addresses (169.254.0.0/16, fe80::/10), where a camera
    /// without DHCP may sit but where the cloud metadata service lives too (see
    /// [`refused_address`]).
    pub allow_link_local: bool,
}

impl Default for RtspOptions {
    fn default() -> Self {
        RtspOptions {
            transport: RtspTransport::Tcp,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            max_attempts: None,
            allow_link_local: false,
        }
    }
}

/// Why a camera URL may not reach `ip`, if it may not. Cameras live on private networks, so
/// loopback, private and public addresses are allowed; unspecified, multicast and broadcast
/// addresses are not addresses of a camera, and link-local ones (the cloud metadata service at
/// 169.254.169.254 among them) only with `allow_link_local`. IPv4 inside IPv6 is judged as IPv4
/// ([`embedded_ipv4`]).
pub fn refused_address(ip: std::net::IpAddr, allow_link_local: bool) -> Option<&'static str> {
    use std::net::IpAddr;
    let ip = match ip {
        IpAddr::V6(v) => embedded_ipv4(v).map_or(IpAddr::V6(v), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    let (unusable, link_local) = match ip {
        IpAddr::V4(v) => (v.is_unspecified() || v.is_multicast() || v.is_broadcast(), v.is_link_local()),
        IpAddr::V6(v) => (v.is_unspecified() || v.is_multicast(), (v.segments()[0] & 0xffc0) == 0xfe80),
    };
    if unusable {
        Some("an unspecified, multicast or broadcast address is not a camera's address")
    } else if link_local && !allow_link_local {
        Some(
            "camera URLs may not reach link-local addresses (169.254.0.0/16, fe80::/10: the cloud metadata \
             service lives there) unless the server allows it (--rtsp-allow-link-local)",
        )
    } else {
        None
    }
}

/// The IPv4 address inside an IPv6 one, for the forms that route to it: mapped
/// (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`). Address
/// policies (this module's and the server's URL guard) judge these as the IPv4 address.
pub fn embedded_ipv4(v: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v.segments();
    let tail = || std::net::Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    match s {
        [0, 0, 0, 0, 0, 0xffff | 0, ..] | [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(tail()),
        _ => None,
    }
}

/// What a failed RTSP request tells the client. When the camera answered, its status says what
/// is wrong (a wrong password is not a network drop). Otherwise one sentence for every case:
/// nothing the other side sent is repeated (a port that is not RTSP must not echo its banner),
/// and refused, closed, silent and non-RTSP ports read the same, so errors cannot map ports.
/// The full error is logged at debug level for the operator.
fn describe_failure(e: &retina::Error, method: &str, camera: &CameraUrl) -> String {
    tracing::debug!(camera = camera.redacted(), method, error = %e, "RTSP request failed");
    match e.status_code() {
        Some(401) => "the camera refused the user name or password (401 Unauthorized): check the credentials \
                      in the URL (percent-escape '@' and ':')"
            .into(),
        Some(403) => "the camera refused access to this stream (403 Forbidden)".into(),
        Some(404) => "the camera has no stream at this path (404 Not Found): check the URL's path".into(),
        Some(461) => {
            "the camera refused the RTP transport (461 Unsupported Transport): try \"transport\": \"tcp\"".into()
        }
        Some(code) => format!("the camera answered {method} with status {code}"),
        None => format!("no RTSP server answered at {} (refused, closed, timed out or not RTSP)", camera.host_port()),
    }
}

/// A parsed camera address: the URL without credentials, and the credentials.
#[derive(Clone)]
pub struct CameraUrl {
    url: Url,
    creds: Option<Credentials>,
}

impl std::fmt::Debug for CameraUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("CameraUrl").field("url", &self.url.as_str()).field("creds", &self.creds.is_some()).finish()
    }
}

impl CameraUrl {
    /// Parses `rtsp://[user:pass@]host[:port]/path`; percent-escapes in the credentials are
    /// decoded.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut url = Url::parse(s).map_err(|e| format!("invalid RTSP URL: {e}"))?;
        if url.scheme() != "rtsp" {
            return Err(format!("an RTSP URL starts with rtsp://, not {}://", url.scheme()));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("the RTSP URL has no host".into());
        }
        let decode = |v: &str| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned();
        let creds = if url.username().is_empty() {
            None
        } else {
            Some(Credentials { username: decode(url.username()), password: decode(url.password().unwrap_or("")) })
        };
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(CameraUrl { url, creds })
    }

    /// The URL without credentials (safe to log).
    pub fn redacted(&self) -> &str {
        self.url.as_str()
    }

    /// `host:port` (554 when the URL gives none).
    pub fn host_port(&self) -> String {
        // An IPv6 host comes in its brackets already.
        format!("{}:{}", self.url.host_str().unwrap_or_default(), self.url.port().unwrap_or(554))
    }

    /// Resolves the host and checks every address against [`refused_address`].
    async fn check_addresses(&self, allow_link_local: bool) -> Result<(), String> {
        let host = self.url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let port = self.url.port().unwrap_or(554);
        let addrs = tokio::net::lookup_host((host, port)).await.map_err(|_| format!("cannot resolve {host}"))?;
        for a in addrs {
            if let Some(why) = refused_address(a.ip(), allow_link_local) {
                return Err(format!("{host} resolves to {}: {why}", a.ip()));
            }
        }
        Ok(())
    }
}

/// Runs an RTSP source until `stop` is signalled, the feed's ring closes, the camera ends the
/// stream for good, or the first connection fails (a wrong address or password should be
/// reported, not retried). Expects to be called on a tokio runtime (network I/O only; decoding is
/// on the feed's thread). Holds `stop` while it runs.
pub async fn run(
    camera: CameraUrl,
    opts: RtspOptions,
    mut feed: LiveFeed,
    events: EventSink,
    stop: shutdown::Receiver,
) {
    let mut base = Duration::ZERO; // stream time at the start of the current connection
    let mut last: Option<(Duration, Instant)> = None; // last frame's stream time and arrival
    let mut attempt = 0u32;
    let mut backoff = opts.backoff_initial;
    let mut connected_once = false;
    loop {
        let outcome = tokio::select! {
            biased;
            _ = stop.cancelled() => Conn::Closed,
            c = connection(&camera, &opts, &mut feed, &events, &mut base, &mut last, &mut connected_once) => c,
        };
        let error = match outcome {
            Conn::Closed => return,
            Conn::Lost { error, delivered } => {
                if delivered {
                    attempt = 0;
                    backoff = opts.backoff_initial;
                }
                error
            }
            Conn::Fatal(error) => {
                feed.finish(RingEnd::Failed(error));
                return;
            }
        };
        attempt += 1;
        if opts.max_attempts.is_some_and(|m| attempt > m) {
            feed.finish(RingEnd::Failed(format!("the camera is gone after {} attempts: {error}", attempt - 1)));
            return;
        }
        tracing::warn!(camera = camera.redacted(), attempt, %error, retry_in_ms = backoff.as_millis() as u64, "RTSP connection lost");
        events(SourceEvent::Reconnecting { attempt, error, retry_in: backoff });
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        if feed.is_closed() {
            return;
        }
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

enum Conn {
    /// Nobody wants frames any more.
    Closed,
    /// The connection failed or dropped; `delivered` says whether it produced frames.
    Lost { error: String, delivered: bool },
    /// Do not retry.
    Fatal(String),
}

async fn connection(
    camera: &CameraUrl,
    opts: &RtspOptions,
    feed: &mut LiveFeed,
    events: &EventSink,
    base: &mut Duration,
    last: &mut Option<(Duration, Instant)>,
    connected_once: &mut bool,
) -> Conn {
    let first = !*connected_once;
    let fail = |error: String| if first { Conn::Fatal(error) } else { Conn::Lost { error, delivered: false } };
    if let Err(why) = camera.check_addresses(opts.allow_link_local).await {
        return Conn::Fatal(why);
    }
    let timeout = opts.connect_timeout;
    let session_opts = SessionOptions::default().creds(camera.creds.clone()).user_agent("lookout".into());
    let described = match tokio::time::timeout(
        timeout,
        retina::client::Session::describe(camera.url.clone(), session_opts),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(describe_failure(&e, "DESCRIBE", camera)),
        Err(_) => return fail(format!("the camera did not answer within {timeout:?}")),
    };
    let mut session = described;
    let Some((index, codec)) = session.streams().iter().enumerate().find_map(|(i, s)| {
        if s.media() != "video" {
            return None;
        }
        match s.encoding_name() {
            "h264" => Some((i, LiveCodec::H264)),
            "h265" => Some((i, LiveCodec::H265)),
            _ => None,
        }
    }) else {
        let found: Vec<String> =
            session.streams().iter().map(|s| format!("{}/{}", s.media(), s.encoding_name())).collect();
        return Conn::Fatal(format!("the camera offers no H.264 or H.265 video (it offers {})", found.join(", ")));
    };
    let setup = |transport| SetupOptions::default().transport(transport).frame_format(FrameFormat::SIMPLE);
    let tcp = || Transport::Tcp(TcpTransportOptions::default());
    let first_choice = match opts.transport {
        RtspTransport::Tcp => tcp(),
        RtspTransport::Udp => Transport::Udp(Default::default()),
    };
    match tokio::time::timeout(timeout, session.setup(index, setup(first_choice))).await {
        Ok(Ok(())) => {}
        // A camera that does not take RTP over UDP (live555 answers 461 to some transport
        // headers) gets interleaved TCP instead, which every camera serves.
        Ok(Err(e)) if e.status_code() == Some(461) && opts.transport == RtspTransport::Udp => {
            tracing::info!(camera = camera.redacted(), "the camera refused RTP over UDP; using TCP");
            match tokio::time::timeout(timeout, session.setup(index, setup(tcp()))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return fail(describe_failure(&e, "SETUP", camera)),
                Err(_) => return fail(format!("SETUP got no answer within {timeout:?}")),
            }
        }
        Ok(Err(e)) => return fail(describe_failure(&e, "SETUP", camera)),
        Err(_) => return fail(format!("SETUP got no answer within {timeout:?}")),
    }
    let playing = match tokio::time::timeout(timeout, session.play(PlayOptions::default())).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return fail(describe_failure(&e, "PLAY", camera)),
        Err(_) => return fail(format!("PLAY got no answer within {timeout:?}")),
    };
    let mut demuxed = match playing.demuxed() {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(camera = camera.redacted(), error = %e, "cannot depacketize");
            return fail("the camera's video stream cannot be read (unsupported packetization)".into());
        }
    };
    *connected_once = true;
    let mut delivered = false;
    feed.resync();
    loop {
        if feed.is_closed() {
            return Conn::Closed;
        }
        let limit = if delivered { opts.stall_timeout } else { opts.connect_timeout.max(opts.stall_timeout) };
        let item = match tokio::time::timeout(limit, demuxed.next()).await {
            Err(_) => return Conn::Lost { error: format!("no video from the camera for {limit:?}"), delivered },
            Ok(None) => return Conn::Lost { error: "the camera ended the stream".into(), delivered },
            Ok(Some(Err(e))) => {
                tracing::debug!(camera = camera.redacted(), error = %e, "RTSP stream error");
                return Conn::Lost { error: "the connection to the camera broke off".into(), delivered };
            }
            Ok(Some(Ok(item))) => item,
        };
        let CodecItem::VideoFrame(frame) = item else { continue };
        if frame.stream_id() != index {
            continue;
        }
        if !delivered {
            delivered = true;
            feed.set_nominal_fps(nominal_fps(&demuxed.streams()[index]));
            if let Some((prev, at)) = *last {
                // Stream time goes on by the wall-clock length of the gap.
                *base = prev + at.elapsed();
                events(SourceEvent::Resumed { from: prev, to: *base });
            }
        }
        let elapsed = frame.timestamp().elapsed_secs().max(0.0);
        let pts = *base + Duration::from_secs_f64(elapsed);
        *last = Some((pts, Instant::now()));
        let key = frame.is_random_access_point();
        if !feed.push(Encoded { codec, data: frame.into_data(), pts, key }) {
            return Conn::Closed;
        }
    }
}

/// The camera's frame rate: from the SPS timing info, else the SDP's `a=framerate`, else 0.
fn nominal_fps(stream: &retina::client::Stream) -> f64 {
    if let Some(retina::codec::ParametersRef::Video(v)) = stream.parameters()
        && let Some((ticks, scale)) = v.frame_rate()
        && ticks > 0
    {
        return f64::from(scale) / f64::from(ticks);
    }
    stream.framerate().map_or(0.0, f64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_url() {
        let c = CameraUrl::parse("rtsp://admin:p%40ss%3Aw0rd@10.0.0.5:554/stream1").unwrap();
        assert_eq!(c.redacted(), "rtsp://10.0.0.5:554/stream1");
        let creds = c.creds.as_ref().unwrap();
        assert_eq!((creds.username.as_str(), creds.password.as_str()), ("admin", "p@ss:w0rd"));
        assert!(!format!("{c:?}").contains("w0rd"));
        assert!(CameraUrl::parse("rtsp://cam/x").unwrap().creds.is_none());
        assert!(CameraUrl::parse("http://cam/x").unwrap_err().contains("rtsp://"));
        assert_eq!(CameraUrl::parse("rtsp://u:p@cam.local/x").unwrap().host_port(), "cam.local:554");
        assert_eq!(CameraUrl::parse("rtsp://[fd00::7]:8554/x").unwrap().host_port(), "[fd00::7]:8554");
        assert!(CameraUrl::parse("not a url").is_err());
        assert_eq!("udp".parse::<RtspTransport>(), Ok(RtspTransport::Udp));
        assert!("sctp".parse::<RtspTransport>().is_err());
    }

    #[test]
    fn cameras_may_be_private_but_not_link_local_unless_allowed() {
        for ok in ["127.0.0.1", "10.0.0.5", "192.168.1.64", "8.8.8.8", "::1", "fd00::1", "2001:db8::1"] {
            assert_eq!(refused_address(ok.parse().unwrap(), false), None, "{ok}");
        }
        for link_local in ["169.254.169.254", "169.254.1.1", "fe80::1", "::ffff:169.254.169.254"] {
            let why = refused_address(link_local.parse().unwrap(), false).expect(link_local);
            assert!(why.contains("--rtsp-allow-link-local"), "{why}");
            assert_eq!(refused_address(link_local.parse().unwrap(), true), None, "{link_local}");
        }
        for never in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::", "ff02::1"] {
            assert!(refused_address(never.parse().unwrap(), true).is_some(), "{never}");
        }
    }
}
