//! Alert latency and the decode tokens `stop_when_decided` saves, measured in one run against a
//! running `lookout serve` (see `benches/alerts.sh`; its address in `LOOKOUT_BASE`, its broker's
//! port in `LOOKOUT_MQTT_PORT`, an upload id in `LOOKOUT_UPLOAD`):
//!
//! 1. `latency N`: a monitor whose answer is fixed by a one-option choice ("yes") and whose rule
//!    fires on it; N times the rule is removed (the incident resolves) and put back (the next
//!    window opens a new incident). For each incident: from the window's `window` message (sent
//!    when its last frame is in) to the `alert` message, to the webhook received, and to the MQTT
//!    notification received: p50/p99.
//! 2. `saved WINDOWS`: ad-hoc sessions on the same clip with a choice of two long options, with
//!    and without `stop_when_decided`: decode tokens per window and the model's decode time.
#![allow(missing_docs, clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::{AlertState, ClientMessage, ServerMessage};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A webhook receiver: the arrival of each incident's `incident.opened`.
async fn receiver() -> (String, Arrivals) {
    let got: Arrivals = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let g = g.clone();
            async move {
                let at = Instant::now();
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                if v["event"] == "incident.opened" {
                    g.lock().unwrap().insert(v["incident"]["id"].as_str().unwrap_or_default().to_owned(), at);
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

/// An MQTT subscriber: the arrival of each incident's `incident.opened` on the events topics.
async fn mqtt(port: u16) -> Arrivals {
    let got: Arrivals = Arc::default();
    let (client, mut events) =
        rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("lookout-bench", "127.0.0.1", port), 64);
    client.subscribe("lookout/+/events", rumqttc::QoS::AtLeastOnce).await.unwrap();
    let g = got.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(ev) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                let at = Instant::now();
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                if v["event"] == "incident.opened" {
                    g.lock().unwrap().insert(v["incident"]["id"].as_str().unwrap_or_default().to_owned(), at);
                }
            }
        }
    });
    got
}

