//! Wire types shared by the Lookout server and its clients: the WebSocket session protocol
//! (`GET /v1/ws`, JSON text frames tagged by `type`) and the REST bodies.
//!
//! The crate depends on serde alone, so it compiles for `wasm32-unknown-unknown` and the web UI
//! uses the very same types as the server.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Where a session's video comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// An RTSP camera.
    Rtsp {
        /// `rtsp://[user:pass@]host[:port]/path` (percent-escape `@` and `:` in credentials).
        url: String,
        /// How RTP travels (the server's default, TCP, when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport: Option<RtspTransport>,
    },
    /// A clip uploaded with `POST /v1/uploads`, replayed as a live stream.
    Upload {
        /// The upload id.
        id: String,
        /// Replay speed (1.0 = real time).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speed: Option<f64>,
        /// Start over at the end.
        #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
        looped: Option<bool>,
    },
    /// A clip at an http(s) URL, replayed as a live stream.
    Url {
        /// The URL.
        url: String,
        /// Replay speed (1.0 = real time).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speed: Option<f64>,
        /// Start over at the end.
        #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
        looped: Option<bool>,
    },
    /// A WebRTC stream published with WHIP (`POST /v1/whip`).
    Webrtc {
        /// The WHIP resource id.
        resource: String,
    },
}

/// RTP transport of an RTSP source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RtspTransport {
    /// Interleaved in the RTSP TCP connection.
    Tcp,
    /// UDP (LAN only).
    Udp,
}

/// How windows are cut from a stream. Every field has a server default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSettings {
    /// Window length in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Seconds between window starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride_seconds: Option<f64>,
    /// Frames per second sampled into windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
    /// Fewest pixels per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pixels: Option<u64>,
    /// Most pixels per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pixels: Option<u64>,
}

/// Generation settings. Every field has a server default (the model's generation config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// Most new tokens per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Top-k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Top-p.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Repetition penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Presence penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Random seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// The shape the answer must have, enforced while decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerFormat>,
    /// With `answer`: end the window's generation as soon as the whole answer is decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_when_decided: Option<bool>,
}

/// The shape an answer must have: `{"choice": ["yes", "no"]}`, `{"regex": "[0-9]{1,3}"}`,
/// `{"json_schema": {...}}` or `{"json_object": {}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AnswerFormat {
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A string the regex matches as a whole.
    Regex(String),
    /// JSON valid against this schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject {},
}

/// OpenAI's `response_format`: `{"type": "json_schema", "json_schema": {"name", "schema",
/// "strict"}}`, `{"type": "json_object"}` or `{"type": "text"}` (no constraint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text.
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: NamedSchema,
    },
}

/// A named JSON schema of `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedSchema {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The schema (any JSON value when left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode. The schema is enforced while decoding either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The answer shape it asks for.
    pub fn answer(&self) -> Option<AnswerFormat> {
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(AnswerFormat::JsonObject {}),
            ResponseFormat::JsonSchema { json_schema } => Some(AnswerFormat::JsonSchema(
                json_schema.schema.clone().unwrap_or_else(|| serde_json::Value::Object(Default::default())),
            )),
        }
    }
}

/// How a constrained answer ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerResult {
    /// The answer completed its grammar; false when it was cut (by `max_tokens` or a stop
    /// string), and then there is no value.
    pub complete: bool,
    /// The answer as JSON (a string for a choice or a regex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

impl Source {
    /// The same source with any password in its URL replaced by `***`
    /// (`rtsp://user:***@host/path`): what responses and logs may show.
    pub fn redacted(&self) -> Source {
        match self {
            Source::Rtsp { url, transport } => Source::Rtsp { url: redact_url(url), transport: *transport },
            Source::Url { url, speed, looped } => Source::Url { url: redact_url(url), speed: *speed, looped: *looped },
            other => other.clone(),
        }
    }
}

