//! Constrained answers through every API, against `lookout serve` on 127.0.0.1 with the fixture
//! model: the chat API (OpenAI's `response_format`, vLLM's `structured_outputs`, the OpenAI
//! Python SDK), the REST inference endpoint, and a WebSocket watch with `decided` events.

use protocol::{AnswerFormat, ClientMessage, EndReason, ErrorCode, GenerationSettings, ServerMessage, Source};
use serde_json::{Value, json};

mod common;
use common::*;

async fn post_json(url: String, body: Value) -> (u16, Value) {
    tokio::task::spawn_blocking(move || {
        match ureq::post(&url).set("Content-Type", "application/json").send_string(&body.to_string()) {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap()
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "tiny", "max_tokens": 48, "temperature": 1.0, "seed": 5,
        "messages": [{"role": "user", "content": "Is anyone at the door?"}]
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_follow_response_format_and_structured_outputs() {
    let mut server = start_server(|_| {}).await;
    let url = format!("http://{}/v1/chat/completions", server.base);
    let content = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();

    let schema = json!({
        "type": "object",
        "properties": {"person": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 9},
                       "color": {"enum": ["red", "blue"]}},
        "required": ["person", "count", "color"], "additionalProperties": false
    });
    for seed in 0..4 {
        let rf = json!({"type": "json_schema", "json_schema": {"name": "door", "schema": schema, "strict": true}});
        let (status, v) = post_json(url.clone(), chat(json!({"response_format": rf, "seed": seed}))).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let answer: Value = serde_json::from_str(&content(&v)).unwrap();
        assert!(answer["person"].is_boolean() && answer["count"].as_u64().unwrap() <= 9, "{answer}");
        assert!(["red", "blue"].contains(&answer["color"].as_str().unwrap()), "{answer}");
        assert_eq!(answer.as_object().unwrap().len(), 3);
    }
    let (status, v) = post_json(url.clone(), chat(json!({"response_format": {"type": "json_object"}}))).await;
    assert_eq!(status, 200, "{v}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(&content(&v)).unwrap().is_object());
    }
    let (_, v) = post_json(url.clone(), chat(json!({"response_format": {"type": "text"}, "max_tokens": 3}))).await;
    assert_eq!(v["usage"]["completion_tokens"], 3, "text is unconstrained: {v}");

    // vLLM's structured_outputs.
    let (status, v) = post_json(url.clone(), chat(json!({"structured_outputs": {"choice": ["yes", "no"]}}))).await;
    assert_eq!(status, 200, "{v}");
    assert!(["yes", "no"].contains(&content(&v).as_str()), "{v}");
    let (_, v) = post_json(url.clone(), chat(json!({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}))).await;
    let c = content(&v);
    assert!(c.len() == 6 && c[..3].bytes().all(|b| b.is_ascii_digit()) && &c[3..4] == "-", "{c:?}");
    // stop_when_decided: the choice is fixed by its first token and completed.
    let body = json!({"structured_outputs": {"choice": ["absolutely", "negative"]}, "stop_when_decided": true});
    let (_, v) = post_json(url.clone(), chat(body)).await;
    assert!(["absolutely", "negative"].contains(&content(&v).as_str()), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 1, "{v}");

    // A max_tokens cut is `length`.
    let rf = json!({"type": "json_schema", "json_schema": {"name": "door", "schema": schema}});
    let (_, v) = post_json(url.clone(), chat(json!({"response_format": rf, "max_tokens": 2}))).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    // Shapes that cannot compile, or two shapes at once: a 400 that says which part.
    let bad = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
        "properties": {"a": {"type": "strnig"}}}}});
    let (status, v) = post_json(url.clone(), chat(json!({"response_format": bad}))).await;
    assert_eq!(status, 400, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.starts_with("response_format: ") && m.contains("strnig"), "{m}");
    let (status, v) = post_json(url.clone(), chat(json!({"structured_outputs": {"regex": "(unclosed"}}))).await;
    assert_eq!(status, 400, "{v}");
    let both = json!({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}});
    let (status, v) = post_json(url.clone(), chat(both)).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("one answer shape"), "{v}");
    let (status, v) = post_json(url.clone(), chat(json!({"structured_outputs": {"choice": []}}))).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("at least one option"), "{v}");

    // The REST endpoint takes response_format as a multipart part and reports the answer.
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let base = server.base.clone();
    let (status, v) = tokio::task::spawn_blocking(move || {
        let boundary = "answerboundary42";
        let mut body = Vec::new();
        let mut part = |name: &str, value: &str| {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
            );
        };
        part("prompt", "How many cars?");
        part("max_tokens", "16");
        part("video_params", r#"{"fps": 1.0, "min_pixels": 4096, "max_pixels": 16384}"#);
        part(
            "response_format",
            r#"{"type":"json_schema","json_schema":{"name":"cars","schema":{"type":"object","properties":{"cars":{"type":"integer","minimum":0,"maximum":9}},"required":["cars"],"additionalProperties":false}}}"#,
        );
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.mkv\"\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(&clip);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        match ureq::post(&format!("http://{base}/v1/inference/upload"))
            .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
            .send_bytes(&body)
        {
            Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["answer"]["complete"], true, "{v}");
    let parsed: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
    assert_eq!(v["answer"]["value"], parsed);
    assert!(parsed["cars"].as_u64().unwrap() <= 9);

    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_parses_structured_outputs() {
    let mut server = start_server(|_| {}).await;
    let python = std::env::var("LOOKOUT_SDK_VENV").unwrap_or_else(|_| "/opt/lookout-sdk".into()) + "/bin/python";
    assert!(std::path::Path::new(&python).is_file(), "{python} is missing: run scripts/setup.sh");
    let script = root().join("tests/sdk/structured.py");
    let base = server.base.clone();
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(python).arg(script).arg(base).output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the SDK failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["parsed"].as_array().unwrap().len(), 3, "{v}");
    for scene in v["parsed"].as_array().unwrap() {
        assert!(scene["count"].as_u64().unwrap() <= 9, "{scene}");
    }
    assert!(v["streamed"]["ok"].is_boolean(), "{v}");
    assert_eq!(v["bad"], "BadRequestError", "{v}");
    assert_eq!(v["bad_status"], 400);
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_reports_decisions_before_each_window_ends() {
    let mut server = start_server(|_| {}).await;
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (_, body) = upload(&server.base, clip, None).await;
    let id = body["id"].as_str().unwrap().to_owned();
    let schema = json!({
        "type": "object",
        "properties": {"person": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["person", "count"], "additionalProperties": false
    });
    let generation = GenerationSettings {
        max_tokens: Some(24),
        temperature: Some(0.0),
        answer: Some(AnswerFormat::JsonSchema(schema)),
        ..Default::default()
    };
    let start = ClientMessage::Start {
        source: Source::Upload { id: id.clone(), speed: Some(4.0), looped: Some(false) },
        prompt: "Is anyone there?".into(),
        window: Some(small_windows()),
        generation: Some(generation),
    };
    let mut ws = connect(&server.base).await;
    send(&mut ws, &start).await;
    let mut windows = 0;
    let mut decided: Vec<(u64, String, Value)> = Vec::new();
    let mut text = String::new();
    loop {
        match recv(&mut ws).await {
            ServerMessage::Token { text: t, .. } => text.push_str(&t),
            ServerMessage::Decided { window, path, value } => {
                if path.is_empty() {
                    assert_eq!(value, serde_json::from_str::<Value>(&text).unwrap(), "the whole answer, once complete");
                }
                decided.push((window, path, value));
            }
            ServerMessage::WindowDone { window, text: done, answer, finish_reason, .. } => {
                assert_eq!(done, text);
                assert_eq!(finish_reason, "stop");
                let answer = answer.expect("a constrained window reports its answer");
                let v: Value = serde_json::from_str(&done).unwrap();
                assert!(answer.complete);
                assert_eq!(answer.value.as_ref(), Some(&v));
                let mine: Vec<&str> = decided.iter().filter(|d| d.0 == window).map(|d| d.1.as_str()).collect();
                assert_eq!(mine, ["/person", "/count", ""], "decisions of window {window}");
                for (_, path, value) in decided.iter().filter(|d| d.0 == window) {
                    assert_eq!(v.pointer(path), Some(value));
                }
                windows += 1;
                text.clear();
            }
            ServerMessage::Ended { .. } => break,
            _ => {}
        }
    }
    assert!(windows >= 2, "{windows}");

    // A schema that cannot compile refuses the start with what is wrong.
    let bad = ClientMessage::Start {
        source: Source::Upload { id, speed: Some(4.0), looped: Some(false) },
        prompt: "x".into(),
        window: Some(small_windows()),
        generation: Some(GenerationSettings {
            answer: Some(AnswerFormat::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "strnig"}}}))),
            ..Default::default()
        }),
    };
    let mut ws = connect(&server.base).await;
    send(&mut ws, &bad).await;
    match recv(&mut ws).await {
        ServerMessage::Error { code: ErrorCode::BadRequest, message, fatal: true } => {
            assert!(message.starts_with("generation.answer: "), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(recv(&mut ws).await, ServerMessage::Ended { reason: EndReason::Rejected, .. }));
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}
