//! The seed service's REST API (`POST /v1/inference/upload`, `POST /v1/inference/url`) and
//! Prometheus metrics.

use std::io::Read as _;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use inference::EngineEvent;
use protocol::{ErrorCode, InferenceResponse, InferenceTimings, UrlInferenceRequest, VideoParams};

use super::uploads::{new_id, receive_file};
use super::{ApiFailure, AppState};

fn internal(e: impl std::fmt::Display) -> ApiFailure {
    ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string())
}

/// Removes a temporary clip when the request ends, whatever happens.
pub(crate) struct TempFile(pub(crate) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn sample_options(v: &VideoParams) -> sampler::SampleOptions {
    sampler::SampleOptions {
        fps: v.fps,
        max_frames: v.max_frames,
        min_pixels: v.min_pixels,
        max_pixels: v.max_pixels,
        total_pixels: v.total_pixels,
        ..Default::default()
    }
}

/// What a REST inference asks.
struct Ask {
    prompt: String,
    params: VideoParams,
    temperature: Option<f64>,
    max_tokens: Option<usize>,
    response_format: Option<protocol::ResponseFormat>,
}

/// Why the engine refused a request, as an HTTP answer.
pub(crate) fn submit_failure(e: inference::Error) -> ApiFailure {
    match e {
        inference::Error::QueueFull(_) => {
            ApiFailure::new(StatusCode::TOO_MANY_REQUESTS, ErrorCode::Overloaded, e.to_string())
        }
        inference::Error::Input(m) => ApiFailure::bad_request(m),
        other => internal(other),
    }
}

/// Downloads `url` under the data directory (blocking work off the runtime, with the URL guard);
/// the file goes away when the returned guard is dropped.
pub(crate) async fn fetch_to_temp(config: &super::ServeConfig, url: &str) -> Result<TempFile, ApiFailure> {
    let path = config.data_dir.join("uploads").join(format!("{}.fetch", new_id()));
    let guard = TempFile(path.clone());
    let (u, limit, allow) = (url.to_owned(), config.max_upload_bytes, config.allow_private_urls);
    tokio::task::spawn_blocking(move || fetch(&u, &path, limit, allow)).await.map_err(internal)??;
    Ok(guard)
}

/// Samples the clip (blocking, off the runtime), asks the engine, collects the answer.
/// A clip's error as the API answers it.
pub(crate) fn clip_failure(e: crate::clip::ClipError, path: &Path) -> ApiFailure {
    match e {
        crate::clip::ClipError::Ingest(e) => ApiFailure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadRequest,
            format!("not a playable video: {}", super::media_error(e, path)),
        ),
        crate::clip::ClipError::Sample(e) => {
            ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::BadRequest, super::media_error(e, path))
        }
        crate::clip::ClipError::Budget { never: true, message } => {
            ApiFailure::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BadRequest, message)
        }
        crate::clip::ClipError::Budget { never: false, message } => ApiFailure::unavailable(&message),
    }
}

async fn analyze(
    state: &AppState,
    path: &Path,
    ask: Ask,
    fetch_ms: f64,
    started: Instant,
) -> Result<InferenceResponse, ApiFailure> {
    let Ask { prompt, params, temperature, max_tokens, response_format } = ask;
    let engine = state.engine()?;
    if prompt.trim().is_empty() {
        return Err(ApiFailure::bad_request("prompt must not be empty"));
    }
    let t = Instant::now();
    let opts = sample_options(&params);
    let p = path.to_owned();
    let media = state.media.clone();
    // The clip's memory stays reserved until its answer is complete (the permit lives to the end).
    let (sampled, _reserved) = tokio::task::spawn_blocking(move || {
        crate::clip::sample_file_within(&p, &opts, ingest::DecodeOptions::default(), |bytes| media.reserve(bytes))
    })
    .await
    .map_err(internal)?
    .map_err(|e| clip_failure(e, path))?;
    let preprocess_ms = t.elapsed().as_secs_f64() * 1000.0;
    let answer = response_format.as_ref().and_then(protocol::ResponseFormat::answer);
    let settings = protocol::GenerationSettings { temperature, max_tokens, answer, ..Default::default() };
    let generation = super::generation(&settings, 256);
    crate::watch::check_answer(&state.analyzer()?, &generation, "response_format")
        .await
        .map_err(ApiFailure::bad_request)?;
    let request = inference::Request {
        messages: vec![inference::processor::Message::user_video(&prompt)],
        videos: vec![sampled.into_video_input()],
        generation,
        schedule: inference::Schedule::interactive("rest"),
    };
    let mut events = engine.submit(request).map_err(submit_failure)?;
    while let Some(ev) = events.recv().await {
        match ev {
            EngineEvent::Done { finish_reason, text, usage, timings, answer, .. } => {
                state.metrics.requests.fetch_add(1, Ordering::Relaxed);
                state.metrics.tokens.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                return Ok(InferenceResponse {
                    text,
                    model: super::model_id(&engine.info().model),
                    finish_reason: finish_reason.as_str().into(),
                    usage: super::wire_usage(usage),
                    timings: InferenceTimings {
                        fetch_ms,
                        preprocess_ms,
                        model: super::wire_timings(timings),
                        total_ms: started.elapsed().as_secs_f64() * 1000.0,
                    },
                    answer: answer.map(super::wire_answer),
                });
            }
            EngineEvent::Failed { error } => {
                return Err(ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::Model, error.to_string()));
            }
            _ => {}
        }
    }
    Err(internal("the engine stopped"))
}

