//! The monitors API: `/v1/monitors` (create, list, read, change, delete), a monitor's history
//! (`/v1/monitors/{id}/events`, `.jsonl` export) and event thumbnails.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use protocol::{ErrorCode, Event, EventPage, Monitor, MonitorList, MonitorPatch, MonitorRequest, Source};

use super::{ApiFailure, AppState};
use crate::store::{EventQuery, EventRow, MonitorRow, Store, StoreError};

/// Longest monitor name.
const MAX_NAME: usize = 200;

impl From<StoreError> for ApiFailure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(_) => ApiFailure::of(ErrorCode::Conflict, e.to_string()),
            // A shared database that is away (several nodes): the request can be tried again.
            StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed) => {
                tracing::warn!(error = %e, "the database does not answer");
                ApiFailure::of(ErrorCode::Overloaded, "the database does not answer; try again shortly")
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiFailure::of(ErrorCode::Internal, "the history store failed; the server log says why")
            }
        }
    }
}

use crate::alerts::rfc3339;

fn parse_time(s: &str, what: &str) -> Result<i64, ApiFailure> {
    s.parse::<jiff::Timestamp>().map(|t| t.as_millisecond()).map_err(|e| {
        ApiFailure::bad_request(format!("{what}={s:?} is not an RFC 3339 time (such as 2026-12-01T08:00:00Z): {e}"))
    })
}

