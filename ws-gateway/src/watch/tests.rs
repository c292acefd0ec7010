//! The pipeline without sockets, ffmpeg or a model: synthetic sources, a fake analyzer, and a
//! paused tokio clock where the logic allows.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::{EndReason, ServerMessage, Source, WindowSettings};

use super::fake::{FakeAnalyzer, SyntheticSources};
use super::*;

/// A watch of synthetic source `id` replayed at `speed`, in windows of `window_s` at `fps`.
fn spec_at(id: &str, speed: f64, window_s: f64, fps: f64) -> WatchSpec {
    let source = Source::Upload { id: id.into(), speed: Some(speed), looped: None };
    let window = WindowSettings {
        seconds: Some(window_s),
        stride_seconds: Some(window_s),
        fps: Some(fps),
        min_pixels: Some(4096),
        max_pixels: Some(4096),
    };
    let generation = crate::server::generation(&Default::default(), 8);
    WatchSpec::new(source, "What happens?".into(), &window, generation).unwrap()
}

/// The same at stream speed (for a paused clock).
fn spec(id: &str, window_s: f64, fps: f64) -> WatchSpec {
    spec_at(id, 1.0, window_s, fps)
}

fn registry(options: WatchOptions) -> (Watches, Arc<SyntheticSources>) {
    let sources = Arc::new(SyntheticSources::default());
    (Watches::new(sources.clone(), options), sources)
}

fn client_closed() -> Stop {
    Stop::new(EndReason::ClientClosed, "the owner left")
}

/// Every event until `ended` (inclusive).
async fn all(sub: &mut Subscription) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    while let Some(m) = sub.next().await {
        let end = matches!(*m, ServerMessage::Ended { .. });
        out.push((*m).clone());
        if end {
            break;
        }
    }
    out
}

/// The windows' (start, end, frames) and each window's streamed text.
fn windows(events: &[ServerMessage]) -> Vec<(f64, f64, usize, String)> {
    let mut out: Vec<(f64, f64, usize, String)> = Vec::new();
    for e in events {
        match e {
            ServerMessage::Window { start_s, end_s, frames, .. } => {
                out.push((*start_s, *end_s, *frames, String::new()))
            }
            ServerMessage::Token { text, .. } => out.last_mut().unwrap().3.push_str(text),
            _ => {}
        }
    }
    out
}

fn ended(events: &[ServerMessage]) -> (EndReason, String) {
    match events.last() {
        Some(ServerMessage::Ended { reason, message }) => (*reason, message.clone()),
        other => panic!("the last event is not ended: {other:?}"),
    }
}