/// `scheme://user:pass@host/...` with the password replaced by `***`; other URLs unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let rest = &url[scheme_end..];
    // The authority ends at the first '/', '?' or '#'; credentials end at its last '@'.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_owned() };
    let Some((user, _password)) = rest[..at].split_once(':') else { return url.to_owned() };
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

/// Client to server.
// Messages are parsed one at a time and dropped; boxing `start` would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Start analysing a source: a new watch that ends when this connection does.
    Start {
        /// The source.
        source: Source,
        /// The standing prompt.
        prompt: String,
        /// Window policy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<WindowSettings>,
        /// Generation settings.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<GenerationSettings>,
    },
    /// Follow a running watch (started by another client) or a monitor: its events from now on,
    /// after the current window's text so far. Give exactly one of the two.
    Subscribe {
        /// A watch id (`ready.session` of the client that started it, or `GET /v1/watches`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        watch: Option<String>,
        /// A monitor id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        monitor: Option<String>,
    },
    /// Change the standing prompt from the next window on (the client that started the watch).
    Prompt {
        /// The new prompt.
        text: String,
    },
    /// End the session (and the watch it started, if any).
    Stop {},
}

/// Why a session or watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The source ended (the end of a clip that does not loop, a WHIP publisher that left).
    EndOfStream,
    /// A client sent `stop`.
    Stopped,
    /// The client that started the watch closed its connection.
    ClientClosed,
    /// The client stopped reading; its connection was dropped.
    SlowClient,
    /// The server is shutting down.
    Shutdown,
    /// The source could not be opened, or failed for good.
    SourceFailed,
    /// The request could not be served as asked (bad settings, unknown watch); see the error.
    Rejected,
    /// No model is loaded (still loading, or it failed to load).
    ModelUnavailable,
    /// The monitor was deleted.
    Deleted,
}

impl EndReason {
    /// The wire spelling (`end_of_stream`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::EndOfStream => "end_of_stream",
            EndReason::Stopped => "stopped",
            EndReason::ClientClosed => "client_closed",
            EndReason::SlowClient => "slow_client",
            EndReason::Shutdown => "shutdown",
            EndReason::SourceFailed => "source_failed",
            EndReason::Rejected => "rejected",
            EndReason::ModelUnavailable => "model_unavailable",
            EndReason::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a watch is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchState {
    /// Opening its source, waiting for the first frame.
    Starting,
    /// Analysing windows.
    Running,
    /// A live source dropped; it is reconnecting.
    Reconnecting,
    /// Not running (a disabled monitor).
    Paused,
    /// Stopped by a failure (see the reason).
    Failed,
    /// Ended.
    Ended,
}

/// A running watch (`GET /v1/watches`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchInfo {
    /// Watch id (`subscribe` with `{"watch": id}`).
    pub id: String,
    /// The monitor it runs, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<String>,
    /// Its source (passwords replaced by `***`).
    pub source: Source,
    /// The standing prompt.
    pub prompt: String,
    /// What it is doing.
    pub state: WatchState,
    /// The source, once it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<SourceInfo>,
    /// Clients following it.
    pub subscribers: usize,
    /// Windows analysed so far.
    pub windows: u64,
    /// Windows skipped because the model fell behind.
    pub skipped: u64,
}

/// `GET /v1/watches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchList {
    /// Running watches, oldest first.
    pub watches: Vec<WatchInfo>,
}

/// What the source turned out to be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Native frame rate.
    pub fps: f64,
    /// Codec name.
    pub codec: String,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens (vision placeholders included).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

/// Where a window's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting for the engine.
    pub queue_ms: f64,
    /// Vision tower.
    pub vision_ms: f64,
    /// Text prefill.
    pub prefill_ms: f64,
    /// From the engine starting the window to its first token.
    pub ttft_ms: f64,
    /// Decode speed.
    pub decode_tok_s: f64,
}

