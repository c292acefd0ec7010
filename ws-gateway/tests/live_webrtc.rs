//! WebRTC ingest end to end: a webrtc-rs peer publishes H.264 over WHIP (`POST /v1/whip`) to
//! `lookout serve` on 127.0.0.1, a WebSocket session analyses the stream, and `DELETE` ends it.
//! (The browser publisher is tested in tests/browser.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use protocol::{ClientMessage, EndReason, ErrorCode, ServerMessage, Source};
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, Registry, register_default_interceptors,
};

/// A 2 s, 15 fps, 320x240 H.264 (constrained baseline) test pattern split into access units.
fn h264_access_units() -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("lookout-whip-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("pattern.h264");
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=15", "-t", "2"])
        .args(["-c:v", "libx264", "-profile:v", "baseline", "-bf", "0", "-g", "15", "-pix_fmt", "yuv420p"])
        .args(["-bsf:v", "h264_metadata=aud=insert", "-f", "h264"])
        .arg(&out)
        .status()
        .expect("ffmpeg (scripts/setup.sh installs it)");
    assert!(status.success());
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    ingest::live::split_access_units(&data).into_iter().map(<[u8]>::to_vec).collect()
}

struct SenderEvents {
    gathered: tokio::sync::watch::Sender<bool>,
    connected: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for SenderEvents {
    async fn on_ice_gathering_state_change(&self, s: RTCIceGatheringState) {
        if s == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }
    async fn on_connection_state_change(&self, s: RTCPeerConnectionState) {
        if s == RTCPeerConnectionState::Connected {
            let _ = self.connected.send(true);
        }
    }
}

/// A WHIP publisher: returns the resource's location, the peer connection and the task sending
/// frames in real time (looping the pattern).
async fn publish(base: &str) -> (String, Arc<dyn PeerConnection>, tokio::task::JoinHandle<()>) {
    publish_with(base, true).await
}

/// [`publish`], with or without mDNS on the publisher's side.
async fn publish_with(base: &str, mdns: bool) -> (String, Arc<dyn PeerConnection>, tokio::task::JoinHandle<()>) {
    let codec = RTCRtpCodec {
        mime_type: "video/H264".into(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
        rtcp_feedback: vec![],
    };
    let mut engine = MediaEngine::default();
    engine
        .register_codec(RTCRtpCodecParameters { rtp_codec: codec.clone(), payload_type: 102 }, RtpCodecKind::Video)
        .unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut engine).unwrap();
    let (gathered_tx, mut gathered) = tokio::sync::watch::channel(false);
    let (connected_tx, mut connected) = tokio::sync::watch::channel(false);
    let mut builder = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(SenderEvents { gathered: gathered_tx, connected: connected_tx }))
        .with_udp_addrs(vec!["127.0.0.1:0".to_owned()]);
    if !mdns {
        builder = builder.with_setting_engine(
            rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder::new()
                .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                .build(),
        );
    }
    let pc = builder.build().await.unwrap();
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    let ssrc = 0x4c4f4f4b;
    let track = Arc::new(
        TrackLocalStaticSample::new(
            Instant::now(),
            MediaStreamTrack::new(
                "lookout-test".into(),
                "camera".into(),
                "camera".into(),
                RtpCodecKind::Video,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
                    codec,
                    ..Default::default()
                }],
            ),
        )
        .unwrap(),
    );
    let sender = pc.add_track(track.clone() as Arc<dyn TrackLocal>).await.unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), gathered.wait_for(|g| *g)).await.unwrap().unwrap();
    let offer = pc.local_description().await.unwrap().sdp;

    let url = format!("http://{base}/v1/whip");
    let (status, location, ct, answer) = tokio::task::spawn_blocking(move || {
        let r = ureq::post(&url).set("Content-Type", "application/sdp").send_string(&offer).unwrap();
        (
            r.status(),
            r.header("Location").unwrap_or("").to_owned(),
            r.content_type().to_owned(),
            r.into_string().unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 201);
    assert_eq!(ct, "application/sdp");
    assert!(location.starts_with("/v1/whip/"), "{location}");
    assert!(answer.contains("a=candidate"), "the answer carries its candidates: {answer}");
    pc.set_remote_description(RTCSessionDescription::answer(answer).unwrap()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), connected.wait_for(|c| *c)).await.unwrap().unwrap();

    let pt = sender.get_parameters().await.unwrap().rtp_parameters.codecs[0].payload_type;
    let frames = h264_access_units();
    let sending = tokio::spawn(async move {
        let step = Duration::from_micros(1_000_000 / 15);
        let mut tick = tokio::time::interval(step);
        for au in frames.iter().cycle() {
            tick.tick().await;
            let sample = Sample { data: au.clone().into(), duration: step, ..Sample::new(Instant::now()) };
            if track.sample_writer(ssrc, pt).write_sample(&sample).await.is_err() {
                break;
            }
        }
    });
    (location, pc, sending)
}

