//! The WebSocket session without a socket: the handler runs over channels, with synthetic
//! sources and a fake analyzer.

use std::sync::Arc;
use std::time::Duration;

use protocol::{ClientMessage, EndReason, ErrorCode, ServerMessage, Source, WindowSettings};
use tokio::sync::mpsc;

use super::{Incoming, run};
use crate::server::{AppState, ModelState, ServeConfig};
use crate::watch::fake::{FakeAnalyzer, SyntheticSources};

async fn state(config: ServeConfig) -> (Arc<AppState>, tokio::sync::watch::Sender<bool>) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lookout-session-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let store = crate::store::Store::open(&dir).await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let whip = ingest::webrtc::Whip::new(Default::default());
    let state = AppState::new(Arc::new(config), whip, Arc::new(SyntheticSources::default()), rx, store);
    state.model.send_replace(ModelState::Fake(FakeAnalyzer::new(3, Duration::from_millis(2))));
    (Arc::new(state), tx)
}

/// A client: what it sends, and what the server sends it.
struct Client {
    to_server: mpsc::Sender<Incoming>,
    from_server: mpsc::Receiver<ServerMessage>,
    session: tokio::task::JoinHandle<()>,
}

impl Client {
    fn connect(state: &Arc<AppState>) -> Client {
        let (to_server, rx) = mpsc::channel(16);
        let (tx, from_server) = mpsc::channel(256);
        let incoming = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let sink = futures_util::sink::unfold(tx, |tx, m: ServerMessage| async move {
            tx.send(m).await.map(|()| tx).map_err(|_| "the client is gone")
        });
        let session = tokio::spawn(run(state.clone(), Box::pin(sink), Box::pin(incoming)));
        Client { to_server, from_server, session }
    }

    async fn send(&self, m: ClientMessage) {
        self.to_server.send(Incoming::Msg(m)).await.unwrap();
    }

    async fn recv(&mut self) -> ServerMessage {
        tokio::time::timeout(Duration::from_secs(30), self.from_server.recv()).await.unwrap().unwrap()
    }

    /// Everything until `ended`, inclusive.
    async fn until_ended(&mut self) -> Vec<ServerMessage> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let end = matches!(m, ServerMessage::Ended { .. });
            out.push(m);
            if end {
                return out;
            }
        }
    }
}

fn start(id: &str) -> ClientMessage {
    ClientMessage::Start {
        source: Source::Upload { id: id.into(), speed: Some(20.0), looped: None },
        prompt: "What happens?".into(),
        window: Some(WindowSettings {
            seconds: Some(2.0),
            stride_seconds: None,
            fps: Some(2.0),
            min_pixels: Some(4096),
            max_pixels: Some(4096),
        }),
        generation: None,
    }
}

#[tokio::test]
async fn a_started_watch_streams_and_ends_with_a_typed_reason() {
    let (state, _stop) = state(ServeConfig::default()).await;
    let mut c = Client::connect(&state);
    c.to_server.send(Incoming::Bad("invalid message: x".into())).await.unwrap();
    assert!(matches!(c.recv().await, ServerMessage::Error { code: ErrorCode::BadRequest, fatal: false, .. }));
    c.send(start("clip:8:2")).await;
    let events = c.until_ended().await;
    assert!(matches!(&events[0], ServerMessage::Ready { model, .. } if model == "fake"));
    let done = events.iter().filter(|e| matches!(e, ServerMessage::WindowDone { .. })).count();
    assert_eq!(done, 2);
    assert!(matches!(events.last(), Some(ServerMessage::Ended { reason: EndReason::EndOfStream, .. })));
    c.session.await.unwrap();
}

#[tokio::test]
async fn subscribers_follow_a_running_watch_but_only_its_owner_steers_it() {
    let (state, _stop) = state(ServeConfig::default()).await;
    let mut owner = Client::connect(&state);
    owner.send(start("live:100000:10")).await;
    let ServerMessage::Ready { session, .. } = owner.recv().await else { panic!() };
    let mut viewer = Client::connect(&state);
    viewer.send(ClientMessage::Subscribe { watch: Some("nope".into()), monitor: None }).await;
    match viewer.recv().await {
        ServerMessage::Error { fatal: false, message, .. } => assert!(message.contains("GET /v1/watches"), "{message}"),
        other => panic!("{other:?}"),
    }
    viewer.send(ClientMessage::Subscribe { watch: Some(session.clone()), monitor: None }).await;
    match viewer.recv().await {
        ServerMessage::Subscribed { watch, source, prompt, .. } => {
            assert_eq!(watch, session);
            assert_eq!(source.unwrap().width, 64);
            assert_eq!(prompt, "What happens?");
        }
        other => panic!("{other:?}"),
    }
    viewer.send(ClientMessage::Prompt { text: "x".into() }).await;
    loop {
        match viewer.recv().await {
            ServerMessage::Error { message, fatal: false, .. } => break assert!(message.contains("only the client")),
            ServerMessage::Ended { .. } => panic!("ended"),
            _ => {}
        }
    }
    // The viewer leaves with `stop`; the watch goes on for its owner.
    viewer.send(ClientMessage::Stop {}).await;
    let last = viewer.until_ended().await;
    assert!(matches!(last.last(), Some(ServerMessage::Ended { reason: EndReason::Stopped, .. })));
    let mut windows = 0;
    while windows < 2 {
        if let ServerMessage::WindowDone { .. } = owner.recv().await {
            windows += 1;
        }
    }
    // The owner's stop ends the watch.
    owner.send(ClientMessage::Stop {}).await;
    let last = owner.until_ended().await;
    assert!(
        matches!(last.last(), Some(ServerMessage::Ended { reason: EndReason::Stopped, message }) if message == "stopped by the client")
    );
}