/// Error classes, for clients to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The client sent something malformed or invalid.
    BadRequest,
    /// The source cannot be opened or stopped delivering.
    Source,
    /// The model failed on a window.
    Model,
    /// A limit was hit (sessions, queue, message size).
    Overloaded,
    /// Authentication failed.
    Unauthorized,
    /// No such thing (monitor, event, watch).
    NotFound,
    /// It conflicts with what exists (a monitor name in use).
    Conflict,
    /// Something else went wrong on the server.
    Internal,
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The watch this session started is running (its source is open).
    Ready {
        /// Watch id (others may `subscribe` to it).
        session: String,
        /// The model serving it.
        model: String,
        /// The source.
        source: SourceInfo,
    },
    /// A `subscribe` was accepted; the watch's events follow (first the current window and
    /// its text so far, when one is running).
    Subscribed {
        /// Watch id.
        watch: String,
        /// The monitor, when the watch runs one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        monitor: Option<String>,
        /// The model serving it.
        model: String,
        /// The source, once it is open (a `ready` follows otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<SourceInfo>,
        /// The standing prompt.
        prompt: String,
    },
    /// A window was cut and sent to the model.
    Window {
        /// Window id (increasing within the session).
        id: u64,
        /// Stream time of its first frame, seconds.
        start_s: f64,
        /// Stream time of its last frame, seconds (it spans until one sampling interval later).
        end_s: f64,
        /// Frames in it (fewer in the last window of a stream that ended).
        frames: usize,
        /// `[t, h, w]` patch grid.
        grid_thw: [usize; 3],
    },
    /// A piece of a window's answer (never a broken UTF-8 character).
    Token {
        /// Window id.
        window: u64,
        /// The text.
        text: String,
    },
    /// A window's answer is complete.
    WindowDone {
        /// Window id.
        window: u64,
        /// The whole answer (the concatenated tokens).
        text: String,
        /// `stop` or `length`.
        finish_reason: String,
        /// Token counts.
        usage: Usage,
        /// Timings.
        timings: Timings,
        /// How the constrained answer ended (only with `generation.answer`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<AnswerResult>,
    },
    /// Part of a window's constrained answer can no longer change: sent after the tokens that
    /// decided it, before the window ends, so a client can act on it at once.
    Decided {
        /// Window id.
        window: u64,
        /// A JSON pointer into the answer (`/person`, `/cars/0`); empty for the whole answer.
        path: String,
        /// The value there.
        value: serde_json::Value,
    },
    /// Windows were dropped because the model fell behind (the newest wins).
    Skipped {
        /// How many.
        windows: u64,
        /// Why.
        reason: String,
    },
    /// This client fell behind and `missed` events were dropped for it; it goes on from the
    /// newest (the current window's text so far comes again first).
    Lagged {
        /// Events dropped.
        missed: u64,
    },
    /// Ingest health.
    Status {
        /// Frames per second arriving from the source.
        ingest_fps: f64,
        /// Frames dropped so far (overwritten before use).
        frames_dropped: u64,
        /// How far the newest analysed frame lags the newest ingested one.
        lag_ms: f64,
    },
    /// A live source lost its connection; it retries after `retry_in_ms`. The session goes on.
    Reconnecting {
        /// Attempt number (1 for the first retry after a loss).
        attempt: u32,
        /// Why the connection was lost or the last attempt failed.
        error: String,
        /// Wait before the next attempt.
        retry_in_ms: u64,
    },
    /// A live source is back. Stream time from `from_s` to `to_s` has no frames (the gap).
    Resumed {
        /// Stream time of the last frame before the gap.
        from_s: f64,
        /// Stream time of the first frame after it.
        to_s: f64,
    },
    /// Something went wrong.
    Error {
        /// Class.
        code: ErrorCode,
        /// What happened, for people.
        message: String,
        /// Whether the session ends.
        fatal: bool,
    },
    /// The session ended.
    Ended {
        /// Why, for programs.
        reason: EndReason,
        /// Why, for people (what happened, and what to do when something can be done).
        message: String,
    },
    /// A monitor's alert rule fired (an incident opened) or was resolved (the incident closed).
    /// `firing` is sent the moment the streamed tokens decide the rule, before the window ends.
    Alert {
        /// The monitor.
        monitor: String,
        /// The incident.
        incident: String,
        /// `firing` or `resolved`.
        state: AlertState,
        /// The window that opened or closed it.
        window: u64,
        /// That window's answer so far (the whole answer when resolved).
        text: String,
    },
}

