//! The HTTP and WebSocket service (`lookout serve`).
//!
//! - `GET /v1/health`: loading, ready or failed, with the model and device.
//! - `GET /v1/models`: the served model.
//! - `POST /v1/uploads`: a clip, streamed to disk under the data directory, size-limited and
//!   probed; answers its id.
//! - `GET /v1/ws`: a streaming session (see the `protocol` crate and `session`): it starts a
//!   watch (`crate::watch`) or subscribes to a running one, and streams its windows' tokens.
//! - `GET /v1/watches`: the running watches; `GET /v1/sessions/{id}/frame.jpg`: a watch's newest
//!   frame.
//!
//! The model loads on its own thread after the listener is up, so health answers at once.

mod incidents;
pub(crate) mod metrics;
mod monitors;
mod nodes;
mod openai;
pub(crate) mod rest;
mod session;
mod sources;
mod ui;
mod uploads;
mod whip;

pub use ingest::webrtc::{IceServer, WebrtcConfig};
pub(crate) use uploads::new_id;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use protocol::{ApiError, ApiErrorBody, ErrorCode, Health, HealthStatus};
use tokio::sync::watch;

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Model directory or Hub id.
    pub model: String,
    /// Device.
    pub device: inference::DeviceChoice,
    /// Dtype.
    pub dtype: inference::DType,
    /// Where uploads are stored.
    pub data_dir: PathBuf,
    /// Bearer token required on every route but health.
    pub api_key: Option<String>,
    /// Largest accepted upload, bytes.
    pub max_upload_bytes: u64,
    /// Concurrent analysis sessions: watches started over WebSockets (subscriptions are not counted).
    pub max_sessions: usize,
    /// Concurrent WebSocket connections of any kind (subscriptions included).
    pub max_connections: usize,
    /// Longest wait for a WebSocket's `start` or `subscribe` before it is closed.
    pub ws_start_timeout: std::time::Duration,
    /// Longest wait for a request's headers (the first one, or the next on a kept-alive
    /// connection) before the connection is closed: a client that opens connections and never
    /// finishes a request cannot hold them.
    pub header_read_timeout: std::time::Duration,
    /// Largest WebSocket message from a client, bytes.
    pub max_ws_message_bytes: usize,
    /// Requests waiting for the engine.
    pub engine_queue: usize,
    /// Let URL sources reach loopback, private and link-local addresses.
    pub allow_private_urls: bool,
    /// Live sources (RTSP).
    pub live: LiveConfig,
    /// History limits of monitors that set none.
    pub retention: protocol::Retention,
    /// Between retention passes over every monitor's history.
    pub retention_every: std::time::Duration,
    /// WebRTC ingest (WHIP).
    pub webrtc: WebrtcConfig,
    /// Alert notifications.
    pub alerts: AlertConfig,
    /// MiB that clips being sampled, and sampled clips waiting for the model, may take in all
    /// (REST and chat requests; each reserves its estimate before decoding).
    pub media_budget_mb: u64,
    /// MiB of encoded frame pairs kept for overlapping windows (0: none).
    pub vision_cache_mb: u64,
    /// MiB of KV cache the running requests may take together (`None`: the device's default,
    /// see [`inference::device::default_kv_budget`]).
    pub kv_cache_mb: Option<u64>,
    /// Requests decoded together at most.
    pub max_batch: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Several nodes sharing a PostgreSQL database; one node with its own SQLite without.
    pub cluster: Option<SharedDatabase>,
}

/// A database several nodes share, and this node's part.
#[derive(Clone)]
pub struct SharedDatabase {
    /// `postgres://user:password@host/db` (its password is never logged).
    pub url: String,
    /// This node; its id and address default to where it listens.
    pub node: NodeSettings,
}

impl std::fmt::Debug for SharedDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDatabase").field("url", &redact_url(&self.url)).field("node", &self.node).finish()
    }
}

/// A node's settings; `None` means "from the listening address".
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// `--node-id`.
    pub id: Option<String>,
    /// `--node-address`.
    pub address: Option<String>,
    /// `--max-monitors`.
    pub max_monitors: u32,
    /// `--lease-s`.
    pub lease: std::time::Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings { id: None, address: None, max_monitors: 32, lease: std::time::Duration::from_secs(10) }
    }
}