/// `POST /v1/inference/upload`: multipart with `file`, `prompt`, and optional `video_params`
/// (JSON), `temperature`, `max_tokens`, `response_format` (JSON, as in the chat API).
pub(crate) async fn inference_upload(
    State(state): State<Arc<AppState>>,
    mut multipart: Multipart,
) -> Result<impl IntoResponse, ApiFailure> {
    let started = Instant::now();
    let path = state.config.data_dir.join("uploads").join(format!("{}.req", new_id()));
    let _cleanup = TempFile(path.clone());
    let (mut prompt, mut params, mut temperature, mut max_tokens, mut have_file) =
        (None, VideoParams::default(), None, None, false);
    let mut response_format = None;
    while let Some(field) =
        multipart.next_field().await.map_err(|e| ApiFailure::bad_request(format!("bad multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            receive_file(field, &path, state.config.max_upload_bytes).await?;
            have_file = true;
            continue;
        }
        let text = field.text().await.map_err(|e| ApiFailure::bad_request(format!("field {name}: {e}")))?;
        match name.as_str() {
            "prompt" => prompt = Some(text),
            "video_params" => {
                params =
                    serde_json::from_str(&text).map_err(|e| ApiFailure::bad_request(format!("video_params: {e}")))?
            }
            "temperature" => {
                temperature =
                    Some(text.trim().parse().map_err(|_| ApiFailure::bad_request("temperature must be a number"))?)
            }
            "response_format" => {
                response_format = Some(
                    serde_json::from_str(&text)
                        .map_err(|e| ApiFailure::bad_request(format!("response_format: {e}")))?,
                )
            }
            "max_tokens" => {
                max_tokens =
                    Some(text.trim().parse().map_err(|_| ApiFailure::bad_request("max_tokens must be an integer"))?)
            }
            _ => return Err(ApiFailure::bad_request(format!("unknown field {name:?}"))),
        }
    }
    if !have_file {
        return Err(ApiFailure::bad_request("the multipart body needs a part named \"file\""));
    }
    let prompt = prompt.ok_or_else(|| ApiFailure::bad_request("the multipart body needs a part named \"prompt\""))?;
    let fetch_ms = started.elapsed().as_secs_f64() * 1000.0;
    let ask = Ask { prompt, params, temperature, max_tokens, response_format };
    let r = analyze(&state, &path, ask, fetch_ms, started).await?;
    Ok(axum::Json(r))
}

/// Whether an address is one a URL fetch must not reach unless allowed: loopback, private,
/// link-local, carrier-grade NAT, "this network", multicast and reserved IPv4, and in IPv6 the
/// same, unique-local and the deprecated site-local ranges, and any IPv4 address embedded in
/// IPv6 (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`).
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let [a, b, ..] = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                || a == 0 // "this network"
                || a >= 240 // reserved
                || a == 100 && (64..128).contains(&b) // carrier-grade NAT
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
                || ingest::rtsp::embedded_ipv4(v).is_some_and(|m| is_private(IpAddr::V4(m)))
        }
    }
}

/// Why a URL's host may not be reached.
#[derive(Debug)]
pub(crate) enum AddressError {
    /// It does not resolve (or has no address).
    Unresolved(String),
    /// It resolves to an address that is not allowed.
    Refused(String),
}

/// The one address to connect to for `url` (blocking: it may resolve a name), checked against
/// the private ranges unless `allow_private`. Callers connect to exactly this address, so DNS
/// cannot change between the check and the use.
pub(crate) fn checked_address(url: &url::Url, allow_private: bool) -> Result<std::net::SocketAddr, AddressError> {
    let host = url.host().ok_or_else(|| AddressError::Unresolved("the url has no host".into()))?.to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<std::net::SocketAddr> = match &host {
        url::Host::Ipv4(ip) => vec![(*ip, port).into()],
        url::Host::Ipv6(ip) => vec![(*ip, port).into()],
        url::Host::Domain(d) => (d.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| AddressError::Unresolved(format!("cannot resolve {d}: {e}")))?
            .collect(),
    };
    if !allow_private && addrs.iter().any(|a| is_private(a.ip())) {
        return Err(AddressError::Refused(format!(
            "{host} resolves to a loopback, private or link-local address, which is not allowed"
        )));
    }
    addrs.first().copied().ok_or_else(|| AddressError::Unresolved(format!("{host} has no address")))
}

