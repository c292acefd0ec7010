//! `GET /v1/ws`: one client connection, following one watch.
//!
//! A session goes through three phases, each a type:
//! 1. [`Waiting`] for `start` (a new watch that ends with this connection) or `subscribe` (a
//!    watch someone else started), within a deadline;
//! 2. attaching: the watch is started or found, and its [`Subscription`] taken;
//! 3. [`Following`]: the watch's events go to the client while its messages are handled (the
//!    watch's owner may change the prompt or stop it).
//!
//! The handler is generic over a `Sink` of [`ServerMessage`]s and a `Stream` of [`Incoming`]
//! messages; [`ws`] adapts an axum WebSocket to them, and tests drive it over channels. A writer
//! task owns the sending half, fed by a bounded channel; a client that stops reading for
//! [`SEND_TIMEOUT`] is dropped (its subscription lags meanwhile, never the watch).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use protocol::{ClientMessage, EndReason, ErrorCode, ServerMessage};
use tokio::sync::mpsc;

use super::{ApiFailure, AppState};
use crate::watch::{Stop, Subscription, WatchHandle, WatchSpec};

/// How long a client may leave messages unread before its session is ended.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes a connection's writer buffers before it waits for the socket.
const WRITE_BUFFER: usize = 16 * 1024;

/// Bytes a connection's writer may hold at most (above the largest message: a whole answer).
const MAX_WRITE_BUFFER: usize = 1 << 20;

/// `GET /v1/sessions/{id}/frame.jpg` (also `/v1/watches/{id}/frame.jpg`): the newest frame of a
/// running watch, as JPEG (the live view of sources a browser cannot play itself, such as RTSP
/// cameras).
pub(crate) async fn frame_jpeg(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Some(frame) = state.watches.get(&id).and_then(|w| w.live_frame()) else {
        return ApiFailure::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, format!("no frame of watch {id:?} yet"))
            .into_response();
    };
    jpeg_response(frame).await
}

/// A frame as a JPEG answer (encoded on a blocking thread).
pub(crate) async fn jpeg_response(frame: ingest::Frame) -> Response {
    let encoded = tokio::task::spawn_blocking(move || {
        let (w, h) = (u16::try_from(frame.width), u16::try_from(frame.height));
        let (Ok(w), Ok(h)) = (w, h) else { return Err("the frame is too large for JPEG".to_owned()) };
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 80)
            .encode(&frame.rgb, w, h, jpeg_encoder::ColorType::Rgb)
            .map_err(|e| e.to_string())?;
        Ok(out)
    })
    .await;
    match encoded {
        Ok(Ok(jpeg)) => {
            ([(axum::http::header::CONTENT_TYPE, "image/jpeg"), (axum::http::header::CACHE_CONTROL, "no-store")], jpeg)
                .into_response()
        }
        Ok(Err(e)) => ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e).into_response(),
        Err(e) => {
            ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string()).into_response()
        }
    }
}

/// `GET /v1/watches`: the running watches.
pub(crate) async fn watches(State(state): State<Arc<AppState>>) -> Result<axum::Json<protocol::WatchList>, ApiFailure> {
    Ok(axum::Json(protocol::WatchList { watches: state.watches.list() }))
}

/// `GET /v1/ws`: the upgrade, then a session over the socket.
/// `/v1/ws` query parameters.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct WsQuery {
    /// Opened by another node's proxy (never proxied again).
    #[serde(default)]
    proxied: bool,
}

pub(crate) async fn ws(
    State(state): State<Arc<AppState>>,
    axum::extract::Query(query): axum::extract::Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let open = state.connections.fetch_add(1, Ordering::SeqCst);
    if open >= state.config.max_connections {
        state.connections.fetch_sub(1, Ordering::SeqCst);
        return ApiFailure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Overloaded,
            format!("all {} connections are in use; try again later", state.config.max_connections),
        )
        .into_response();
    }
    state.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    let max = state.config.max_ws_message_bytes;
    // A small write buffer (bounded, as every queue here): a client that stops reading blocks
    // its writer soon, its subscription lags, and after SEND_TIMEOUT it is dropped.
    let upgrade = upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER);
    upgrade.on_upgrade(move |socket| async move {
        use tracing::Instrument;
        let id = format!("c{}", state.next_session.fetch_add(1, Ordering::Relaxed));
        let (sink, stream) = socket.split();
        let sink = sink.with(|m: ServerMessage| {
            // Serializing a wire type cannot fail (no maps with non-string keys).
            let text = serde_json::to_string(&m).unwrap_or_default();
            futures_util::future::ready(Ok::<_, axum::Error>(Message::Text(text.into())))
        });
        let incoming = stream.filter_map(|m| futures_util::future::ready(Incoming::from_ws(m)));
        let session = run(state.clone(), sink, incoming).instrument(tracing::info_span!("session", id = %id));
        super::nodes::PROXIED.scope(query.proxied, session).await;
        state.connections.fetch_sub(1, Ordering::SeqCst);
    })
}