/// Whether an alert is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// An incident is open.
    Firing,
    /// The incident closed.
    Resolved,
}

/// A monitor's alert rule: `{"when": ..., "confirm": {"windows": 2, "of": 3}, "clear_after": 2,
/// "cooldown_s": 60, "notify": [{"webhook": {"url": ..., "secret": ...}}]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// What makes a window positive.
    pub when: AlertCondition,
    /// An incident opens when `windows` of the last `of` windows are positive (default 1 of 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Confirm>,
    /// An open incident closes after this many negative windows in a row (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_after: Option<u32>,
    /// After an incident closes, no new one opens for this long (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_s: Option<f64>,
    /// Where notifications go (MQTT, when the server has `--mqtt-url`, gets every monitor's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifyTarget>,
}

/// N of the last M windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirm {
    /// Positive windows needed (N).
    pub windows: u32,
    /// Out of the last this many (M).
    pub of: u32,
}

/// What makes a window positive. One test of:
/// - `{"equals": "yes"}`: the whole answer (a choice, a regex answer) equals the value;
/// - `{"pointer": "/person", "equals": true}`: the value at a JSON pointer of a JSON answer;
/// - `{"pointer": "/count", "gt": 2}` (or `gte`, `lt`, `lte`): a number there compared;
/// - `{"matches": "REGEX"}`: the answer (free text) contains a match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertCondition {
    /// A JSON pointer into a JSON answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    /// The value must equal this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
    /// A number greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    /// At least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<f64>,
    /// Less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    /// At most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<f64>,
    /// The text contains a match of this regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
}

/// Where an alert's notifications go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NotifyTarget {
    /// A JSON POST to a URL, signed when a secret is given.
    Webhook(WebhookTarget),
}

/// A webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTarget {
    /// `http://` or `https://` URL.
    pub url: String,
    /// HMAC-SHA256 key: each POST carries `X-Lookout-Signature: sha256=<hex of the HMAC of the
    /// body>`. Never shown again (responses give `***`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl AlertRule {
    /// The same rule with webhook secrets and URL passwords replaced by `***`.
    pub fn redacted(&self) -> AlertRule {
        let mut r = self.clone();
        for NotifyTarget::Webhook(w) in &mut r.notify {
            w.url = redact_url(&w.url);
            if w.secret.is_some() {
                w.secret = Some("***".to_owned());
            }
        }
        r
    }
}

/// An incident: consecutive confirmed positive windows of one monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Id.
    pub id: String,
    /// The monitor.
    pub monitor: String,
    /// `open` or `closed`.
    pub state: IncidentState,
    /// When it opened, RFC 3339 (UTC).
    pub opened_at: String,
    /// When it closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
    /// The positive windows that make it up, oldest first.
    pub windows: Vec<IncidentWindow>,
    /// Key frames: `/v1/incidents/{id}/frames/{n}.jpg`, one per window in `windows`.
    pub frames: Vec<String>,
    /// `/v1/incidents/{id}/clip.mp4`: the confirming windows with a few seconds of pre-roll,
    /// from the source's own encoded video (once the opening window has ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<String>,
}

/// Open or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentState {
    /// Still firing.
    Open,
    /// Resolved.
    Closed,
}

/// One window of an incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentWindow {
    /// Window id within its watch.
    pub window: u64,
    /// Stream time of its first frame, seconds.
    pub start_s: f64,
    /// Stream time of its last frame.
    pub end_s: f64,
    /// When the rule decided it, RFC 3339 (UTC).
    pub decided_at: String,
    /// The answer (the whole answer once the window ended).
    pub text: String,
}

