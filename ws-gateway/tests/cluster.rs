//! Several nodes with real parts: three `lookout serve` processes (the real binary, the fixture
//! model) sharing a real PostgreSQL (Debian's, started here in a temporary directory) and one
//! data directory; looped uploads as sources; `kill -9`, restarts, graceful shutdowns and a
//! database outage.
//!
//! "Never run by two nodes at once" is checked from the nodes' own logs: each node logs when a
//! monitor's task starts and when it has stopped (its watch's threads joined, its last windows
//! stored), and those intervals must never overlap across nodes for any monitor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{ClientMessage, EventPage, Health, Nodes, ServerMessage};
use serde_json::json;

mod common;
use common::postgres::Postgres;
use common::*;

/// Lease time of the test nodes, seconds.
const LEASE_S: f64 = 2.0;

/// One node: the real binary on a fixed port (its id is `127.0.0.1:PORT`), its log lines kept.
struct Node {
    child: Option<Child>,
    port: u16,
    base: String,
}

impl Node {
    fn start(url: &str, data: &Path, port: u16, log: Arc<Mutex<Vec<String>>>) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lookout"));
        cmd.args(["serve", "--port", &port.to_string(), "--database", url, "--lease-s", &LEASE_S.to_string()])
            .args(["--max-monitors", "4", "--max-sessions", "2"])
            .arg("--model")
            .arg(root().join("fixtures/models/tiny-tied"))
            .arg("--data-dir")
            .arg(data)
            .env("LOOKOUT_LOG", "warn,ws_gateway::monitors=info,ws_gateway::cluster=info");
        let child = common::process::spawn_listening(cmd, Some(log));
        Node { child: Some(child), port, base: format!("127.0.0.1:{port}") }
    }

    fn id(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no chance to hand anything back.
    fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_9();
    }
}

