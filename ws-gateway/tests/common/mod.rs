//! What the service tests share: a `lookout serve` on 127.0.0.1 with the fixture model, a
//! WebSocket client, and the real peers the live-source tests talk to.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{ClientMessage, GenerationSettings, ServerMessage, WindowSettings};
use tokio_tungstenite::tungstenite::Message;
use ws_gateway::server::{ServeConfig, serve};

pub mod openapi;
pub mod postgres;
pub mod process;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct Server {
    pub base: String,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the service with the tiny fixture model on CPU, `adjust`ed, and waits until it is ready.
pub async fn start_server(adjust: impl FnOnce(&mut ServeConfig)) -> Server {
    let data = std::env::temp_dir().join(format!("lookout-serve-{}-{}", std::process::id(), rand_suffix()));
    let mut config = ServeConfig {
        model: root().join("fixtures/models/tiny-tied").to_string_lossy().into_owned(),
        data_dir: data,
        max_sessions: 4,
        max_ws_message_bytes: 16 * 1024,
        engine_queue: 4,
        ..ServeConfig::default()
    };
    adjust(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(config, listener, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let server = Server { base, stop: Some(tx), task };
    // Wait for the model.
    for _ in 0..200 {
        let url = format!("http://{}/v1/health", server.base);
        let h: serde_json::Value =
            tokio::task::spawn_blocking(move || ureq::get(&url).call().ok().map(|r| r.into_json().unwrap()))
                .await
                .unwrap()
                .unwrap_or_default();
        if h["status"] == "ready" {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the model never became ready");
}

/// A multipart body with one part named `file`.
pub fn multipart(bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "lookoutboundary7MA4YWxkTrZu0gW";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip\"\r\nContent-Type: application/octet-stream\r\n\r\n").into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub async fn upload(base: &str, bytes: Vec<u8>, key: Option<&str>) -> (u16, serde_json::Value) {
    let url = format!("http://{base}/v1/uploads");
    let key = key.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let (ct, body) = multipart(&bytes);
        let mut req = ureq::post(&url).set("Content-Type", &ct);
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        match req.send_bytes(&body) {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap()
}

/// A blocking HTTP call: status and JSON body (null when it is not JSON).
pub fn call(method: &str, url: &str, body: Option<serde_json::Value>, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = ureq::request(method, url);
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
        None => req.call(),
    };
    match r {
        Ok(r) => {
            let status = r.status();
            (status, r.into_json().unwrap_or(serde_json::Value::Null))
        }
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(serde_json::Value::Null)),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

pub async fn http(method: &'static str, url: String, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    tokio::task::spawn_blocking(move || call(method, &url, body, None)).await.unwrap()
}

/// A GET: status and body bytes.
pub async fn bytes(url: String) -> (u16, Vec<u8>) {
    tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(r) => {
            let status = r.status();
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut v).unwrap();
            (status, v)
        }
        Err(ureq::Error::Status(code, _)) => (code, Vec::new()),
        Err(e) => panic!("{e}"),
    })
    .await
    .unwrap()
}

pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_007
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(base: &str) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{base}/v1/ws")).await.unwrap().0
}

pub async fn send(ws: &mut Ws, m: &ClientMessage) {
    ws.send(Message::Text(serde_json::to_string(m).unwrap().into())).await.unwrap();
}

pub async fn recv(ws: &mut Ws) -> ServerMessage {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("no message within 60 s")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// GStreamer's RTSP server (tools/rtsp_server.py) on 127.0.0.1; killed when dropped.
pub struct RtspServer {
    pub port: u16,
    child: Child,
}

impl RtspServer {
    pub fn start(port: u16, auth: Option<&str>) -> RtspServer {
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(root().join("tools/rtsp_server.py")).arg("--port").arg(port.to_string());
        if let Some(a) = auth {
            cmd.arg("--auth").arg(a);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("GStreamer RTSP server (scripts/setup.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("READY"), "the RTSP server did not start: {line:?}");
        RtspServer { port, child }
    }

    /// Kills the server at once (no TEARDOWN, no goodbye: the camera dropped).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One-second windows of two frames, small frames: quick on the tiny model.
pub fn small_windows() -> WindowSettings {
    WindowSettings {
        seconds: Some(1.0),
        stride_seconds: Some(1.0),
        fps: Some(2.0),
        min_pixels: Some(4096),
        max_pixels: Some(16384),
    }
}

/// Four greedy tokens per window.
pub fn short_answers() -> GenerationSettings {
    GenerationSettings { max_tokens: Some(4), temperature: Some(0.0), ..Default::default() }
}