/// A URL with its password replaced by `***` (for errors and logs).
pub fn redact_url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(an unreadable URL)".to_owned(),
    }
}

/// How alert notifications are delivered.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    /// Attempts per notification before it is marked failed.
    pub webhook_attempts: u32,
    /// Wait after the first failed attempt (doubled after each, up to 10 minutes).
    pub webhook_retry: std::time::Duration,
    /// Per attempt.
    pub webhook_timeout: std::time::Duration,
    /// Webhooks may go to loopback, private and link-local addresses (a Home Assistant on the
    /// LAN). `allow_private_urls` permits them too.
    pub allow_private_webhooks: bool,
    /// `mqtt://[user:password@]host[:port]` of an MQTT broker.
    pub mqtt_url: Option<String>,
}

impl Default for AlertConfig {
    fn default() -> Self {
        let d = crate::alerts::AlertOptions::default();
        AlertConfig {
            webhook_attempts: d.attempts,
            webhook_retry: d.retry_initial,
            webhook_timeout: d.timeout,
            allow_private_webhooks: false,
            mqtt_url: None,
        }
    }
}

pub(crate) use uploads::upload_path;

/// The media budget of the server: MiB permits.
#[derive(Clone)]
pub(crate) struct MediaBudget {
    permits: Arc<tokio::sync::Semaphore>,
    total_mb: u64,
}

/// How long a request waits for its share of the media budget.
const MEDIA_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl MediaBudget {
    fn new(total_mb: u64) -> Self {
        let total_mb = total_mb.clamp(1, u64::from(u32::MAX >> 4));
        MediaBudget { permits: Arc::new(tokio::sync::Semaphore::new(total_mb as usize)), total_mb }
    }

    /// Reserves `bytes` (on a blocking thread): waits while other requests hold the budget, up
    /// to a minute; refuses a clip that could never fit.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<tokio::sync::OwnedSemaphorePermit, crate::clip::ClipError> {
        let mb = bytes.div_ceil(1 << 20).max(1);
        let total = self.total_mb;
        if mb > total {
            return Err(crate::clip::ClipError::Budget {
                never: true,
                message: format!(
                    "this clip needs about {mb} MiB to decode and hold (its resolution, and the count and size of the \
                     frames sampled), more than the server's {total} MiB for clips (--media-budget-mb): lower fps or \
                     max_pixels, or send a lower resolution"
                ),
            });
        }
        let acquire = self.permits.clone().acquire_many_owned(mb as u32);
        let waited = tokio::runtime::Handle::current().block_on(tokio::time::timeout(MEDIA_WAIT, acquire));
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => {
                Err(crate::clip::ClipError::Budget { never: false, message: "the server is stopping".into() })
            }
            Err(_) => Err(crate::clip::ClipError::Budget {
                never: false,
                message: format!(
                    "other clips hold the server's {total} MiB for clips; this one needs {mb} MiB: try again shortly"
                ),
            }),
        }
    }
}

/// Checks an MQTT broker URL (`--mqtt-url`); the error never repeats a password.
pub fn check_mqtt_url(url: &str) -> Result<(), String> {
    crate::notify::mqtt::MqttOptions::parse(url).map(drop)
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: String::new(),
            device: inference::DeviceChoice::Cpu,
            dtype: inference::DType::F32,
            data_dir: PathBuf::from("lookout-data"),
            api_key: None,
            max_upload_bytes: 512 << 20,
            max_sessions: 8,
            max_connections: 256,
            ws_start_timeout: std::time::Duration::from_secs(30),
            header_read_timeout: std::time::Duration::from_secs(10),
            max_ws_message_bytes: 64 * 1024,
            engine_queue: 8,
            allow_private_urls: false,
            live: LiveConfig::default(),
            retention: crate::monitors::MonitorOptions::default().retention,
            retention_every: crate::monitors::MonitorOptions::default().retention_every,
            webrtc: WebrtcConfig::default(),
            alerts: AlertConfig::default(),
            media_budget_mb: 2048,
            vision_cache_mb: 512,
            kv_cache_mb: None,
            max_batch: inference::engine::DEFAULT_MAX_RUNNING,
            prefill_chunk: inference::engine::DEFAULT_PREFILL_CHUNK,
            cluster: None,
        }
    }
}

