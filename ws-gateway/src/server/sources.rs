//! The server's real sources behind [`Sources`]: a replayed upload or URL, an RTSP camera, or a
//! WHIP stream. Every kind ends in the watch's [`ingest::ring::FrameRing`]; live kinds also
//! report [`SourceEvent`]s (first frame, reconnects).

use std::sync::Arc;

use axum::http::StatusCode;
use futures_util::future::BoxFuture;
use ingest::live::{EventSink, FeedOptions, LiveFeed, SourceEvent};
use ingest::replay::{Replay, ReplayOptions};
use protocol::{ErrorCode, Source, SourceInfo};
use tokio::sync::mpsc;

use super::{ServeConfig, uploads};
use crate::watch::{Feed, Opened, SourceError, Sources};

/// Opens sources as the server is configured.
pub(crate) struct ServerSources {
    pub(crate) config: Arc<ServeConfig>,
    pub(crate) whip: Arc<ingest::webrtc::Whip>,
}

/// An event sink that never blocks the source: events beyond what the watch has read are
/// dropped (the watch reads them at once; only a stuck watch would lose any).
fn event_channel() -> (EventSink, mpsc::Receiver<SourceEvent>) {
    let (tx, rx) = mpsc::channel(64);
    (Arc::new(move |e| drop(tx.try_send(e))), rx)
}

fn failure(code: ErrorCode, message: impl Into<String>) -> SourceError {
    SourceError { code, message: message.into() }
}

/// Detaches a watch from its WHIP resource when the watch ends.
struct WhipAttachment {
    whip: Arc<ingest::webrtc::Whip>,
    resource: String,
    watch: String,
}

impl Drop for WhipAttachment {
    fn drop(&mut self) {
        self.whip.detach(&self.resource, &self.watch);
    }
}

impl Sources for ServerSources {
    fn open<'a>(&'a self, name: &'a str, source: &'a Source, feed: Feed) -> BoxFuture<'a, Result<Opened, SourceError>> {
        Box::pin(self.open_source(name, source, feed))
    }
}

impl ServerSources {
    async fn open_source(&self, name: &str, source: &Source, feed: Feed) -> Result<Opened, SourceError> {
        let Feed { ring, admit, stop, packets } = feed;
        let (path, opts, temp) = match source {
            Source::Upload { id, speed, looped } => match uploads::upload_path(&self.config.data_dir, id) {
                Some(p) if p.is_file() => {
                    (p, ReplayOptions { speed: speed.unwrap_or(1.0), looped: looped.unwrap_or(false) }, None)
                }
                _ => return Err(failure(ErrorCode::BadRequest, format!("no upload with id {id:?}"))),
            },
            Source::Url { url, speed, looped } => match super::rest::fetch_to_temp(&self.config, url).await {
                Ok(file) => {
                    let path = file.0.clone();
                    (path, ReplayOptions { speed: speed.unwrap_or(1.0), looped: looped.unwrap_or(false) }, Some(file))
                }
                Err(e) => {
                    let code =
                        if e.status == StatusCode::BAD_REQUEST { ErrorCode::BadRequest } else { ErrorCode::Source };
                    return Err(failure(code, e.message));
                }
            },
            Source::Rtsp { url, transport } => {
                let camera = ingest::rtsp::CameraUrl::parse(url).map_err(|e| failure(ErrorCode::BadRequest, e))?;
                let mut opts = self.config.live.rtsp.clone();
                match transport {
                    Some(protocol::RtspTransport::Tcp) => opts.transport = ingest::rtsp::RtspTransport::Tcp,
                    Some(protocol::RtspTransport::Udp) => opts.transport = ingest::rtsp::RtspTransport::Udp,
                    None => {}
                }
                let (sink, events) = event_channel();
                let options = FeedOptions { packets, ..Default::default() };
                let feed = LiveFeed::start(name, ring, admit, sink.clone(), options, stop.clone())
                    .map_err(|e| failure(ErrorCode::Internal, format!("cannot start a decoder: {e}")))?;
                tracing::info!(camera = camera.redacted(), transport = ?opts.transport, "opening RTSP camera");
                let task = ingest::rtsp::run(camera, opts, feed, sink, stop);
                tokio::spawn(tracing::Instrument::in_current_span(task));
                return Ok(Opened { info: None, events: Some(events), hold: None });
            }
            Source::Webrtc { resource } => {
                let (sink, events) = event_channel();
                self.whip.attach(resource, name, ring, admit, sink, stop).map_err(|e| {
                    let code = match e {
                        ingest::webrtc::AttachError::Internal(_) => ErrorCode::Internal,
                        ingest::webrtc::AttachError::NotFound(_) => ErrorCode::BadRequest,
                    };
                    failure(code, e.to_string())
                })?;
                let attachment =
                    WhipAttachment { whip: self.whip.clone(), resource: resource.clone(), watch: name.to_owned() };
                return Ok(Opened { info: None, events: Some(events), hold: Some(Box::new(attachment)) });
            }
        };
        let info = match tokio::task::spawn_blocking({
            let path = path.clone();
            move || ingest::probe(&path)
        })
        .await
        {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return Err(failure(ErrorCode::Source, e.to_string())),
            Err(e) => return Err(failure(ErrorCode::Internal, e.to_string())),
        };
        Replay::start(&path, opts, ring, admit, stop)
            .map_err(|e| failure(ErrorCode::Source, super::media_error(e, &path)))?;
        Ok(Opened {
            info: Some(SourceInfo { width: info.width, height: info.height, fps: info.fps, codec: info.codec }),
            events: None,
            hold: temp.map(|t| Box::new(t) as Box<dyn Send>),
        })
    }
}
