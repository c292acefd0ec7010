//! Several nodes on one PostgreSQL, measured in one run (see `benches/cluster.sh`). Each mode
//! starts its own PostgreSQL (Debian's, in a temporary directory) and `lookout serve` processes
//! (the binary in `LOOKOUT_BIN`, the tiny fixture model).
//!
//! 1. `takeover TRIES LEASE_S`: two nodes, four monitors; TRIES times, the node holding the
//!    most is killed with SIGKILL and the time until the other holds every monitor is measured
//!    (polling `/v1/nodes` every 10 ms); then the killed node comes back and the load is split
//!    again. Prints p50 and max against the lease time.
//! 2. `writes SECONDS`: three nodes' stores (three `Store`s with three node ids, as three
//!    processes would have) each hold the leases of four monitors and write fenced events as
//!    fast as they can for SECONDS: events per second into PostgreSQL in all.
//! 3. `history EVENTS`: one monitor with EVENTS events (bulk-loaded with SQL, words varied)
//!    behind a real node; history queries through its HTTP API: newest page, a time range, an
//!    older page by cursor, a rare word and a common word (p50/p99 of 200 each).
#![allow(missing_docs, clippy::print_stdout, clippy::print_stderr)]

#[path = "../tests/common/postgres.rs"]
mod postgres;
#[path = "../tests/common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protocol::{GenerationSettings, Retention, Source, Timings, Usage, WindowSettings};
use ws_gateway::store::{MonitorRow, NewEvent, Store, now_ms};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn get(url: &str) -> serde_json::Value {
    ureq::get(url).call().map(|r| r.into_json().unwrap_or_default()).unwrap_or_default()
}

fn post(url: &str, body: serde_json::Value) -> serde_json::Value {
    ureq::post(url).send_json(body).map(|r| r.into_json().unwrap_or_default()).unwrap_or_else(|e| panic!("{url}: {e}"))
}

struct Node {
    child: Option<Child>,
    port: u16,
}

