//! Watches over real sockets with the fixture model: several clients following one watch, a
//! client that stops reading, and the end of a replayed clip analysed as a last, shorter window.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use protocol::{ClientMessage, EndReason, GenerationSettings, ServerMessage, Source, WindowSettings};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::*;

/// A clip of `seconds` at 25 frames/s, 160x120, made with ffmpeg (installed by scripts/setup.sh).
fn make_clip(seconds: u32) -> Vec<u8> {
    let path =
        std::env::temp_dir().join(format!("lookout-clip-{seconds}s-{}-{}.mp4", std::process::id(), rand_suffix()));
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=160x120:rate=25:duration={seconds}"))
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "25"])
        .arg(&path)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

async fn upload_clip(base: &str, bytes: Vec<u8>) -> String {
    let (status, body) = upload(base, bytes, None).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

fn start(id: &str, window: WindowSettings, speed: f64, looped: bool, max_tokens: usize) -> ClientMessage {
    ClientMessage::Start {
        source: Source::Upload { id: id.into(), speed: Some(speed), looped: Some(looped) },
        prompt: "What happens?".into(),
        window: Some(window),
        generation: Some(GenerationSettings {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }),
    }
}

fn windows_of(seconds: f64) -> WindowSettings {
    WindowSettings {
        seconds: Some(seconds),
        stride_seconds: None,
        fps: Some(2.0),
        min_pixels: Some(4096),
        max_pixels: Some(16384),
    }
}

/// Each window's text as a client saw it (catch-up included), with its `window_done` text.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    streamed: String,
    done: Option<String>,
}