/// `GET /v1/incidents`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentList {
    /// The incidents.
    pub incidents: Vec<Incident>,
}

/// One notification and how its delivery went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Id, also sent as `X-Lookout-Delivery` (idempotency key for receivers).
    pub id: String,
    /// The incident.
    pub incident: String,
    /// The monitor.
    pub monitor: String,
    /// `incident.opened`, `incident.updated` or `incident.resolved`.
    pub event: String,
    /// Where (the webhook URL, passwords replaced).
    pub target: String,
    /// `pending`, `delivered` or `failed`.
    pub state: DeliveryState,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it was queued, RFC 3339 (UTC).
    pub created_at: String,
    /// When the receiver accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    /// When the next attempt is due (pending only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not yet accepted; retried with backoff.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed.
    Failed,
}

/// `GET /v1/deliveries`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryList {
    /// The deliveries.
    pub deliveries: Vec<Delivery>,
}

/// How long a monitor keeps its history. Either limit may be left out (the server's default
/// applies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Events older than this many days are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
    /// At most this many events are kept (the oldest go first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_events: Option<u64>,
}

/// `POST /v1/monitors`: a standing watch that runs without a viewer and across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorRequest {
    /// A unique name.
    pub name: String,
    /// The source, as in `start` (an upload with `"loop": true` makes a clip a standing camera).
    pub source: Source,
    /// The standing prompt.
    pub prompt: String,
    /// Window policy, as in `start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSettings>,
    /// Generation settings, as in `start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationSettings>,
    /// Whether it runs (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// History limits (the server's defaults otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// The answer's shape: the same as `generation.answer` (give one or the other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerFormat>,
    /// An alert rule on the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertRule>,
}

/// `PATCH /v1/monitors/{id}`: the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorPatch {
    /// A new unique name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A new prompt (applies from the next window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// New window settings (the monitor restarts its watch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSettings>,
    /// New generation settings (from the next window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationSettings>,
    /// New history limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Pause (false) or resume (true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// A new answer shape (`generation.answer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerFormat>,
    /// A new alert rule; `null` removes it (an open incident is then resolved).
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[allow(clippy::option_option, reason = "missing, null and a value mean three different things in a PATCH")]
    pub alert: Option<Option<AlertRule>>,
}

/// A field that may be given as `null`: `Some(None)`, unlike a missing one (`None`).
#[allow(clippy::option_option, reason = "missing, null and a value mean three different things in a PATCH")]
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// What a monitor has done since the server started (events: ever, as stored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorCounters {
    /// Windows analysed.
    pub windows: u64,
    /// Windows skipped because the model fell behind.
    pub skipped: u64,
    /// Events in its history.
    pub events: u64,
    /// Times its source failed or dropped.
    pub failures: u64,
}

/// A monitor (`GET /v1/monitors/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Monitor {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The source (passwords replaced by `***`).
    pub source: Source,
    /// The standing prompt.
    pub prompt: String,
    /// Window settings as given.
    pub window: WindowSettings,
    /// Generation settings as given.
    pub generation: GenerationSettings,
    /// Whether it runs.
    pub enabled: bool,
    /// History limits in force (the server's defaults filled in).
    pub retention: Retention,
    /// The alert rule (secrets replaced by `***`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertRule>,
    /// Whether an incident is open, and which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_incident: Option<String>,
    /// What it is doing.
    pub state: WatchState,
    /// Why it failed or ended, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The watch running it now (`subscribe` to the monitor to follow it across restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<String>,
    /// With several nodes: the node running it (any node answers for it, and proxies a
    /// subscription to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Counters.
    pub counters: MonitorCounters,
    /// The newest event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<Event>,
    /// Created, RFC 3339 (UTC).
    pub created_at: String,
    /// Last changed, RFC 3339 (UTC).
    pub updated_at: String,
}

