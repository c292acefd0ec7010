//! Monitors with real parts: the service on 127.0.0.1 with the fixture model, looped uploads and
//! GStreamer's RTSP server as sources, the SQLite store on disk, restarts of the real binary
//! (graceful and `kill -9`), retention, search, and viewers over WebSockets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use protocol::{ClientMessage, EndReason, Event, EventPage, Monitor, MonitorList, ServerMessage, WatchState};
use serde_json::json;

mod common;
use common::*;

fn monitor_body(name: &str, source: serde_json::Value, prompt: &str) -> serde_json::Value {
    json!({
        "name": name, "source": source, "prompt": prompt,
        "window": {"seconds": 1, "fps": 2, "min_pixels": 4096, "max_pixels": 16384},
        "generation": {"max_tokens": 4, "temperature": 0},
    })
}

async fn events(base: &str, id: &str, query: &str) -> EventPage {
    let (status, v) = http("GET", format!("http://{base}/v1/monitors/{id}/events?{query}"), None).await;
    assert_eq!(status, 200, "{v}");
    common::openapi::conforms("EventPage", &v);
    serde_json::from_value(v).unwrap()
}

/// Waits until a monitor has at least `n` events.
async fn wait_events(base: &str, id: &str, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let page = events(base, id, "limit=500").await;
        if page.events.len() >= n {
            return page.events;
        }
        assert!(Instant::now() < deadline, "only {} events after 90 s", page.events.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_monitor(base: &str, id: &str) -> Monitor {
    let (status, v) = http("GET", format!("http://{base}/v1/monitors/{id}"), None).await;
    assert_eq!(status, 200, "{v}");
    common::openapi::conforms("Monitor", &v);
    serde_json::from_value(v).unwrap()
}

async fn upload_fixture(base: &str) -> String {
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (status, body) = upload(base, clip, None).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_are_created_checked_searched_changed_and_deleted() {
    let mut server = start_server(|_| {}).await;
    let base = server.base.clone();
    let upload = upload_fixture(&base).await;
    let source = json!({"kind": "upload", "id": upload, "loop": true, "speed": 4.0});
    let url = format!("http://{base}/v1/monitors");

    // Bad input: 4xx with a message that says what to change.
    let bad = [
        (json!({"name": "x", "source": {"kind": "ftp", "url": "x"}, "prompt": "p"}), 400, "unknown variant"),
        (monitor_body("x", json!({"kind": "upload", "id": "nope"}), "p"), 400, "POST /v1/uploads"),
        (json!({"name": "x", "source": source, "prompt": "p", "window": {"fps": 0}}), 400, "window.fps"),
        (monitor_body("x", json!({"kind": "webrtc", "resource": "abc"}), "p"), 400, "cannot be monitored"),
        (monitor_body("", source.clone(), "p"), 400, "name"),
        (json!({"name": "x", "source": source, "prompt": "p", "retention": {"days": 0}}), 400, "at least 1"),
        (json!({"name": "x", "source": source}), 400, "prompt"),
    ];
    for (body, status, needle) in bad {
        let (s, v) = http("POST", url.clone(), Some(body.clone())).await;
        assert_eq!(s, status, "{body} → {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body} → {message}");
    }

    // Create: 201, Location, the monitor.
    let created = tokio::task::spawn_blocking({
        let url = url.clone();
        let body = monitor_body("front door", source.clone(), "What happens?");
        move || {
            let r = ureq::post(&url).set("Content-Type", "application/json").send_string(&body.to_string()).unwrap();
            (r.status(), r.header("Location").map(str::to_owned), r.into_json::<Monitor>().unwrap())
        }
    })
    .await
    .unwrap();
    let (status, location, m) = created;
    assert_eq!(status, 201);
    assert_eq!(location.as_deref(), Some(format!("/v1/monitors/{}", m.id).as_str()));
    assert_eq!(m.name, "front door");
    assert!(m.enabled);
    assert_eq!(m.retention.days, Some(30));
    let id = m.id.clone();
    let (s, v) = http("POST", url.clone(), Some(monitor_body("front door", source.clone(), "p"))).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("front door"));

    // It runs with nobody watching: events with thumbnails.
    let evs = wait_events(&base, &id, 3).await;
    assert!(evs.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let e = &evs[0];
    assert_eq!(e.monitor, id);
    assert_eq!(e.prompt, "What happens?");
    assert!(e.usage.completion_tokens >= 1);
    let started: jiff::Timestamp = e.started_at.parse().unwrap();
    assert!(e.started_at.ends_with('Z'));
    assert!((jiff::Timestamp::now() - started).get_seconds().abs() < 600, "{}", e.started_at);
    let (s, jpeg) = bytes(format!("http://{base}{}", e.thumbnail.as_ref().unwrap())).await;
    assert_eq!(s, 200);
    assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
    let m = get_monitor(&base, &id).await;
    assert_eq!(m.state, WatchState::Running);
    assert!(m.counters.windows >= 3 && m.counters.events >= 3, "{:?}", m.counters);
    assert!(m.last_event.is_some());
    assert!(m.watch.is_some());

    // Search finds a known answer; a word that is in no answer finds nothing.
    let word = e.text.split(|c: char| !c.is_alphanumeric()).find(|w| w.len() >= 3).unwrap_or("x").to_owned();
    let found = events(&base, &id, &format!("q={}", urlencode(&word))).await;
    assert!(found.events.iter().any(|f| f.id == e.id), "q={word} missed event {}", e.id);
    assert!(found.events.iter().all(|f| f.text.to_lowercase().contains(&word.to_lowercase())));
    assert!(events(&base, &id, "q=zzqqxxjj").await.events.is_empty());
    // Paging with the cursor; time filters.
    let first = events(&base, &id, "limit=1").await;
    let next = first.next.clone().unwrap();
    let second = events(&base, &id, &format!("limit=1&before={next}")).await;
    assert!(second.events[0].id < first.events[0].id);
    assert!(events(&base, &id, "since=2999-01-01T00:00:00Z").await.events.is_empty());
    assert!(!events(&base, &id, "until=2999-01-01T00:00:00Z").await.events.is_empty());
    let (s, v) = http("GET", format!("http://{base}/v1/monitors/{id}/events?since=yesterday"), None).await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("RFC 3339"));
    // The export: every event, oldest first, one per line.
    let (s, body) = bytes(format!("http://{base}/v1/monitors/{id}/events.jsonl")).await;
    assert_eq!(s, 200);
    let lines: Vec<Event> =
        String::from_utf8(body).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 3);
    assert!(lines.windows(2).all(|w| w[0].id < w[1].id));

    // Two viewers follow it; a third never reads.
    let mut viewers = Vec::new();
    for _ in 0..2 {
        let mut ws = connect(&base).await;
        send(&mut ws, &ClientMessage::Subscribe { watch: None, monitor: Some(id.clone()) }).await;
        match recv(&mut ws).await {
            ServerMessage::Subscribed { monitor, prompt, .. } => {
                assert_eq!(monitor.as_deref(), Some(id.as_str()));
                assert_eq!(prompt, "What happens?");
            }
            other => panic!("{other:?}"),
        }
        viewers.push(ws);
    }
    let mut stalled = connect(&base).await;
    send(&mut stalled, &ClientMessage::Subscribe { watch: None, monitor: Some(id.clone()) }).await;
    for ws in &mut viewers {
        loop {
            if let ServerMessage::Token { .. } = recv(ws).await {
                break;
            }
        }
    }

    // A new prompt applies from the next window; pause and resume.
    let (s, v) = http("PATCH", format!("{url}/{id}"), Some(json!({"prompt": "Count the shapes."}))).await;
    assert_eq!(s, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while events(&base, &id, "limit=1").await.events[0].prompt != "Count the shapes." {
        assert!(Instant::now() < deadline, "the new prompt was never used");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, v) = http("PATCH", format!("{url}/{id}"), Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while get_monitor(&base, &id).await.state != WatchState::Paused {
        assert!(Instant::now() < deadline, "never paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let paused_at = get_monitor(&base, &id).await.counters.events;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get_monitor(&base, &id).await.counters.events, paused_at, "a paused monitor stores nothing");
    let (s, _) = http("PATCH", format!("{url}/{id}"), Some(json!({"enabled": true, "name": "porch"}))).await;
    assert_eq!(s, 200);
    wait_events(&base, &id, paused_at as usize + 2).await;
    assert_eq!(get_monitor(&base, &id).await.name, "porch");
    let (s, v) = http("PATCH", format!("{url}/{id}"), Some(json!({"window": {"fps": -1}}))).await;
    assert_eq!(s, 400, "{v}");

    // Listed, with the metrics of its history.
    let (_, v) = http("GET", url.clone(), None).await;
    let list: MonitorList = serde_json::from_value(v).unwrap();
    assert_eq!(list.monitors.len(), 1);
    let (_, metrics) = bytes(format!("http://{base}/metrics")).await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("lookout_monitors 1"), "{metrics}");
    // The windows' latency histograms, vLLM's names: every analysed window counted, in buckets.
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    for h in [
        "lookout_request_queue_time_seconds",
        "lookout_time_to_first_token_seconds",
        "lookout_e2e_request_latency_seconds",
    ] {
        assert!(count(h) >= 1, "{h}: {metrics}");
        assert!(metrics.contains(&format!("{h}_bucket{{le=\"+Inf\"}} {}", count(h))), "{h}: {metrics}");
    }
    let history_bytes: u64 =
        metrics.lines().find_map(|l| l.strip_prefix("lookout_history_bytes ")).and_then(|v| v.parse().ok()).unwrap();
    assert!(history_bytes > 0);

    // Deleting it ends its viewers with a typed reason and removes its history.
    let thumb = format!("http://{base}{}", e.thumbnail.as_ref().unwrap());
    let (s, _) = http("DELETE", format!("{url}/{id}"), None).await;
    assert_eq!(s, 204);
    for ws in &mut viewers {
        loop {
            if let ServerMessage::Ended { reason, .. } = recv(ws).await {
                assert_eq!(reason, EndReason::Deleted);
                break;
            }
        }
    }
    assert_eq!(http("GET", format!("{url}/{id}"), None).await.0, 404);
    assert_eq!(http("GET", format!("{url}/{id}/events"), None).await.0, 404);
    assert_eq!(bytes(thumb).await.0, 404);
    assert_eq!(http("DELETE", format!("{url}/{id}"), None).await.0, 404);
    drop(stalled);
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

fn urlencode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtsp_monitor_runs_without_a_viewer_and_never_shows_its_password() {
    let rtsp = RtspServer::start(free_port(), Some("viewer:s3cr3t"));
    let server = start_server(|_| {}).await;
    let base = server.base.clone();
    let source = json!({"kind": "rtsp", "url": format!("rtsp://viewer:s3cr3t@127.0.0.1:{}/h264", rtsp.port)});
    let (s, v) = http("POST", format!("http://{base}/v1/monitors"), Some(monitor_body("cam", source, "Anyone?"))).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(!v.to_string().contains("s3cr3t"), "{v}");
    assert!(v["source"]["url"].as_str().unwrap().contains("viewer:***@"), "{v}");
    let evs = wait_events(&base, &id, 2).await;
    assert!(evs.iter().all(|e| e.end_s > e.start_s));
    let m = get_monitor(&base, &id).await;
    assert_eq!(m.state, WatchState::Running);
    let (_, list) = http("GET", format!("http://{base}/v1/monitors"), None).await;
    let (_, watches) = http("GET", format!("http://{base}/v1/watches"), None).await;
    for body in [list, watches] {
        assert!(!body.to_string().contains("s3cr3t"), "{body}");
    }
    // Its live thumbnail.
    let (s, jpeg) = bytes(format!("http://{base}/v1/monitors/{id}/frame.jpg")).await;
    assert_eq!(s, 200);
    assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_events_and_their_thumbnails_in_the_background() {
    let data = std::env::temp_dir().join(format!("lookout-retention-{}-{}", std::process::id(), rand_suffix()));
    let dir = data.clone();
    let server = start_server(move |c| {
        c.data_dir = dir;
        c.retention_every = Duration::from_millis(300);
    })
    .await;
    let base = server.base.clone();
    let upload = upload_fixture(&base).await;
    let mut body = monitor_body("keep three", json!({"kind": "upload", "id": upload, "loop": true, "speed": 4.0}), "p");
    body["retention"] = json!({"max_events": 3});
    let (s, v) = http("POST", format!("http://{base}/v1/monitors"), Some(body)).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["retention"]["max_events"], 3);
    // Wait until the monitor has made more than 3 events in all, then for a pass.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let newest = events(&base, &id, "limit=1").await.events.first().map_or(0, |e| e.id);
        let oldest = events(&base, &id, "limit=500").await.events.last().map_or(0, |e| e.id);
        if newest - oldest >= 1 && newest >= 6 {
            break;
        }
        assert!(Instant::now() < deadline, "too few events");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept = events(&base, &id, "limit=500").await.events.len();
        let files = std::fs::read_dir(data.join("thumbnails").join(&id)).map_or(0, |r| r.count());
        // At most one event may arrive between a pass and this check.
        if kept <= 4 && files <= 4 {
            assert!(kept >= 1);
            break;
        }
        assert!(Instant::now() < deadline, "{kept} events and {files} thumbnails are kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real binary, serving on a free port with `data` as its data directory.
struct Binary {
    child: Child,
    base: String,
}

impl Binary {
    fn start(data: &Path) -> Binary {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lookout"));
        cmd.args(["serve", "--port", &port.to_string(), "--max-sessions", "4"])
            .arg("--model")
            .arg(root().join("fixtures/models/tiny-tied"))
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn");
        let child = common::process::spawn_listening(cmd, None);
        Binary { child, base: format!("127.0.0.1:{port}") }
    }

    /// SIGTERM, then wait for the exit.
    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }

    /// SIGKILL: no chance to flush anything.
    fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, h) = http("GET", format!("http://{base}/v1/health"), None).await;
        if h["status"] == "ready" {
            return;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_resume_after_a_graceful_restart_and_after_kill_9_with_their_history() {
    let data: PathBuf = std::env::temp_dir().join(format!("lookout-restart-{}-{}", std::process::id(), rand_suffix()));
    let server = Binary::start(&data);
    wait_ready(&server.base).await;
    let upload = upload_fixture(&server.base).await;
    let source = json!({"kind": "upload", "id": upload, "loop": true, "speed": 4.0});
    let (s, v) =
        http("POST", format!("http://{}/v1/monitors", server.base), Some(monitor_body("a", source.clone(), "p"))).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let mut paused = monitor_body("b", source, "p");
    paused["enabled"] = json!(false);
    let (s, v) = http("POST", format!("http://{}/v1/monitors", server.base), Some(paused)).await;
    assert_eq!(s, 201, "{v}");
    let paused_id = v["id"].as_str().unwrap().to_owned();
    let before = wait_events(&server.base, &id, 3).await;

    // Graceful: SIGTERM, start again on the same data.
    server.stop();
    let server = Binary::start(&data);
    wait_ready(&server.base).await;
    let kept = events(&server.base, &id, "limit=500").await.events;
    assert!(before.iter().all(|b| kept.iter().any(|k| k == b)), "history lost across a graceful restart");
    let after = wait_events(&server.base, &id, kept.len() + 2).await;
    assert!(after[0].id > before[0].id, "the monitor did not resume");
    assert_eq!(get_monitor(&server.base, &paused_id).await.state, WatchState::Paused);

    // kill -9 while it writes: at most the window in flight is lost, the database opens, and
    // the monitor resumes.
    let before = events(&server.base, &id, "limit=500").await.events;
    server.kill_9();
    let server = Binary::start(&data);
    wait_ready(&server.base).await;
    let kept = events(&server.base, &id, "limit=500").await.events;
    assert!(before.iter().all(|b| kept.iter().any(|k| k.id == b.id && k.text == b.text)), "committed events lost");
    wait_events(&server.base, &id, kept.len() + 2).await;
    let m = get_monitor(&server.base, &id).await;
    assert_eq!(m.state, WatchState::Running);
    server.stop();
    let _ = std::fs::remove_dir_all(&data);
}