/// Downloads `url` to `path` (blocking): http(s) only, no redirects, checked addresses, size limit.
pub(crate) fn fetch(url: &str, path: &Path, limit: u64, allow_private: bool) -> Result<u64, ApiFailure> {
    let parsed = url::Url::parse(url).map_err(|e| ApiFailure::bad_request(format!("invalid url: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ApiFailure::bad_request("only http and https URLs are fetched"));
    }
    let addr = checked_address(&parsed, allow_private).map_err(|e| match e {
        AddressError::Unresolved(m) => ApiFailure::new(StatusCode::BAD_GATEWAY, ErrorCode::Source, m),
        AddressError::Refused(m) => ApiFailure::bad_request(format!("{m} (see --allow-private-urls)")),
    })?;
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(std::time::Duration::from_secs(10))
        .timeout_read(std::time::Duration::from_secs(30))
        .resolver(move |_: &str| Ok(vec![addr]))
        .build();
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => ApiFailure::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Source,
            format!("fetching the url answered HTTP {code}"),
        ),
        other @ ureq::Error::Transport(_) => {
            ApiFailure::new(StatusCode::BAD_GATEWAY, ErrorCode::Source, format!("cannot fetch the url: {other}"))
        }
    })?;
    if (300..400).contains(&resp.status()) {
        return Err(ApiFailure::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Source,
            "the url redirects; give the final address",
        ));
    }
    let mut reader = resp.into_reader().take(limit + 1);
    let mut file = std::fs::File::create(path).map_err(internal)?;
    let n = std::io::copy(&mut reader, &mut file).map_err(|e| {
        ApiFailure::new(StatusCode::BAD_GATEWAY, ErrorCode::Source, format!("the download broke off: {e}"))
    })?;
    if n > limit {
        return Err(ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BadRequest,
            format!("the clip is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(n)
}

/// `POST /v1/inference/url`.
pub(crate) async fn inference_url(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiFailure> {
    let started = Instant::now();
    let req: UrlInferenceRequest =
        serde_json::from_slice(&body).map_err(|e| ApiFailure::bad_request(format!("invalid JSON body: {e}")))?;
    let clip = fetch_to_temp(&state.config, &req.url).await?;
    let fetch_ms = started.elapsed().as_secs_f64() * 1000.0;
    let ask = Ask {
        prompt: req.prompt,
        params: req.video_params,
        temperature: req.temperature,
        max_tokens: req.max_tokens,
        response_format: req.response_format,
    };
    let r = analyze(&state, &clip.0, ask, fetch_ms, started).await?;
    Ok(axum::Json(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_recognized() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.1.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "100.64.0.1",
            // IPv4-compatible, NAT64 and site-local forms.
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe", // 169.254.169.254, the cloud metadata address
            "fec0::1",
            "ff02::1",
            "224.0.0.1",
            "0.1.2.3",
            "240.0.0.1",
        ] {
            assert!(is_private(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "2001:4860::8888", "100.128.0.1", "64:ff9b::808:808", "::ffff:8.8.8.8"] {
            assert!(!is_private(a.parse().unwrap()), "{a}");
        }
    }

    proptest::proptest! {
        /// An IPv4 address is refused in every IPv6 form exactly when it is refused itself.
        #[test]
        fn embedded_ipv4_is_judged_as_itself(a in proptest::prelude::any::<u32>()) {
            let v4 = std::net::Ipv4Addr::from(a);
            let private = is_private(IpAddr::V4(v4));
            let [hi, lo] = [(a >> 16) as u16, a as u16];
            for v6 in [
                v4.to_ipv6_mapped(),
                std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo),
                std::net::Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo),
            ] {
                proptest::prop_assert!(is_private(IpAddr::V6(v6)) == private, "{v4} as {v6}");
            }
        }
    }

    #[test]
    fn non_http_urls_are_refused_without_network() {
        let p = std::env::temp_dir().join("lookout-never-written");
        assert!(fetch("file:///etc/passwd", &p, 10, false).is_err());
        assert!(fetch("not a url", &p, 10, false).is_err());
        let e = fetch("http://127.0.0.1:9/clip.mp4", &p, 10, false).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
