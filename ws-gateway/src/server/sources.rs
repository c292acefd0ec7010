//! Opening a session's source: a replayed upload or URL, an RTSP camera, or a WHIP stream. Every
//! kind ends in the same [`FrameRing`]; live kinds also report [`SourceEvent`]s (first frame,
//! reconnects).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ingest::live::{EventSink, FeedOptions, LiveFeed, SourceEvent};
use ingest::replay::{Admit, Replay, ReplayOptions};
use ingest::ring::{FrameRing, RingEnd};
use protocol::{ErrorCode, ServerMessage, Source, SourceInfo};
use tokio::sync::mpsc;

use super::{AppState, uploads};

/// An opened source.
pub(crate) struct Opened {
    /// What it is (for live sources, filled in when the first frame arrives).
    pub(crate) info: SourceInfo,
    /// Live sources' events.
    pub(crate) events: Option<mpsc::Receiver<SourceEvent>>,
    /// A fetched URL's file, removed when the session ends.
    _temp: Option<super::rest::TempFile>,
}

type Failure = (ErrorCode, String);

/// An event sink that never blocks the source: events beyond what the session has read are
/// dropped (the session reads them at once; only a stuck session would lose any).
pub(crate) fn event_channel() -> (EventSink, mpsc::Receiver<SourceEvent>) {
    let (tx, rx) = mpsc::channel(64);
    (Arc::new(move |e| drop(tx.try_send(e))), rx)
}

/// Opens `source` and starts it feeding `ring` with the frames `admit` takes.
pub(crate) async fn open(
    state: &Arc<AppState>,
    session: &str,
    source: &Source,
    ring: Arc<FrameRing>,
    admit: Admit,
) -> Result<Opened, Failure> {
    let (path, opts, temp) = match source {
        Source::Upload { id, speed, looped } => match uploads::upload_path(&state.config.data_dir, id) {
            Some(p) if p.is_file() => {
                (p, ReplayOptions { speed: speed.unwrap_or(1.0), looped: looped.unwrap_or(false) }, None)
            }
            _ => return Err((ErrorCode::BadRequest, format!("no upload with id {id:?}"))),
        },
        Source::Url { url, speed, looped } => match super::rest::fetch_to_temp(state, url).await {
            Ok(file) => {
                let path = file.0.clone();
                (path, ReplayOptions { speed: speed.unwrap_or(1.0), looped: looped.unwrap_or(false) }, Some(file))
            }
            Err(e) => {
                let code = if e.status == StatusCode::BAD_REQUEST { ErrorCode::BadRequest } else { ErrorCode::Source };
                return Err((code, e.message));
            }
        },
        Source::Rtsp { url, transport } => {
            let camera = ingest::rtsp::CameraUrl::parse(url).map_err(|e| (ErrorCode::BadRequest, e))?;
            let mut opts = state.config.live.rtsp.clone();
            match transport {
                Some(protocol::RtspTransport::Tcp) => opts.transport = ingest::rtsp::RtspTransport::Tcp,
                Some(protocol::RtspTransport::Udp) => opts.transport = ingest::rtsp::RtspTransport::Udp,
                None => {}
            }
            let (sink, events) = event_channel();
            let feed = LiveFeed::start(session, ring, admit, sink.clone(), FeedOptions::default())
                .map_err(|e| (ErrorCode::Internal, format!("cannot start a decoder: {e}")))?;
            tracing::info!(camera = camera.redacted(), transport = ?opts.transport, "opening RTSP camera");
            tokio::spawn(ingest::rtsp::run(camera, opts, feed, sink));
            return Ok(Opened { info: pending_info(), events: Some(events), _temp: None });
        }
        Source::Webrtc { resource } => {
            let (sink, events) = event_channel();
            state.whip.attach(resource, session, ring, admit, sink).map_err(|e| {
                let code = match e {
                    ingest::webrtc::AttachError::Internal(_) => ErrorCode::Internal,
                    _ => ErrorCode::BadRequest,
                };
                (code, e.to_string())
            })?;
            return Ok(Opened { info: pending_info(), events: Some(events), _temp: None });
        }
    };
    let info = match tokio::task::spawn_blocking({
        let path = path.clone();
        move || ingest::probe(&path)
    })
    .await
    {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => return Err((ErrorCode::Source, e.to_string())),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    Replay::start(&path, opts, ring, admit).map_err(|e| (ErrorCode::Source, e.to_string()))?;
    Ok(Opened {
        info: SourceInfo { width: info.width, height: info.height, fps: info.fps, codec: info.codec },
        events: None,
        _temp: temp,
    })
}

fn pending_info() -> SourceInfo {
    SourceInfo { width: 0, height: 0, fps: 0.0, codec: String::new() }
}

/// Waits for a live source's first decoded frame (or its failure).
pub(crate) async fn first_frame(
    events: &mut mpsc::Receiver<SourceEvent>,
    ring: &FrameRing,
    timeout: Duration,
) -> Result<SourceInfo, String> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    let ended = |end: RingEnd| match end {
        RingEnd::Failed(e) => e,
        RingEnd::EndOfStream => "the source ended before its first frame".to_owned(),
        RingEnd::Stopped => "stopped".to_owned(),
    };
    loop {
        if let Some(end) = ring.end() {
            return Err(ended(end));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let why = last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            return Err(format!("no video arrived within {timeout:?}{why}"));
        }
        match tokio::time::timeout(left.min(Duration::from_millis(200)), events.recv()).await {
            Ok(Some(SourceEvent::Started { width, height, codec, fps })) => {
                return Ok(SourceInfo { width, height, fps, codec });
            }
            Ok(Some(SourceEvent::Reconnecting { error, .. })) => last_error = Some(error),
            Ok(Some(SourceEvent::Resumed { .. })) => {}
            // The source closes the ring before it drops its end of the channel.
            Ok(None) => return Err(ring.end().map_or_else(|| "the source ended before its first frame".into(), ended)),
            Err(_) => {}
        }
    }
}

/// The next live event, or never for sources without events.
pub(crate) async fn next_event(events: &mut Option<mpsc::Receiver<SourceEvent>>) -> Option<SourceEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A live event as the client sees it.
pub(crate) fn wire_event(ev: SourceEvent) -> Option<ServerMessage> {
    match ev {
        SourceEvent::Started { .. } => None,
        SourceEvent::Reconnecting { attempt, error, retry_in } => {
            Some(ServerMessage::Reconnecting { attempt, error, retry_in_ms: retry_in.as_millis() as u64 })
        }
        SourceEvent::Resumed { from, to } => {
            Some(ServerMessage::Resumed { from_s: from.as_secs_f64(), to_s: to.as_secs_f64() })
        }
    }
}
