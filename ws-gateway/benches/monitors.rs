//! Monitors at scale, measured in one run (see `benches/monitors.sh`):
//!
//! 1. `live URL SECONDS N`: a running `lookout serve` (its address and pid in `LOOKOUT_BASE`
//!    and `LOOKOUT_PID`) gets N monitors on the RTSP stream at URL; for SECONDS the bench samples
//!    the server's CPU and memory (from /proc) and the monitors' counters, then prints CPU and
//!    memory per monitor, windows analysed and skipped per minute, and the history writer's
//!    mean queue-to-stored time.
//! 2. `history EVENTS`: a store in a temporary directory gets EVENTS events one at a time
//!    (insert latency p50/p99), then plain and full-text queries over them (p50/p99).
#![allow(missing_docs, clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use protocol::{GenerationSettings, Retention, Source, Timings, Usage, WindowSettings};
use ws_gateway::store::{EventQuery, MonitorRow, NewEvent, Store, now_ms};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds (user + system) and resident bytes of a process.
fn proc_stat(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu / ticks, rss_kb * 1024)
}

fn get(url: &str) -> serde_json::Value {
    ureq::get(url).call().map(|r| r.into_json().unwrap_or_default()).unwrap_or_default()
}

/// Sum of every monitor's windows, skipped windows and events.
fn counters(base: &str) -> (u64, u64, u64) {
    let list = get(&format!("http://{base}/v1/monitors"));
    let mut t = (0, 0, 0);
    for m in list["monitors"].as_array().into_iter().flatten() {
        t.0 += m["counters"]["windows"].as_u64().unwrap_or(0);
        t.1 += m["counters"]["skipped"].as_u64().unwrap_or(0);
        t.2 += m["counters"]["events"].as_u64().unwrap_or(0);
    }
    t
}

fn metric(base: &str, name: &str) -> f64 {
    let text =
        ureq::get(&format!("http://{base}/metrics")).call().ok().and_then(|r| r.into_string().ok()).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn live(url: &str, seconds: u64, n: usize) {
    let base = std::env::var("LOOKOUT_BASE").expect("LOOKOUT_BASE=host:port of the server");
    let pid: u32 = std::env::var("LOOKOUT_PID").expect("LOOKOUT_PID").parse().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (_, rss_before) = proc_stat(pid);
    for i in 0..n {
        let body = serde_json::json!({
            "name": format!("camera {i:02}"),
            "source": {"kind": "rtsp", "url": url},
            "prompt": "Is anyone at the door? Answer briefly.",
            "window": {"seconds": 4, "fps": 2, "min_pixels": 4096, "max_pixels": 65536},
            "generation": {"max_tokens": 8, "temperature": 0},
        });
        let r = ureq::post(&format!("http://{base}/v1/monitors")).send_json(body);
        if let Err(e) = r {
            panic!("creating monitor {i}: {e}");
        }
    }
    // Let every monitor connect and its first window go through.
    std::thread::sleep(Duration::from_secs(10));
    let (cpu0, _) = proc_stat(pid);
    let c0 = counters(&base);
    let w0 = metric(&base, "lookout_history_events_written_total");
    let r0 = metric(&base, "lookout_windows_refused_total");
    let l0 = metric(&base, "lookout_history_insert_microseconds_total");
    let t0 = Instant::now();
    let mut rss_peak = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        rss_peak = rss_peak.max(proc_stat(pid).1);
    }
    let dt = t0.elapsed().as_secs_f64();
    let (cpu1, rss_after) = proc_stat(pid);
    let c1 = counters(&base);
    let written = metric(&base, "lookout_history_events_written_total") - w0;
    let refused = metric(&base, "lookout_windows_refused_total") - r0;
    let latency = metric(&base, "lookout_history_insert_microseconds_total") - l0;
    let cores = 100.0 * (cpu1 - cpu0) / dt;
    let per_min = |a: u64, b: u64| (b - a) as f64 * 60.0 / dt;
    let running = get(&format!("http://{base}/v1/monitors"))["monitors"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|m| m["state"] == "running").count());
    println!("monitors: {n} on {url} ({running} running after {seconds} s), {dt:.0} s measured");
    println!("server CPU: {cores:.0} % of one core in all, {:.1} % per monitor", cores / n as f64);
    println!(
        "server memory: {:.0} MiB before the monitors, {:.0} MiB with them (peak {:.0}): {:.1} MiB per monitor",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        rss_peak as f64 / 1048576.0,
        (rss_after.saturating_sub(rss_before)) as f64 / 1048576.0 / n as f64
    );
    println!(
        "windows per minute: {:.0} analysed, {:.0} skipped (the model fell behind; the newest wins), {:.0} refused, {:.0} events stored",
        per_min(c0.0, c1.0),
        per_min(c0.1, c1.1),
        refused * 60.0 / dt,
        per_min(c0.2, c1.2)
    );
    if written > 0.0 {
        println!(
            "history: {written:.0} events stored, mean {:.1} ms from a window's end to its row",
            latency / written / 1000.0
        );
    }
}