async fn get<T: serde::de::DeserializeOwned>(url: String) -> T {
    let (status, v) = http("GET", url, None).await;
    assert_eq!(status, 200, "{v}");
    serde_json::from_value(v).unwrap()
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

/// Polls `/v1/nodes` on `base` until `ok` holds (monitor → node), for at most `within`;
/// returns the assignment and when it first held.
async fn wait_nodes(
    base: &str,
    within: Duration,
    ok: impl Fn(&HashMap<String, String>, &Nodes) -> bool,
) -> (HashMap<String, String>, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let nodes: Nodes = get(format!("http://{base}/v1/nodes")).await;
        let at = Instant::now();
        let held: HashMap<String, String> =
            nodes.nodes.iter().flat_map(|n| n.monitors.iter().map(|m| (m.clone(), n.id.clone()))).collect();
        if ok(&held, &nodes) {
            return (held, at);
        }
        assert!(Instant::now() < deadline, "not as expected within {within:?}: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn event_ids(base: &str, id: &str) -> Vec<i64> {
    let page: EventPage = get(format!("http://{base}/v1/monitors/{id}/events?limit=500")).await;
    page.events.iter().map(|e| e.id).collect()
}

/// Waits until a monitor has more than `n` events (read through `base`).
async fn wait_more_events(base: &str, id: &str, n: usize) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids = event_ids(base, id).await;
        if ids.len() > n {
            return ids;
        }
        assert!(Instant::now() < deadline, "monitor {id}: still {} events after 60 s", ids.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The intervals each monitor ran on each node, from the nodes' logs: monitor → [(start, end,
/// node)], in microseconds since the epoch; a run still open ends at `open_until` (or, for a
/// node killed at a known time, at that time).
/// A node's id, its log, and when it was killed.
type NodeLog = (String, Arc<Mutex<Vec<String>>>, Vec<i64>);

/// Monitor → runs (start µs, end µs, node).
type Runs = HashMap<String, Vec<(i64, i64, String)>>;

fn runs(logs: &[NodeLog], now_us: i64) -> Runs {
    let mut out = Runs::new();
    for (node, log, kills) in logs {
        let mut open: HashMap<String, i64> = HashMap::new();
        let lines = log.lock().unwrap().clone();
        let mut kills = kills.clone();
        kills.sort();
        let mut pending_kills = kills.into_iter().peekable();
        for line in lines {
            let Some(ts) = line.split_whitespace().next().and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
                continue;
            };
            let t = ts.as_microsecond();
            // A kill ends every run open before it.
            while pending_kills.peek().is_some_and(|k| *k <= t) {
                let k = pending_kills.next().unwrap();
                for (m, s) in open.drain() {
                    out.entry(m).or_default().push((s, k, node.clone()));
                }
            }
            let monitor = line.split("monitor=").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned);
            let Some(monitor) = monitor else { continue };
            if line.contains("monitor started on this node") {
                open.insert(monitor, t);
            } else if line.contains("monitor stopped on this node")
                && let Some(s) = open.remove(&monitor)
            {
                out.entry(monitor).or_default().push((s, t, node.clone()));
            }
        }
        let end = pending_kills.next().unwrap_or(now_us);
        for (m, s) in open {
            out.entry(m).or_default().push((s, end, node.clone()));
        }
    }
    out
}

fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_six_monitors_fail_over_rebalance_and_relay_subscriptions() {
    let pg = Postgres::start();
    let url = pg.database();
    let data: PathBuf = std::env::temp_dir().join(format!("lookout-cluster-{}-{}", std::process::id(), rand_suffix()));
    let ports = [free_port(), free_port(), free_port()];
    let logs: Vec<Arc<Mutex<Vec<String>>>> = (0..3).map(|_| Arc::default()).collect();
    let mut nodes: Vec<Node> = (0..3).map(|i| Node::start(&url, &data, ports[i], logs[i].clone())).collect();
    for n in &nodes {
        wait_ready(&n.base).await;
    }
    let (a, b) = (nodes[0].base.clone(), nodes[1].base.clone());
    let health: Health = get(format!("http://{a}/v1/health")).await;
    assert_eq!(health.node.as_deref(), Some(nodes[0].id().as_str()));

    // An upload through one node is a source for every node (the data directory is shared).
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (status, body) = upload(&a, clip, None).await;
    assert_eq!(status, 201, "{body}");
    let upload = body["id"].as_str().unwrap().to_owned();
    let mut monitors = Vec::new();
    for i in 0..6 {
        let body = json!({
            "name": format!("camera {i}"),
            "source": {"kind": "upload", "id": upload, "loop": true, "speed": 2.0},
            "prompt": "What happens?",
            "window": {"seconds": 1, "fps": 2, "min_pixels": 4096, "max_pixels": 16384},
            "generation": {"max_tokens": 4, "temperature": 0},
        });
        let (s, v) = http("POST", format!("http://{a}/v1/monitors"), Some(body)).await;
        assert_eq!(s, 201, "{v}");
        monitors.push(v["id"].as_str().unwrap().to_owned());
    }

    // Six monitors spread over three nodes: two each.
    let spread = |held: &HashMap<String, String>, n: &Nodes| {
        held.len() == 6 && n.nodes.len() == 3 && n.nodes.iter().all(|n| n.monitors.len() == 2)
    };
    let (held, _) = wait_nodes(&b, Duration::from_secs(30), spread).await;
    // Every one of them writes history, read through any node.
    let mut counts = HashMap::new();
    for m in &monitors {
        counts.insert(m.clone(), wait_more_events(&nodes[2].base, m, 0).await.len());
    }
    // Any node shows where each runs and how it goes.
    let (_, v) = http("GET", format!("http://{b}/v1/monitors/{}", monitors[0]), None).await;
    assert_eq!(v["node"], json!(held[&monitors[0]]), "{v}");
    common::openapi::conforms("Monitor", &v);
    let (_, v) = http("GET", format!("http://{b}/v1/nodes"), None).await;
    common::openapi::conforms("Nodes", &v);
    let (_, v) = http("GET", format!("http://{a}/v1/health"), None).await;
    common::openapi::conforms("Health", &v);

    // A subscription through a node that does not run the monitor receives its tokens.
    let on_a: Vec<String> = monitors.iter().filter(|m| held[*m] == nodes[0].id()).cloned().collect();
    let mut ws = connect(&b).await;
    send(&mut ws, &ClientMessage::Subscribe { watch: None, monitor: Some(on_a[0].clone()) }).await;
    match recv(&mut ws).await {
        ServerMessage::Subscribed { monitor, .. } => assert_eq!(monitor.as_deref(), Some(on_a[0].as_str())),
        other => panic!("expected subscribed, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no token relayed within 30 s");
        if let ServerMessage::Token { .. } = recv(&mut ws).await {
            break;
        }
    }

    // kill -9 the first node: its monitors resume elsewhere within twice the lease time, and
    // the relayed subscription is told the monitor went away.
    let killed_at = Instant::now();
    let killed_us = now_us();
    nodes[0].kill_9();
    let dead = nodes[0].id();
    let (after, moved) = wait_nodes(&b, Duration::from_secs(30), |held, n| {
        held.len() == 6 && n.nodes.iter().all(|n| n.id != dead) && held.values().all(|h| *h != dead)
    })
    .await;
    let takeover = moved - killed_at;
    println!("takeover after kill -9: {takeover:?} (lease {LEASE_S} s)");
    assert!(takeover <= Duration::from_secs_f64(2.0 * LEASE_S), "took {takeover:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "the relay never ended");
        if let ServerMessage::Ended { .. } = recv(&mut ws).await {
            break;
        }
    }
    // History is continuous: what was stored stays, and the moved monitors go on writing.
    for m in &on_a {
        let ids = wait_more_events(&b, m, counts[m]).await;
        assert!(ids.len() > counts[m]);
        println!("monitor {m}: {} → {} events, now on {}", counts[m], ids.len(), after[m]);
    }

    // The node comes back: load rebalances (two each again).
    nodes[0] = Node::start(&url, &data, ports[0], logs[0].clone());
    wait_ready(&nodes[0].base).await;
    wait_nodes(&b, Duration::from_secs(30), spread).await;

    // A graceful shutdown hands its monitors over at once (well within a lease).
    let leaving = nodes[1].id();
    let before: Vec<String> = wait_nodes(&a, Duration::from_secs(5), spread)
        .await
        .0
        .into_iter()
        .filter(|(_, n)| *n == leaving)
        .map(|(m, _)| m)
        .collect();
    let stopped_at = Instant::now();
    nodes[1].stop();
    let (_, moved) = wait_nodes(&nodes[2].base, Duration::from_secs(30), |held, _| {
        held.len() == 6 && held.values().all(|h| *h != leaving)
    })
    .await;
    println!("hand-over after SIGTERM: {:?} (from the signal; the exit included)", moved - stopped_at);
    assert!(moved - stopped_at < Duration::from_secs_f64(LEASE_S), "{:?}", moved - stopped_at);
    for m in &before {
        let n = event_ids(&nodes[2].base, m).await.len();
        wait_more_events(&nodes[2].base, m, n).await;
    }

    // Never two nodes at once, for any monitor, over the whole test.
    let all = runs(
        &[
            (nodes[0].id(), logs[0].clone(), vec![killed_us]),
            (nodes[1].id(), logs[1].clone(), vec![]),
            (nodes[2].id(), logs[2].clone(), vec![]),
        ],
        now_us(),
    );
    assert_eq!(all.len(), 6, "{all:?}");
    for (m, mut r) in all {
        r.sort();
        for w in r.windows(2) {
            assert!(w[1].0 >= w[0].1, "monitor {m} ran on {} and {} at once: {r:?}", w[0].2, w[1].2);
        }
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_the_database_stops_its_monitors_and_resumes_when_it_returns() {
    let pg = Postgres::start();
    let url = pg.database();
    let data: PathBuf = std::env::temp_dir().join(format!("lookout-outage-{}-{}", std::process::id(), rand_suffix()));
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let node = Node::start(&url, &data, free_port(), log.clone());
    let base = node.base.clone();
    wait_ready(&base).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (_, body) = upload(&base, clip, None).await;
    let body = json!({
        "name": "door",
        "source": {"kind": "upload", "id": body["id"], "loop": true, "speed": 2.0},
        "prompt": "What happens?",
        "window": {"seconds": 1, "fps": 2, "min_pixels": 4096, "max_pixels": 16384},
        "generation": {"max_tokens": 4, "temperature": 0},
    });
    let (s, v) = http("POST", format!("http://{base}/v1/monitors"), Some(body)).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let before = wait_more_events(&base, &id, 1).await.len();

    // The database goes away: within a lease the node stops the monitor (it could not record
    // it, and could not know whether another node took it), and says why.
    pg.stop();
    let lost = Instant::now();
    let deadline = lost + Duration::from_secs_f64(LEASE_S + 2.0);
    loop {
        let stopped = log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("monitor stopped on this node") && l.contains("lost the database"));
        if stopped {
            break;
        }
        assert!(Instant::now() < deadline, "the monitor kept running without the database: {:?}", log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("monitor stopped {:?} after the database went away (lease {LEASE_S} s)", lost.elapsed());
    assert!(lost.elapsed() < Duration::from_secs_f64(LEASE_S), "stopped only after the lease ran out");
    let health: Health = get(format!("http://{base}/v1/health")).await;
    assert!(health.database_error.as_deref().is_some_and(|e| e.contains("database")), "{health:?}");
    // The API says so clearly and can be retried.
    let (status, v) = http("GET", format!("http://{base}/v1/monitors"), None).await;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("database does not answer"), "{v}");

    // It comes back: the node claims the monitor again and its history goes on.
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health: Health = get(format!("http://{base}/v1/health")).await;
        if health.database_error.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "still {health:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = wait_more_events(&base, &id, before).await.len();
    assert!(after > before);
    drop(node);
    let _ = std::fs::remove_dir_all(&data);
}
