//! Alerts end to end inside the crate: monitor tasks with scripted answers, a real store, and a
//! real HTTP receiver on 127.0.0.1 for the webhooks.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use protocol::{AlertState, ServerMessage};
use serde_json::{Value, json};

use super::*;
use crate::monitors::{Models, MonitorOptions, Monitors};
use crate::store::MonitorRow;
use crate::watch::fake::{FakeAnalyzer, SyntheticSources};
use crate::watch::{Analyzer, Watches};

/// What a webhook receiver got: headers and body of each POST.
#[derive(Default)]
struct Received {
    posts: Mutex<Vec<(HeaderMap, String)>>,
    /// The status it answers with.
    status: AtomicU16,
}

async fn receiver() -> (String, Arc<Received>) {
    let got = Arc::new(Received { status: AtomicU16::new(200), ..Default::default() });
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let g = g.clone();
            async move {
                g.posts.lock().unwrap().push((headers, body));
                axum::http::StatusCode::from_u16(g.status.load(Ordering::SeqCst)).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

fn temp_dir() -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lookout-alerts-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn fast(allow_private: bool) -> AlertOptions {
    AlertOptions {
        attempts: 3,
        retry_initial: Duration::from_millis(30),
        retry_max: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        allow_private,
        mqtt: None,
    }
}

struct Ready(Arc<FakeAnalyzer>);

impl Models for Ready {
    fn ready(&self) -> futures_util::future::BoxFuture<'_, Result<Arc<dyn Analyzer>, String>> {
        let a: Arc<dyn Analyzer> = self.0.clone();
        Box::pin(async move { Ok(a) })
    }
}

fn monitor_row(id: &str, alert: Value) -> MonitorRow {
    let mut row = crate::monitors::tests::row(id, "live:100000:10");
    row.alert = Some(serde_json::from_value(alert).unwrap());
    row
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..1000 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn two_of_three_positive_windows_open_an_incident_that_two_negatives_close_notified_in_order() {
    let dir = temp_dir();
    let store = Store::open(&dir).await.unwrap();
    let (url, got) = receiver().await;
    let alerts = Alerts::start(store.clone(), fast(true));
    let script = ["a person waits ", "an empty street ", "a person waits ", "the person again ", "empty ", "empty "];
    let analyzer = FakeAnalyzer::scripted(&script, Duration::from_millis(5));
    let watches = Watches::new(Arc::new(SyntheticSources::default()), Default::default());
    let monitors = Monitors::new(store.clone(), watches, Arc::new(Ready(analyzer)), MonitorOptions::default(), alerts);
    let rule = json!({
        "when": {"matches": "(?i)\\bperson\\b"},
        "confirm": {"windows": 2, "of": 3},
        "clear_after": 2,
        "notify": [{"webhook": {"url": url, "secret": "s3cret"}}],
    });
    monitors.create(monitor_row("m1", rule)).await.unwrap();
    let (mut viewer, _) = monitors.subscribe("m1").unwrap();

    // The viewer sees the alert fire inside the third window, before that window ends.
    let mut seen: Vec<ServerMessage> = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), viewer.next()).await.unwrap().unwrap();
        let resolved = matches!(&*m, ServerMessage::Alert { state: AlertState::Resolved, .. });
        seen.push((*m).clone());
        if resolved {
            break;
        }
    }
    let dones: Vec<&str> = seen
        .iter()
        .filter_map(|m| match m {
            ServerMessage::WindowDone { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let firing = seen.iter().position(|m| matches!(m, ServerMessage::Alert { state: AlertState::Firing, .. })).unwrap();
    let ServerMessage::Alert { window: fired_in, ref text, .. } = seen[firing] else { unreachable!() };
    assert_eq!(text, "a person ", "decided on the partial answer, at the token that matched");
    let done_of_fired =
        seen.iter().position(|m| matches!(m, ServerMessage::WindowDone { window, .. } if *window == fired_in)).unwrap();
    assert!(firing < done_of_fired, "the alert came before its window ended");
    // Windows before firing: person, empty (1 of 2, then 2 of 3 at the third).
    assert_eq!(dones[..2], [script[0], script[1]]);

    let incidents = store.incidents(&crate::store::IncidentQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(incidents.len(), 1);
    let i = &incidents[0];
    assert!(i.closed_ms.is_some());
    let texts: Vec<&str> = i.windows.iter().map(|w| w.text.as_str()).collect();
    assert_eq!(texts, [script[2], script[3]], "the confirming window and the one after it, whole answers");
    assert!(i.windows.iter().all(|w| w.frame.is_some()), "each window has a key frame");
    let frame = std::fs::read(store.incident_file(i.windows[0].frame.as_ref().unwrap())).unwrap();
    assert_eq!(&frame[..2], [0xff, 0xd8], "a JPEG");

    // Opened (partial answer), updated (its whole answer), updated (the next window), resolved.
    let posts = wait_for("four webhooks", async || {
        let p = got.posts.lock().unwrap();
        (p.len() >= 4).then(|| p.clone())
    })
    .await;
    let events: Vec<String> = posts.iter().map(|(h, _)| h["x-lookout-event"].to_str().unwrap().to_owned()).collect();
    assert_eq!(events, ["incident.opened", "incident.updated", "incident.updated", "incident.resolved"]);
    for (h, body) in &posts {
        let sig = h["x-lookout-signature"].to_str().unwrap();
        assert_eq!(sig, crate::notify::outbox::signature("s3cret", body.as_bytes()), "signed with the secret");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["delivery"], h["x-lookout-delivery"].to_str().unwrap());
        assert_eq!(v["incident"]["id"], i.id);
        assert!(!body.contains("s3cret"), "the secret is never sent");
    }
    let bodies: Vec<Value> = posts.iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect();
    assert_eq!(bodies[0]["window"]["text"], "a person ");
    assert_eq!(bodies[1]["window"]["text"], script[2]);
    assert_eq!(bodies[3]["incident"]["state"], "closed");
    // The receiver has them; their rows are marked a moment later.
    let rows = wait_for("every delivery marked", async || {
        let rows = store.deliveries(None, 10).await.unwrap();
        rows.iter().all(|d| d.state == "delivered").then_some(rows)
    })
    .await;
    assert!(rows.iter().all(|d| d.attempts == 1), "{rows:?}");
    monitors.shutdown().await;
}

async fn queue_one(store: &Store, url: &str) -> String {
    let incident = IncidentRow {
        id: "i1".into(),
        monitor: "m".into(),
        opened_ms: 1,
        closed_ms: None,
        windows: vec![],
        clip: None,
    };
    let d = NewDelivery {
        id: "d1".into(),
        incident: "i1".into(),
        monitor: "m".into(),
        event: "incident.opened".into(),
        kind: "webhook".into(),
        url: url.into(),
        secret: Some("k".into()),
        body: "{\"delivery\":\"d1\"}".into(),
    };
    // Incidents refer to their monitor.
    let mut row = monitor_row("m", json!({"when": {"matches": "x"}}));
    row.name = format!("m-{}", crate::server::new_id());
    store.create_monitor(&row).await.unwrap();
    store.save_incident(&incident, &[d]).await.unwrap();
    "d1".into()
}

#[tokio::test]
async fn an_unreachable_webhook_is_retried_with_backoff_then_marked_failed() {
    let store = Store::open(&temp_dir()).await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    queue_one(&store, &format!("http://{closed}/hook")).await;
    let alerts = Alerts::start(store.clone(), fast(true));
    alerts.0.outbox.wake();
    let d = wait_for("the delivery to fail", async || {
        let d = store.deliveries(None, 1).await.unwrap().pop()?;
        (d.state == "failed").then_some(d)
    })
    .await;
    assert_eq!(d.attempts, 3);
    assert!(d.last_error.as_deref().unwrap().contains("cannot reach the receiver"), "{d:?}");
    assert_eq!(alerts.stats().failed.load(Ordering::Relaxed), 1);
    alerts.shutdown().await;
}

#[tokio::test]
async fn a_webhook_to_a_private_address_is_refused_unless_allowed() {
    let store = Store::open(&temp_dir()).await.unwrap();
    let (url, got) = receiver().await;
    queue_one(&store, &url).await;
    let alerts = Alerts::start(store.clone(), fast(false));
    let d = wait_for("the refusal", async || {
        let d = store.deliveries(None, 1).await.unwrap().pop()?;
        (d.state == "failed").then_some(d)
    })
    .await;
    assert_eq!(d.attempts, 1, "a refusal is not retried");
    assert!(d.last_error.as_deref().unwrap().contains("--allow-private-webhooks"), "{d:?}");
    assert!(got.posts.lock().unwrap().is_empty());
    alerts.shutdown().await;
}

#[tokio::test]
async fn pending_deliveries_survive_a_restart_and_keep_their_id_and_signature() {
    let dir = temp_dir();
    let store = Store::open(&dir).await.unwrap();
    let (url, got) = receiver().await;
    got.status.store(503, Ordering::SeqCst);
    queue_one(&store, &url).await;
    let mut options = fast(true);
    options.attempts = 100;
    options.retry_initial = Duration::from_millis(200);
    let first = Alerts::start(store.clone(), options.clone());
    wait_for("a failed attempt", async || (!got.posts.lock().unwrap().is_empty()).then_some(())).await;
    first.shutdown().await;
    drop(first);
    drop(store);
    let d = Store::open(&dir).await.unwrap().deliveries(None, 1).await.unwrap().pop().unwrap();
    assert_eq!(d.state, "pending");
    assert!(d.last_error.as_deref().unwrap().contains("503"), "{d:?}");

    // The receiver recovers; a new server on the same store delivers it.
    got.status.store(200, Ordering::SeqCst);
    let store = Store::open(&dir).await.unwrap();
    let second = Alerts::start(store.clone(), options);
    let d = wait_for("the delivery", async || {
        let d = store.deliveries(None, 1).await.unwrap().pop()?;
        (d.state == "delivered").then_some(d)
    })
    .await;
    assert!(d.attempts >= 2);
    let posts = got.posts.lock().unwrap().clone();
    let (first_post, last_post) = (&posts[0], posts.last().unwrap());
    assert_eq!(first_post.1, last_post.1, "the same body");
    for h in ["x-lookout-delivery", "x-lookout-signature"] {
        assert_eq!(first_post.0[h], last_post.0[h], "the same {h}");
    }
    second.shutdown().await;
}

#[tokio::test]
async fn a_cooldown_keeps_a_second_incident_from_opening_right_after_the_first_closes() {
    let store = Store::open(&temp_dir()).await.unwrap();
    let alerts = Alerts::start(store.clone(), fast(true));
    // Positive, negative, then positives only: without the cooldown a second incident would
    // open at the third window.
    let script = ["a person ", "nobody ", "a person ", "a person ", "a person ", "a person "];
    let analyzer = FakeAnalyzer::scripted(&script, Duration::from_millis(5));
    let watches = Watches::new(Arc::new(SyntheticSources::default()), Default::default());
    let monitors = Monitors::new(store.clone(), watches, Arc::new(Ready(analyzer)), MonitorOptions::default(), alerts);
    let rule = json!({"when": {"matches": "person"}, "clear_after": 1, "cooldown_s": 3600});
    monitors.create(monitor_row("m1", rule)).await.unwrap();
    let (mut viewer, _) = monitors.subscribe("m1").unwrap();
    let (mut alerts_seen, mut windows) = (Vec::new(), 0);
    while windows < 12 {
        let m = tokio::time::timeout(Duration::from_secs(10), viewer.next()).await.unwrap().unwrap();
        match &*m {
            ServerMessage::Alert { state, .. } => alerts_seen.push(*state),
            ServerMessage::WindowDone { .. } => windows += 1,
            _ => {}
        }
    }
    assert_eq!(alerts_seen, [AlertState::Firing, AlertState::Resolved], "one incident in 12 windows");
    let all = store.incidents(&crate::store::IncidentQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 1);
    monitors.shutdown().await;
}