/// Live-source settings.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// RTSP connection and reconnection.
    pub rtsp: ingest::rtsp::RtspOptions,
    /// Longest wait for a live source's first frame before the session fails.
    pub first_frame_timeout: std::time::Duration,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            rtsp: ingest::rtsp::RtspOptions::default(),
            first_frame_timeout: std::time::Duration::from_secs(20),
        }
    }
}

/// Service counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) sessions: std::sync::atomic::AtomicU64,
    pub(crate) tokens: std::sync::atomic::AtomicU64,
    pub(crate) uploads: std::sync::atomic::AtomicU64,
    pub(crate) requests: std::sync::atomic::AtomicU64,
}

/// The model's state as the service sees it.
#[derive(Clone)]
pub(crate) enum ModelState {
    Loading,
    Ready(inference::Engine),
    Failed(String),
    /// A stand-in analyzer (session tests without a model).
    #[cfg(test)]
    Fake(Arc<dyn crate::watch::Analyzer>),
}

/// Shared state of the service.
pub(crate) struct AppState {
    pub(crate) config: Arc<ServeConfig>,
    /// The model's state; monitors wait on it for the model to load.
    pub(crate) model: watch::Sender<ModelState>,
    /// Open WebSocket connections.
    pub(crate) connections: AtomicUsize,
    /// Watches started by `start` and still running (limited by `max_sessions`).
    pub(crate) sessions: AtomicUsize,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) next_session: AtomicUsize,
    pub(crate) metrics: Metrics,
    pub(crate) whip: Arc<ingest::webrtc::Whip>,
    /// The running watches.
    pub(crate) watches: crate::watch::Watches,
    /// The monitors and their history.
    pub(crate) monitors: crate::monitors::Monitors,
    /// Memory for clips of REST and chat requests.
    pub(crate) media: MediaBudget,
    /// With several nodes: the lease loop's view.
    pub(crate) cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// Waits on the model's state for monitors.
struct ModelWaiter(watch::Receiver<ModelState>);

impl crate::monitors::Models for ModelWaiter {
    fn ready(&self) -> futures_util::future::BoxFuture<'_, Result<Arc<dyn crate::watch::Analyzer>, String>> {
        let mut rx = self.0.clone();
        Box::pin(async move {
            let state =
                rx.wait_for(|s| !matches!(s, ModelState::Loading)).await.map_err(|_| "the server is stopping")?;
            match &*state {
                ModelState::Ready(e) => Ok(Arc::new(e.clone()) as Arc<dyn crate::watch::Analyzer>),
                ModelState::Failed(e) => Err(format!("the model failed to load: {e}")),
                #[cfg(test)]
                ModelState::Fake(a) => Ok(a.clone()),
                ModelState::Loading => Err("the model is still loading".to_owned()),
            }
        })
    }
}

