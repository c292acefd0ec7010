//! `lookout serve` against real sockets on 127.0.0.1 with a fixture model: uploads, a streaming
//! WebSocket session over a replayed clip, and bad input that gets a clear error while the server
//! keeps serving.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{ClientMessage, EndReason, ErrorCode, GenerationSettings, ServerMessage, Source, WindowSettings};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::*;

async fn start(api_key: Option<&str>, max_upload_bytes: u64) -> Server {
    start_with(api_key, max_upload_bytes, false).await
}

async fn start_with(api_key: Option<&str>, max_upload_bytes: u64, allow_private_urls: bool) -> Server {
    start_server(|c| {
        c.api_key = api_key.map(str::to_owned);
        c.max_upload_bytes = max_upload_bytes;
        c.allow_private_urls = allow_private_urls;
    })
    .await
}

fn start_msg(id: &str, prompt: &str) -> ClientMessage {
    ClientMessage::Start {
        source: Source::Upload { id: id.into(), speed: Some(4.0), looped: Some(false) },
        prompt: prompt.into(),
        window: Some(WindowSettings {
            seconds: Some(1.0),
            stride_seconds: Some(1.0),
            fps: Some(4.0),
            min_pixels: Some(4096),
            max_pixels: Some(16384),
        }),
        generation: Some(GenerationSettings { max_tokens: Some(6), temperature: Some(0.0), ..Default::default() }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_upload_streams_windows_and_tokens() {
    let mut server = start(None, 50 << 20).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (status, body) = upload(&server.base, clip, None).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["frames"], 100);
    let id = body["id"].as_str().unwrap().to_owned();

    let mut ws = connect(&server.base).await;
    // Bad JSON first: a clear, non-fatal error.
    ws.send(Message::Text("{not json".into())).await.unwrap();
    assert!(matches!(recv(&mut ws).await, ServerMessage::Error { code: ErrorCode::BadRequest, fatal: false, .. }));
    send(&mut ws, &start_msg(&id, "What happens?")).await;
    let ready = recv(&mut ws).await;
    assert!(
        matches!(&ready, ServerMessage::Ready { source, .. } if source.width == 480 && source.codec == "h264"),
        "{ready:?}"
    );

    let mut windows = 0;
    let mut prompt_tokens = Vec::new();
    let mut tokens = String::new();
    let mut current = None;
    let mut saw_status = false;
    let ended = loop {
        match recv(&mut ws).await {
            ServerMessage::Window { id, frames, grid_thw, start_s, end_s } => {
                assert_eq!(frames, 4);
                assert_eq!(grid_thw[0], 2);
                assert!(end_s > start_s);
                current = Some(id);
                tokens.clear();
            }
            ServerMessage::Token { window, text } => {
                assert_eq!(Some(window), current);
                tokens.push_str(&text);
            }
            ServerMessage::WindowDone { window, text, usage, .. } => {
                assert_eq!(Some(window), current);
                assert_eq!(tokens, text, "streamed tokens must add up to the window's text");
                assert!(usage.completion_tokens >= 1);
                prompt_tokens.push(usage.prompt_tokens);
                windows += 1;
                if windows == 1 {
                    // Change the prompt: it applies from the next window.
                    let longer = "Count the shapes, name every colour you see, and say which of them move.";
                    send(&mut ws, &ClientMessage::Prompt { text: longer.into() }).await;
                }
            }
            ServerMessage::Status { .. } => saw_status = true,
            ServerMessage::Skipped { .. } => {}
            ServerMessage::Ended { reason, .. } => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(windows >= 2, "only {windows} windows");
    // Same video grid, longer prompt: once a window uses the new prompt, all later ones do (a
    // window already cut when the message arrives may still use the old one).
    let first_new = prompt_tokens.iter().position(|&n| n > prompt_tokens[0]).expect("the new prompt was never used");
    assert!(prompt_tokens[first_new..].iter().all(|&n| n == prompt_tokens[first_new]), "{prompt_tokens:?}");
    assert_eq!(ended, EndReason::EndOfStream);
    assert!(saw_status);

    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_errors_and_the_server_keeps_serving() {
    let mut server = start(None, 200_000).await;
    // Not a video.
    let (status, body) = upload(&server.base, b"hello, this is text".to_vec(), None).await;
    assert_eq!(status, 415, "{body}");
    let m = body["error"]["message"].as_str().unwrap();
    assert!(m.contains("not a playable video"), "{m}");
    assert!(!m.contains(".part") && !m.contains("uploads/"), "the server's paths stay private: {m}");
    // Health (no key needed) names the model, not where it lives.
    let base = server.base.clone();
    let health: serde_json::Value = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://{base}/v1/health")).call().unwrap().into_json().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(health["model"], "tiny-tied", "{health}");
    common::openapi::conforms("Health", &health);
    // A still image and a one-frame clip can never make a window: refused at upload.
    let dir = std::env::temp_dir().join(format!("lookout-stills-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["still.png", "one.mp4"] {
        let out = dir.join(name);
        let ok = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25"])
            .args(["-frames:v", "1"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(ok.success());
        let (status, body) = upload(&server.base, std::fs::read(&out).unwrap(), None).await;
        assert_eq!(status, 422, "{name}: {body}");
        let m = body["error"]["message"].as_str().unwrap();
        assert!(m.contains("1 frame") && m.contains("at least 2 frames"), "{m}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Too large.
    let (status, _) = upload(&server.base, vec![0u8; 300_000], None).await;
    assert_eq!(status, 413);
    // Unknown source kind and unknown upload id over the WebSocket.
    let mut ws = connect(&server.base).await;
    ws.send(Message::Text(r#"{"type":"start","source":{"kind":"ftp","url":"x"},"prompt":"p"}"#.into())).await.unwrap();
    assert!(matches!(recv(&mut ws).await, ServerMessage::Error { code: ErrorCode::BadRequest, .. }));
    send(&mut ws, &start_msg("doesnotexist", "p")).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Error { fatal: true, .. }));
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ended { .. }));
    // A URL source at a private address is refused with a reason; an unreachable one too.
    for (url, needle) in [("http://192.168.1.20/cam.mp4", "not allowed"), ("http://127.0.0.1:9/x.mp4", "not allowed")] {
        let mut ws = connect(&server.base).await;
        let m = ClientMessage::Start {
            source: Source::Url { url: url.into(), speed: None, looped: None },
            prompt: "p".into(),
            window: None,
            generation: None,
        };
        send(&mut ws, &m).await;
        match recv(&mut ws).await {
            ServerMessage::Error { message, fatal: true, .. } => assert!(message.contains(needle), "{message}"),
            other => panic!("{other:?}"),
        }
    }
    // A message over the size limit (16 KiB here) closes that connection, nothing else.
    let mut ws = connect(&server.base).await;
    let huge = format!(r#"{{"type":"prompt","text":"{}"}}"#, "x".repeat(64 * 1024));
    let _ = ws.send(Message::Text(huge.into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_) | Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(closed);
    // Still serving.
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_short_30fps_256x144.mp4")).unwrap();
    let (status, _) = upload(&server.base, clip, None).await;
    assert_eq!(status, 201);
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_everything_but_health_and_shutdown_ends_sessions() {
    let mut server = start(Some("sekrit"), 50 << 20).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_short_30fps_256x144.mp4")).unwrap();
    // A small body: the server answers 401 without reading it, and a large one could see the
    // connection reset before the answer is read.
    let (status, _) = upload(&server.base, b"tiny".to_vec(), None).await;
    assert_eq!(status, 401);
    let (status, body) = upload(&server.base, clip, Some("sekrit")).await;
    assert_eq!(status, 201);
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", server.base)).await.is_err());
    let base = server.base.clone();
    let (without, with) = tokio::task::spawn_blocking(move || {
        let code = |u: String| match ureq::get(&u).call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{e}"),
        };
        let guarded = [
            code(format!("http://{base}/v1/monitors")),
            code(format!("http://{base}/v1/watches")),
            code(format!("http://{base}/v1/monitors/x/events")),
            code(format!("http://{base}/v1/events/1/thumbnail.jpg")),
        ];
        assert_eq!(guarded, [401; 4], "the monitor routes need the key");
        // The document and the server agree: every operation it says needs the key answers 401
        // without one (the WebSocket is checked below).
        let doc: serde_json::Value = ureq::get(&format!("http://{base}/openapi.json"))
            .set("Authorization", "Bearer sekrit")
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in
                item.as_object().unwrap().keys().filter(|m| ["get", "post", "patch", "delete"].contains(&m.as_str()))
            {
                if ["/", "/v1/health", "/v1/ws"].contains(&path.as_str()) {
                    continue;
                }
                let url = format!("http://{base}{}", path.replace("{id}", "x").replace("{file}", "x"));
                let status = match ureq::request(&method.to_uppercase(), &url).call() {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(c, _)) => c,
                    Err(e) => panic!("{e}"),
                };
                assert_eq!(status, 401, "{method} {path} without the key");
            }
        }
        // The scheme is case-insensitive (RFC 7235); a wrong key or another scheme is not.
        let with_auth =
            |value: &str| match ureq::get(&format!("http://{base}/v1/watches")).set("Authorization", value).call() {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(c, _)) => c,
                Err(e) => panic!("{e}"),
            };
        let codes: Vec<u16> =
            ["Bearer sekrit", "bearer sekrit", "BEARER  sekrit", "Bearer sekri", "Basic sekrit", "sekrit"]
                .into_iter()
                .map(with_auth)
                .collect();
        assert_eq!(codes, [200, 200, 200, 401, 401, 401]);
        (code(format!("http://{base}/docs")), code(format!("http://{base}/docs?api_key=sekrit")))
    })
    .await
    .unwrap();
    assert_eq!((without, with), (401, 200));
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?api_key=sekrit", server.base)).await.unwrap();
    let mut start = start_msg(&id, "p");
    if let ClientMessage::Start { source: Source::Upload { looped, speed, .. }, .. } = &mut start {
        *looped = Some(true);
        *speed = Some(1.0);
    }
    send(&mut ws, &start).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ready { .. }));
    server.stop.take().unwrap().send(()).unwrap();
    let (reason, message) = loop {
        if let ServerMessage::Ended { reason, message } = recv(&mut ws).await {
            break (reason, message);
        }
    };
    assert_eq!(reason, EndReason::Shutdown);
    assert!(message.contains("shutting down"), "{message}");
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_and_a_stalled_reader_do_not_block_others() {
    let mut server = start(None, 50 << 20).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (_, body) = upload(&server.base, clip, None).await;
    let id = body["id"].as_str().unwrap().to_owned();

    // A client that starts a looping session with long answers and then never reads.
    let mut stalled = connect(&server.base).await;
    let mut start = start_msg(&id, "Describe everything in detail.");
    if let ClientMessage::Start { source: Source::Upload { looped, .. }, generation, .. } = &mut start {
        *looped = Some(true);
        *generation = Some(GenerationSettings { max_tokens: Some(64), temperature: Some(0.0), ..Default::default() });
    }
    send(&mut stalled, &start).await;

    // Two well-behaved sessions at once.
    let run = |base: String, id: String| async move {
        let mut ws = connect(&base).await;
        send(&mut ws, &start_msg(&id, "What happens?")).await;
        let mut done = 0;
        loop {
            match recv(&mut ws).await {
                ServerMessage::WindowDone { .. } => done += 1,
                ServerMessage::Ended { reason, .. } => return (done, reason),
                _ => {}
            }
        }
    };
    let (a, b) = tokio::join!(run(server.base.clone(), id.clone()), run(server.base.clone(), id.clone()));
    for (done, reason) in [a, b] {
        assert_eq!(reason, EndReason::EndOfStream);
        assert!(done >= 1, "a session got no window done");
    }
    drop(stalled);
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

/// A multipart body with several text parts and one file part.
fn multipart_fields(fields: &[(&str, &str)], file: &[u8]) -> (String, Vec<u8>) {
    let boundary = "lookoutboundaryRESTfields";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_json(url: String, body: String) -> (u16, serde_json::Value) {
    tokio::task::spawn_blocking(move || {
        match ureq::post(&url).set("Content-Type", "application/json").send_string(&body) {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_rest_endpoints_answer_in_the_seed_shapes() {
    let mut server = start_with(None, 50 << 20, true).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();

    // Upload inference.
    let url = format!("http://{}/v1/inference/upload", server.base);
    let params = r#"{"fps": 1.0, "min_pixels": 4096, "max_pixels": 16384}"#;
    let (ct, body) = multipart_fields(
        &[("prompt", "What happens?"), ("video_params", params), ("max_tokens", "5"), ("temperature", "0")],
        &clip,
    );
    let (status, v) =
        tokio::task::spawn_blocking(move || match ureq::post(&url).set("Content-Type", &ct).send_bytes(&body) {
            Ok(r) => (r.status(), r.into_json::<serde_json::Value>().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        })
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    common::openapi::conforms("InferenceResponse", &v);
    let r: protocol::InferenceResponse = serde_json::from_value(v).unwrap();
    assert_eq!(r.usage.completion_tokens, 5);
    assert_eq!(r.finish_reason, "length");
    assert!(r.timings.total_ms >= r.timings.preprocess_ms);

    // URL inference from a local HTTP server (private addresses allowed on this server).
    let files = axum::Router::new().route("/clip.mkv", axum::routing::get(move || async move { clip.clone() }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let clip_url = format!("http://127.0.0.1:{}/clip.mkv", l.local_addr().unwrap().port());
    tokio::spawn(async move { axum::serve(l, files).await.unwrap() });
    let req = serde_json::json!({"url": clip_url, "prompt": "What happens?", "video_params": {"fps": 1.0, "min_pixels": 4096, "max_pixels": 16384}, "max_tokens": 4, "temperature": 0.0});
    let (status, v) = post_json(format!("http://{}/v1/inference/url", server.base), req.to_string()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);

    // Bad JSON, an unreachable URL, a missing prompt.
    let (status, v) = post_json(format!("http://{}/v1/inference/url", server.base), "{oops".into()).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("invalid JSON"));
    let req = serde_json::json!({"url": "http://127.0.0.1:9/none.mp4", "prompt": "x"});
    let (status, v) = post_json(format!("http://{}/v1/inference/url", server.base), req.to_string()).await;
    assert_eq!(status, 502, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("cannot fetch"));

    // Metrics count what happened.
    let m = tokio::task::spawn_blocking({
        let u = format!("http://{}/metrics", server.base);
        move || ureq::get(&u).call().unwrap().into_string().unwrap()
    })
    .await
    .unwrap();
    assert!(m.contains("lookout_rest_requests_total 2"), "{m}");
    // OpenMetrics (Prometheus' own encoder): the family's TYPE line, the sample with `_total`,
    // and the end marker.
    assert!(m.contains("# TYPE lookout_tokens counter"), "{m}");
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_address_urls_are_refused_by_default() {
    let mut server = start(None, 50 << 20).await;
    for url in
        ["http://127.0.0.1:8000/x.mp4", "http://10.0.0.5/x.mp4", "http://[::1]/x.mp4", "http://169.254.169.254/latest"]
    {
        let req = serde_json::json!({"url": url, "prompt": "x"});
        let (status, v) = post_json(format!("http://{}/v1/inference/url", server.base), req.to_string()).await;
        assert_eq!(status, 400, "{url}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("not allowed"), "{v}");
    }
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_completions_whole_and_streamed() {
    let mut server = start(None, 50 << 20).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (_, body) = upload(&server.base, clip, None).await;
    let id = body["id"].as_str().unwrap().to_owned();
    let request = |stream: bool| {
        serde_json::json!({
            "model": "tiny", "stream": stream, "max_tokens": 8, "temperature": 0,
            "video_params": {"fps": 1.0, "min_pixels": 4096, "max_pixels": 16384},
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": if stream { id.clone() } else { format!("upload:{id}") }}},
                                             {"type": "text", "text": "What happens?"}]}]
        })
        .to_string()
    };
    let url = format!("http://{}/v1/chat/completions", server.base);
    let (status, whole) = post_json(url.clone(), request(false)).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["usage"]["completion_tokens"], 8);
    assert_eq!(whole["model"], "tiny-tied", "the model that answered, not the one asked for");
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap().to_owned();

    let body = request(true);
    let sse = tokio::task::spawn_blocking(move || {
        ureq::post(&url).set("Content-Type", "application/json").send_string(&body).unwrap().into_string().unwrap()
    })
    .await
    .unwrap();
    let data: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(*data.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    let mut finish = None;
    for d in &data[..data.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    assert_eq!(streamed, content, "the streamed pieces add up to the whole answer");
    assert_eq!(finish.as_deref(), Some("length"));

    // stream_options.include_usage: a last chunk with the counts and no choices; streamed chats
    // count in the metrics.
    let metric = |text: &str, name: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().trim().parse().unwrap()
    };
    let metrics_url = format!("http://{}/metrics", server.base);
    let get = |u: String| async move {
        tokio::task::spawn_blocking(move || ureq::get(&u).call().unwrap().into_string().unwrap()).await.unwrap()
    };
    let before = get(metrics_url.clone()).await;
    let mut body: serde_json::Value = serde_json::from_str(&request(true)).unwrap();
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let url = format!("http://{}/v1/chat/completions", server.base);
    let sse = tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap()
            .into_string()
            .unwrap()
    })
    .await
    .unwrap();
    let data: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let usage: serde_json::Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], serde_json::json!([]), "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 8, "{usage}");
    let after = get(metrics_url).await;
    assert_eq!(metric(&after, "lookout_rest_requests_total"), metric(&before, "lookout_rest_requests_total") + 1);
    assert_eq!(metric(&after, "lookout_tokens_total"), metric(&before, "lookout_tokens_total") + 8);

    // OpenAI fields that are not served are refused, saying which; parts other than text and
    // video get advice; a URL in capitals is a URL, not an upload id.
    let url = format!("http://{}/v1/chat/completions", server.base);
    let text_only = |extra: serde_json::Value| {
        let mut b = serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    for (extra, needle) in [
        (serde_json::json!({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
        (serde_json::json!({"n": 2}), "n other than 1"),
        (serde_json::json!({"logprobs": true}), "logprobs"),
        (serde_json::json!({"frequency_penalty": 0.5}), "frequency_penalty"),
        (serde_json::json!({"logit_bias": {"12": 5}}), "logit_bias"),
    ] {
        let (status, v) = post_json(url.clone(), text_only(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{extra}: {v}");
    }
    let (status, v) =
        post_json(url.clone(), text_only(serde_json::json!({"n": 1, "tools": [], "logprobs": false}))).await;
    assert_eq!(status, 200, "the defaults are accepted: {v}");
    let image = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}"#;
    let (status, v) = post_json(url.clone(), image.into()).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("send a video_url part"), "{v}");
    let caps = r#"{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "HTTPS://127.0.0.1/a.mp4"}}]}]}"#;
    let (status, v) = post_json(url.clone(), caps.into()).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("not allowed"), "fetched as a URL (and refused): {v}");

    // Bad requests.
    let url = format!("http://{}/v1/chat/completions", server.base);
    let (status, _) = post_json(url.clone(), r#"{"messages": []}"#.into()).await;
    assert_eq!(status, 400);
    let bad =
        r#"{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "upload:nope"}}]}]}"#;
    let (status, v) = post_json(url, bad.into()).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("no upload"));
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_and_docs_are_served_from_the_binary() {
    let mut server = start(None, 1 << 20).await;
    let base = server.base.clone();
    let (doc, page) = tokio::task::spawn_blocking(move || {
        let doc: serde_json::Value =
            ureq::get(&format!("http://{base}/openapi.json")).call().unwrap().into_json().unwrap();
        let page = ureq::get(&format!("http://{base}/docs")).call().unwrap().into_string().unwrap();
        (doc, page)
    })
    .await
    .unwrap();
    for path in [
        "/v1/health",
        "/v1/models",
        "/v1/uploads",
        "/v1/inference/upload",
        "/v1/inference/url",
        "/v1/chat/completions",
        "/v1/ws",
        "/metrics",
        "/v1/watches",
        "/v1/monitors",
        "/v1/monitors/{id}",
        "/v1/monitors/{id}/events",
        "/v1/events/{id}/thumbnail.jpg",
        "/v1/nodes",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    // Every operation behind the key documents 401, every one with a body documents 400, and
    // the upload's file part is required.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["/", "/v1/health"].contains(&path.as_str())
                || !["get", "post", "patch", "delete"].contains(&method.as_str())
            {
                continue;
            }
            assert!(op["responses"]["401"].is_object(), "{method} {path} does not document 401");
            if op.get("requestBody").is_some() {
                assert!(op["responses"]["400"].is_object(), "{method} {path} does not document 400");
            }
        }
    }
    let upload = &doc["paths"]["/v1/uploads"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"];
    assert!(upload["required"].as_array().unwrap().contains(&serde_json::json!("file")), "{upload}");
    assert!(page.contains("Lookout API") && page.contains("/openapi.json"));
    assert!(!page.contains("https://"), "the docs page must not load anything from elsewhere");
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_window_ends_the_session_at_once() {
    let mut server = start(None, 50 << 20).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (_, body) = upload(&server.base, clip, None).await;
    let id = body["id"].as_str().unwrap().to_owned();
    let mut ws = connect(&server.base).await;
    let mut start = start_msg(&id, "Describe everything.");
    if let ClientMessage::Start { generation, .. } = &mut start {
        *generation = Some(GenerationSettings { max_tokens: Some(8192), temperature: Some(0.0), ..Default::default() });
    }
    send(&mut ws, &start).await;
    loop {
        if let ServerMessage::Token { .. } = recv(&mut ws).await {
            break;
        }
    }
    let asked = std::time::Instant::now();
    send(&mut ws, &ClientMessage::Stop {}).await;
    let (reason, message) = loop {
        if let ServerMessage::Ended { reason, message } = recv(&mut ws).await {
            break (reason, message);
        }
    };
    assert_eq!(reason, EndReason::Stopped);
    assert_eq!(message, "stopped by the client");
    assert!(asked.elapsed() < Duration::from_secs(4), "stop took {:?}", asked.elapsed());
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_their_headers_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut server = start_server(|c| c.header_read_timeout = Duration::from_secs(1)).await;
    // A slowloris: many connections that start a request and never finish its headers.
    let mut idle = Vec::new();
    for _ in 0..100 {
        let mut tcp = tokio::net::TcpStream::connect(&server.base).await.unwrap();
        tcp.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        idle.push(tcp);
    }
    // And some that never send a byte.
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(&server.base).await.unwrap());
    }
    // Health still answers meanwhile.
    let base = server.base.clone();
    let status =
        tokio::task::spawn_blocking(move || ureq::get(&format!("http://{base}/v1/health")).call().unwrap().status())
            .await
            .unwrap();
    assert_eq!(status, 200);
    // Every one of them is closed by the server soon after the timeout.
    let started = std::time::Instant::now();
    for tcp in &mut idle {
        let mut buf = [0u8; 512];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408 answer, then the close
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a half-open connection was kept past the header timeout");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_multipart_uploads_get_a_4xx_and_the_server_keeps_serving() {
    use proptest::prelude::*;
    let mut server = start(None, 200_000).await;
    let base = server.base.clone();
    tokio::task::spawn_blocking(move || {
        // Bodies made of multipart pieces in any order and amount, with any bytes between.
        let piece = prop_oneof![
            Just(b"--b\r\n".to_vec()),
            Just(b"--b--\r\n".to_vec()),
            Just(b"Content-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n".to_vec()),
            Just(b"Content-Disposition: form-data; name=\"other\"\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..64),
        ];
        let body = proptest::collection::vec(piece, 0..16).prop_map(|p| p.concat());
        let content_type =
            prop_oneof![Just("multipart/form-data; boundary=b"), Just("multipart/form-data"), Just("text/plain")];
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 64, ..Default::default() });
        runner
            .run(&(body, content_type), |(body, ct)| {
                let status =
                    match ureq::post(&format!("http://{base}/v1/uploads")).set("Content-Type", ct).send_bytes(&body) {
                        Ok(r) => r.status(),
                        Err(ureq::Error::Status(c, _)) => c,
                        Err(e) => return Err(proptest::test_runner::TestCaseError::fail(format!("transport: {e}"))),
                    };
                prop_assert!((400..500).contains(&status), "{status} for {:?}", String::from_utf8_lossy(&body));
                Ok(())
            })
            .unwrap();
        let health = ureq::get(&format!("http://{base}/v1/health")).call().unwrap().status();
        assert_eq!(health, 200);
    })
    .await
    .unwrap();
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

/// Defect 1 of the reliability issue: a clip's decoding memory is reserved from the server's
/// media budget before it is decoded; a clip that can never fit is refused with a 413 that says
/// what to change, concurrent ones within the budget wait their turn, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clips_are_sampled_within_the_media_budget() {
    // The fixture clip (480x270) needs about 3 MiB at these settings.
    let mut small = start_server(|c| c.media_budget_mb = 1).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let post = |base: String, clip: Vec<u8>| async move {
        let url = format!("http://{base}/v1/inference/upload");
        let params = r#"{"fps": 1.0, "min_pixels": 4096, "max_pixels": 16384}"#;
        let (ct, body) =
            multipart_fields(&[("prompt", "What happens?"), ("video_params", params), ("max_tokens", "3")], &clip);
        tokio::task::spawn_blocking(move || match ureq::post(&url).set("Content-Type", &ct).send_bytes(&body) {
            Ok(r) => (r.status(), r.into_json::<serde_json::Value>().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        })
        .await
        .unwrap()
    };
    let (status, v) = post(small.base.clone(), clip.clone()).await;
    assert_eq!(status, 413, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("--media-budget-mb") && message.contains("max_pixels"), "{message}");
    let (status, _) = post_json(format!("http://{}/v1/health", small.base), String::new()).await;
    assert_ne!(status, 500);
    small.stop.take().unwrap().send(()).unwrap();
    small.task.await.unwrap();

    // Room for one clip at a time: four at once all succeed, one after another.
    let mut one = start_server(|c| c.media_budget_mb = 5).await;
    let runs: Vec<_> = (0..4).map(|_| tokio::spawn(post(one.base.clone(), clip.clone()))).collect();
    for r in runs {
        let (status, v) = r.await.unwrap();
        assert_eq!(status, 200, "{v}");
    }
    one.stop.take().unwrap().send(()).unwrap();
    one.task.await.unwrap();
}

#[test]
fn the_openapi_check_refuses_what_the_document_does_not_say() {
    use common::openapi::conforms;
    let fails = |name: &str, v: serde_json::Value| std::panic::catch_unwind(|| conforms(name, &v)).is_err();
    conforms("Health", &serde_json::json!({"status": "ready", "model": "m", "device": "cpu"}));
    assert!(fails("Health", serde_json::json!({"status": "ready", "model": "m", "device": "cpu", "oops": 1})));
    assert!(fails("Health", serde_json::json!({"status": "sleeping", "model": "m", "device": "cpu"})));
    assert!(fails("Health", serde_json::json!({"status": "ready", "model": 3, "device": "cpu"})));
    assert!(fails("EventPage", serde_json::json!({"events": []})), "next is required");
    assert!(fails("EventPage", serde_json::json!({"events": [{"id": 1}], "next": null})), "an event lacks its fields");
    assert!(fails("NoSuchSchema", serde_json::json!({})));
}

/// Sliding windows (2 s, a stride of 1 s at 4 fps: two of each window's four frame pairs were
/// in the window before) reuse those pairs' vision features, and say exactly what the same
/// windows say when every window is encoded whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_windows_reuse_frame_pairs_and_say_the_same() {
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let mut said = Vec::new();
    for cache_mb in [512, 0] {
        // The first server is given a KV budget, the second takes this machine's default.
        let kv_mb = (cache_mb > 0).then_some(1024);
        let mut server = start_server(|c| {
            c.vision_cache_mb = cache_mb;
            c.kv_cache_mb = kv_mb;
        })
        .await;
        let (status, body) = upload(&server.base, clip.clone(), None).await;
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        let mut ws = connect(&server.base).await;
        let mut start = start_msg(&id, "What happens?");
        if let ClientMessage::Start { source, window, .. } = &mut start {
            *source = Source::Upload { id: id.clone(), speed: Some(1.0), looped: Some(false) };
            *window = Some(WindowSettings {
                seconds: Some(2.0),
                stride_seconds: Some(1.0),
                fps: Some(4.0),
                min_pixels: Some(4096),
                max_pixels: Some(16384),
            });
        }
        send(&mut ws, &start).await;
        let mut texts = std::collections::BTreeMap::new();
        let mut starts = std::collections::HashMap::new();
        loop {
            match recv(&mut ws).await {
                ServerMessage::Window { id, start_s, grid_thw, .. } => {
                    assert_eq!(grid_thw[0], 4);
                    starts.insert(id, format!("{start_s:.2}"));
                }
                ServerMessage::WindowDone { window, text, .. } => {
                    texts.insert(starts[&window].clone(), text);
                }
                ServerMessage::Ended { reason, .. } => {
                    assert_eq!(reason, EndReason::EndOfStream);
                    break;
                }
                _ => {}
            }
        }
        let (_, metrics) = bytes(format!("http://{}/metrics", server.base)).await;
        let metrics = String::from_utf8(metrics).unwrap();
        let value = |name: &str| -> u64 {
            let line = metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} ")));
            line.unwrap_or_else(|| panic!("no {name} in {metrics}")).trim().parse().unwrap()
        };
        let (reused, encoded) =
            (value("lookout_vision_pairs_reused_total"), value("lookout_vision_pairs_encoded_total"));
        // The engine's gauges: idle now, nothing allocated, the budget as configured or, by
        // default, a quarter of the memory available (within what it moved since the load).
        assert_eq!(value("lookout_engine_requests_running"), 0);
        assert_eq!(value("lookout_engine_requests_waiting"), 0);
        assert_eq!(value("lookout_kv_cache_bytes"), 0);
        let budget = value("lookout_kv_cache_budget_bytes");
        match kv_mb {
            Some(mb) => assert_eq!(budget, mb << 20),
            None => {
                let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
                let kib: u64 = meminfo
                    .lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap();
                let quarter = (kib * 1024 / 4).clamp(256 << 20, 16 << 30);
                assert!(budget.abs_diff(quarter) < quarter / 5, "budget {budget}, a quarter of available {quarter}");
            }
        }
        let (steps, decoded) =
            (value("lookout_engine_decode_steps_total"), value("lookout_engine_decode_tokens_total"));
        assert!(steps > 0 && decoded >= steps, "{steps} decode steps, {decoded} tokens");
        if cache_mb > 0 {
            assert!(texts.len() >= 2, "{texts:?}");
            assert!(reused >= 2, "reused {reused}, encoded {encoded}: {metrics}");
            assert!(value("lookout_vision_cache_bytes") > 0);
        } else {
            assert_eq!(reused, 0);
            assert_eq!(value("lookout_vision_cache_bytes"), 0);
        }
        said.push(texts);
        server.stop.take().unwrap().send(()).unwrap();
        server.task.await.unwrap();
    }
    let common: Vec<_> = said[0].keys().filter(|k| said[1].contains_key(*k)).collect();
    assert!(!common.is_empty(), "{said:?}");
    for k in common {
        assert_eq!(said[0][k], said[1][k], "the window at {k} s");
    }
}
