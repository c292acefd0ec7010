//! `POST /v1/chat/completions`: an OpenAI-compatible chat API with `video_url` content parts
//! (an http(s) URL, fetched with the URL guard, or an upload id, bare or as `upload:ID`), answered whole
//! or streamed as server-sent events with `stream: true`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use inference::EngineEvent;
use inference::processor::{Content, Message, Part};
use protocol::{ErrorCode, VideoParams};
use serde::Deserialize;

use super::rest::{fetch_to_temp, sample_options, submit_failure};
use super::uploads::{new_id, upload_path};
use super::{ApiFailure, AppState};

#[derive(Deserialize)]
#[serde(untagged)]
enum ChatContent {
    Text(String),
    Parts(Vec<ChatPart>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ChatPart {
    Text {
        text: String,
    },
    VideoUrl {
        video_url: VideoUrl,
    },
    /// Refused with advice (Lookout analyses video).
    ImageUrl {},
    /// Any other part type, refused.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct VideoUrl {
    url: String,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: ChatContent,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatRequest {
    /// Any name is accepted (one model is served); the answer names the one that served it.
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    /// Lookout extension: how clips are sampled.
    #[serde(default)]
    video_params: VideoParams,
    /// OpenAI's answer shape (`json_schema`, `json_object`, `text`).
    #[serde(default)]
    response_format: Option<protocol::ResponseFormat>,
    /// vLLM's answer shape: exactly one of `choice`, `regex`, `json`.
    #[serde(default)]
    structured_outputs: Option<StructuredOutputs>,
    /// Lookout extension: end as soon as the constrained answer is decided.
    #[serde(default)]
    stop_when_decided: Option<bool>,
    /// `{"include_usage": true}` adds a last chunk with the token counts.
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    // OpenAI fields Lookout does not serve: read only to refuse them clearly (see `refuse_unserved`).
    #[serde(default)]
    tools: Option<serde_json::Value>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
    #[serde(default)]
    functions: Option<serde_json::Value>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// OpenAI fields that would change the answer and are not served: a 400 that says so, never a
/// silently different answer.
fn refuse_unserved(req: &ChatRequest) -> Result<(), ApiFailure> {
    let present =
        |v: &Option<serde_json::Value>| v.as_ref().is_some_and(|v| !v.is_null() && v != &serde_json::json!([]));
    let mut unserved = Vec::new();
    if present(&req.tools) || present(&req.functions) {
        unserved.push("tools (function calling)");
    }
    if req.tool_choice.as_ref().is_some_and(|v| !v.is_null() && v != "none" && v != "auto") {
        unserved.push("tool_choice");
    }
    if req.n.is_some_and(|n| n != 1) {
        unserved.push("n other than 1 (send one request per answer)");
    }
    if req.logprobs == Some(true) || req.top_logprobs.is_some_and(|n| n > 0) {
        unserved.push("logprobs");
    }
    if req.frequency_penalty.is_some_and(|p| p != 0.0) {
        unserved.push("frequency_penalty (presence_penalty and repetition_penalty are served)");
    }
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        unserved.push("logit_bias");
    }
    if unserved.is_empty() {
        Ok(())
    } else {
        Err(ApiFailure::bad_request(format!("not supported by this server: {}", unserved.join(", "))))
    }
}

/// vLLM's `structured_outputs`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StructuredOutputs {
    #[serde(default)]
    choice: Option<Vec<String>>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    json: Option<serde_json::Value>,
}

/// The one answer shape a chat request asks for, if any.
fn answer_format(req: &ChatRequest) -> Result<Option<protocol::AnswerFormat>, ApiFailure> {
    use protocol::AnswerFormat;
    let mut asked = Vec::new();
    if let Some(f) = req.response_format.as_ref().and_then(protocol::ResponseFormat::answer) {
        asked.push(f);
    }
    if let Some(s) = &req.structured_outputs {
        let before = asked.len();
        asked.extend(s.choice.clone().map(AnswerFormat::Choice));
        asked.extend(s.regex.clone().map(AnswerFormat::Regex));
        asked.extend(s.json.clone().map(AnswerFormat::JsonSchema));
        if asked.len() == before {
            return Err(ApiFailure::bad_request("structured_outputs needs one of choice, regex or json"));
        }
    }
    if asked.len() > 1 {
        return Err(ApiFailure::bad_request(
            "give one answer shape: response_format, or one of structured_outputs' choice, regex and json",
        ));
    }
    Ok(asked.pop())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiFailure> {
    let req: ChatRequest =
        serde_json::from_slice(&body).map_err(|e| ApiFailure::bad_request(format!("invalid chat request: {e}")))?;
    let engine = state.engine()?;
    refuse_unserved(&req)?;
    let answer = answer_format(&req)?;
    if req.messages.is_empty() {
        return Err(ApiFailure::bad_request("messages must not be empty"));
    }
    // Resolve every video part to a local file, then sample them all off the runtime.
    let mut messages = Vec::new();
    let mut clips = Vec::new();
    let mut temps = Vec::new();
    for m in req.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiFailure::bad_request(format!("unknown role {:?}", m.role)));
        }
        let content = match m.content {
            ChatContent::Text(t) => Content::Text(t),
            ChatContent::Parts(parts) => {
                let mut out = Vec::new();
                for p in parts {
                    match p {
                        ChatPart::Text { text } => out.push(Part::Text(text)),
                        ChatPart::ImageUrl {} => {
                            return Err(ApiFailure::bad_request(
                                "image_url parts are not supported: Lookout analyses video; send a video_url part \
                                 (an http(s) URL, or upload:ID from POST /v1/uploads)",
                            ));
                        }
                        ChatPart::Other => {
                            return Err(ApiFailure::bad_request(
                                "unknown content part type: use text or video_url parts",
                            ));
                        }
                        ChatPart::VideoUrl { video_url } => {
                            let url = video_url.url;
                            let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
                            let is_http = matches!(scheme.as_deref(), Some("http" | "https"));
                            if scheme.is_some() && !is_http {
                                return Err(ApiFailure::bad_request(
                                    "a video_url is an http(s) URL or upload:ID from POST /v1/uploads",
                                ));
                            }
                            let upload_id = url.strip_prefix("upload:").or((!is_http).then_some(url.as_str()));
                            let path = if let Some(id) = upload_id {
                                upload_path(&state.config.data_dir, id)
                                    .filter(|p| p.is_file())
                                    .ok_or_else(|| ApiFailure::bad_request(format!("no upload with id {id:?}")))?
                            } else {
                                let file = fetch_to_temp(&state.config, &url).await?;
                                let path = file.0.clone();
                                temps.push(file);
                                path
                            };
                            clips.push(path);
                            out.push(Part::Video);
                        }
                    }
                }
                Content::Parts(out)
            }
        };
        messages.push(Message { role: m.role, content });
    }
    let opts = sample_options(&req.video_params);
    let media = state.media.clone();
    // Each clip's memory stays reserved until the answer is complete (the permits live to the end).
    let (videos, _reserved): (Vec<_>, Vec<_>) = tokio::task::spawn_blocking(move || {
        clips
            .iter()
            .map(|p| {
                crate::clip::sample_file_within(p, &opts, ingest::DecodeOptions::default(), |b| media.reserve(b))
                    .map(|(s, held)| (s.into_video_input(), held))
                    .map_err(|e| super::rest::clip_failure(e, p))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string()))??
    .into_iter()
    .unzip();
    drop(temps);

    let settings = protocol::GenerationSettings {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
        repetition_penalty: req.repetition_penalty,
        presence_penalty: req.presence_penalty,
        seed: req.seed,
        stop: match req.stop {
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
            None => vec![],
        },
        answer,
        stop_when_decided: req.stop_when_decided,
    };
    let generation = super::generation(&settings, 256);
    crate::watch::check_answer(&state.analyzer()?, &generation, "response_format")
        .await
        .map_err(ApiFailure::bad_request)?;
    let mut events = engine
        .submit(inference::Request { messages, videos, generation, schedule: inference::Schedule::interactive("chat") })
        .map_err(submit_failure)?;
    let id = format!("chatcmpl-{}", new_id());
    // The model that answers, whatever the request named.
    let model = super::model_id(&engine.info().model);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let created = now();
    let started = Instant::now();

    if !req.stream {
        while let Some(ev) = events.recv().await {
            match ev {
                EngineEvent::Done { finish_reason, text, usage, .. } => {
                    state.metrics.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    state
                        .metrics
                        .tokens
                        .fetch_add(usage.completion_tokens as u64, std::sync::atomic::Ordering::Relaxed);
                    return Ok(axum::Json(serde_json::json!({
                        "id": id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason.as_str()}],
                        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                  "total_tokens": usage.prompt_tokens + usage.completion_tokens},
                    }))
                    .into_response());
                }
                EngineEvent::Failed { error } => {
                    return Err(ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::Model, error.to_string()));
                }
                _ => {}
            }
        }
        return Err(ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "the engine stopped"));
    }

    // Streaming: one chunk per token piece, a final chunk with the finish reason, with
    // `include_usage` a chunk with the counts, then [DONE].
    let chunk = move |delta: Option<serde_json::Value>, finish: Option<&str>, usage: Option<inference::Usage>| {
        let choices = match delta {
            Some(delta) => serde_json::json!([{"index": 0, "delta": delta, "finish_reason": finish}]),
            None => serde_json::json!([]),
        };
        let mut c = serde_json::json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = serde_json::json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                                            "total_tokens": u.prompt_tokens + u.completion_tokens});
        }
        c.to_string()
    };
    let first = chunk(Some(serde_json::json!({"role": "assistant", "content": ""})), None, None);
    let pending = std::collections::VecDeque::from([first]);
    let stream = futures_util::stream::unfold(
        (Some(events), pending, chunk, state, started),
        move |(mut events, mut pending, chunk, state, started)| async move {
            if let Some(p) = pending.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(p)), (events, pending, chunk, state, started)));
            }
            let rx = events.as_mut()?;
            loop {
                match rx.recv().await {
                    Some(EngineEvent::Token { text }) => {
                        let data = chunk(Some(serde_json::json!({"content": text})), None, None);
                        return Some((Ok(Event::default().data(data)), (events, pending, chunk, state, started)));
                    }
                    Some(EngineEvent::Done { finish_reason, usage, .. }) => {
                        state.metrics.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        state
                            .metrics
                            .tokens
                            .fetch_add(usage.completion_tokens as u64, std::sync::atomic::Ordering::Relaxed);
                        let data = chunk(Some(serde_json::json!({})), Some(finish_reason.as_str()), None);
                        if include_usage {
                            pending.push_back(chunk(None, None, Some(usage)));
                        }
                        pending.push_back("[DONE]".into());
                        return Some((Ok(Event::default().data(data)), (None, pending, chunk, state, started)));
                    }
                    Some(EngineEvent::Failed { error }) => {
                        let data =
                            serde_json::json!({"error": {"code": "model", "message": error.to_string()}}).to_string();
                        pending.push_back("[DONE]".into());
                        return Some((Ok(Event::default().data(data)), (None, pending, chunk, state, started)));
                    }
                    Some(_) => {}
                    None => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).into_response())
}
