//! `GET /v1/ws`: one streaming session per WebSocket.
//!
//! Tasks and threads of a session:
//! - the replay thread (ingest) paces the source and pushes admitted frames into a [`FrameRing`];
//! - the window thread reads the ring, resizes each frame once, and when a window is due builds
//!   its clip and puts it in a one-slot mailbox (a newer window replaces an unclaimed one, and the
//!   replaced window is counted as skipped);
//! - the session task takes windows from the mailbox, submits them to the engine with the
//!   standing prompt and forwards the engine's events; it also reads client messages and sends
//!   status once a second;
//! - a writer task owns the socket's sending half, fed by a bounded channel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use inference::EngineEvent;
use ingest::ring::{FrameRing, Read, RingEnd};
use protocol::{ClientMessage, ErrorCode, ServerMessage, WindowSettings};
use sampler::stream::{Admission, WindowPolicy, WindowShape, Windower};
use sampler::{ClipBuilder, Resizer};
use tokio::sync::{Notify, mpsc};

use super::{ApiFailure, AppState, sources};

/// `GET /v1/sessions/{id}/frame.jpg`: the newest frame of a running session, as JPEG (the live
/// view of sources a browser cannot play itself, such as RTSP cameras).
pub(crate) async fn frame_jpeg(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<super::KeyQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = super::authorized_or_query(&state, &headers, &q) {
        return e.into_response();
    }
    let progress = state.previews.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
    let Some(frame) = progress.and_then(|p| p.latest()) else {
        return ApiFailure::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BadRequest,
            format!("no frame of session {id:?} yet"),
        )
        .into_response();
    };
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

/// How long a client may leave messages unread before its session is ended.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn ws(
    State(state): State<Arc<AppState>>,
    Query(q): Query<super::KeyQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Browsers cannot set headers on a WebSocket: the key may also come as ?api_key=.
    if let Err(e) = super::authorized_or_query(&state, &headers, &q) {
        return e.into_response();
    }
    let open = state.sessions.fetch_add(1, Ordering::SeqCst);
    if open >= state.config.max_sessions {
        state.sessions.fetch_sub(1, Ordering::SeqCst);
        return ApiFailure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Overloaded,
            format!("all {} sessions are in use; try again later", state.config.max_sessions),
        )
        .into_response();
    }
    state.metrics.sessions.fetch_add(1, Ordering::Relaxed);
    let max = state.config.max_ws_message_bytes;
    upgrade.max_message_size(max).max_frame_size(max).on_upgrade(move |socket| async move {
        use tracing::Instrument;
        let id = format!("s{}", state.next_session.fetch_add(1, Ordering::Relaxed));
        let span = tracing::info_span!("session", id = %id);
        run(state.clone(), socket, id).instrument(span).await;
        state.sessions.fetch_sub(1, Ordering::SeqCst);
    })
}

/// A window ready for the model.
struct PendingWindow {
    id: u64,
    start_s: f64,
    end_s: f64,
    frames: usize,
    video: inference::VideoInput,
}

/// One-slot mailbox between the window thread and the session task.
#[derive(Default)]
struct Mailbox {
    slot: Mutex<(Option<PendingWindow>, Option<RingEnd>)>,
    notify: Notify,
    skipped: AtomicU64,
}

impl Mailbox {
    fn put(&self, w: PendingWindow) {
        let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if s.0.replace(w).is_some() {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        drop(s);
        self.notify.notify_one();
    }

    fn close(&self, end: RingEnd) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(end);
        self.notify.notify_one();
    }

    fn take(&self) -> (Option<PendingWindow>, Option<RingEnd>) {
        let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        (s.0.take(), s.1.clone())
    }
}

/// Counters the status messages report.
#[derive(Default)]
pub(crate) struct Progress {
    missed: AtomicU64,
    last_frame_ms: AtomicU64,
    last_window_end_ms: AtomicU64,
    /// The newest frame read from the ring (the live preview).
    latest: Mutex<Option<ingest::Frame>>,
}

impl Progress {
    /// The newest frame the session has seen.
    pub(crate) fn latest(&self) -> Option<ingest::Frame> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Removes a session's preview from the registry when the session ends.
struct Registered<'a>(&'a AppState, &'a str);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.previews.lock().unwrap_or_else(|e| e.into_inner()).remove(self.1);
    }
}