// Window accounting runs in real time: the window thread is a plain thread, and a paused clock
// that jumps ahead while it works would let windows replace each other.
#[tokio::test]
async fn three_clients_watching_one_source_get_the_same_windows_and_tokens() {
    let (watches, sources) = registry(WatchOptions::default());
    let analyzer = FakeAnalyzer::new(5, Duration::from_millis(5));
    let (owner, mut first) = watches.start(spec_at("clip:10:2", 20.0, 2.0, 2.0), analyzer, client_closed(), None);
    let id = owner.shared().id.clone();
    let mut second = watches.get(&id).unwrap().hub.subscribe();
    let mut third = watches.get(&id).unwrap().hub.subscribe();
    assert_eq!(watches.list()[0].subscribers, 3);
    let (a, b, c) = tokio::join!(all(&mut first), all(&mut second), all(&mut third));
    assert_eq!(a, b);
    assert_eq!(a, c);
    let w = windows(&a);
    // 10 frames at 2 fps: two full windows of 4 frames, then the last 2 at the end of the clip.
    let frames: Vec<usize> = w.iter().map(|w| w.2).collect();
    assert_eq!(frames, [4, 4, 2]);
    assert!(w.iter().all(|w| w.3 == "t0 t1 t2 t3 t4 "), "{w:?}");
    assert!(matches!(&a[0], ServerMessage::Ready { session, .. } if *session == id));
    assert_eq!(ended(&a).0, EndReason::EndOfStream);
    drop(owner);
    // The watch leaves the registry, and its source task was joined before `ended`.
    tokio::task::yield_now().await;
    assert_eq!(sources.running.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_that_never_reads_is_told_it_lagged_and_the_others_keep_their_pace() {
    let (watches, _) = registry(WatchOptions::default());
    // Long answers: far more events than a subscriber's bound.
    let analyzer = FakeAnalyzer::new(400, Duration::from_micros(500));
    let (owner, mut reader) = watches.start(spec_at("clip:8:2", 20.0, 2.0, 2.0), analyzer, client_closed(), None);
    let mut stalled = watches.get(&owner.shared().id).unwrap().hub.subscribe();
    let events = all(&mut reader).await;
    // The reader missed nothing: every token of both windows.
    let w = windows(&events);
    assert_eq!(w.len(), 2);
    assert!(w.iter().all(|w| w.3.split_whitespace().count() == 400));
    assert!(!events.iter().any(|e| matches!(e, ServerMessage::Lagged { .. })));
    // The stalled one, reading only now, is told how much it missed and goes on from the newest.
    let late = all(&mut stalled).await;
    let ServerMessage::Lagged { missed } = late[0] else { panic!("{:?}", late[0]) };
    assert!(missed > 400, "{missed}");
    assert!(matches!(late.last(), Some(ServerMessage::Ended { reason: EndReason::EndOfStream, .. })));
}

#[tokio::test]
async fn clips_shorter_than_a_window_and_clip_ends_are_analysed() {
    let (watches, _) = registry(WatchOptions::default());
    let analyzer = FakeAnalyzer::new(2, Duration::from_millis(1));
    // A 3 s clip with 4 s windows: one window of its 6 frames.
    let (_owner, mut sub) = watches.start(spec_at("clip:6:2", 20.0, 4.0, 2.0), analyzer.clone(), client_closed(), None);
    let events = all(&mut sub).await;
    let w = windows(&events);
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].0, w[0].1, w[0].2), (0.0, 2.5, 6));
    assert!(events.iter().any(|e| matches!(e, ServerMessage::WindowDone { .. })));
    // A 10 s clip with 4 s windows: windows over 0-4, 4-8 and 8-10 s.
    let (_owner, mut sub) =
        watches.start(spec_at("clip:20:2", 20.0, 4.0, 2.0), analyzer.clone(), client_closed(), None);
    let w = windows(&all(&mut sub).await);
    let spans: Vec<(f64, f64, usize)> = w.iter().map(|w| (w.0, w.1, w.2)).collect();
    assert_eq!(spans, [(0.0, 3.5, 8), (4.0, 7.5, 8), (8.0, 9.5, 4)]);
    // One sampled frame: nothing to analyse, and `ended` says why.
    let (_owner, mut sub) = watches.start(spec_at("clip:1:2", 20.0, 4.0, 2.0), analyzer, client_closed(), None);
    let events = all(&mut sub).await;
    assert!(windows(&events).is_empty());
    let (reason, message) = ended(&events);
    assert_eq!(reason, EndReason::EndOfStream);
    assert!(message.contains("nothing was analysed") && message.contains("1 sampled frame"), "{message}");
}

#[tokio::test]
async fn a_new_prompt_applies_from_the_next_window() {
    let (watches, _) = registry(WatchOptions::default());
    let analyzer = FakeAnalyzer::new(3, Duration::from_millis(20));
    let (owner, mut sub) = watches.start(spec_at("clip:12:2", 10.0, 2.0, 2.0), analyzer.clone(), client_closed(), None);
    // Change the prompt while the first window is being answered.
    loop {
        if let ServerMessage::Token { .. } = *sub.next().await.unwrap() {
            break;
        }
    }
    owner.shared().set_prompt("Count the cars.".into());
    all(&mut sub).await;
    let prompts = analyzer.prompts.lock().unwrap().clone();
    assert_eq!(prompts, ["What happens?", "Count the cars.", "Count the cars."]);
}

