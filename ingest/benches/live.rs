//! Live ingest cost: pulls an RTSP camera with retina, decodes every frame with libav on the
//! feed's thread and converts the admitted ones to RGB, for a fixed time; prints frames/s decoded
//! and the CPU this process used (one core = 100 %). The RTSP server runs in its own process
//! (benches/live.sh starts GStreamer's), so its encoding is not counted.
//!
//! `cargo bench -p ingest --bench live -- URL SECONDS`
#![allow(clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest::live::{FeedOptions, LiveFeed, SourceEvent};
use ingest::ring::{FrameRing, Read, RingEnd};
use ingest::rtsp::{CameraUrl, RtspOptions};

/// CPU seconds (user + system) this process has used.
fn cpu_seconds(ticks_per_s: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (utime + stime) / ticks_per_s
}

fn run(url: &str, seconds: f64, convert_every: Option<f64>, ticks: f64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ring = FrameRing::new(64);
    let mut reader = ring.reader();
    let started = Arc::new(std::sync::Mutex::new(None));
    let s2 = started.clone();
    let events: ingest::live::EventSink = Arc::new(move |e| {
        if let SourceEvent::Started { width, height, codec, .. } = e {
            *s2.lock().unwrap() = Some(format!("{codec} {width}x{height}"));
        }
    });
    let mut next = 0.0f64;
    let admit: ingest::replay::Admit = Box::new(move |t| match convert_every {
        None => true,
        Some(step) => {
            let t = t.as_secs_f64();
            if t + 1e-6 >= next {
                next = t + step;
                true
            } else {
                false
            }
        }
    });
    let feed = LiveFeed::start(
        "bench",
        ring.clone(),
        admit,
        events,
        FeedOptions::default(),
        base::shutdown::Receiver::never(),
    )
    .unwrap();
    let camera = CameraUrl::parse(url).unwrap();
    rt.spawn(ingest::rtsp::run(
        camera,
        RtspOptions::default(),
        feed,
        Arc::new(|_| {}),
        base::shutdown::Receiver::never(),
    ));
    // Warm up: wait for the first frame, then measure.
    let consumer = std::thread::spawn(move || {
        let mut converted = 0u64;
        loop {
            match reader.next(Duration::from_millis(100)) {
                Read::Frame { .. } => converted += 1,
                Read::Timeout => {}
                Read::Closed(_) => return converted,
            }
        }
    });
    rt.block_on(async {
        while started.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (a0, c0, t0) = (ring.arrived(), cpu_seconds(ticks), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let (a1, c1, dt) = (ring.arrived(), cpu_seconds(ticks), t0.elapsed().as_secs_f64());
        let what = match convert_every {
            None => "every frame to RGB".to_owned(),
            Some(s) => format!("RGB at {:.0} fps", 1.0 / s),
        };
        println!(
            "{}: decoded {:.1} frames/s, CPU {:.1} % of one core ({what}; {} frames lost upstream)",
            started.lock().unwrap().clone().unwrap_or_default(),
            (a1 - a0) as f64 / dt,
            (c1 - c0) / dt * 100.0,
            ring.lost_upstream(),
        );
        ring.close(RingEnd::Stopped);
    });
    let _ = consumer.join();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let url = args.first().cloned().unwrap_or_else(|| "rtsp://127.0.0.1:8554/h264-720p".into());
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20.0);
    let ticks: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    // The service's default (windows sample 2 fps), then the worst case.
    run(&url, seconds, Some(0.5), ticks);
    run(&url, seconds, None, ticks);
}