impl AppState {
    /// A state for `config` whose watches open sources with `sources`.
    pub(crate) fn new(
        config: Arc<ServeConfig>,
        whip: Arc<ingest::webrtc::Whip>,
        sources: Arc<dyn crate::watch::Sources>,
        shutdown: watch::Receiver<bool>,
        store: crate::store::Store,
    ) -> Self {
        let options =
            crate::watch::WatchOptions { first_frame_timeout: config.live.first_frame_timeout, ..Default::default() };
        let watches = crate::watch::Watches::new(sources, options);
        let model = watch::Sender::new(ModelState::Loading);
        let monitor_options = crate::monitors::MonitorOptions {
            retention: config.retention,
            retention_every: config.retention_every,
            ..Default::default()
        };
        let a = &config.alerts;
        let alert_options = crate::alerts::AlertOptions {
            attempts: a.webhook_attempts.max(1),
            retry_initial: a.webhook_retry,
            timeout: a.webhook_timeout,
            allow_private: a.allow_private_webhooks || config.allow_private_urls,
            mqtt: a.mqtt_url.as_deref().and_then(|u| {
                crate::notify::mqtt::MqttOptions::parse(u)
                    .inspect_err(|e| tracing::error!(error = %e, "MQTT is off"))
                    .ok()
            }),
            ..Default::default()
        };
        let alerts = crate::alerts::Alerts::start(store.clone(), alert_options);
        let monitors = crate::monitors::Monitors::new(
            store,
            watches.clone(),
            Arc::new(ModelWaiter(model.subscribe())),
            monitor_options,
            alerts,
        );
        let media = MediaBudget::new(config.media_budget_mb);
        AppState {
            config,
            model,
            connections: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            shutdown,
            next_session: AtomicUsize::new(1),
            metrics: Metrics::default(),
            whip,
            watches,
            monitors,
            media,
            cluster: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn engine(&self) -> Result<inference::Engine, ApiFailure> {
        match &*self.model.borrow() {
            ModelState::Ready(e) => Ok(e.clone()),
            ModelState::Loading => Err(ApiFailure::unavailable("the model is still loading; see /v1/health")),
            ModelState::Failed(e) => Err(ApiFailure::unavailable(&format!("the model failed to load: {e}"))),
            #[cfg(test)]
            ModelState::Fake(_) => Err(ApiFailure::unavailable("a test model has no engine")),
        }
    }

    /// What watches analyse windows with.
    pub(crate) fn analyzer(&self) -> Result<Arc<dyn crate::watch::Analyzer>, ApiFailure> {
        #[cfg(test)]
        if let ModelState::Fake(a) = &*self.model.borrow() {
            return Ok(a.clone());
        }
        Ok(Arc::new(self.engine()?))
    }
}

/// An error answer of the REST API: one place maps kinds to status codes.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    pub(crate) status: StatusCode,
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl ApiFailure {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiFailure { status, code, message: message.into() }
    }
    pub(crate) fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, m)
    }
    pub(crate) fn unavailable(m: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Overloaded, m)
    }
    /// An error of this kind, with the status the kind has.
    pub(crate) fn of(code: ErrorCode, m: impl Into<String>) -> Self {
        Self::new(status_of(code), code, m)
    }
}

/// The HTTP status of an error kind: decided here, once.
pub(crate) fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Source => StatusCode::BAD_GATEWAY,
        ErrorCode::Model | ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let body = ApiError { error: ApiErrorBody { code: self.code, message: self.message } };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Whether two secrets are equal, taking the same time wherever they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), ApiFailure> {
    let Some(key) = &state.config.api_key else { return Ok(()) };
    // The scheme is case-insensitive (RFC 7235); the key is compared in constant time.
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    if given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiFailure::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong API key (Authorization: Bearer KEY)",
        ))
    }
}

async fn health(State(state): State<Arc<AppState>>) -> axum::Json<Health> {
    let (status, error) = match &*state.model.borrow() {
        ModelState::Loading => (HealthStatus::Loading, None),
        ModelState::Ready(_) => (HealthStatus::Ready, None),
        ModelState::Failed(e) => (HealthStatus::Failed, Some(e.clone())),
        #[cfg(test)]
        ModelState::Fake(_) => (HealthStatus::Ready, None),
    };
    let device = match state.config.device {
        inference::DeviceChoice::Cpu => "cpu".to_owned(),
        inference::DeviceChoice::Cuda(n) => format!("cuda:{n}"),
    };
    // Anyone may ask for health: the error names the model as the API does, not by its path.
    let model = model_id(&state.config.model);
    let error = error.map(|e| e.replace(&state.config.model, &model));
    let cluster = state.cluster.get();
    axum::Json(Health {
        status,
        model,
        device,
        error,
        node: cluster.map(|c| c.node_id().to_owned()),
        database_error: cluster.and_then(|c| c.standing().error),
    })
}

async fn models(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiFailure> {
    Ok(axum::Json(serde_json::json!({
        "object": "list",
        "data": [{"id": model_id(&state.config.model), "object": "model", "owned_by": "lookout"}],
    })))
}

/// A media error as a client may see it: the server's path of the clip replaced by what it is.
pub(crate) fn media_error(e: impl std::fmt::Display, path: &std::path::Path) -> String {
    e.to_string().replace(&path.display().to_string(), "the clip")
}

/// The name the API shows for a model: a Hub id as given, a local checkpoint by its directory's
/// name, never the server's path to it.
pub(crate) fn model_id(model: &str) -> String {
    let path = std::path::Path::new(model);
    if path.is_absolute() || model.starts_with('.') || path.is_dir() {
        return path.file_name().map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned());
    }
    model.to_owned()
}