#[tokio::test]
async fn an_owner_that_leaves_ends_the_watch_for_its_viewers() {
    let (state, _stop) = state(ServeConfig::default()).await;
    let mut owner = Client::connect(&state);
    owner.send(start("live:100000:10")).await;
    let ServerMessage::Ready { session, .. } = owner.recv().await else { panic!() };
    let mut viewer = Client::connect(&state);
    viewer.send(ClientMessage::Subscribe { watch: Some(session), monitor: None }).await;
    assert!(matches!(viewer.recv().await, ServerMessage::Subscribed { .. }));
    owner.to_server.send(Incoming::Closed).await.unwrap();
    let events = viewer.until_ended().await;
    assert!(matches!(events.last(), Some(ServerMessage::Ended { reason: EndReason::ClientClosed, .. })));
    owner.session.await.unwrap();
}

#[tokio::test]
async fn a_connection_that_never_starts_is_closed_after_the_deadline() {
    let config = ServeConfig { ws_start_timeout: Duration::from_secs(25), ..ServeConfig::default() };
    let (state, _stop) = state(config).await;
    // The store is open (its pool's timeouts are real time); the session's clock is paused.
    tokio::time::pause();
    let mut c = Client::connect(&state);
    let t = tokio::time::Instant::now();
    let events = c.until_ended().await;
    assert!(t.elapsed() >= Duration::from_secs(25));
    match &events[..] {
        [ServerMessage::Ended { reason: EndReason::Rejected, message }] => {
            assert!(message.contains("no start"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    c.session.await.unwrap();
}

#[tokio::test]
async fn bad_settings_and_server_shutdown_end_sessions_with_their_reasons() {
    let (state, stop) = state(ServeConfig::default()).await;
    let mut c = Client::connect(&state);
    let mut bad = start("clip:8:2");
    if let ClientMessage::Start { window, .. } = &mut bad {
        window.as_mut().unwrap().fps = Some(0.0);
    }
    c.send(bad).await;
    let events = c.until_ended().await;
    assert!(matches!(&events[0], ServerMessage::Error { fatal: true, message, .. } if message.contains("window.fps")));
    assert!(matches!(events.last(), Some(ServerMessage::Ended { reason: EndReason::Rejected, .. })));
    // Waiting for start when the server stops.
    let mut waiting = Client::connect(&state);
    tokio::task::yield_now().await;
    stop.send(true).unwrap();
    let events = waiting.until_ended().await;
    assert!(matches!(events.last(), Some(ServerMessage::Ended { reason: EndReason::Shutdown, .. })));
}

#[tokio::test]
async fn analysis_sessions_are_limited_but_subscriptions_are_not() {
    let (state, _stop) = state(ServeConfig { max_sessions: 1, ..ServeConfig::default() }).await;
    let mut first = Client::connect(&state);
    first.send(start("live:100000:10")).await;
    let ServerMessage::Ready { session, .. } = first.recv().await else { panic!() };
    let mut second = Client::connect(&state);
    second.send(start("live:100000:10")).await;
    let events = second.until_ended().await;
    assert!(
        matches!(&events[0], ServerMessage::Error { fatal: true, message, .. } if message.contains("all 1 analysis sessions"))
    );
    assert!(matches!(events.last(), Some(ServerMessage::Ended { reason: EndReason::Rejected, .. })));
    // Following the running watch needs no slot.
    let mut viewer = Client::connect(&state);
    viewer.send(ClientMessage::Subscribe { watch: Some(session), monitor: None }).await;
    assert!(matches!(viewer.recv().await, ServerMessage::Subscribed { .. }));
    // Once the first ends, its slot is free again.
    first.send(ClientMessage::Stop {}).await;
    first.until_ended().await;
    first.session.await.unwrap();
    let mut third = Client::connect(&state);
    third.send(start("clip:4:2")).await;
    assert!(matches!(third.recv().await, ServerMessage::Ready { .. }));
}