fn not_found(id: &str) -> ApiFailure {
    ApiFailure::of(ErrorCode::NotFound, format!("no monitor {id:?}; GET /v1/monitors lists them"))
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiFailure> {
    serde_json::from_slice(body).map_err(|e| ApiFailure::bad_request(format!("invalid JSON body: {e}")))
}

/// An event as the API shows it.
pub(crate) fn wire_event(e: EventRow) -> Event {
    Event {
        id: e.id,
        monitor: e.event.monitor,
        window: e.event.window,
        start_s: e.event.start_s,
        end_s: e.event.end_s,
        started_at: rfc3339(e.event.started_ms),
        prompt: e.event.prompt,
        text: e.event.text,
        finish_reason: e.event.finish_reason,
        usage: e.event.usage,
        timings: e.event.timings,
        thumbnail: e.thumbnail.map(|_| format!("/v1/events/{}/thumbnail.jpg", e.id)),
    }
}

impl AppState {
    /// Checks what a monitor is asked to run; the error says what to change.
    async fn check_monitor(&self, row: &MonitorRow) -> Result<(), ApiFailure> {
        let name = row.name.trim();
        if name.is_empty() || name.len() > MAX_NAME || name.len() != row.name.len() {
            return Err(ApiFailure::bad_request(format!(
                "a monitor's name must be 1 to {MAX_NAME} characters without leading or trailing spaces"
            )));
        }
        match &row.source {
            Source::Upload { id, .. } => {
                if !super::uploads::upload_path(&self.config.data_dir, id).is_some_and(|p| p.is_file()) {
                    return Err(ApiFailure::bad_request(format!("no upload with id {id:?}; POST /v1/uploads first")));
                }
            }
            Source::Rtsp { url, .. } => {
                ingest::rtsp::CameraUrl::parse(url).map_err(ApiFailure::bad_request)?;
            }
            Source::Url { url, .. } => {
                let u = url::Url::parse(url).map_err(|e| ApiFailure::bad_request(format!("invalid url: {e}")))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(ApiFailure::bad_request("a URL source must be http:// or https://"));
                }
            }
            Source::Webrtc { .. } => {
                return Err(ApiFailure::bad_request(
                    "a WHIP stream ends with its publisher and gets a new id each time, so it cannot be monitored: \
                     monitor an RTSP camera, or analyse the stream with a WebSocket start",
                ));
            }
        }
        let params = super::generation(&row.generation, 128);
        // The answer shape compiles against the model's tokenizer (checked when a model is
        // loaded; otherwise the monitor's windows report it).
        if let Ok(analyzer) = self.analyzer() {
            crate::watch::check_answer(&analyzer, &params, "generation.answer")
                .await
                .map_err(ApiFailure::bad_request)?;
        }
        crate::watch::WatchSpec::new(row.source.clone(), row.prompt.clone(), &row.window, params)
            .map_err(ApiFailure::bad_request)?;
        if row.retention.days == Some(0) || row.retention.max_events == Some(0) {
            return Err(ApiFailure::bad_request("retention limits must be at least 1 (leave one out for the default)"));
        }
        if let Some(rule) = &row.alert {
            crate::alerts::Rule::check(rule, row.generation.answer.as_ref()).map_err(ApiFailure::bad_request)?;
        }
        Ok(())
    }

    /// A monitor as the API shows it.
    async fn wire_monitor(&self, row: MonitorRow) -> Result<Monitor, ApiFailure> {
        let store = self.monitors.store();
        let events = store.count_events(&row.id).await?;
        let last = store.events(&EventQuery { monitor: row.id.clone(), limit: 1, ..Default::default() }).await?;
        let status = self.monitors.status(&row.id);
        let (mut state, mut reason) = status.as_ref().map_or((protocol::WatchState::Ended, None), |s| s.state());
        let mut node = store.node_id().filter(|_| status.is_some()).map(str::to_owned);
        if status.is_none() && store.is_shared() {
            // Run by another node (or by none yet): the state its node last reported.
            match store.lease_state(&row.id).await? {
                Some(lease) => {
                    state = lease
                        .state
                        .and_then(|s| serde_json::from_value(serde_json::Value::String(s)).ok())
                        .unwrap_or(protocol::WatchState::Starting);
                    reason = lease.reason;
                    node = Some(lease.node);
                }
                None if row.enabled => {
                    state = protocol::WatchState::Starting;
                    reason = Some("waiting for a node with room to claim it".into());
                }
                None => state = protocol::WatchState::Paused,
            }
        }
        let counters =
            status.as_ref().map_or(protocol::MonitorCounters { events, ..Default::default() }, |s| s.counters(events));
        Ok(Monitor {
            id: row.id,
            name: row.name,
            source: row.source.redacted(),
            prompt: row.prompt,
            window: row.window,
            generation: row.generation,
            enabled: row.enabled,
            retention: Store::effective(row.retention, self.monitors.options().retention),
            alert: row.alert.as_ref().map(protocol::AlertRule::redacted),
            open_incident: status.as_ref().and_then(|s| s.open_incident()),
            state,
            reason,
            watch: status.and_then(|s| s.watch_id()),
            node,
            counters,
            last_event: last.into_iter().next().map(wire_event),
            created_at: rfc3339(row.created_ms),
            updated_at: rfc3339(row.updated_ms),
        })
    }
}

/// The top-level `answer` of a monitor request: the same as `generation.answer`.
fn set_answer(
    generation: &mut protocol::GenerationSettings,
    answer: Option<protocol::AnswerFormat>,
) -> Result<(), ApiFailure> {
    let Some(a) = answer else { return Ok(()) };
    if generation.answer.as_ref().is_some_and(|g| *g != a) {
        return Err(ApiFailure::bad_request("answer and generation.answer differ; give one of them"));
    }
    generation.answer = Some(a);
    Ok(())
}

/// A rule sent back as read (`"secret": "***"`) keeps the stored secret of the same webhook.
fn keep_secrets(mut new: protocol::AlertRule, old: Option<&protocol::AlertRule>) -> protocol::AlertRule {
    let old_targets = old.map(|o| o.notify.as_slice()).unwrap_or_default();
    for protocol::NotifyTarget::Webhook(w) in &mut new.notify {
        if w.secret.as_deref() == Some("***") {
            let stored = old_targets.iter().find_map(|protocol::NotifyTarget::Webhook(o)| {
                (protocol::redact_url(&o.url) == w.url || o.url == w.url).then(|| (o.url.clone(), o.secret.clone()))
            });
            if let Some((url, secret)) = stored {
                w.url = url;
                w.secret = secret;
            }
        }
    }
    new
}