impl Node {
    fn start(url: &str, data: &Path, port: u16, lease_s: f64) -> Node {
        let bin = std::env::var("LOOKOUT_BIN")
            .unwrap_or_else(|_| root().join("target/release/lookout").display().to_string());
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--port", &port.to_string(), "--database", url, "--lease-s", &lease_s.to_string()])
            .arg("--model")
            .arg(root().join("fixtures/models/tiny-tied"))
            .arg("--data-dir")
            .arg(data);
        let child = process::spawn_listening(cmd, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&format!("http://127.0.0.1:{port}/v1/health"))["status"] != "ready" {
            assert!(Instant::now() < deadline, "never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        Node { child: Some(child), port }
    }

    fn id(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Monitor → node, as `/v1/nodes` on `port` says.
fn holders(port: u16) -> Vec<(String, String)> {
    let v = get(&format!("http://127.0.0.1:{port}/v1/nodes"));
    let mut out = Vec::new();
    for n in v["nodes"].as_array().into_iter().flatten() {
        for m in n["monitors"].as_array().into_iter().flatten() {
            out.push((m.as_str().unwrap_or_default().to_owned(), n["id"].as_str().unwrap_or_default().to_owned()));
        }
    }
    out
}

fn monitor_body(name: &str, upload: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "source": {"kind": "upload", "id": upload, "loop": true, "speed": 1.0},
        "prompt": "What happens?",
        "window": {"seconds": 2, "fps": 1, "min_pixels": 4096, "max_pixels": 16384},
        "generation": {"max_tokens": 2, "temperature": 0},
    })
}

fn upload(port: u16) -> String {
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let boundary = "lookoutbench";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.mkv\"\r\nContent-Type: video/x-matroska\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&clip);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = ureq::post(&format!("http://127.0.0.1:{port}/v1/uploads"))
        .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
        .send_bytes(&body)
        .unwrap();
    let v: serde_json::Value = r.into_json().unwrap();
    v["id"].as_str().unwrap().to_owned()
}

fn takeover(tries: usize, lease_s: f64) {
    let pg = postgres::Postgres::start();
    let url = pg.database();
    let data = std::env::temp_dir().join(format!("lookout-bench-takeover-{}", std::process::id()));
    let ports = [free_port(), free_port()];
    let mut nodes = [Node::start(&url, &data, ports[0], lease_s), Node::start(&url, &data, ports[1], lease_s)];
    let id = upload(ports[0]);
    for i in 0..4 {
        post(&format!("http://127.0.0.1:{}/v1/monitors", ports[0]), monitor_body(&format!("m{i}"), &id));
    }
    let balanced = |port: u16| {
        let h = holders(port);
        h.len() == 4 && h.iter().filter(|(_, n)| *n == format!("127.0.0.1:{}", ports[0])).count() == 2
    };
    let mut times = Vec::new();
    for t in 0..tries {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !balanced(ports[t % 2]) {
            assert!(Instant::now() < deadline, "never balanced: {:?}", holders(ports[t % 2]));
            std::thread::sleep(Duration::from_millis(20));
        }
        // Renewals are a beat apart: kill at a random point of the beat.
        std::thread::sleep(Duration::from_millis(rand_ms(t, (lease_s * 1000.0 / 3.0) as u64)));
        let (victim, survivor) = (t % 2, 1 - t % 2);
        let dead = nodes[victim].id();
        let killed = Instant::now();
        nodes[victim].kill_9();
        loop {
            let h = holders(ports[survivor]);
            if h.len() == 4 && h.iter().all(|(_, n)| *n != dead) {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "no takeover");
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = killed.elapsed().as_secs_f64();
        times.push(took);
        println!("  try {}: {:.2} s", t + 1, took);
        nodes[victim] = Node::start(&url, &data, ports[victim], lease_s);
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    let p50 = percentile(&mut times, 0.5);
    println!("takeover after kill -9 over {tries} tries: p50 {p50:.2} s, max {max:.2} s; lease {lease_s:.1} s");
    println!("  ratio to the lease: p50 {:.2}, max {:.2} (the bound is 2.0)", p50 / lease_s, max / lease_s);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&data);
}

/// A pseudo-random wait below `below` ms, different per try.
fn rand_ms(t: usize, below: u64) -> u64 {
    let x = (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_ms() as u64;
    x % below.max(1)
}

fn row(id: &str) -> MonitorRow {
    MonitorRow {
        id: id.into(),
        name: id.into(),
        source: Source::Rtsp { url: "rtsp://cam/x".into(), transport: None },
        prompt: "p".into(),
        window: WindowSettings::default(),
        generation: GenerationSettings::default(),
        enabled: true,
        retention: Retention::default(),
        alert: None,
        created_ms: now_ms(),
        updated_ms: now_ms(),
    }
}

fn event(monitor: &str, window: u64, text: String) -> NewEvent {
    NewEvent {
        monitor: monitor.into(),
        window,
        start_s: window as f64,
        end_s: window as f64 + 2.0,
        started_ms: now_ms(),
        prompt: "What happens?".into(),
        text,
        finish_reason: "stop".into(),
        usage: Usage { prompt_tokens: 300, completion_tokens: 12, total_tokens: 312 },
        timings: Timings::default(),
    }
}

const WORDS: &[&str] = &["person", "car", "door", "dog", "parcel", "nobody", "bicycle", "light", "rain", "truck"];

async fn writes(seconds: u64) {
    let pg = postgres::Postgres::start();
    let url = pg.database();
    let dir = std::env::temp_dir().join(format!("lookout-bench-writes-{}", std::process::id()));
    let mut stores = Vec::new();
    for n in 0..3 {
        let s = Store::open_postgres(&url, &dir, &format!("node{n}")).await.unwrap();
        s.join("http://127.0.0.1:1", 4).await.unwrap();
        stores.push(s);
    }
    for i in 0..12 {
        stores[0].create_monitor(&row(&format!("m{i}"))).await.unwrap();
    }
    for s in &stores {
        let got = s.claim(4, 600_000).await.unwrap();
        assert_eq!(got.len(), 4);
    }
    let written = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for s in &stores {
        for l in s.renew(600_000).await.unwrap() {
            let (s, w) = (s.clone(), written.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let text = format!(
                        "a {} near the {}",
                        WORDS[n as usize % WORDS.len()],
                        WORDS[(n as usize / 3) % WORDS.len()]
                    );
                    s.insert_event(&event(&l.monitor, n, text), None).await.unwrap();
                    n += 1;
                    w.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = written.load(Ordering::Relaxed);
    println!(
        "fenced event writes by 3 nodes (12 monitors, one writer each) for {seconds} s: {n} events, {:.0} events/s",
        n as f64 / seconds as f64
    );
    println!("  (a monitor writes one event per window: a window every 2 s is 0.5 events/s per camera)");
    let _ = std::fs::remove_dir_all(&dir);
}

fn history(events: u64) {
    let pg = postgres::Postgres::start();
    let url = pg.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let data = std::env::temp_dir().join(format!("lookout-bench-history-{}", std::process::id()));
    let port = free_port();
    let node = Node::start(&url, &data, port, 10.0);
    let base = format!("http://127.0.0.1:{port}");
    // A paused monitor (it needs no node), then its history in bulk: one insert of EVENTS rows,
    // the tsvector and indexes kept by PostgreSQL as for any insert.
    let id = upload(port);
    let mut body = monitor_body("history", &id);
    body["enabled"] = serde_json::json!(false);
    let m = post(&format!("{base}/v1/monitors"), body)["id"].as_str().unwrap().to_owned();
    let words = WORDS.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(",");
    let timings = serde_json::to_string(&Timings::default()).unwrap();
    let start = Instant::now();
    pg.psql(
        &db,
        &format!(
            "INSERT INTO events (monitor_id, window_id, start_s, end_s, started_ms, prompt, text, finish_reason, \
             prompt_tokens, completion_tokens, timings) SELECT '{m}', g, g * 2.0, g * 2.0 + 2.0, \
             1700000000000 + g * 2000, 'What happens?', 'a ' || (ARRAY[{words}])[1 + g % 10] || ' near the ' || \
             (ARRAY[{words}])[1 + (g / 10) % 10] || CASE WHEN g % 100000 = 7 THEN ' zebra' ELSE '' END, 'stop', 300, 12, '{timings}' \
             FROM generate_series(0, {}) g; ANALYZE events;",
            events - 1
        ),
    );
    println!("{events} events loaded in {:.1} s", start.elapsed().as_secs_f64());
    let mid = 1_700_000_000_000i64 + (events as i64) * 1000;
    let agent = ureq::AgentBuilder::new().build();
    let cases = [
        ("newest 50", format!("{base}/v1/monitors/{m}/events?limit=50")),
        (
            "one hour (time range)",
            format!("{base}/v1/monitors/{m}/events?limit=50&since={}&until={}", rfc(mid), rfc(mid + 3_600_000)),
        ),
        ("a page by cursor, half-way back", format!("{base}/v1/monitors/{m}/events?limit=50&before={}", events / 2)),
        ("rare word (q=zebra)", format!("{base}/v1/monitors/{m}/events?limit=50&q=zebra")),
        ("common words (q=person+car)", format!("{base}/v1/monitors/{m}/events?limit=50&q=person%20car")),
    ];
    for (name, url) in cases {
        let mut ms = Vec::new();
        let mut found = 0;
        for _ in 0..200 {
            let t = Instant::now();
            let v: serde_json::Value = agent.get(&url).call().unwrap().into_json().unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            found = v["events"].as_array().map_or(0, Vec::len);
        }
        println!(
            "  {name}: p50 {:.1} ms, p99 {:.1} ms ({found} events per answer)",
            percentile(&mut ms, 0.5),
            percentile(&mut ms, 0.99)
        );
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&data);
}

fn rfc(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).unwrap().to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let n = |i: usize, d: u64| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("takeover") => {
            let lease = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2.0);
            takeover(n(1, 10) as usize, lease);
        }
        Some("writes") => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(writes(n(1, 10)));
        }
        Some("history") => history(n(1, 1_000_000)),
        _ => eprintln!("usage: cluster takeover TRIES LEASE_S | writes SECONDS | history EVENTS"),
    }
}
