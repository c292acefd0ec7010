//! The alerts API: incidents (`/v1/incidents`, one incident, its key frames) and the
//! notification outbox (`/v1/deliveries`).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use protocol::{Delivery, DeliveryList, DeliveryState, ErrorCode, Incident, IncidentList};

use super::{ApiFailure, AppState};
use crate::alerts::{rfc3339, wire_incident};
use crate::store::{DeliveryRow, IncidentQuery};

/// Most items in one answer.
const MAX_LIMIT: u32 = 500;

/// The query of `GET /v1/incidents`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IncidentsParams {
    state: Option<String>,
    monitor: Option<String>,
    limit: Option<u32>,
    /// Checked in front of every route (`require_key`).
    #[allow(dead_code)]
    api_key: Option<String>,
}

/// The query of `GET /v1/deliveries`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveriesParams {
    incident: Option<String>,
    limit: Option<u32>,
    /// Checked in front of every route (`require_key`).
    #[allow(dead_code)]
    api_key: Option<String>,
}

fn limit(l: Option<u32>) -> Result<u32, ApiFailure> {
    let l = l.unwrap_or(50);
    if l == 0 || l > MAX_LIMIT {
        return Err(ApiFailure::bad_request(format!("limit must be 1 to {MAX_LIMIT}")));
    }
    Ok(l)
}

fn not_found(id: &str) -> ApiFailure {
    ApiFailure::of(ErrorCode::NotFound, format!("no incident {id:?}; GET /v1/incidents lists them"))
}

/// `GET /v1/incidents?state=open|closed&monitor=ID&limit=N`: newest first.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    q: Result<Query<IncidentsParams>, QueryRejection>,
) -> Result<axum::Json<IncidentList>, ApiFailure> {
    let Query(p) = q.map_err(|e| ApiFailure::bad_request(e.body_text()))?;
    let open = match p.state.as_deref() {
        None => None,
        Some("open") => Some(true),
        Some("closed") => Some(false),
        Some(other) => return Err(ApiFailure::bad_request(format!("state={other:?}: use open or closed"))),
    };
    let query = IncidentQuery { open, monitor: p.monitor, limit: limit(p.limit)? };
    let rows = state.monitors.store().incidents(&query).await?;
    Ok(axum::Json(IncidentList { incidents: rows.iter().map(wire_incident).collect() }))
}

/// `GET /v1/incidents/{id}`.
pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Incident>, ApiFailure> {
    let row = state.monitors.store().incident(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(wire_incident(&row)))
}

/// `GET /v1/incidents/{id}/frames/{n}.jpg`: the key frame of the incident's `n`th window.
pub(crate) async fn frame(
    State(state): State<Arc<AppState>>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiFailure> {
    let missing = || ApiFailure::of(ErrorCode::NotFound, format!("no frame {file:?} of incident {id:?}"));
    let n: usize = file.strip_suffix(".jpg").and_then(|n| n.parse().ok()).ok_or_else(missing)?;
    let store = state.monitors.store();
    let row = store.incident(&id).await?.ok_or_else(|| not_found(&id))?;
    let name = row.windows.get(n).and_then(|w| w.frame.clone()).ok_or_else(missing)?;
    let bytes = tokio::fs::read(store.incident_file(&name)).await.map_err(|_| missing())?;
    Ok(([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "max-age=86400")], bytes).into_response())
}

/// `GET /v1/incidents/{id}/clip.mp4`: the evidence clip.
pub(crate) async fn clip(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiFailure> {
    let store = state.monitors.store();
    let row = store.incident(&id).await?.ok_or_else(|| not_found(&id))?;
    let missing = || {
        ApiFailure::of(
            ErrorCode::NotFound,
            format!(
                "incident {id:?} has no clip (yet: it is written when the opening window ends; never for URL or \
                 WHIP sources)"
            ),
        )
    };
    let name = row.clip.ok_or_else(missing)?;
    let bytes = tokio::fs::read(store.incident_file(&name)).await.map_err(|_| missing())?;
    Ok(([(header::CONTENT_TYPE, "video/mp4"), (header::CACHE_CONTROL, "max-age=86400")], bytes).into_response())
}

fn wire_delivery(d: DeliveryRow) -> Delivery {
    let state = match d.state.as_str() {
        "delivered" => DeliveryState::Delivered,
        "failed" => DeliveryState::Failed,
        _ => DeliveryState::Pending,
    };
    Delivery {
        id: d.delivery.id,
        incident: d.delivery.incident,
        monitor: d.delivery.monitor,
        event: d.delivery.event,
        target: match d.delivery.kind.as_str() {
            "mqtt" => format!("mqtt:{}", d.delivery.url),
            _ => protocol::redact_url(&d.delivery.url),
        },
        state,
        attempts: d.attempts,
        last_error: d.last_error,
        created_at: rfc3339(d.created_ms),
        delivered_at: d.delivered_ms.map(rfc3339),
        next_attempt_at: (state == DeliveryState::Pending).then(|| rfc3339(d.next_attempt_ms)),
    }
}

/// `GET /v1/deliveries?incident=ID&limit=N`: notifications, newest first, with their attempts.
pub(crate) async fn deliveries(
    State(state): State<Arc<AppState>>,
    q: Result<Query<DeliveriesParams>, QueryRejection>,
) -> Result<axum::Json<DeliveryList>, ApiFailure> {
    let Query(p) = q.map_err(|e| ApiFailure::bad_request(e.body_text()))?;
    let rows = state.monitors.store().deliveries(p.incident.as_deref(), limit(p.limit)?).await?;
    Ok(axum::Json(DeliveryList { deliveries: rows.into_iter().map(wire_delivery).collect() }))
}