/// A synthetic answer: words from a 2000-word vocabulary, skewed like language, with a known
/// phrase in 1 % of them.
fn answer(i: u64) -> String {
    let mut x = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut words = Vec::new();
    for _ in 0..12 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51afd7ed558ccd);
        let r = (x >> 11) as f64 / (1u64 << 53) as f64;
        words.push(format!("w{}", (2000.0 * r * r * r) as u64));
    }
    if i % 100 == 7 {
        words.push("a person at the door".into());
    }
    words.join(" ")
}

fn history(n: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("lookout-history-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).await.unwrap();
        let m = MonitorRow {
            id: "m1".into(),
            name: "bench".into(),
            source: Source::Rtsp { url: "rtsp://cam/x".into(), transport: None },
            prompt: "p".into(),
            window: WindowSettings::default(),
            generation: GenerationSettings::default(),
            enabled: true,
            retention: Retention::default(),
            alert: None,
            created_ms: now_ms(),
            updated_ms: now_ms(),
        };
        store.create_monitor(&m).await.unwrap();
        let thumb = vec![0u8; 12_000]; // about a 448x252 JPEG
        let start_ms = now_ms() - n as i64 * 4000;
        let mut lat = Vec::with_capacity(n as usize);
        let t = Instant::now();
        for i in 0..n {
            let e = NewEvent {
                monitor: "m1".into(),
                window: i,
                start_s: i as f64 * 4.0,
                end_s: i as f64 * 4.0 + 3.5,
                started_ms: start_ms + i as i64 * 4000,
                prompt: "Is anyone at the door?".into(),
                text: answer(i),
                finish_reason: "stop".into(),
                usage: Usage { prompt_tokens: 300, completion_tokens: 12, total_tokens: 312 },
                timings: Timings::default(),
            };
            // A thumbnail with one event in 50 keeps the bench's disk use small; the file write is
            // measured all the same.
            let th = (i % 50 == 0).then_some(thumb.as_slice());
            let s = Instant::now();
            store.insert_event(&e, th).await.unwrap();
            lat.push(s.elapsed().as_secs_f64() * 1000.0);
        }
        let total = t.elapsed().as_secs_f64();
        println!(
            "history insert ({n} events, one at a time): p50 {:.2} ms, p99 {:.2} ms, {:.0} events/s",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            n as f64 / total
        );
        let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()) as f64 / 1048576.0;
        println!(
            "  before a checkpoint: database {:.1} MiB, write-ahead log {:.1} MiB",
            size("lookout.db"),
            size("lookout.db-wal")
        );
        let busy = store.checkpoint().await.unwrap();
        println!("  checkpoint busy: {busy}");
        let bytes = store.disk_bytes().await.unwrap();
        let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()) as f64 / 1048576.0;
        println!("  database {:.1} MiB, write-ahead log {:.1} MiB", size("lookout.db"), size("lookout.db-wal"));
        println!(
            "history on disk: {:.1} MiB ({:.0} bytes per event)",
            bytes as f64 / 1048576.0,
            bytes as f64 / n as f64
        );
        let cases: [(&str, EventQuery); 5] = [
            ("newest page (plain)", EventQuery { monitor: "m1".into(), limit: 50, ..Default::default() }),
            (
                "a page deep in the history (before=)",
                EventQuery { monitor: "m1".into(), limit: 50, before_id: Some(n as i64 / 2), ..Default::default() },
            ),
            (
                "one hour (since/until)",
                EventQuery {
                    monitor: "m1".into(),
                    limit: 50,
                    since_ms: Some(start_ms + (n as i64 / 2) * 4000),
                    until_ms: Some(start_ms + (n as i64 / 2) * 4000 + 3_600_000),
                    ..Default::default()
                },
            ),
            (
                "q= a rare phrase (1 % of events)",
                EventQuery { monitor: "m1".into(), limit: 50, text: Some("person door".into()), ..Default::default() },
            ),
            (
                "q= a common word",
                EventQuery { monitor: "m1".into(), limit: 50, text: Some("w0".into()), ..Default::default() },
            ),
        ];
        for (name, q) in cases {
            let mut lat = Vec::new();
            let mut rows = 0;
            for _ in 0..100 {
                let s = Instant::now();
                rows = store.events(&q).await.unwrap().len();
                lat.push(s.elapsed().as_secs_f64() * 1000.0);
            }
            println!(
                "query {name}: p50 {:.2} ms, p99 {:.2} ms ({rows} rows)",
                percentile(&mut lat, 0.5),
                percentile(&mut lat, 0.99)
            );
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    match args.first().map(String::as_str) {
        Some("live") if args.len() == 4 => live(&args[1], args[2].parse().unwrap(), args[3].parse().unwrap()),
        Some("history") => history(args.get(1).and_then(|v| v.parse().ok()).unwrap_or(100_000)),
        _ => {
            panic!("usage: monitors live RTSP_URL SECONDS N | monitors history [EVENTS]");
        }
    }
}