/// Generation parameters from wire settings: greedy unless a temperature is given, Qwen's
/// recommended top-k 20 / top-p 0.8 when sampling, `default_max` new tokens unless told.
pub(crate) fn generation(g: &protocol::GenerationSettings, default_max: usize) -> inference::GenerationParams {
    let temperature = g.temperature.unwrap_or(0.0);
    inference::GenerationParams {
        sampling: inference::sampling::SamplingParams {
            temperature,
            top_k: g.top_k.unwrap_or(if temperature > 0.0 { 20 } else { 0 }),
            top_p: g.top_p.unwrap_or(if temperature > 0.0 { 0.8 } else { 1.0 }),
            repetition_penalty: g.repetition_penalty.unwrap_or(1.0),
            presence_penalty: g.presence_penalty.unwrap_or(0.0),
            seed: g.seed.unwrap_or(3407),
        },
        max_tokens: g.max_tokens.unwrap_or(default_max).clamp(1, 8192),
        stop: g.stop.clone(),
        capture: false,
        ignore_eos: false,
        answer: g.answer.as_ref().map(answer_spec),
        stop_when_decided: g.stop_when_decided.unwrap_or(false),
    }
}

/// The engine's answer shape from the wire's.
pub(crate) fn answer_spec(a: &protocol::AnswerFormat) -> inference::answer::AnswerSpec {
    use inference::answer::AnswerSpec;
    match a {
        protocol::AnswerFormat::Choice(c) => AnswerSpec::Choice(c.clone()),
        protocol::AnswerFormat::Regex(r) => AnswerSpec::Regex(r.clone()),
        protocol::AnswerFormat::JsonSchema(s) => AnswerSpec::JsonSchema(s.clone()),
        protocol::AnswerFormat::JsonObject {} => AnswerSpec::JsonObject,
    }
}

/// How a constrained answer ended, on the wire.
pub(crate) fn wire_answer(a: inference::answer::AnswerOutcome) -> protocol::AnswerResult {
    protocol::AnswerResult { complete: a.complete, value: a.value }
}

/// Engine token counts on the wire.
pub(crate) fn wire_usage(u: inference::Usage) -> protocol::Usage {
    protocol::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
    }
}

/// Engine timings on the wire.
pub(crate) fn wire_timings(t: inference::Timings) -> protocol::Timings {
    protocol::Timings {
        queue_ms: t.queue_ms,
        vision_ms: t.vision_ms,
        prefill_ms: t.prefill_ms,
        ttft_ms: t.ttft_ms,
        decode_tok_s: t.decode_tok_s,
    }
}

/// The OpenAPI description, embedded at build time.
pub const OPENAPI: &str = include_str!("openapi.json");

/// `?api_key=` for the routes a browser opens directly (docs) or a WebSocket (no headers).
#[derive(serde::Deserialize)]
pub(crate) struct KeyQuery {
    pub(crate) api_key: Option<String>,
}

/// Checks the bearer header, or the `api_key` query parameter.
pub(crate) fn authorized_or_query(state: &AppState, headers: &HeaderMap, q: &KeyQuery) -> Result<(), ApiFailure> {
    if let (Some(key), Some(given)) = (&state.config.api_key, &q.api_key)
        && same_secret(key.as_bytes(), given.as_bytes())
    {
        return Ok(());
    }
    authorized(state, headers)
}

async fn openapi() -> Result<impl IntoResponse, ApiFailure> {
    Ok(([("content-type", "application/json")], OPENAPI))
}

async fn docs() -> Result<impl IntoResponse, ApiFailure> {
    Ok(axum::response::Html(include_str!("docs.html")))
}