async fn http(method: &'static str, url: String, body: Value) -> Value {
    tokio::task::spawn_blocking(move || {
        ureq::request(method, &url)
            .send_json(body)
            .map(|r| r.into_json().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{url}: {e}"))
    })
    .await
    .unwrap()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn recv(ws: &mut Ws) -> ServerMessage {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), ws.next()).await.expect("no message for 120 s");
        if let Some(Ok(Message::Text(t))) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

fn window() -> Value {
    json!({"seconds": 1, "fps": 2, "min_pixels": 4096, "max_pixels": 16384})
}

async fn latency(base: &str, upload: &str, mqtt_port: u16, n: usize) {
    let (hook, hooks) = receiver().await;
    let broker = mqtt(mqtt_port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rule = json!({"when": {"equals": "yes"}, "notify": [{"webhook": {"url": hook}}]});
    let m = http(
        "POST",
        format!("http://{base}/v1/monitors"),
        json!({
            "name": format!("bench {}", std::process::id()), "prompt": "Is anyone at the door?",
            "source": {"kind": "upload", "id": upload, "loop": true, "speed": 1.0},
            "window": window(), "generation": {"max_tokens": 4, "temperature": 0},
            "answer": {"choice": ["yes"]}, "alert": rule,
        }),
    )
    .await;
    let id = m["id"].as_str().unwrap().to_owned();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{base}/v1/ws")).await.unwrap();
    let sub = ClientMessage::Subscribe { watch: None, monitor: Some(id.clone()) };
    ws.send(Message::Text(serde_json::to_string(&sub).unwrap().into())).await.unwrap();
    let mut cut: HashMap<u64, Instant> = HashMap::new();
    let mut fired: Vec<(String, Instant, Instant)> = Vec::new();
    let mut missed = 0;
    let debug = std::env::var_os("BENCH_DEBUG").is_some();
    while fired.len() < n {
        let m = recv(&mut ws).await;
        if debug && !matches!(m, ServerMessage::Token { .. } | ServerMessage::Status { .. }) {
            eprintln!("{:?} {m:?}", Instant::now());
        }
        match m {
            ServerMessage::Window { id, .. } => {
                cut.insert(id, Instant::now());
            }
            ServerMessage::Alert { state: AlertState::Firing, incident, window, .. } => {
                let now = Instant::now();
                // A window whose cut this client missed (it lagged) is not measured, but the
                // cycle goes on.
                if let Some(w) = cut.get(&window).copied() {
                    fired.push((incident, w, now));
                } else {
                    missed += 1;
                }
                // Resolve it (removing the rule) and, once resolved, put the rule back: the next
                // window opens the next incident. (Both changes at once could reach the monitor
                // as one, no change at all: it follows the newest settings.)
                let url = format!("http://{base}/v1/monitors/{id}");
                http("PATCH", url.clone(), json!({"alert": null})).await;
                loop {
                    match recv(&mut ws).await {
                        ServerMessage::Alert { state: AlertState::Resolved, .. } => break,
                        ServerMessage::Window { id, .. } => {
                            cut.insert(id, Instant::now());
                        }
                        _ => {}
                    }
                }
                http("PATCH", url, json!({"alert": rule})).await;
            }
            _ => {}
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (hooks, broker) = (hooks.lock().unwrap().clone(), broker.lock().unwrap().clone());
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
    let mut decide: Vec<f64> = fired.iter().map(|(_, w, a)| ms(*w, *a)).collect();
    let mut webhook: Vec<f64> = fired.iter().filter_map(|(i, w, _)| Some(ms(*w, *hooks.get(i)?))).collect();
    let mut mq: Vec<f64> = fired.iter().filter_map(|(i, w, _)| Some(ms(*w, *broker.get(i)?))).collect();
    println!(
        "{n} incidents ({missed} more not measured: the client lagged), each opened by one window \
         (1 s of video at 2 fps, tiny model, CPU); from the window's cut:"
    );
    println!("| to | received | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    for (name, v) in
        [("alert message (WebSocket)", &mut decide), ("webhook POST", &mut webhook), ("MQTT message", &mut mq)]
    {
        let got = v.len();
        println!("| {name} | {got}/{n} | {:.1} | {:.1} |", percentile(v, 0.5), percentile(v, 0.99));
    }
    let _ = tokio::task::spawn_blocking({
        let url = format!("http://{base}/v1/monitors/{id}");
        move || ureq::delete(&url).call().map(drop).map_err(|e| e.to_string())
    })
    .await;
}

async fn saved(base: &str, upload: &str, windows: usize) {
    let options = ["a person is standing at the front door", "nobody is there and the street is empty"];
    println!(
        "choice of two options of {} and {} characters, {windows} windows each:",
        options[0].len(),
        options[1].len()
    );
    println!("| stop_when_decided | decode tokens/window | decode ms/window | answers identical |");
    println!("|---|---|---|---|");
    let mut texts: Vec<Vec<String>> = Vec::new();
    for stop in [false, true] {
        let start = json!({
            "type": "start", "prompt": "Who is at the door?",
            "source": {"kind": "upload", "id": upload, "speed": 100.0, "loop": true},
            "window": window(),
            "generation": {"max_tokens": 32, "temperature": 0, "answer": {"choice": options}, "stop_when_decided": stop},
        });
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{base}/v1/ws")).await.unwrap();
        ws.send(Message::Text(start.to_string().into())).await.unwrap();
        let (mut tokens, mut decode_ms, mut got) = (0usize, 0.0, Vec::new());
        while got.len() < windows {
            if let ServerMessage::WindowDone { text, usage, timings, .. } = recv(&mut ws).await {
                tokens += usage.completion_tokens;
                if timings.decode_tok_s > 0.0 {
                    decode_ms += usage.completion_tokens as f64 / timings.decode_tok_s * 1000.0;
                }
                got.push(text);
            }
        }
        let _ = ws.send(Message::Text(r#"{"type":"stop"}"#.into())).await;
        let same = texts.first().map_or("-".to_owned(), |t| (t == &got).to_string());
        println!("| {stop} | {:.1} | {:.1} | {same} |", tokens as f64 / windows as f64, decode_ms / windows as f64);
        texts.push(got);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let base = std::env::var("LOOKOUT_BASE").expect("LOOKOUT_BASE=host:port of the server");
    let upload = std::env::var("LOOKOUT_UPLOAD").expect("LOOKOUT_UPLOAD=an upload id");
    match args.first().map(String::as_str) {
        Some("latency") => {
            let port = std::env::var("LOOKOUT_MQTT_PORT").expect("LOOKOUT_MQTT_PORT").parse().unwrap();
            latency(&base, &upload, port, args.get(1).map_or(100, |n| n.parse().unwrap())).await;
        }
        Some("saved") => saved(&base, &upload, args.get(1).map_or(20, |n| n.parse().unwrap())).await,
        _ => eprintln!("usage: alerts latency N | alerts saved WINDOWS"),
    }
}