/// A message from the client, as the session sees it.
#[allow(clippy::large_enum_variant)] // one at a time, never stored
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A protocol message.
    Msg(ClientMessage),
    /// Something that is not one (the reason, for the client).
    Bad(String),
    /// The client closed the connection.
    Closed,
}

impl Incoming {
    /// A WebSocket frame as a session message (`None` for pings and pongs).
    fn from_ws(m: Result<Message, axum::Error>) -> Option<Incoming> {
        match m {
            Ok(Message::Text(t)) => Some(match serde_json::from_str::<ClientMessage>(&t) {
                Ok(m) => Incoming::Msg(m),
                Err(e) => Incoming::Bad(format!("invalid message: {e}")),
            }),
            Ok(Message::Binary(_)) => Some(Incoming::Bad("binary messages are not part of the protocol".into())),
            Ok(Message::Ping(_) | Message::Pong(_)) => None,
            Ok(Message::Close(_)) => Some(Incoming::Closed),
            Err(e) => Some(Incoming::Bad(format!("websocket error: {e}"))),
        }
    }
}

/// Why a session ends, when the session (not its watch) says so.
#[derive(Debug)]
struct Ending {
    reason: EndReason,
    message: String,
}

impl Ending {
    fn new(reason: EndReason, message: impl Into<String>) -> Self {
        Ending { reason, message: message.into() }
    }
}

fn err(code: ErrorCode, message: impl Into<String>, fatal: bool) -> ServerMessage {
    ServerMessage::Error { code, message: message.into(), fatal }
}

/// The sending side of a session: a bounded queue to the writer task.
struct Out(mpsc::Sender<ServerMessage>);

impl Out {
    /// Sends, giving up when the client stops reading or has gone.
    async fn send(&self, m: ServerMessage) -> Result<(), Ending> {
        match tokio::time::timeout(SEND_TIMEOUT, self.0.send(m)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ending::new(EndReason::ClientClosed, "the connection closed")),
            Err(_) => Err(Ending::new(EndReason::SlowClient, "the client stopped reading")),
        }
    }
}

/// The next client message; a stream that ends is a closed connection.
async fn next_in<St: Stream<Item = Incoming> + Unpin>(incoming: &mut St) -> Incoming {
    incoming.next().await.unwrap_or(Incoming::Closed)
}

/// Runs one session over `sink` and `incoming` until it ends; the last message is `ended`.
pub(crate) async fn run<Si, St>(state: Arc<AppState>, sink: Si, mut incoming: St)
where
    Si: Sink<ServerMessage> + Send + Unpin + 'static,
    St: Stream<Item = Incoming> + Send + Unpin,
{
    let (tx, rx) = mpsc::channel::<ServerMessage>(64);
    let writer = tokio::spawn(write_all(sink, rx));
    let out = Out(tx);
    tracing::info!("session opened");
    let ending = match (Waiting { state: &state, incoming: &mut incoming, out: &out }).until_attached().await {
        Ok(following) => following.run(&mut incoming, &out).await,
        Err(ending) => Some(ending),
    };
    if let Some(e) = ending {
        tracing::info!(reason = %e.reason, message = %e.message, "session ended");
        // A client that has gone or stopped reading would not read it.
        if !matches!(e.reason, EndReason::ClientClosed | EndReason::SlowClient) {
            let _ = out.send(ServerMessage::Ended { reason: e.reason, message: e.message }).await;
        }
    }
    drop(out);
    let _ = tokio::time::timeout(SEND_TIMEOUT, writer).await;
}