fn policy(w: &Option<WindowSettings>) -> WindowPolicy {
    let d = WindowPolicy::default();
    let w = w.clone().unwrap_or_default();
    WindowPolicy {
        window_s: w.seconds.unwrap_or(d.window_s),
        stride_s: w.stride_seconds.or(w.seconds).unwrap_or(d.stride_s),
        fps: w.fps.unwrap_or(d.fps),
        min_pixels: w.min_pixels.or(Some(4096)),
        max_pixels: w.max_pixels.or(Some(256 * 32 * 32)),
    }
}

fn err(code: ErrorCode, message: impl Into<String>, fatal: bool) -> ServerMessage {
    ServerMessage::Error { code, message: message.into(), fatal }
}

async fn run(state: Arc<AppState>, socket: WebSocket, session: String) {
    let (mut sink, mut incoming) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<ServerMessage>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let Ok(text) = serde_json::to_string(&m) else { continue };
            let last = matches!(m, ServerMessage::Ended { .. });
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
            if last {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
        }
    });
    tracing::info!("session opened");
    let reason = drive(&state, &session, &mut incoming, &out).await;
    tracing::info!(%reason, "session ended");
    let _ = tokio::time::timeout(SEND_TIMEOUT, out.send(ServerMessage::Ended { reason })).await;
    drop(out);
    let _ = tokio::time::timeout(SEND_TIMEOUT, writer).await;
}

/// Sends, ending the session if the client stops reading.
async fn send(out: &mpsc::Sender<ServerMessage>, m: ServerMessage) -> Result<(), String> {
    match tokio::time::timeout(SEND_TIMEOUT, out.send(m)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("the connection closed".into()),
        Err(_) => Err("the client stopped reading".into()),
    }
}

#[allow(clippy::large_enum_variant)] // one at a time, never stored
enum Incoming {
    Msg(ClientMessage),
    Bad(String),
    Closed,
}