/// `GET /v1/monitors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorList {
    /// Every monitor, oldest first.
    pub monitors: Vec<Monitor>,
}

/// One analysed window of a monitor, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event id.
    pub id: i64,
    /// The monitor.
    pub monitor: String,
    /// Window id within its watch.
    pub window: u64,
    /// Stream time of the window's first frame, seconds.
    pub start_s: f64,
    /// Stream time of its last frame, seconds.
    pub end_s: f64,
    /// Wall-clock time of its first frame, RFC 3339 (UTC).
    pub started_at: String,
    /// The prompt it was asked.
    pub prompt: String,
    /// The answer.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// `/v1/events/{id}/thumbnail.jpg`, when a thumbnail was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<String>,
}

/// `GET /v1/monitors/{id}/events`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    /// The events.
    pub events: Vec<Event>,
    /// Pass as `before=` for the next (older) page; null on the last page.
    pub next: Option<String>,
}

/// A published WebRTC stream (`GET /v1/whip`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhipResource {
    /// Resource id (`start` a session with `{kind: "webrtc", resource: id}`).
    pub id: String,
    /// Negotiated video codec, once the track arrived.
    pub codec: Option<String>,
    /// Whether the peer connection is up.
    pub connected: bool,
    /// Whether a watch is analysing it.
    pub watched: bool,
    /// How many watches analyse it.
    #[serde(default)]
    pub watchers: usize,
    /// Seconds since it was published.
    pub age_s: f64,
}

/// `video_params` of the REST inference endpoints (the seed service's shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoParams {
    /// Sampling rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
    /// Most frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames: Option<usize>,
    /// Fewest pixels per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pixels: Option<u64>,
    /// Most pixels per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pixels: Option<u64>,
    /// Pixel budget over all frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_pixels: Option<u64>,
}

/// `POST /v1/inference/url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlInferenceRequest {
    /// http(s) URL of the clip.
    pub url: String,
    /// The question.
    pub prompt: String,
    /// Sampling of the clip.
    #[serde(default)]
    pub video_params: VideoParams,
    /// Sampling temperature (0 is greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Most new tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// The shape the answer must have, as in OpenAI's chat API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
}

/// The answer of the REST inference endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResponse {
    /// The model's answer.
    pub text: String,
    /// The model.
    pub model: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Token counts.
    pub usage: Usage,
    /// Timings, including preprocessing.
    pub timings: InferenceTimings,
    /// How a constrained answer ended (only with `response_format`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerResult>,
}

/// Timings of a REST inference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceTimings {
    /// Fetching or storing the clip.
    pub fetch_ms: f64,
    /// Decoding and sampling the clip.
    pub preprocess_ms: f64,
    /// Model timings.
    #[serde(flatten)]
    pub model: Timings,
    /// Wall time of the whole request.
    pub total_ms: f64,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `loading`, `ready` or `failed`.
    pub status: HealthStatus,
    /// The model (as configured).
    pub model: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Why loading failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With several nodes: this node's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// With several nodes: why the shared database does not answer, while it does not (the
    /// node's monitors are stopped meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_error: Option<String>,
}

/// `GET /v1/nodes`: the nodes that share the database (one, without `--database`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nodes {
    /// The id of the node that answered.
    #[serde(rename = "self")]
    pub self_id: String,
    /// Every live node (heartbeat within a lease time), by id.
    pub nodes: Vec<NodeInfo>,
}

/// A node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Id.
    pub id: String,
    /// Where the other nodes reach its API.
    pub address: String,
    /// Most monitors it runs (`--max-monitors`).
    pub capacity: u32,
    /// The monitors it runs (holds the leases of).
    pub monitors: Vec<String>,
    /// Monitors over capacity, 0 to 1.
    pub load: f64,
    /// When it started, RFC 3339 (UTC).
    pub started_at: String,
    /// Its last heartbeat, RFC 3339 (UTC).
    pub heartbeat_at: String,
}

