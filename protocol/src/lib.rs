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
}

/// Client to server.
// Messages are parsed one at a time and dropped; boxing `start` would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Start analysing a source.
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
    /// Change the standing prompt from the next window on.
    Prompt {
        /// The new prompt.
        text: String,
    },
    /// End the session.
    Stop {},
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
    /// Something else went wrong on the server.
    Internal,
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The session is running.
    Ready {
        /// Session id.
        session: String,
        /// The model serving it.
        model: String,
        /// The source.
        source: SourceInfo,
    },
    /// A window was cut and sent to the model.
    Window {
        /// Window id (increasing within the session).
        id: u64,
        /// Stream time of its first frame, seconds.
        start_s: f64,
        /// Stream time of its last frame, seconds.
        end_s: f64,
        /// Frames in it.
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
    },
    /// Windows were dropped because the model fell behind (the newest wins).
    Skipped {
        /// How many.
        windows: u64,
        /// Why.
        reason: String,
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
        /// Why.
        reason: String,
    },
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
    /// Whether a session is analysing it.
    pub watched: bool,
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