/// `POST /v1/monitors`.
pub(crate) async fn create(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiFailure> {
    let req: MonitorRequest = json_body(&body)?;
    let now = crate::store::now_ms();
    let mut generation = req.generation.unwrap_or_default();
    set_answer(&mut generation, req.answer)?;
    let row = MonitorRow {
        id: format!("m{}", super::new_id()),
        name: req.name,
        source: req.source,
        prompt: req.prompt,
        window: req.window.unwrap_or_default(),
        generation,
        enabled: req.enabled.unwrap_or(true),
        retention: req.retention.unwrap_or_default(),
        alert: req.alert,
        created_ms: now,
        updated_ms: now,
    };
    state.check_monitor(&row).await?;
    state.monitors.create(row.clone()).await?;
    tracing::info!(monitor = %row.id, name = %row.name, source = ?row.source.redacted(), "monitor created");
    let location = format!("/v1/monitors/{}", row.id);
    let m = state.wire_monitor(row).await?;
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], axum::Json(m)).into_response())
}

/// `GET /v1/monitors`.
pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Result<axum::Json<MonitorList>, ApiFailure> {
    let mut monitors = Vec::new();
    for row in state.monitors.store().monitors().await? {
        monitors.push(state.wire_monitor(row).await?);
    }
    Ok(axum::Json(MonitorList { monitors }))
}

/// `GET /v1/monitors/{id}`.
pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Monitor>, ApiFailure> {
    let row = state.monitors.store().monitor(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(state.wire_monitor(row).await?))
}

/// `PATCH /v1/monitors/{id}`.
pub(crate) async fn patch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Monitor>, ApiFailure> {
    let p: MonitorPatch = json_body(&body)?;
    let mut row = state.monitors.store().monitor(&id).await?.ok_or_else(|| not_found(&id))?;
    if let Some(v) = p.name {
        row.name = v;
    }
    if let Some(v) = p.prompt {
        row.prompt = v;
    }
    if let Some(v) = p.window {
        row.window = v;
    }
    let patched_answer = p.generation.as_ref().and_then(|g| g.answer.clone());
    if let Some(v) = p.generation {
        row.generation = v;
    }
    if let Some(v) = p.retention {
        row.retention = v;
    }
    if let Some(v) = p.enabled {
        row.enabled = v;
    }
    if let Some(a) = p.answer {
        // The top-level answer replaces the stored one; only a patch that gives both may conflict.
        row.generation.answer = patched_answer;
        set_answer(&mut row.generation, Some(a))?;
    }
    if let Some(alert) = p.alert {
        row.alert = alert.map(|new| keep_secrets(new, row.alert.as_ref()));
    }
    row.updated_ms = crate::store::now_ms();
    state.check_monitor(&row).await?;
    if !state.monitors.update(row.clone()).await? {
        return Err(not_found(&id));
    }
    Ok(axum::Json(state.wire_monitor(row).await?))
}

/// `DELETE /v1/monitors/{id}`: stops it, ends its viewers, removes its history.
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    if state.monitors.delete(&id).await? {
        tracing::info!(monitor = %id, "monitor deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&id))
    }
}

/// The query of `GET /v1/monitors/{id}/events`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsParams {
    since: Option<String>,
    until: Option<String>,
    q: Option<String>,
    limit: Option<u32>,
    before: Option<String>,
    /// The key, checked in front of every route (`require_key`); named here so that it is not
    /// an unknown parameter.
    #[allow(dead_code)]
    api_key: Option<String>,
}

/// Most events in one page.
const MAX_PAGE: u32 = 500;

