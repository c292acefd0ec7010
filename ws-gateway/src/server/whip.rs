//! WHIP over HTTP (RFC 9725); the WebRTC side is `ingest::webrtc`.
//!
//! - `POST /v1/whip` with an SDP offer (`Content-Type: application/sdp`) answers `201 Created`
//!   with the SDP answer (every ICE candidate included; this endpoint does not trickle, so
//!   `PATCH` is answered 405) and `Location: /v1/whip/{id}`.
//! - `DELETE /v1/whip/{id}` ends the stream, and the session analysing it.
//! - `GET /v1/whip` lists the streams.
//!
//! A WebSocket session analyses a stream with `start {source: {kind: "webrtc", resource: id}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ingest::webrtc::WhipError;
use protocol::ErrorCode;

use super::{ApiFailure, AppState};

/// `POST /v1/whip`.
pub(crate) async fn publish(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiFailure> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.trim().to_ascii_lowercase().starts_with("application/sdp") {
        return Err(ApiFailure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadRequest,
            "a WHIP offer is an SDP body with Content-Type: application/sdp",
        ));
    }
    let sdp = String::from_utf8(body.to_vec()).map_err(|_| ApiFailure::bad_request("the SDP offer is not UTF-8"))?;
    if !sdp.starts_with("v=0") {
        return Err(ApiFailure::bad_request("the body is not an SDP offer (it must start with v=0)"));
    }
    let (id, answer) = state.whip.publish(sdp).await.map_err(|e| match e {
        WhipError::BadOffer(_) | WhipError::NoVideo => ApiFailure::bad_request(e.to_string()),
        WhipError::Full(_) => ApiFailure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Overloaded, e.to_string()),
        WhipError::Internal(_) => {
            ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string())
        }
    })?;
    let mut response = (StatusCode::CREATED, answer).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/sdp"));
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/whip/{id}")) {
        h.insert(header::LOCATION, v);
    }
    Ok(response)
}

/// `DELETE /v1/whip/{id}`.
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    if state.whip.delete(&id).await {
        Ok(StatusCode::OK)
    } else {
        Err(ApiFailure::new(StatusCode::NOT_FOUND, ErrorCode::BadRequest, format!("no WHIP resource {id:?}")))
    }
}

/// `GET /v1/whip`: the published streams, newest first.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
) -> Result<axum::Json<Vec<protocol::WhipResource>>, ApiFailure> {
    let out = state
        .whip
        .list()
        .into_iter()
        .map(|r| protocol::WhipResource {
            id: r.id,
            codec: r.codec.map(|c| c.name().to_owned()),
            connected: r.connected,
            watched: r.watchers > 0,
            watchers: r.watchers,
            age_s: r.age.as_secs_f64(),
        })
        .collect();
    Ok(axum::Json(out))
}