async fn next_client(incoming: &mut futures_util::stream::SplitStream<WebSocket>) -> Incoming {
    loop {
        match incoming.next().await {
            Some(Ok(Message::Text(t))) => {
                return match serde_json::from_str::<ClientMessage>(&t) {
                    Ok(m) => Incoming::Msg(m),
                    Err(e) => Incoming::Bad(format!("invalid message: {e}")),
                };
            }
            Some(Ok(Message::Binary(_))) => {
                return Incoming::Bad("binary messages are not part of the protocol".into());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => return Incoming::Closed,
            Some(Err(e)) => return Incoming::Bad(format!("websocket error: {e}")),
        }
    }
}

/// Handles a client message once the session runs: a new prompt replaces the standing one (it
/// applies from the next window); returns `Some(reason)` when the session should end.
async fn on_client(
    m: Incoming,
    prompt: &mut String,
    out: &mpsc::Sender<ServerMessage>,
) -> Result<Option<String>, String> {
    match m {
        Incoming::Msg(ClientMessage::Prompt { text }) => *prompt = text,
        Incoming::Msg(ClientMessage::Stop {}) => return Ok(Some("stopped by the client".into())),
        Incoming::Msg(ClientMessage::Start { .. }) => {
            send(out, err(ErrorCode::BadRequest, "this session has started already", false)).await?
        }
        Incoming::Bad(e) => send(out, err(ErrorCode::BadRequest, e, false)).await?,
        Incoming::Closed => return Ok(Some("the client closed the connection".into())),
    }
    Ok(None)
}

/// Runs a session; returns why it ended.
async fn drive(
    state: &Arc<AppState>,
    session: &str,
    incoming: &mut futures_util::stream::SplitStream<WebSocket>,
    out: &mpsc::Sender<ServerMessage>,
) -> String {
    let mut shutdown = state.shutdown.clone();
    // 1. Wait for `start`.
    let (source, mut prompt, window, generation_settings) = loop {
        tokio::select! {
            _ = shutdown.changed() => return "the server is shutting down".into(),
            m = next_client(incoming) => match m {
                Incoming::Msg(ClientMessage::Start { source, prompt, window, generation }) => break (source, prompt, window, generation),
                Incoming::Msg(ClientMessage::Stop {}) => return "stopped by the client".into(),
                Incoming::Msg(ClientMessage::Prompt { .. }) => {
                    if send(out, err(ErrorCode::BadRequest, "send start before prompt", false)).await.is_err() {
                        return "the connection closed".into();
                    }
                }
                Incoming::Bad(e) => {
                    if send(out, err(ErrorCode::BadRequest, e, false)).await.is_err() {
                        return "the connection closed".into();
                    }
                }
                Incoming::Closed => return "the client closed the connection".into(),
            }
        }
    };
    let engine = match state.engine() {
        Ok(e) => e,
        Err(e) => {
            let _ = send(out, err(ErrorCode::Overloaded, e.message, true)).await;
            return "no model".into();
        }
    };
    let params = super::generation(&generation_settings.unwrap_or_default(), 128);
    if let Err(e) = params.sampling.validate() {
        let _ = send(out, err(ErrorCode::BadRequest, e, true)).await;
        return "bad generation settings".into();
    }

    // 2. Open the source and the window pipeline (blocking work on threads). A window's frame
    // count and the admission cadence do not depend on the frame size, so the policy is checked
    // (and the ring sized) before the source is opened.
    let policy = policy(&window);
    let planned = match Windower::new(&policy, 640, 360) {
        Ok(w) => w,
        Err(e) => {
            let _ = send(out, err(ErrorCode::BadRequest, e.to_string(), true)).await;
            return "bad window settings".into();
        }
    };
    let ring = FrameRing::new(planned.shape().frames * 2 + 4);
    let stop_ring = StopOnDrop(ring.clone());
    let mut admit_windower = planned;
    let admit: ingest::replay::Admit =
        Box::new(move |t| matches!(admit_windower.observe(t.as_secs_f64()), Admission::Admit { .. }));
    let opened = tokio::select! {
        biased;
        _ = shutdown.changed() => return "the server is shutting down".into(),
        r = sources::open(state, session, &source, ring.clone(), admit) => r,
    };
    let mut opened = match opened {
        Ok(o) => o,
        Err((code, message)) => {
            let _ = send(out, err(code, message, true)).await;
            return "the source failed".into();
        }
    };
    // A live source says its frame size with its first frame.
    // Meanwhile a new prompt is kept and `stop` ends the session.
    if let Some(events) = opened.events.as_mut() {
        let first = sources::first_frame(events, &ring, state.config.live.first_frame_timeout);
        tokio::pin!(first);
        let started = loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return "the server is shutting down".into(),
                m = next_client(incoming) => match on_client(m, &mut prompt, out).await {
                    Ok(None) => {}
                    Ok(Some(reason)) | Err(reason) => return reason,
                },
                r = &mut first => break r,
            }
        };
        match started {
            Ok(info) => opened.info = info,
            Err(e) => {
                let _ = send(out, err(ErrorCode::Source, e, true)).await;
                return "the source failed".into();
            }
        }
    }
    let info = opened.info.clone();
    let windower = match Windower::new(&policy, info.width, info.height) {
        Ok(w) => w,
        Err(e) => {
            let _ = send(out, err(ErrorCode::BadRequest, e.to_string(), true)).await;
            return "bad window settings".into();
        }
    };
    let shape = windower.shape();
    let mailbox = Arc::new(Mailbox::default());
    let progress = Arc::new(Progress::default());
    state.previews.lock().unwrap_or_else(|e| e.into_inner()).insert(session.to_owned(), progress.clone());
    let _registered = Registered(state, session);
    spawn_window_thread(session, ring.clone(), shape, mailbox.clone(), progress.clone());
    let model = engine.info().model.clone();
    let ready = ServerMessage::Ready { session: session.to_owned(), model, source: info };
    if send(out, ready).await.is_err() {
        return "the connection closed".into();
    }

    // 3. Windows, prompts and status until the end.
    // The first report comes after a quarter second (a rate needs an interval to be measured over).
    let first = tokio::time::Instant::now() + Duration::from_millis(250);
    let mut status = tokio::time::interval_at(first, Duration::from_secs(1));
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_pushed = (0u64, Instant::now());
    let mut reported_skips = 0u64;
    let result: Result<String, String> = async {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok("the server is shutting down".into()),
                m = next_client(incoming) => {
                    if let Some(reason) = on_client(m, &mut prompt, out).await? {
                        return Ok(reason);
                    }
                }
                _ = mailbox.notify.notified() => {
                    let (pending, end) = mailbox.take();
                    let skipped = mailbox.skipped.load(Ordering::Relaxed);
                    if skipped > reported_skips {
                        state.metrics.skipped.fetch_add(skipped - reported_skips, Ordering::Relaxed);
                        send(out, ServerMessage::Skipped { windows: skipped - reported_skips, reason: "the model fell behind; the newest window wins".into() }).await?;
                        reported_skips = skipped;
                    }
                    if let Some(w) = pending {
                        state.metrics.windows.fetch_add(1, Ordering::Relaxed);
                        let ctx = WindowCtx { engine: &engine, params: &params, shape, out, progress: &progress, metrics: &state.metrics };
                        let ended = run_window(&ctx, w, &mut prompt, incoming, &mut shutdown).await?;
                        if let Some(reason) = ended {
                            return Ok(reason);
                        }
                        // A window may have arrived while this one ran.
                        mailbox.notify.notify_one();
                    } else if let Some(end) = end {
                        return Ok(match end {
                            RingEnd::EndOfStream => "end of stream".into(),
                            RingEnd::Stopped => "stopped".into(),
                            RingEnd::Failed(e) => {
                                send(out, err(ErrorCode::Source, e, true)).await?;
                                "the source failed".into()
                            }
                        });
                    }
                }
                Some(ev) = sources::next_event(&mut opened.events) => {
                    if let Some(m) = sources::wire_event(ev) {
                        send(out, m).await?;
                    }
                }
                _ = status.tick() => {
                    let pushed = ring.arrived();
                    let dt = last_pushed.1.elapsed().as_secs_f64().max(1e-3);
                    let ingest_fps = (pushed - last_pushed.0) as f64 / dt;
                    last_pushed = (pushed, Instant::now());
                    let frames_dropped = ring.overwritten() + ring.lost_upstream() + progress.missed.load(Ordering::Relaxed);
                    let lag_ms = progress.last_frame_ms.load(Ordering::Relaxed).saturating_sub(progress.last_window_end_ms.load(Ordering::Relaxed)) as f64;
                    send(out, ServerMessage::Status { ingest_fps, frames_dropped, lag_ms }).await?;
                }
            }
        }
    }
    .await;
    drop(stop_ring);
    result.unwrap_or_else(|e| e)
}