/// Model state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Still loading.
    Loading,
    /// Serving.
    Ready,
    /// Could not load.
    Failed,
}

/// A JSON error body of the REST API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// The error.
    pub error: ApiErrorBody,
}

/// The inside of [`ApiError`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Class.
    pub code: ErrorCode,
    /// What happened and what to do.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_from_the_documented_json() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"start","source":{"kind":"upload","id":"u1","speed":2.0,"loop":true},"prompt":"What happens?",
                "window":{"seconds":4,"stride_seconds":2,"fps":2},"generation":{"max_tokens":64,"temperature":0}}"#,
        )
        .unwrap();
        let ClientMessage::Start { source, window, generation, .. } = m else { panic!() };
        assert_eq!(source, Source::Upload { id: "u1".into(), speed: Some(2.0), looped: Some(true) });
        assert_eq!(window.unwrap().stride_seconds, Some(2.0));
        assert_eq!(generation.unwrap().max_tokens, Some(64));
        assert_eq!(serde_json::from_str::<ClientMessage>(r#"{"type":"stop"}"#).unwrap(), ClientMessage::Stop {});
        let p: ClientMessage = serde_json::from_str(r#"{"type":"prompt","text":"Count cars"}"#).unwrap();
        assert_eq!(p, ClientMessage::Prompt { text: "Count cars".into() });
    }

    #[test]
    fn unknown_kinds_and_fields_are_rejected() {
        assert!(
            serde_json::from_str::<ClientMessage>(r#"{"type":"start","source":{"kind":"ftp","url":"x"},"prompt":"p"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"dance"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"prompt","text":"a","extra":1}"#).is_err());
    }

    #[test]
    fn subscriptions_endings_and_lag_have_their_documented_shapes() {
        let m: ClientMessage = serde_json::from_str(r#"{"type":"subscribe","watch":"s3"}"#).unwrap();
        assert_eq!(m, ClientMessage::Subscribe { watch: Some("s3".into()), monitor: None });
        let e =
            serde_json::to_value(ServerMessage::Ended { reason: EndReason::EndOfStream, message: "m".into() }).unwrap();
        assert_eq!(e, serde_json::json!({"type": "ended", "reason": "end_of_stream", "message": "m"}));
        for r in [EndReason::ClientClosed, EndReason::SourceFailed, EndReason::ModelUnavailable] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        let l = serde_json::to_value(ServerMessage::Lagged { missed: 7 }).unwrap();
        assert_eq!(l, serde_json::json!({"type": "lagged", "missed": 7}));
    }

    #[test]
    fn passwords_are_redacted_from_source_urls() {
        assert_eq!(redact_url("rtsp://admin:s3cr%40t@10.0.0.5:554/stream1"), "rtsp://admin:***@10.0.0.5:554/stream1");
        assert_eq!(redact_url("rtsp://10.0.0.5/a@b"), "rtsp://10.0.0.5/a@b");
        assert_eq!(redact_url("rtsp://user@cam/x"), "rtsp://user@cam/x");
        assert_eq!(redact_url("not a url"), "not a url");
        let s = Source::Rtsp { url: "rtsp://u:p@cam/x".into(), transport: None }.redacted();
        assert_eq!(s, Source::Rtsp { url: "rtsp://u:***@cam/x".into(), transport: None });
    }

    #[test]
    fn server_messages_are_tagged() {
        let t = serde_json::to_value(ServerMessage::Token { window: 3, text: "hi".into() }).unwrap();
        assert_eq!(t, serde_json::json!({"type": "token", "window": 3, "text": "hi"}));
        let e = serde_json::to_value(ServerMessage::Error {
            code: ErrorCode::BadRequest,
            message: "m".into(),
            fatal: false,
        })
        .unwrap();
        assert_eq!(e["code"], "bad_request");
        let back: ServerMessage = serde_json::from_value(t).unwrap();
        assert_eq!(back, ServerMessage::Token { window: 3, text: "hi".into() });
    }
}
