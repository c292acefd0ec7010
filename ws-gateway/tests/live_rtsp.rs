//! RTSP cameras end to end: GStreamer's RTSP server (tools/rtsp_server.py, Debian packages) on
//! 127.0.0.1 serves live H.264 and H.265; `lookout serve` pulls them with retina, decodes with
//! libav, and streams windows and tokens over a real WebSocket. The server is killed and restarted
//! mid-session to check the reconnect.

mod common;

use std::time::{Duration, Instant};

use common::*;
use protocol::{ClientMessage, EndReason, ErrorCode, RtspTransport, ServerMessage, Source};

fn start_rtsp(url: String, transport: Option<RtspTransport>) -> ClientMessage {
    ClientMessage::Start {
        source: Source::Rtsp { url, transport },
        prompt: "What moves?".into(),
        window: Some(small_windows()),
        generation: Some(short_answers()),
    }
}

/// Reads until a window is done; returns it with the tokens seen for it.
async fn until_window_done(ws: &mut Ws, seen: &mut Vec<ServerMessage>) -> (u64, String, usize) {
    let mut tokens = 0;
    loop {
        let m = recv(ws).await;
        seen.push(m.clone());
        match m {
            ServerMessage::Token { .. } => tokens += 1,
            ServerMessage::WindowDone { window, text, .. } => return (window, text, tokens),
            ServerMessage::Error { fatal: true, message, .. } => panic!("fatal error: {message}"),
            ServerMessage::Ended { reason, message } => panic!("ended ({reason}): {message}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_and_h265_cameras_stream_tokens_over_tcp_and_udp() {
    let rtsp = RtspServer::start(free_port(), None);
    let server = start_server(|_| {}).await;
    // The last: a camera that refuses RTP over UDP with 461 is watched over TCP instead.
    for (path, codec, transport) in [
        ("h264", "h264", None),
        ("h265", "hevc", Some(RtspTransport::Tcp)),
        ("h264", "h264", Some(RtspTransport::Udp)),
        ("h264-tcp-only", "h264", Some(RtspTransport::Udp)),
    ] {
        let mut ws = connect(&server.base).await;
        send(&mut ws, &start_rtsp(format!("rtsp://127.0.0.1:{}/{path}", rtsp.port), transport)).await;
        // A new prompt while the camera connects is kept (it is not an error).
        send(&mut ws, &ClientMessage::Prompt { text: "What moves?".into() }).await;
        let session = match recv(&mut ws).await {
            ServerMessage::Ready { source, session, .. } => {
                assert_eq!((source.width, source.height), (640, 360), "{path}");
                assert_eq!(source.codec, codec);
                // The camera's own frame rate, from its parameter sets.
                assert!((source.fps - 15.0).abs() < 0.01, "{path}: {} fps", source.fps);
                session
            }
            other => panic!("{path}: {other:?}"),
        };
        let mut seen = Vec::new();
        let (w0, text, tokens) = until_window_done(&mut ws, &mut seen).await;
        assert!(tokens > 0 && !text.is_empty(), "{path}: tokens arrive on the session");
        // The live view: the newest frame as JPEG (640x360 in its SOF0 header).
        let url = format!("http://{}/v1/sessions/{session}/frame.jpg", server.base);
        let (ct, jpeg) = tokio::task::spawn_blocking(move || {
            let r = ureq::get(&url).call().unwrap();
            let ct = r.content_type().to_owned();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
            (ct, body)
        })
        .await
        .unwrap();
        assert_eq!(ct, "image/jpeg");
        assert_eq!(&jpeg[..2], [0xff, 0xd8]);
        let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).expect("a baseline JPEG");
        let (h, w) =
            (u16::from_be_bytes([jpeg[sof + 5], jpeg[sof + 6]]), u16::from_be_bytes([jpeg[sof + 7], jpeg[sof + 8]]));
        assert_eq!((w, h), (640, 360));
        let (w1, _, _) = until_window_done(&mut ws, &mut seen).await;
        assert!(w1 > w0);
        let windows: Vec<(f64, f64)> = seen
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Window { start_s, end_s, frames, .. } => {
                    assert_eq!(*frames, 2);
                    Some((*start_s, *end_s))
                }
                _ => None,
            })
            .collect();
        // Stream time from the RTP clock: 2 frames at 2 fps are 0.5 s apart.
        for (s, e) in &windows {
            assert!((e - s - 0.5).abs() < 0.1, "{path}: window {s}..{e}");
        }
        let status = loop {
            if let ServerMessage::Status { ingest_fps, .. } = recv(&mut ws).await {
                break ingest_fps;
            }
        };
        eprintln!("{path} ({transport:?}): ingest {status:.1} frames/s, windows {windows:?}");
        assert!(status > 5.0, "{path}: the 15 fps camera is decoded at {status} frames/s");
        send(&mut ws, &ClientMessage::Stop {}).await;
        loop {
            if let ServerMessage::Ended { reason, message } = recv(&mut ws).await {
                assert_eq!(reason, EndReason::Stopped, "{message}");
                assert!(message.contains("stopped"), "{message}");
                break;
            }
        }
        // An ended session has no live view.
        let url = format!("http://{}/v1/sessions/{session}/frame.jpg", server.base);
        let code = tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
            Err(ureq::Error::Status(c, _)) => c,
            other => panic!("{other:?}"),
        })
        .await
        .unwrap();
        assert_eq!(code, 404);
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_camera_is_reconnected_and_the_gap_reported() {
    let port = free_port();
    let rtsp = RtspServer::start(port, None);
    let server = start_server(|c| {
        c.live.rtsp.backoff_initial = Duration::from_millis(100);
        c.live.rtsp.backoff_max = Duration::from_millis(400);
    })
    .await;
    let mut ws = connect(&server.base).await;
    send(&mut ws, &start_rtsp(format!("rtsp://127.0.0.1:{port}/h264"), None)).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ready { .. }));
    let mut seen = Vec::new();
    until_window_done(&mut ws, &mut seen).await;

    rtsp.kill();
    let killed = Instant::now();
    // The session notices the drop and starts retrying.
    let (attempt, error) = loop {
        match recv(&mut ws).await {
            ServerMessage::Reconnecting { attempt, error, .. } => break (attempt, error),
            ServerMessage::Error { fatal: true, message, .. } => panic!("{message}"),
            _ => {}
        }
    };
    let noticed = killed.elapsed();
    assert_eq!(attempt, 1);
    assert!(!error.is_empty());
    // Down for a second, then back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = Instant::now();
    let _rtsp = RtspServer::start(port, None);
    let (from_s, to_s) = loop {
        match recv(&mut ws).await {
            ServerMessage::Resumed { from_s, to_s } => break (from_s, to_s),
            ServerMessage::Reconnecting { .. } | ServerMessage::Status { .. } => {}
            ServerMessage::Error { fatal: true, message, .. } => panic!("{message}"),
            ServerMessage::Ended { reason, message } => panic!("ended ({reason}): {message}"),
            _ => {}
        }
    };
    let back = restarted.elapsed();
    // The gap covers the downtime (at least the second the camera was off).
    assert!(to_s - from_s >= 1.0, "gap {from_s}..{to_s}");
    // Windows continue after the gap, in stream time after it.
    let mut after = Vec::new();
    let (_, text, _) = until_window_done(&mut ws, &mut after).await;
    assert!(!text.is_empty());
    let start_after = after
        .iter()
        .find_map(|m| match m {
            ServerMessage::Window { start_s, .. } => Some(*start_s),
            _ => None,
        })
        .unwrap();
    assert!(start_after >= to_s - 1.0, "window at {start_after} after a gap ending at {to_s}");
    eprintln!(
        "reconnect: drop noticed {:.0} ms after the kill; first frame {:.0} ms after the server restarted; \
         gap {from_s:.2}..{to_s:.2} s",
        noticed.as_secs_f64() * 1e3,
        back.as_secs_f64() * 1e3,
    );
    send(&mut ws, &ClientMessage::Stop {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_and_clear_errors_for_bad_cameras() {
    let rtsp = RtspServer::start(free_port(), Some("cam:s3cr3t:pw"));
    let server = start_server(|c| c.live.first_frame_timeout = Duration::from_secs(15)).await;

    // Right credentials (the ':' in the password percent-escaped).
    let mut ws = connect(&server.base).await;
    send(&mut ws, &start_rtsp(format!("rtsp://cam:s3cr3t%3Apw@127.0.0.1:{}/h264", rtsp.port), None)).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ready { .. }));
    let mut seen = Vec::new();
    until_window_done(&mut ws, &mut seen).await;
    send(&mut ws, &ClientMessage::Stop {}).await;

    // Wrong password, no such path, nothing listening, a server that is not RTSP (an SSH-like
    // banner), the metadata address, not an RTSP URL: a fatal error that says so. Nothing the
    // other side sent comes back, and a closed port reads like a port that is not RTSP.
    let closed = free_port();
    let banner = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let banner_port = banner.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in banner.incoming().flatten() {
            let mut c = c;
            let _ = std::io::Write::write_all(&mut c, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
        }
    });
    let no_server = "no RTSP server answered";
    let cases = [
        (format!("rtsp://cam:wrong@127.0.0.1:{}/h264", rtsp.port), ErrorCode::Source, "401"),
        (format!("rtsp://cam:s3cr3t%3Apw@127.0.0.1:{}/nothing", rtsp.port), ErrorCode::Source, "404"),
        (format!("rtsp://127.0.0.1:{closed}/h264"), ErrorCode::Source, no_server),
        (format!("rtsp://127.0.0.1:{banner_port}/h264"), ErrorCode::Source, no_server),
        ("rtsp://169.254.169.254/latest".to_owned(), ErrorCode::Source, "link-local"),
        ("http://127.0.0.1/cam".to_owned(), ErrorCode::BadRequest, "rtsp://"),
    ];
    for (url, code, says) in cases {
        let mut ws = connect(&server.base).await;
        send(&mut ws, &start_rtsp(url.clone(), None)).await;
        match recv(&mut ws).await {
            ServerMessage::Error { code: c, message, fatal } => {
                assert_eq!(c, code, "{url}: {message}");
                assert!(fatal);
                assert!(message.contains(says), "{url}: {message}");
                assert!(!message.contains("wrong"), "the password must not be echoed: {message}");
                assert!(!message.contains("SSH"), "the other side's bytes must not be echoed: {message}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    // The server still serves.
    let mut ws = connect(&server.base).await;
    send(&mut ws, &start_rtsp(format!("rtsp://cam:s3cr3t%3Apw@127.0.0.1:{}/h265", rtsp.port), None)).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ready { .. }));
}