/// Builds the router (separate from serving, for tests).
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let public =
        Router::new().route("/", get(ui::index)).route("/app/{file}", get(ui::file)).route("/v1/health", get(health));
    let guarded = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/uploads", post(uploads::upload).layer(DefaultBodyLimit::disable()))
        .route("/v1/ws", get(session::ws))
        .route("/v1/sessions/{id}/frame.jpg", get(session::frame_jpeg))
        .route("/v1/watches", get(session::watches))
        .route("/v1/watches/{id}/frame.jpg", get(session::frame_jpeg))
        .route("/v1/monitors", post(monitors::create).get(monitors::list))
        .route("/v1/monitors/{id}", get(monitors::get).patch(monitors::patch).delete(monitors::delete))
        .route("/v1/monitors/{id}/events", get(monitors::events))
        .route("/v1/monitors/{id}/events.jsonl", get(monitors::export))
        .route("/v1/monitors/{id}/frame.jpg", get(monitors::frame))
        .route("/v1/events/{id}/thumbnail.jpg", get(monitors::thumbnail))
        .route("/v1/incidents", get(incidents::list))
        .route("/v1/incidents/{id}", get(incidents::get))
        .route("/v1/incidents/{id}/frames/{file}", get(incidents::frame))
        .route("/v1/incidents/{id}/clip.mp4", get(incidents::clip))
        .route("/v1/deliveries", get(incidents::deliveries))
        .route("/v1/nodes", get(nodes::list))
        .route("/v1/whip", post(whip::publish).get(whip::list).layer(DefaultBodyLimit::max(64 * 1024)))
        .route("/v1/whip/{id}", axum::routing::delete(whip::delete))
        .route("/v1/inference/upload", post(rest::inference_upload).layer(DefaultBodyLimit::disable()))
        .route("/v1/inference/url", post(rest::inference_url))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs))
        // Before any extractor: a request without the key is 401 whatever its body.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    public.merge(guarded).with_state(state)
}

/// The API key check in front of every route but the UI's and health. The key comes as
/// `Authorization: Bearer KEY`, or on GET requests (a WebSocket, an image, the docs page: what a
/// browser cannot give headers) as `?api_key=KEY`.
async fn require_key(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.config.api_key.is_none() {
        return next.run(request).await;
    }
    let api_key = (request.method() == axum::http::Method::GET)
        .then(|| request.uri().query())
        .flatten()
        .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "api_key"))
        .map(|(_, v)| v.into_owned());
    match authorized_or_query(&state, request.headers(), &KeyQuery { api_key }) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// Runs the service until SIGINT/SIGTERM (or `stop` resolving), then ends every session with an
/// `ended` event.
pub async fn serve(
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_announced(config, listener, stop, |_| {}).await
}

/// [`serve`], calling `announce` with the address once the store is open and requests are
/// about to be served (an unreachable database fails before anything says "listening").
pub async fn serve_announced(
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    announce: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(config.data_dir.join("uploads"))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let whip = ingest::webrtc::Whip::new(config.webrtc.clone());
    let node = match &config.cluster {
        Some(shared) => Some(node_config(shared, listener.local_addr()?)),
        None => None,
    };
    let store = match (&config.cluster, &node) {
        (Some(shared), Some(node)) => crate::store::Store::open_postgres(&shared.url, &config.data_dir, &node.node_id)
            .await
            .map_err(|e| anyhow::anyhow!("cannot use the database {}: {e}", redact_url(&shared.url)))?,
        _ => crate::store::Store::open(&config.data_dir)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the store under {}: {e}", config.data_dir.display()))?,
    };
    let config = Arc::new(config);
    let sources = Arc::new(sources::ServerSources { config: config.clone(), whip: whip.clone() });
    let state = Arc::new(AppState::new(config, whip, sources, shutdown_rx, store.clone()));
    let (cluster_stop, cluster_task) = match node {
        Some(node) => {
            let cluster = crate::cluster::Cluster::join(store, state.monitors.clone(), node.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot join the nodes sharing the database: {e}"))?;
            let _ = state.cluster.set(cluster.clone());
            tracing::info!(node = %node.node_id, address = %node.address, max_monitors = node.max_monitors, lease = ?node.lease, "joined the nodes sharing the database");
            let (tx, rx) = watch::channel(false);
            (Some(tx), Some(tokio::spawn(cluster.run(rx))))
        }
        None => (None, None),
    };
    let resumed = state.monitors.start_all().await?;
    if resumed > 0 {
        tracing::info!(monitors = resumed, "monitors started");
    }
    // Load on a blocking thread; health says "loading" meanwhile.
    let loader = state.clone();
    tokio::task::spawn_blocking(move || {
        let result = inference::Engine::load(inference::LoadOptions {
            model: loader.config.model.clone(),
            device: loader.config.device,
            dtype: loader.config.dtype,
            queue: loader.config.engine_queue,
            vision_cache_bytes: usize::try_from(loader.config.vision_cache_mb << 20).unwrap_or(usize::MAX),
            kv_cache_bytes: loader
                .config
                .kv_cache_mb
                .map(|mb| usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)),
            max_running: loader.config.max_batch,
            prefill_chunk: loader.config.prefill_chunk,
        });
        let next = match result {
            Ok(engine) => ModelState::Ready(engine),
            Err(e) => {
                tracing::error!(error = %e, "model failed to load");
                ModelState::Failed(e.to_string())
            }
        };
        loader.model.send_replace(next);
    });
    let app = router(state.clone());
    tracing::info!(addr = %listener.local_addr()?, "listening");
    announce(listener.local_addr()?);
    let watches = state.watches.clone();
    let monitors = state.monitors.clone();
    let header_timeout = state.config.header_read_timeout;
    accept(listener, app, header_timeout, async move {
        stop.await;
        tracing::info!("shutting down: ending sessions and watches");
        let _ = shutdown_tx.send(true);
        // With several nodes the lease loop stops this node's monitors and hands their leases
        // back at once (the others take them over at their next beat).
        if let (Some(stop), Some(task)) = (cluster_stop, cluster_task) {
            let _ = stop.send(true);
            let _ = task.await;
        }
        // Monitors stop (their history flushed), then every other watch ends (its clients
        // are told why) and its threads are joined; the connections then close.
        monitors.shutdown().await;
        watches.shutdown().await;
    })
    .await;
    state.whip.close_all().await;
    let open = state.connections.load(Ordering::Relaxed);
    if open > 0 {
        tracing::info!(open, "connections still closing");
    }
    Ok(())
}