struct StopOnDrop(Arc<FrameRing>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.close(RingEnd::Stopped);
    }
}

/// Analyses one window, forwarding its events, and handles client messages meanwhile (a new
/// prompt applies from the next window on). Returns `Some(reason)` if the session should end.
/// What every window of a session shares.
struct WindowCtx<'a> {
    engine: &'a inference::Engine,
    params: &'a inference::GenerationParams,
    shape: WindowShape,
    out: &'a mpsc::Sender<ServerMessage>,
    progress: &'a Progress,
    metrics: &'a super::Metrics,
}

async fn run_window(
    ctx: &WindowCtx<'_>,
    w: PendingWindow,
    prompt: &mut String,
    incoming: &mut futures_util::stream::SplitStream<WebSocket>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<String>, String> {
    let WindowCtx { engine, params, shape, out, progress, metrics } = *ctx;
    send(
        out,
        ServerMessage::Window {
            id: w.id,
            start_s: w.start_s,
            end_s: w.end_s,
            frames: w.frames,
            grid_thw: shape.grid_thw(),
        },
    )
    .await?;
    progress.last_window_end_ms.store((w.end_s * 1000.0) as u64, Ordering::Relaxed);
    let request = inference::Request {
        messages: vec![inference::processor::Message::user_video(prompt.as_str())],
        videos: vec![w.video],
        generation: params.clone(),
    };
    let mut events = match engine.submit(request) {
        Ok(rx) => rx,
        Err(e) => {
            send(out, err(ErrorCode::Overloaded, e.to_string(), false)).await?;
            return Ok(None);
        }
    };
    loop {
        // Client messages are handled while the window runs: a new prompt is kept for the next
        // window, `stop` ends the session at once (dropping `events` cancels the request).
        let ev = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(Some("the server is shutting down".into())),
            m = next_client(incoming) => {
                if let Some(reason) = on_client(m, prompt, out).await? {
                    return Ok(Some(reason));
                }
                continue;
            }
            ev = events.recv() => ev,
        };
        let Some(ev) = ev else { return Ok(None) };
        match ev {
            EngineEvent::Queued | EngineEvent::Captured { .. } => {}
            EngineEvent::Token { text } => send(out, ServerMessage::Token { window: w.id, text }).await?,
            EngineEvent::Done { finish_reason, text, usage, timings, .. } => {
                metrics.tokens.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                send(
                    out,
                    ServerMessage::WindowDone {
                        window: w.id,
                        text,
                        finish_reason: finish_reason.as_str().into(),
                        usage: super::wire_usage(usage),
                        timings: super::wire_timings(timings),
                    },
                )
                .await?;
                return Ok(None);
            }
            EngineEvent::Failed { error } => {
                send(out, err(ErrorCode::Model, error.to_string(), false)).await?;
                return Ok(None);
            }
        }
    }
}

