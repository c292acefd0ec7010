//! Many WebSocket clients on one server, some of which never read (see `benches/load.sh`).
//!
//! `load SECONDS CLIENTS STALLED` against a running `lookout serve` (address and pid in
//! `LOOKOUT_BASE` and `LOOKOUT_PID`): one client uploads a clip and starts a looped watch; the
//! others subscribe to it, and STALLED of them never read a byte (their receive buffers are
//! small, so the server's send queue for them fills). Every second the bench samples the
//! server's resident memory, threads and open file descriptors (from /proc); at the end it
//! prints them over time, tokens per reading client (min / median / max against the owner's),
//! and what became of the stalled clients (told `lagged`, then dropped as slow).
#![allow(missing_docs, clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::{ClientMessage, GenerationSettings, ServerMessage, Source, WindowSettings};
use tokio_tungstenite::tungstenite::Message;

fn proc_sample(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (field("VmRSS:") * 1024, field("Threads:"), fds)
}

fn upload(base: &str, path: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    let boundary = "loadbenchboundary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip\"\r\n\r\n")
        .into_bytes();
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r: serde_json::Value = ureq::post(&format!("http://{base}/v1/uploads"))
        .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
        .send_bytes(&body)
        .unwrap()
        .into_json()
        .unwrap();
    r["id"].as_str().unwrap().to_owned()
}

/// A socket with a small receive buffer (a client that will not read fills it quickly).
async fn connect(base: &str, small_buffer: bool) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let addr: std::net::SocketAddr = base.parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if small_buffer {
        socket.set_recv_buffer_size(4096).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{base}/v1/ws"), tcp).await.unwrap();
    ws
}

fn text(m: &ClientMessage) -> Message {
    Message::Text(serde_json::to_string(m).unwrap().into())
}

#[derive(Default)]
struct Tally {
    tokens: AtomicU64,
    lagged: AtomicU64,
    ended: AtomicU64,
}

async fn follow(mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, tally: Arc<Tally>, until: Instant) {
    while Instant::now() < until {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(500), ws.next()).await else { continue };
        let Message::Text(t) = msg else { continue };
        match serde_json::from_str::<ServerMessage>(&t) {
            Ok(ServerMessage::Token { .. }) => {
                tally.tokens.fetch_add(1, Ordering::Relaxed);
            }
            Ok(ServerMessage::Lagged { .. }) => {
                tally.lagged.fetch_add(1, Ordering::Relaxed);
            }
            Ok(ServerMessage::Ended { .. }) => {
                tally.ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (seconds, clients, stalled): (u64, usize, usize) = match &args[..] {
        [s, c, k, ..] => (s.parse().unwrap(), c.parse().unwrap(), k.parse().unwrap()),
        _ => panic!("usage: load SECONDS CLIENTS STALLED"),
    };
    assert!(stalled < clients, "at least the owner reads");
    let base = std::env::var("LOOKOUT_BASE").expect("LOOKOUT_BASE");
    let pid: u32 = std::env::var("LOOKOUT_PID").expect("LOOKOUT_PID").parse().unwrap();
    let clip = std::env::var("LOOKOUT_CLIP").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/preprocess/clips/h264_25fps_480x270.mkv").into()
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let before = proc_sample(pid);
        let id = tokio::task::spawn_blocking({
            let base = base.clone();
            move || upload(&base, &clip)
        })
        .await
        .unwrap();
        let mut owner = connect(&base, false).await;
        let start = ClientMessage::Start {
            source: Source::Upload { id, speed: Some(1.0), looped: Some(true) },
            prompt: "What happens?".into(),
            window: Some(WindowSettings {
                seconds: Some(1.0),
                stride_seconds: Some(1.0),
                fps: Some(2.0),
                min_pixels: Some(4096),
                max_pixels: Some(16384),
            }),
            generation: Some(GenerationSettings { max_tokens: Some(16), temperature: Some(0.0), ..Default::default() }),
        };
        owner.send(text(&start)).await.unwrap();
        let watch = loop {
            if let Some(Ok(Message::Text(t))) = owner.next().await
                && let Ok(ServerMessage::Ready { session, .. }) = serde_json::from_str(&t)
            {
                break session;
            }
        };
        let until = Instant::now() + Duration::from_secs(seconds);
        let owner_tally = Arc::new(Tally::default());
        let mut tasks = vec![tokio::spawn(follow(owner, owner_tally.clone(), until))];
        let mut readers = Vec::new();
        let mut stalled_sockets = Vec::new();
        for i in 1..clients {
            let never_reads = i <= stalled;
            let mut ws = connect(&base, never_reads).await;
            ws.send(text(&ClientMessage::Subscribe { watch: Some(watch.clone()), monitor: None })).await.unwrap();
            if never_reads {
                stalled_sockets.push(ws); // held, never read
            } else {
                let t = Arc::new(Tally::default());
                readers.push(t.clone());
                tasks.push(tokio::spawn(follow(ws, t, until)));
            }
        }
        println!(
            "load: {clients} clients on one looped watch ({stalled} never read), {seconds} s; server before: RSS {:.0} MiB, {} threads, {} fds",
            before.0 as f64 / 1048576.0,
            before.1,
            before.2
        );
        println!("  t (s)   RSS (MiB)  threads  fds");
        let started = Instant::now();
        let mut peak = 0;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (rss, threads, fds) = proc_sample(pid);
            peak = peak.max(rss);
            let t = started.elapsed().as_secs();
            if t.is_multiple_of(5) || Instant::now() >= until {
                println!("  {t:>5}   {:>9.1}  {threads:>7}  {fds:>4}", rss as f64 / 1048576.0);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        // What became of the stalled: a closed socket shows as the server's close or an error.
        let checks: Vec<_> = stalled_sockets
            .into_iter()
            .map(|mut ws| {
                tokio::spawn(async move {
                    let closed = async {
                        loop {
                            match ws.next().await {
                                None | Some(Err(_) | Ok(Message::Close(_))) => return true,
                                Some(Ok(_)) => {}
                            }
                        }
                    };
                    tokio::time::timeout(Duration::from_secs(15), closed).await.unwrap_or(false)
                })
            })
            .collect();
        let mut dropped = 0;
        for c in checks {
            dropped += usize::from(c.await.unwrap_or(false));
        }
        let mut tokens: Vec<u64> = readers.iter().map(|t| t.tokens.load(Ordering::Relaxed)).collect();
        tokens.sort_unstable();
        let owner_tokens = owner_tally.tokens.load(Ordering::Relaxed);
        let lagged: u64 = readers.iter().map(|t| t.lagged.load(Ordering::Relaxed)).sum();
        let median = tokens.get(tokens.len() / 2).copied().unwrap_or(0);
        println!(
            "tokens per reading client: min {} / median {median} / max {} (the owner: {owner_tokens}); {lagged} lagged notices to readers",
            tokens.first().copied().unwrap_or(0),
            tokens.last().copied().unwrap_or(0),
        );
        println!(
            "stalled clients: {dropped} of {stalled} dropped by the server; peak RSS {:.1} MiB",
            peak as f64 / 1048576.0
        );
        let after = proc_sample(pid);
        println!(
            "server after: RSS {:.0} MiB, {} threads, {} fds",
            after.0 as f64 / 1048576.0,
            after.1,
            after.2
        );
    });
}