/// Owns the sending half: writes messages in order, closes after `ended`.
async fn write_all<Si: Sink<ServerMessage> + Unpin>(mut sink: Si, mut rx: mpsc::Receiver<ServerMessage>) {
    while let Some(m) = rx.recv().await {
        let last = matches!(m, ServerMessage::Ended { .. });
        if sink.send(m).await.is_err() || last {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Phase 1: a connection that has neither started nor subscribed yet.
struct Waiting<'a, St> {
    state: &'a Arc<AppState>,
    incoming: &'a mut St,
    out: &'a Out,
}

impl<St: Stream<Item = Incoming> + Unpin> Waiting<'_, St> {
    /// Waits for `start` or `subscribe` (the others get an error and the session goes on
    /// waiting), until the start deadline.
    async fn until_attached(self) -> Result<Following, Ending> {
        let mut shutdown = self.state.shutdown.clone();
        let limit = self.state.config.ws_start_timeout;
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        loop {
            let m = tokio::select! {
                biased;
                _ = shutdown.wait_for(|down| *down) => {
                    return Err(Ending::new(EndReason::Shutdown, "the server is shutting down"));
                }
                _ = &mut deadline => {
                    return Err(Ending::new(
                        EndReason::Rejected,
                        format!("no start or subscribe within {limit:?}; send one right after connecting"),
                    ));
                }
                m = next_in(self.incoming) => m,
            };
            let reply = match m {
                Incoming::Msg(ClientMessage::Start { source, prompt, window, generation }) => {
                    return self
                        .start(source, prompt, window.unwrap_or_default(), generation.unwrap_or_default())
                        .await;
                }
                Incoming::Msg(ClientMessage::Subscribe { watch, monitor }) => {
                    match self.subscribe(watch, monitor).await {
                        Ok((following, subscribed)) => {
                            self.out.send(subscribed).await?;
                            return Ok(following);
                        }
                        Err(e) => e,
                    }
                }
                Incoming::Msg(ClientMessage::Stop {}) => {
                    return Err(Ending::new(EndReason::Stopped, "stopped by the client"));
                }
                Incoming::Msg(ClientMessage::Prompt { .. }) => "send start before prompt".to_owned(),
                Incoming::Bad(e) => e,
                Incoming::Closed => {
                    return Err(Ending::new(EndReason::ClientClosed, "the client closed the connection"));
                }
            };
            self.out.send(err(ErrorCode::BadRequest, reply, false)).await?;
        }
    }

    /// Starts a watch owned by this session.
    async fn start(
        &self,
        source: protocol::Source,
        prompt: String,
        window: protocol::WindowSettings,
        generation: protocol::GenerationSettings,
    ) -> Result<Following, Ending> {
        let analyzer = match self.state.analyzer() {
            Ok(a) => a,
            Err(e) => {
                self.out.send(err(ErrorCode::Overloaded, &e.message, true)).await?;
                return Err(Ending::new(EndReason::ModelUnavailable, e.message));
            }
        };
        let params = super::generation(&generation, 128);
        if let Err(e) = crate::watch::check_answer(&analyzer, &params, "generation.answer").await {
            self.out.send(err(ErrorCode::BadRequest, &e, true)).await?;
            return Err(Ending::new(EndReason::Rejected, e));
        }
        let spec = match WatchSpec::new(source, prompt, &window, params) {
            Ok(s) => s,
            Err(e) => {
                self.out.send(err(ErrorCode::BadRequest, &e, true)).await?;
                return Err(Ending::new(EndReason::Rejected, e));
            }
        };
        let Some(slot) = SessionSlot::take(self.state) else {
            let max = self.state.config.max_sessions;
            let e = format!(
                "all {max} analysis sessions are in use; try again later (subscribing to a watch or monitor is not limited by this)"
            );
            self.out.send(err(ErrorCode::Overloaded, &e, true)).await?;
            return Err(Ending::new(EndReason::Rejected, e));
        };
        let on_drop = Stop::new(EndReason::ClientClosed, "the client that started this watch closed its connection");
        let (owner, sub) = self.state.watches.start(spec, analyzer, on_drop, None);
        tracing::info!(watch = %owner.shared().id, "watch started");
        Ok(Following { sub, owner: Some(owner), _slot: Some(slot), _relay: None })
    }

    /// Follows a running watch; the error is the reason for the client.
    async fn subscribe(
        &self,
        watch: Option<String>,
        monitor: Option<String>,
    ) -> Result<(Following, ServerMessage), String> {
        let id = match (watch, monitor) {
            (Some(w), None) => w,
            (None, Some(m)) => {
                if let Some((sub, status)) = self.state.monitors.subscribe(&m) {
                    let prompt = status.watch_prompt().unwrap_or_default();
                    return Ok((
                        Following { sub, owner: None, _slot: None, _relay: None },
                        status.subscribed(&m, prompt),
                    ));
                }
                // With several nodes, another may run it.
                let relay = super::nodes::relay(self.state, &m)
                    .await?
                    .ok_or_else(|| format!("no monitor {m:?} runs now; GET /v1/monitors lists them"))?;
                let following = Following { sub: relay.sub, owner: None, _slot: None, _relay: Some(relay.task) };
                return Ok((following, relay.subscribed));
            }
            _ => return Err("subscribe needs exactly one of \"watch\" and \"monitor\"".into()),
        };
        let shared = self
            .state
            .watches
            .get(&id)
            .ok_or_else(|| format!("no running watch {id:?}; GET /v1/watches lists them"))?;
        // Subscribe before describing the watch, so that nothing published in between is lost.
        let sub = shared.hub.subscribe();
        Ok((Following { sub, owner: None, _slot: None, _relay: None }, shared.subscribed()))
    }
}

/// One of the `max_sessions` slots for watches started by `start`, given back when dropped.
struct SessionSlot(Arc<AppState>);

impl SessionSlot {
    fn take(state: &Arc<AppState>) -> Option<SessionSlot> {
        let open = state.sessions.fetch_add(1, Ordering::SeqCst);
        if open >= state.config.max_sessions {
            state.sessions.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(SessionSlot(state.clone()))
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Phase 3: a session following a watch, as its owner or as a subscriber.
struct Following {
    sub: Subscription,
    owner: Option<WatchHandle>,
    _slot: Option<SessionSlot>,
    /// A subscription relayed from another node, ended with the session.
    _relay: Option<super::nodes::AbortOnDrop>,
}

impl Following {
    /// Forwards the watch's events and handles the client's messages. Returns the session's own
    /// ending, or `None` when the watch's `ended` was forwarded (or nobody is left to tell).
    async fn run<St: Stream<Item = Incoming> + Unpin>(mut self, incoming: &mut St, out: &Out) -> Option<Ending> {
        let ending = self.forward(incoming, out).await;
        if let (Some(owner), Some(e)) = (&self.owner, &ending) {
            // The owner's ending is its watch's too (other subscribers learn why).
            owner.stop(Stop::new(e.reason, e.message.clone()));
        }
        ending
    }

    async fn forward<St: Stream<Item = Incoming> + Unpin>(&mut self, incoming: &mut St, out: &Out) -> Option<Ending> {
        loop {
            tokio::select! {
                biased;
                m = next_in(incoming) => {
                    let reply = match m {
                        Incoming::Msg(ClientMessage::Prompt { text }) => match &self.owner {
                            Some(owner) => {
                                owner.shared().set_prompt(text);
                                None
                            }
                            None => Some("only the client that started this watch can change its prompt".to_owned()),
                        },
                        Incoming::Msg(ClientMessage::Stop {}) => match &self.owner {
                            // The watch ends; its `ended` comes through the subscription.
                            Some(owner) => {
                                owner.stop(Stop::new(EndReason::Stopped, "stopped by the client"));
                                None
                            }
                            None => return Some(Ending::new(EndReason::Stopped, "stopped by the client")),
                        },
                        Incoming::Msg(ClientMessage::Start { .. } | ClientMessage::Subscribe { .. }) => {
                            Some("this session follows a watch already; open another connection".to_owned())
                        }
                        Incoming::Bad(e) => Some(e),
                        Incoming::Closed => {
                            // Nobody is left to tell; the owner's handle stops the watch.
                            return None;
                        }
                    };
                    if let Some(reply) = reply
                        && let Err(e) = out.send(err(ErrorCode::BadRequest, reply, false)).await
                    {
                        return Some(e);
                    }
                }
                ev = self.sub.next() => match ev {
                    Some(m) => {
                        let last = matches!(*m, ServerMessage::Ended { .. });
                        if let Err(e) = out.send((*m).clone()).await {
                            return Some(e);
                        }
                        if last {
                            return None;
                        }
                    }
                    None => return Some(Ending::new(EndReason::EndOfStream, "the watch ended")),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests;