/// Reads the ring, resizes admitted frames once, and posts each due window to the mailbox.
fn spawn_window_thread(
    session: &str,
    ring: Arc<FrameRing>,
    shape: WindowShape,
    mailbox: Arc<Mailbox>,
    progress: Arc<Progress>,
) {
    let name = format!("window:{session}");
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let mut reader = ring.reader();
        let mut resizer = Resizer::new();
        let mut recent: VecDeque<(f64, Vec<u8>)> = VecDeque::with_capacity(shape.frames);
        let mut admitted = 0usize;
        let mut next_id = 0u64;
        loop {
            match reader.next(Duration::from_millis(200)) {
                Read::Frame { frame, missed } => {
                    progress.missed.fetch_add(missed, Ordering::Relaxed);
                    let t = frame.pts.as_secs_f64();
                    progress.last_frame_ms.store((t * 1000.0) as u64, Ordering::Relaxed);
                    *progress.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame.clone());
                    let mut out = Vec::new();
                    if let Err(e) =
                        resizer.resize_rgb(&frame.rgb, frame.width, frame.height, shape.width, shape.height, &mut out)
                    {
                        mailbox.close(RingEnd::Failed(e.to_string()));
                        return;
                    }
                    if recent.len() == shape.frames {
                        recent.pop_front();
                    }
                    recent.push_back((t, out));
                    admitted += 1;
                    if admitted >= shape.frames && (admitted - shape.frames).is_multiple_of(shape.stride) {
                        match build_window(next_id, &recent, shape) {
                            Ok(w) => mailbox.put(w),
                            Err(e) => {
                                mailbox.close(RingEnd::Failed(e));
                                return;
                            }
                        }
                        next_id += 1;
                    }
                }
                Read::Timeout => {}
                Read::Closed(end) => {
                    mailbox.close(end);
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a window thread");
    }
}

fn build_window(id: u64, frames: &VecDeque<(f64, Vec<u8>)>, shape: WindowShape) -> Result<PendingWindow, String> {
    let start = frames.front().map_or(0.0, |f| f.0);
    let end = frames.back().map_or(0.0, |f| f.0);
    let mut b = ClipBuilder::new(shape.height, shape.width).map_err(|e| e.to_string())?;
    for (t, rgb) in frames {
        // Timestamps inside the prompt count from the window's first frame.
        b.push(rgb.clone(), t - start).map_err(|e| e.to_string())?;
    }
    let clip = b.finish().map_err(|e| e.to_string())?;
    Ok(PendingWindow {
        id,
        start_s: start,
        end_s: end,
        frames: frames.len(),
        video: inference::VideoInput {
            pixel_values: clip.pixel_values,
            grid_thw: clip.grid_thw,
            timestamps: clip.timestamps,
        },
    })
}