async fn follow(ws: &mut Ws) -> (BTreeMap<u64, Seen>, EndReason) {
    let mut seen: BTreeMap<u64, Seen> = BTreeMap::new();
    loop {
        match recv(ws).await {
            ServerMessage::Window { id, .. } => {
                seen.insert(id, Seen::default());
            }
            ServerMessage::Token { window, text } => seen.entry(window).or_default().streamed.push_str(&text),
            ServerMessage::WindowDone { window, text, .. } => seen.entry(window).or_default().done = Some(text),
            ServerMessage::Ended { reason, .. } => return (seen, reason),
            ServerMessage::Error { fatal: true, message, .. } => panic!("{message}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_following_one_watch_get_the_same_windows_and_tokens() {
    let server = start_server(|_| {}).await;
    let id = upload_clip(&server.base, make_clip(6)).await;
    let mut owner = connect(&server.base).await;
    send(&mut owner, &start(&id, windows_of(1.0), 1.0, false, 6)).await;
    let ServerMessage::Ready { session, .. } = recv(&mut owner).await else { panic!("no ready") };
    let mut viewers = Vec::new();
    for _ in 0..2 {
        let mut ws = connect(&server.base).await;
        send(&mut ws, &ClientMessage::Subscribe { watch: Some(session.clone()), monitor: None }).await;
        match recv(&mut ws).await {
            ServerMessage::Subscribed { watch, source, .. } => {
                assert_eq!(watch, session);
                assert_eq!(source.unwrap().width, 160);
            }
            other => panic!("{other:?}"),
        }
        viewers.push(ws);
    }
    let listed: serde_json::Value = {
        let url = format!("http://{}/v1/watches", server.base);
        tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_json().unwrap()).await.unwrap()
    };
    assert_eq!(listed["watches"][0]["id"], session);
    assert_eq!(listed["watches"][0]["subscribers"], 3);
    let [mut a, mut b] = <[Ws; 2]>::try_from(viewers).ok().unwrap();
    let ((o, or), (x, xr), (y, yr)) = tokio::join!(follow(&mut owner), follow(&mut a), follow(&mut b));
    for r in [or, xr, yr] {
        assert_eq!(r, EndReason::EndOfStream);
    }
    // Every window a viewer saw from its start is the owner's, token for token; a window joined
    // midway came with its text so far, so even that one adds up.
    for viewer in [&x, &y] {
        assert!(viewer.len() >= 5, "{viewer:?}");
        for (id, v) in viewer {
            let mine = &o[id];
            assert_eq!(v, mine, "window {id}");
            assert_eq!(v.done.as_ref(), Some(&v.streamed), "window {id}: streamed tokens add up to its text");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_lags_or_is_dropped_while_the_others_keep_their_pace() {
    let server = start_server(|_| {}).await;
    let id = upload_clip(&server.base, make_clip(4)).await;
    let mut owner = connect(&server.base).await;
    send(&mut owner, &start(&id, windows_of(1.0), 4.0, true, 48)).await;
    let ServerMessage::Ready { session, .. } = recv(&mut owner).await else { panic!("no ready") };
    // A viewer with a tiny receive buffer that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.base.parse().unwrap()).await.unwrap();
    let (mut stalled, _) = tokio_tungstenite::client_async(
        format!("ws://{}/v1/ws", server.base),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    send(&mut stalled, &ClientMessage::Subscribe { watch: Some(session), monitor: None }).await;
    // The owner keeps getting whole windows at its pace meanwhile.
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed() < Duration::from_secs(14) {
        match recv(&mut owner).await {
            ServerMessage::WindowDone { .. } => done += 1,
            ServerMessage::Lagged { .. } => panic!("the reading client lagged"),
            ServerMessage::Ended { reason, message } => panic!("ended ({reason}): {message}"),
            _ => {}
        }
    }
    eprintln!("the owner got {done} windows in 14 s while the other client did not read");
    assert!(done >= 10, "only {done} windows in 14 s");
    // The stalled client, reading now, was told it lagged, or was dropped after the send timeout.
    let mut lagged = false;
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(m) = stalled.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    if let Ok(ServerMessage::Lagged { missed }) = serde_json::from_str(&t) {
                        assert!(missed > 0);
                        lagged = true;
                        return "lagged";
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return "dropped",
                Ok(_) => {}
            }
        }
        "dropped"
    })
    .await
    .expect("the stalled client was neither told it lagged nor dropped");
    eprintln!("stalled client: {outcome}; the owner got {done} windows in 14 s");
    assert!(lagged || outcome == "dropped");
    send(&mut owner, &ClientMessage::Stop {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_clip_is_analysed_as_a_last_shorter_window() {
    let server = start_server(|_| {}).await;
    // 10 s with 4 s windows: 0-4, 4-8 and 8-10 s (frames sampled at 2 fps: 0 .. 9.5 s).
    let id = upload_clip(&server.base, make_clip(10)).await;
    let mut ws = connect(&server.base).await;
    send(&mut ws, &start(&id, windows_of(4.0), 8.0, false, 3)).await;
    let mut windows = Vec::new();
    let mut texts = 0;
    let reason = loop {
        match recv(&mut ws).await {
            ServerMessage::Window { start_s, end_s, frames, .. } => windows.push((start_s, end_s, frames)),
            ServerMessage::WindowDone { text, .. } if !text.is_empty() => texts += 1,
            ServerMessage::Ended { reason, .. } => break reason,
            _ => {}
        }
    };
    assert_eq!(reason, EndReason::EndOfStream);
    assert_eq!(windows.len(), 3, "{windows:?}");
    for ((s, e, n), (ws_, we, wn)) in windows.iter().zip([(0.0, 3.5, 8), (4.0, 7.5, 8), (8.0, 9.5, 4)]) {
        assert!((s - ws_).abs() < 0.05 && (e - we).abs() < 0.05 && *n == wn, "{windows:?}");
    }
    assert_eq!(texts, 3);

    // 3 s with the default 4 s window: one window of the 6 frames there are, with tokens.
    let id = upload_clip(&server.base, make_clip(3)).await;
    let mut ws = connect(&server.base).await;
    let mut m = start(
        &id,
        WindowSettings { min_pixels: Some(4096), max_pixels: Some(16384), ..Default::default() },
        4.0,
        false,
        3,
    );
    if let ClientMessage::Start { generation, .. } = &mut m {
        *generation = Some(GenerationSettings { max_tokens: Some(3), ..Default::default() });
    }
    send(&mut ws, &m).await;
    let mut frames = Vec::new();
    let mut tokens = 0;
    loop {
        match recv(&mut ws).await {
            ServerMessage::Window { frames: n, .. } => frames.push(n),
            ServerMessage::Token { .. } => tokens += 1,
            ServerMessage::Ended { reason, .. } => break assert_eq!(reason, EndReason::EndOfStream),
            _ => {}
        }
    }
    assert_eq!(frames, [6]);
    assert!(tokens >= 1);
}
