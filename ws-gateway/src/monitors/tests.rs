//! Monitor tasks with a real store, synthetic sources and a fake analyzer.

use std::sync::Arc;
use std::time::Duration;

use protocol::{EndReason, Retention, ServerMessage, Source, WatchState, WindowSettings};

use super::*;
use crate::watch::fake::{FakeAnalyzer, SyntheticSources};

struct Ready(Arc<FakeAnalyzer>);

impl Models for Ready {
    fn ready(&self) -> BoxFuture<'_, Result<Arc<dyn Analyzer>, String>> {
        let a: Arc<dyn Analyzer> = self.0.clone();
        Box::pin(async move { Ok(a) })
    }
}

async fn monitors() -> (Monitors, Arc<FakeAnalyzer>) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lookout-monitors-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).await.unwrap();
    let watches = Watches::new(Arc::new(SyntheticSources::default()), Default::default());
    let analyzer = FakeAnalyzer::new(2, Duration::from_millis(1));
    let options = MonitorOptions {
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        ..Default::default()
    };
    let alerts = crate::alerts::Alerts::start(store.clone(), Default::default());
    (Monitors::new(store, watches, Arc::new(Ready(analyzer.clone())), options, alerts), analyzer)
}

/// A monitor of synthetic source `source` (see `watch::fake`) in 1 s windows at 2 fps.
pub(crate) fn row(id: &str, source: &str) -> MonitorRow {
    MonitorRow {
        id: id.into(),
        name: id.into(),
        source: Source::Upload { id: source.into(), speed: Some(20.0), looped: None },
        prompt: "p".into(),
        window: WindowSettings {
            seconds: Some(1.0),
            fps: Some(2.0),
            min_pixels: Some(4096),
            max_pixels: Some(4096),
            ..Default::default()
        },
        generation: Default::default(),
        enabled: true,
        retention: Retention::default(),
        alert: None,
        created_ms: 0,
        updated_ms: 0,
    }
}

async fn until(m: &Monitors, id: &str, want: WatchState) {
    for _ in 0..500 {
        if m.status(id).is_some_and(|s| s.state().0 == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never got to {want:?}: {:?}", m.status(id).map(|s| s.state()));
}

#[tokio::test]
async fn windows_become_events_and_a_viewer_follows_across_a_restart() {
    let (m, analyzer) = monitors().await;
    m.create(row("m1", "live:100000:10")).await.unwrap();
    let (mut viewer, _) = m.subscribe("m1").unwrap();
    // Events are written with nobody asking.
    for _ in 0..500 {
        if m.store().count_events("m1").await.unwrap() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = m
        .store()
        .events(&crate::store::EventQuery { monitor: "m1".into(), limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert!(events.len() >= 2);
    assert!(events.iter().all(|e| e.thumbnail.is_some() && e.event.text == "t0 t1 "));
    // New window settings restart the watch; the viewer stays subscribed and sees the new one.
    let first_watch = m.status("m1").unwrap().watch_id().unwrap();
    let mut changed = row("m1", "live:100000:10");
    changed.window.seconds = Some(2.0);
    assert!(m.update(changed).await.unwrap());
    let mut saw_new_window = false;
    for _ in 0..2000 {
        match &*viewer.next().await.unwrap() {
            ServerMessage::Window { frames: 4, .. } => {
                saw_new_window = true;
                break;
            }
            ServerMessage::Ended { .. } => panic!("the viewer was ended by a restart"),
            _ => {}
        }
    }
    assert!(saw_new_window);
    assert_ne!(m.status("m1").unwrap().watch_id().unwrap(), first_watch);
    // A prompt change reaches the running watch without a restart.
    let watch = m.status("m1").unwrap().watch_id().unwrap();
    let mut prompted = row("m1", "live:100000:10");
    prompted.window.seconds = Some(2.0);
    prompted.prompt = "Count.".into();
    m.update(prompted).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.status("m1").unwrap().watch_id().unwrap(), watch);
    assert_eq!(analyzer.prompts.lock().unwrap().last().map(String::as_str), Some("Count."));
    // Deleting ends the viewer with its reason.
    assert!(m.delete("m1").await.unwrap());
    loop {
        if let ServerMessage::Ended { reason, .. } = &*viewer.next().await.unwrap() {
            assert_eq!(*reason, EndReason::Deleted);
            break;
        }
    }
    assert!(m.status("m1").is_none());
}

#[tokio::test]
async fn a_failing_source_is_retried_with_backoff_and_a_paused_monitor_waits() {
    let (m, _) = monitors().await;
    m.create(row("bad", "fail")).await.unwrap();
    until(&m, "bad", WatchState::Failed).await;
    let (mut viewer, status) = m.subscribe("bad").unwrap();
    // The viewer is told of each failure and the next try; it is never ended by one.
    let mut notes = 0;
    while notes < 3 {
        match &*viewer.next().await.unwrap() {
            ServerMessage::Error { fatal: false, message, .. } => {
                assert!(message.contains("trying again"), "{message}");
                notes += 1;
            }
            ServerMessage::Ended { .. } => panic!("ended"),
            _ => {}
        }
    }
    assert!(status.counters(0).failures >= 3);
    let mut paused = row("bad", "fail");
    paused.enabled = false;
    m.update(paused).await.unwrap();
    until(&m, "bad", WatchState::Paused).await;
    // A clip that ends: the monitor is ended (not retried) until it is changed.
    m.create(row("clip", "clip:4:2")).await.unwrap();
    until(&m, "clip", WatchState::Ended).await;
    m.shutdown().await;
}