/// This node's settings: the id and address default to where it listens (`http://host:port`,
/// the machine's name for a wildcard address).
fn node_config(shared: &SharedDatabase, local: std::net::SocketAddr) -> crate::cluster::ClusterConfig {
    let n = &shared.node;
    let address = n.address.clone().unwrap_or_else(|| {
        if local.ip().is_unspecified() {
            let host =
                std::fs::read_to_string("/etc/hostname").map_or_else(|_| "localhost".into(), |h| h.trim().to_owned());
            format!("http://{host}:{}", local.port())
        } else {
            format!("http://{local}")
        }
    });
    let id =
        n.id.clone().unwrap_or_else(|| address.trim_start_matches("http://").trim_start_matches("https://").to_owned());
    crate::cluster::ClusterConfig { node_id: id, address, max_monitors: n.max_monitors.max(1), lease: n.lease }
}

/// Serves HTTP/1.1 (with upgrades, for WebSockets) on every accepted connection until `stop`
/// resolves, then lets open requests finish (at most 10 s). Each connection has
/// `header_timeout` to send a request's headers. Accept errors (out of file descriptors) wait a
/// moment instead of ending the server.
async fn accept(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    // Connection tasks are owned here: told to finish when the server stops, and joined.
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => break,
        };
        let mut tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying shortly");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tune_connection(&mut tcp);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
            .with_upgrades();
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::info!(open = connections.len(), "connections still open after 10 s; closing them");
    }
}

/// Bytes the kernel may queue for one client. Tokens are small messages: this holds about a
/// thousand, so a client that stops reading is noticed within seconds (its subscription lags,
/// then it is dropped) instead of after megabytes of autotuned buffer.
const SOCKET_SEND_BUFFER: usize = 64 * 1024;

/// Every accepted connection: tokens go out at once (no Nagle delay), and the kernel's send
/// queue is bounded.
fn tune_connection(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    if let Err(e) = socket2::SockRef::from(&*tcp).set_send_buffer_size(SOCKET_SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot bound the socket's send buffer");
    }
}

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    one_signal().await;
    // The shutdown is orderly and bounded, but whoever sends a second signal wants out now.
    tokio::spawn(async {
        one_signal().await;
        // Not through tracing: its writer may be gone (a closed stderr), and nothing may keep
        // this from exiting.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"second signal: exiting at once\n");
        #[allow(clippy::exit)] // the one place the service exits without unwinding, on request
        std::process::exit(130);
    });
}

/// SIGINT or SIGTERM.
async fn one_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