fn start_webrtc(resource: &str) -> ClientMessage {
    ClientMessage::Start {
        source: Source::Webrtc { resource: resource.into() },
        prompt: "What is on screen?".into(),
        window: Some(small_windows()),
        generation: Some(short_answers()),
    }
}

fn http(method: &str, url: &str, ct: Option<&str>, body: &str) -> (u16, String) {
    let mut req = ureq::request(method, url);
    if let Some(ct) = ct {
        req = req.set("Content-Type", ct);
    }
    match req.send_string(body) {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webrtc_rs_publisher_streams_over_whip_until_deleted() {
    let server = start_server(|c| c.webrtc.udp_addrs = vec!["127.0.0.1:0".into()]).await;
    let base = server.base.clone();
    let (location, pc, sending) = publish(&base).await;
    let id = location.rsplit('/').next().unwrap().to_owned();

    let mut ws = connect(&base).await;
    send(&mut ws, &start_webrtc(&id)).await;
    match recv(&mut ws).await {
        ServerMessage::Ready { source, .. } => {
            assert_eq!((source.width, source.height, source.codec.as_str()), (320, 240, "h264"));
        }
        other => panic!("{other:?}"),
    }
    let mut tokens = 0;
    let mut windows = Vec::new();
    loop {
        match recv(&mut ws).await {
            ServerMessage::Window { start_s, end_s, .. } => windows.push((start_s, end_s)),
            ServerMessage::Token { .. } => tokens += 1,
            ServerMessage::WindowDone { text, .. } if windows.len() >= 2 => {
                assert!(!text.is_empty());
                break;
            }
            ServerMessage::Error { fatal: true, message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    assert!(tokens > 0);
    // Stream time from the RTP clock: 2 frames at 2 fps, half a second apart.
    assert!(windows.iter().all(|(s, e)| (e - s - 0.5).abs() < 0.1), "{windows:?}");

    // A second client watches the same stream at the same time, with its own prompt: it gets
    // its own frames, windows and tokens while the first goes on.
    let mut second = connect(&base).await;
    let mut start = start_webrtc(&id);
    if let ClientMessage::Start { prompt, .. } = &mut start {
        *prompt = "Count the shapes.".into();
    }
    send(&mut second, &start).await;
    match recv(&mut second).await {
        ServerMessage::Ready { source, .. } => assert_eq!((source.width, source.height), (320, 240)),
        other => panic!("{other:?}"),
    }
    let (mut first_done, mut second_done) = (0, 0);
    while first_done < 1 || second_done < 1 {
        tokio::select! {
            m = recv(&mut ws) => if let ServerMessage::WindowDone { .. } = m { first_done += 1 },
            m = recv(&mut second) => match m {
                ServerMessage::WindowDone { text, .. } => {
                    assert!(!text.is_empty());
                    second_done += 1;
                }
                ServerMessage::Error { fatal: true, message, .. } => panic!("{message}"),
                _ => {}
            },
        }
    }

    // Listed as connected and watched by both.
    let list_url = format!("http://{base}/v1/whip");
    let listed: Vec<protocol::WhipResource> =
        tokio::task::spawn_blocking(move || ureq::get(&list_url).call().unwrap().into_json().unwrap()).await.unwrap();
    let me = listed.iter().find(|r| r.id == id).unwrap();
    assert!(me.connected && me.watched);
    assert_eq!(me.watchers, 2);
    assert_eq!(me.codec.as_deref(), Some("h264"));

    // DELETE ends the resource, and with it both watches.
    let del = format!("http://{base}{location}");
    let (code, _) = tokio::task::spawn_blocking(move || http("DELETE", &del, None, "")).await.unwrap();
    assert_eq!(code, 200);
    for ws in [&mut ws, &mut second] {
        loop {
            if let ServerMessage::Ended { reason, message } = recv(ws).await {
                assert_eq!(reason, EndReason::EndOfStream, "{message}");
                break;
            }
        }
    }
    sending.abort();
    let _ = pc.close().await;

    // Bad requests get clear answers.
    let b = base.clone();
    let loc = location.clone();
    let answers = tokio::task::spawn_blocking(move || {
        [
            http("DELETE", &format!("http://{b}{loc}"), None, ""),
            http("POST", &format!("http://{b}/v1/whip"), Some("text/plain"), "v=0"),
            http("POST", &format!("http://{b}/v1/whip"), Some("application/sdp"), "hello"),
            http("POST", &format!("http://{b}/v1/whip"), Some("application/sdp"), "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"),
        ]
    })
    .await
    .unwrap();
    assert_eq!(answers[0].0, 404);
    assert_eq!(answers[1].0, 415);
    assert_eq!(answers[2].0, 400);
    assert_eq!(answers[3].0, 400, "{}", answers[3].1);
    let mut ws = connect(&base).await;
    send(&mut ws, &start_webrtc("nope")).await;
    match recv(&mut ws).await {
        ServerMessage::Error { code: ErrorCode::BadRequest, message, .. } => assert!(message.contains("POST /v1/whip")),
        other => panic!("{other:?}"),
    }
}

/// Runs this test binary's test `name` again in a new network namespace that has only loopback
/// (no multicast route, as on many servers and containers); true when this is that run.
fn in_a_namespace_without_multicast(name: &str) -> bool {
    if std::env::var_os("LOOKOUT_NETNS_CHILD").is_some() {
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("unshare")
        .args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("LOOKOUT_NETNS_CHILD", "1")
        .output()
        .expect("unshare (util-linux) runs the test in a network namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.contains("1 passed"), "in the namespace:\n{stdout}\n{stderr}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_serves_publishers_on_a_host_without_a_multicast_route() {
    if !in_a_namespace_without_multicast("whip_serves_publishers_on_a_host_without_a_multicast_route") {
        return;
    }
    // The condition itself: joining mDNS's group fails here (ENODEV).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    assert!(probe.join_multicast_v4(&"224.0.0.251".parse().unwrap(), &"0.0.0.0".parse().unwrap()).is_err());
    let server = start_server(|c| c.webrtc.udp_addrs = vec!["127.0.0.1:0".into()]).await;
    // Before the fix: 500 "cannot create a peer connection: No such device".
    let (location, _pc, sending) = publish_with(&server.base, false).await;
    let id = location.rsplit('/').next().unwrap().to_owned();
    let mut ws = connect(&server.base).await;
    send(&mut ws, &start_webrtc(&id)).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ready { .. }));
    loop {
        match recv(&mut ws).await {
            ServerMessage::WindowDone { text, .. } => {
                assert!(!text.is_empty());
                break;
            }
            ServerMessage::Error { fatal: true, message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    sending.abort();
}

/// The publisher of [`a_publisher_that_vanishes_without_delete_is_reaped`], in a child process
/// the test kills: publishes to `LOOKOUT_TEST_WHIP_BASE`, prints its resource, sends until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: run in a child process by a_publisher_that_vanishes_without_delete_is_reaped"]
async fn vanishing_publisher() {
    let base = std::env::var("LOOKOUT_TEST_WHIP_BASE").expect("run by the test that kills it");
    let (location, _pc, sending) = publish(&base).await;
    println!("LOCATION {location}");
    let _ = sending.await;
}

/// Chaos: a WHIP publisher killed with SIGKILL (no DELETE, no goodbye) loses its resource once
/// ICE gives up on it, and the watch on it ends; a publisher that posts an offer and never
/// connects loses its resource after the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_vanishes_without_delete_is_reaped() {
    use std::io::BufRead;
    let server = start_server(|c| {
        c.webrtc.udp_addrs = vec!["127.0.0.1:0".into()];
        c.webrtc.ice_disconnected_timeout = Duration::from_secs(1);
        c.webrtc.ice_failed_timeout = Duration::from_secs(2);
        c.webrtc.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let base = server.base.clone();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "vanishing_publisher", "--nocapture", "--test-threads=1"])
        .env("LOOKOUT_TEST_WHIP_BASE", &base)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let location = loop {
        let line = lines.next().expect("the publisher printed its resource").unwrap();
        // libtest writes "test vanishing_publisher ... " on the same line first.
        if let Some((_, l)) = line.split_once("LOCATION ") {
            break l.trim().to_owned();
        }
    };
    let id = location.rsplit('/').next().unwrap().to_owned();
    let mut ws = connect(&base).await;
    send(&mut ws, &start_webrtc(&id)).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ready { .. }));
    loop {
        if let ServerMessage::WindowDone { .. } = recv(&mut ws).await {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    loop {
        if let ServerMessage::Ended { reason, message } = recv(&mut ws).await {
            assert_eq!(reason, EndReason::EndOfStream, "{message}");
            break;
        }
    }
    let list = format!("http://{base}/v1/whip");
    let listed: Vec<protocol::WhipResource> =
        tokio::task::spawn_blocking(move || ureq::get(&list).call().unwrap().into_json().unwrap()).await.unwrap();
    assert!(listed.iter().all(|r| r.id != id), "reaped: {listed:?}");
    println!("a killed publisher's resource was reaped {:?} after the kill", killed.elapsed());

    // An offer whose publisher never connects (its answer is never applied).
    let mut engine = MediaEngine::default();
    engine
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: "video/H264".into(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: "packetization-mode=1;profile-level-id=42e01f".into(),
                    rtcp_feedback: vec![],
                },
                payload_type: 102,
            },
            RtpCodecKind::Video,
        )
        .unwrap();
    let (gathered, _) = tokio::sync::watch::channel(false);
    let (connected, _) = tokio::sync::watch::channel(false);
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_handler(Arc::new(SenderEvents { gathered, connected }))
        .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
        .build()
        .await
        .unwrap();
    pc.add_transceiver_from_kind(RtpCodecKind::Video, None).await.unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer.clone()).await.unwrap();
    let url = format!("http://{base}/v1/whip");
    let sdp = offer.sdp;
    let (code, _) =
        tokio::task::spawn_blocking(move || http("POST", &url, Some("application/sdp"), &sdp)).await.unwrap();
    assert_eq!(code, 201);
    let list = format!("http://{base}/v1/whip");
    let count =
        move || -> usize { ureq::get(&list).call().unwrap().into_json::<Vec<serde_json::Value>>().unwrap().len() };
    let c = count.clone();
    assert_eq!(tokio::task::spawn_blocking(c).await.unwrap(), 1, "registered at first");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(tokio::task::spawn_blocking(count).await.unwrap(), 0, "reaped after the connect timeout");
    let _ = pc.close().await;
}