fn event_query(id: &str, p: &EventsParams) -> Result<EventQuery, ApiFailure> {
    let limit = p.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiFailure::bad_request(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let before_id = match &p.before {
        Some(b) => Some(
            b.parse::<i64>()
                .map_err(|_| ApiFailure::bad_request("before must be a `next` value of an earlier page"))?,
        ),
        None => None,
    };
    Ok(EventQuery {
        monitor: id.to_owned(),
        since_ms: p.since.as_deref().map(|s| parse_time(s, "since")).transpose()?,
        until_ms: p.until.as_deref().map(|s| parse_time(s, "until")).transpose()?,
        before_id,
        text: p.q.clone().filter(|q| !q.trim().is_empty()),
        limit,
    })
}

fn params(q: Result<Query<EventsParams>, QueryRejection>) -> Result<EventsParams, ApiFailure> {
    q.map(|Query(p)| p).map_err(|e| ApiFailure::bad_request(e.body_text()))
}

/// `GET /v1/monitors/{id}/events`: newest first, `next` for the following page.
pub(crate) async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<EventsParams>, QueryRejection>,
) -> Result<axum::Json<EventPage>, ApiFailure> {
    let p = params(q)?;
    let store = state.monitors.store();
    store.monitor(&id).await?.ok_or_else(|| not_found(&id))?;
    let query = event_query(&id, &p)?;
    let rows = store.events(&query).await?;
    let next = (rows.len() == query.limit as usize).then(|| rows.last().map(|e| e.id.to_string())).flatten();
    Ok(axum::Json(EventPage { events: rows.into_iter().map(wire_event).collect(), next }))
}

/// `GET /v1/monitors/{id}/events.jsonl`: the whole history, oldest first, one event per line.
pub(crate) async fn export(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Response, ApiFailure> {
    // Unknown parameters are refused here too.
    params(q)?;
    let store = state.monitors.store().clone();
    store.monitor(&id).await?.ok_or_else(|| not_found(&id))?;
    // Pages are read newest first; the export is written oldest first, a page at a time.
    let mut pages: Vec<Vec<EventRow>> = Vec::new();
    let mut query = EventQuery { monitor: id.clone(), limit: MAX_PAGE, ..Default::default() };
    loop {
        let page = store.events(&query).await?;
        let full = page.len() == MAX_PAGE as usize;
        query.before_id = page.last().map(|e| e.id);
        pages.push(page);
        if !full {
            break;
        }
    }
    let lines = pages.into_iter().rev().map(|page| {
        let mut chunk = String::new();
        for e in page.into_iter().rev() {
            chunk.push_str(&serde_json::to_string(&wire_event(e)).unwrap_or_default());
            chunk.push('\n');
        }
        Ok::<_, std::convert::Infallible>(chunk)
    });
    let body = axum::body::Body::from_stream(futures_util::stream::iter(lines));
    let disposition = format!("attachment; filename=\"{id}-events.jsonl\"");
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson".to_owned()), (header::CONTENT_DISPOSITION, disposition)], body)
        .into_response())
}

/// `GET /v1/events/{id}/thumbnail.jpg`.
pub(crate) async fn thumbnail(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiFailure> {
    let missing = || ApiFailure::of(ErrorCode::NotFound, format!("no thumbnail for event {id:?}"));
    let event_id: i64 = id.parse().map_err(|_| missing())?;
    let store = state.monitors.store();
    let row = store.event(event_id).await?.ok_or_else(missing)?;
    let file = row.thumbnail.ok_or_else(missing)?;
    let bytes = tokio::fs::read(store.thumbnail_file(&file)).await.map_err(|_| missing())?;
    Ok(([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "max-age=86400")], bytes).into_response())
}

/// `GET /v1/monitors/{id}/frame.jpg`: the monitor's newest analysed frame (its live thumbnail).
pub(crate) async fn frame(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.monitors.status(&id).and_then(|s| s.latest_frame()) {
        Some(frame) => super::session::jpeg_response(frame).await,
        None => ApiFailure::of(ErrorCode::NotFound, format!("no frame of monitor {id:?} yet")).into_response(),
    }
}