#[tokio::test(start_paused = true)]
async fn stopping_ends_the_watch_at_once_and_joins_its_stages() {
    let (watches, sources) = registry(WatchOptions::default());
    let analyzer = FakeAnalyzer::new(1000, Duration::from_millis(100));
    let (owner, mut sub) = watches.start(spec("live:100000:10", 2.0, 2.0), analyzer, client_closed(), None);
    loop {
        if let ServerMessage::Token { .. } = *sub.next().await.unwrap() {
            break;
        }
    }
    assert_eq!(sources.running.load(Ordering::SeqCst), 1);
    owner.stop(Stop::new(EndReason::Stopped, "stopped by the client"));
    let events = all(&mut sub).await;
    assert_eq!(ended(&events), (EndReason::Stopped, "stopped by the client".into()));
    // Every stage exited before `ended` was published.
    assert_eq!(sources.running.load(Ordering::SeqCst), 0);
    drop(owner);
    tokio::task::yield_now().await;
    assert!(watches.list().is_empty());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_owner_ends_the_watch_for_its_subscribers() {
    let (watches, _) = registry(WatchOptions::default());
    let analyzer = FakeAnalyzer::new(1000, Duration::from_millis(100));
    let (owner, _own) = watches.start(spec("live:100000:10", 2.0, 2.0), analyzer, client_closed(), None);
    let mut viewer = watches.get(&owner.shared().id).unwrap().hub.subscribe();
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(owner);
    let events = all(&mut viewer).await;
    assert_eq!(ended(&events), (EndReason::ClientClosed, "the owner left".into()));
}

#[tokio::test(start_paused = true)]
async fn live_sources_say_their_size_with_the_first_frame_or_time_out() {
    let options = WatchOptions { first_frame_timeout: Duration::from_secs(20), ..Default::default() };
    let (watches, _) = registry(options);
    let analyzer = FakeAnalyzer::new(1, Duration::from_millis(1));
    let (_o, mut sub) = watches.start(spec("live:4:2", 2.0, 2.0), analyzer.clone(), client_closed(), None);
    match &*sub.next().await.unwrap() {
        ServerMessage::Ready { source, .. } => assert_eq!((source.width, source.codec.as_str()), (64, "synthetic")),
        other => panic!("{other:?}"),
    }
    let started = tokio::time::Instant::now();
    let (_o, mut sub) = watches.start(spec("silent", 2.0, 2.0), analyzer.clone(), client_closed(), None);
    let events = all(&mut sub).await;
    assert!(started.elapsed() >= Duration::from_secs(20));
    assert!(
        matches!(&events[0], ServerMessage::Error { fatal: true, message, .. } if message.contains("no video arrived"))
    );
    assert_eq!(ended(&events).0, EndReason::SourceFailed);
    let (_o, mut sub) = watches.start(spec("fail", 2.0, 2.0), analyzer, client_closed(), None);
    let events = all(&mut sub).await;
    assert!(matches!(&events[0], ServerMessage::Error { fatal: true, .. }));
    assert_eq!(ended(&events).0, EndReason::SourceFailed);
}

#[tokio::test(start_paused = true)]
async fn status_reports_the_ingest_rate_and_shutdown_stops_every_watch() {
    let (watches, sources) = registry(WatchOptions::default());
    let analyzer = FakeAnalyzer::new(2, Duration::from_millis(10));
    let (_a, mut sub) = watches.start(spec("live:100000:10", 2.0, 2.0), analyzer.clone(), client_closed(), None);
    let (_b, _) = watches.start(spec("live:100000:10", 2.0, 2.0), analyzer, client_closed(), None);
    let mut rates = Vec::new();
    while rates.len() < 3 {
        if let ServerMessage::Status { ingest_fps, .. } = *sub.next().await.unwrap() {
            rates.push(ingest_fps);
        }
    }
    // 10 frames/s arrive (the first report covers the first quarter second only).
    assert!(rates[1..].iter().all(|r| (r - 10.0).abs() < 1.5), "{rates:?}");
    watches.shutdown().await;
    let events = all(&mut sub).await;
    assert_eq!(ended(&events).0, EndReason::Shutdown);
    assert_eq!(sources.running.load(Ordering::SeqCst), 0);
}

#[test]
fn bad_window_settings_are_refused_before_anything_runs() {
    let w = WindowSettings { fps: Some(-1.0), ..Default::default() };
    let e = WatchSpec::new(
        Source::Upload { id: "x".into(), speed: None, looped: None },
        "p".into(),
        &w,
        spec("x", 1.0, 1.0).generation,
    )
    .unwrap_err();
    assert!(e.contains("window.fps"), "{e}");
}

#[tokio::test]
async fn a_window_waiting_for_the_engine_is_replaced_by_a_newer_one_never_refused() {
    let (watches, _) = registry(WatchOptions::default());
    // One place; each answer takes longer than two windows of the stream.
    let analyzer = FakeAnalyzer::with_queue(4, Duration::from_millis(60), 1);
    let (_o, mut sub) = watches.start(spec_at("clip:40:2", 20.0, 1.0, 2.0), analyzer, client_closed(), None);
    let events = all(&mut sub).await;
    assert!(!events.iter().any(|e| matches!(e, ServerMessage::Error { .. })), "a window was refused: {events:?}");
    let skipped: u64 = events
        .iter()
        .filter_map(|e| if let ServerMessage::Skipped { windows, .. } = e { Some(*windows) } else { None })
        .sum();
    let analysed: Vec<u64> =
        events.iter().filter_map(|e| if let ServerMessage::Window { id, .. } = e { Some(*id) } else { None }).collect();
    assert!(skipped > 0, "{events:?}");
    // 20 windows were cut: each was analysed or skipped, and the analysed ones go forward.
    assert_eq!(analysed.len() as u64 + skipped, 20, "{analysed:?} + {skipped}");
    assert!(analysed.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(analysed.last(), Some(&19), "the newest window wins");
}

#[tokio::test]
async fn watches_sharing_a_busy_engine_each_get_their_share() {
    let (watches, _) = registry(WatchOptions::default());
    // One place for six live streams whose windows all come due together.
    let analyzer = FakeAnalyzer::with_queue(3, Duration::from_millis(20), 1);
    let mut subs = Vec::new();
    let mut owners = Vec::new();
    for _ in 0..6 {
        let (o, s) = watches.start(spec_at("live:100000:10", 5.0, 1.0, 2.0), analyzer.clone(), client_closed(), None);
        owners.push(o);
        subs.push(s);
    }
    let done = Arc::new(std::sync::Mutex::new(vec![0usize; 6]));
    let mut tasks = Vec::new();
    for (i, mut s) in subs.into_iter().enumerate() {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(m) = s.next().await {
                match &*m {
                    ServerMessage::WindowDone { .. } => done.lock().unwrap()[i] += 1,
                    ServerMessage::Error { message, .. } => panic!("watch {i}: {message}"),
                    _ => {}
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = done.lock().unwrap().clone();
    // First come, first served: nobody starves, and nobody gets less than half the best share
    // (the watches start a little apart, and the clock is real, so shares differ by a few).
    let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
    assert!(min >= 3, "{counts:?}");
    assert!(2 * min >= max, "{counts:?}");
    drop(owners);
    for t in tasks {
        t.await.unwrap();
    }
}

/// Chaos: the engine dies in the middle of a window's answer (its channel closes without an
/// end). The window ends with a non-fatal model error, the watch goes on with the next window,
/// and the failure is counted.
#[tokio::test]
async fn an_engine_that_dies_mid_window_ends_that_window_with_an_error_and_the_watch_goes_on() {
    let (watches, _) = registry(WatchOptions::default());
    let analyzer = FakeAnalyzer::scripted(&["all quiet ", "half an !crash ", "quiet again "], Duration::from_millis(1));
    // A 6 s clip in 2 s windows: three windows, the second one's answer dies after a token.
    let (_owner, mut sub) = watches.start(spec_at("clip:12:2", 20.0, 2.0, 2.0), analyzer, client_closed(), None);
    let events = all(&mut sub).await;
    let mut per_window: Vec<(u64, String, bool, bool)> = Vec::new();
    for e in &events {
        match e {
            ServerMessage::Window { id, .. } => per_window.push((*id, String::new(), false, false)),
            ServerMessage::Token { text, .. } => per_window.last_mut().unwrap().1.push_str(text),
            ServerMessage::WindowDone { .. } => per_window.last_mut().unwrap().2 = true,
            ServerMessage::Error { code: protocol::ErrorCode::Model, fatal: false, message } => {
                assert!(message.contains("stopped answering"), "{message}");
                per_window.last_mut().unwrap().3 = true;
            }
            _ => {}
        }
    }
    let seen: Vec<(&str, bool, bool)> = per_window.iter().map(|w| (w.1.as_str(), w.2, w.3)).collect();
    assert_eq!(
        seen,
        [("all quiet ", true, false), ("half an ", false, true), ("quiet again ", true, false)],
        "{events:?}"
    );
    assert_eq!(ended(&events).0, EndReason::EndOfStream, "the watch went on to the clip's end");
    assert_eq!(watches.totals().refused.load(Ordering::Relaxed), 1);
}
