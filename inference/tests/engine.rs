//! The engine as a service uses it: streamed events, cancellation, a bounded queue, and failures
//! that stay with their request.

mod common;

use common::*;
use inference::engine::EngineEvent;
use inference::processor::Message;
use inference::sampling::SamplingParams;
use inference::{DeviceChoice, Engine, GenerationParams, LoadOptions, Request, VideoInput};

fn engine(name: &str, queue: usize) -> Engine {
    engine_with_kv(name, queue, 256 << 20)
}

fn engine_with_kv(name: &str, queue: usize, kv_cache_bytes: usize) -> Engine {
    Engine::load(LoadOptions {
        model: model_dir(name).to_str().unwrap().into(),
        device: DeviceChoice::Cpu,
        dtype: candle_core::DType::F32,
        queue,
        vision_cache_bytes: 64 << 20,
        kv_cache_bytes: Some(kv_cache_bytes),
        max_running: inference::engine::DEFAULT_MAX_RUNNING,
        prefill_chunk: inference::engine::DEFAULT_PREFILL_CHUNK,
    })
    .unwrap()
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        capture: true,
        ignore_eos: false,
        answer: None,
        stop_when_decided: false,
    }
}

#[test]
fn streams_tokens_that_add_up_to_the_answer() {
    let e = engine("tiny-untied", 4);
    let all = cases();
    let case = &all["models"]["tiny-untied"][2]; // text only
    let r = Reference::load("tiny-untied", "text_only");
    let mut rx = e
        .submit(Request {
            messages: messages(case),
            videos: vec![],
            generation: greedy(16),
            schedule: Default::default(),
        })
        .unwrap();
    assert!(matches!(rx.blocking_recv(), Some(EngineEvent::Queued)));
    let mut streamed = String::new();
    let mut captured = false;
    loop {
        match rx.blocking_recv().expect("stream ended early") {
            EngineEvent::Captured { input_ids, logits } => {
                let ids: Vec<i64> = input_ids.iter().map(|&i| i as i64).collect();
                assert_eq!(ids, r.ids("input_ids"));
                assert!(rel_err(&logits, &r.f32s("logits_last")) < 1e-4);
                captured = true;
            }
            EngineEvent::Token { text } => streamed.push_str(&text),
            EngineEvent::Done { text, token_ids, usage, finish_reason, timings, answer } => {
                assert_eq!(streamed, text);
                assert_eq!(answer, None, "unconstrained");
                let ids: Vec<i64> = token_ids.iter().map(|&i| i as i64).collect();
                assert_eq!(ids, r.ids("generated"));
                assert_eq!(usage.completion_tokens, token_ids.len());
                assert_eq!(usage.prompt_tokens, r.ids("input_ids").len());
                assert_eq!(finish_reason.as_str(), "length");
                assert!(timings.ttft_ms > 0.0 && timings.prefill_ms > 0.0);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(captured);
}

/// The reference's video, twice: the second time every frame pair comes from the reuse cache,
/// and the prefill logits and tokens are the same bit for bit (and the reference's tokens).
#[test]
fn video_request_matches_reference() {
    let e = engine("tiny-tied", 4);
    let all = cases();
    let case = &all["models"]["tiny-tied"][1];
    let r = Reference::load("tiny-tied", "video_system_vp9");
    let video = r.video(case);
    let pairs = r.grid()[0] as u64;
    let mut runs = Vec::new();
    for run in 0..2 {
        let request = Request {
            messages: messages(case),
            videos: vec![video.clone()],
            generation: greedy(16),
            schedule: Default::default(),
        };
        let mut rx = e.submit(request).unwrap();
        let mut prefill = Vec::new();
        let ids = loop {
            match rx.blocking_recv().expect("no Done event") {
                EngineEvent::Captured { logits, .. } => prefill = logits.iter().map(|v| v.to_bits()).collect(),
                EngineEvent::Done { token_ids, .. } => break token_ids,
                ev => assert!(!matches!(ev, EngineEvent::Failed { .. }), "{ev:?}"),
            }
        };
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, r.ids("generated"), "run {run}");
        let reused = e.stats().vision_reused.load(std::sync::atomic::Ordering::Relaxed);
        let encoded = e.stats().vision_encoded.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((reused, encoded), (run * pairs, pairs), "run {run}");
        runs.push(prefill);
    }
    assert!(!runs[0].is_empty() && runs[0] == runs[1], "the reused pairs changed the prefill logits");
    assert!(e.stats().vision_cache_bytes.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[test]
fn a_bad_request_fails_alone() {
    let e = engine("tiny-tied", 4);
    let bad = VideoInput { pixel_values: vec![0.0; 10], grid_thw: [1, 2, 2], timestamps: vec![0.5] };
    let mut rx = e
        .submit(Request {
            messages: vec![Message::user_video("what?")],
            videos: vec![bad],
            generation: greedy(4),
            schedule: Default::default(),
        })
        .unwrap();
    let mut failed = false;
    while let Some(ev) = rx.blocking_recv() {
        if let EngineEvent::Failed { error } = ev {
            assert!(error.to_string().contains("pixel values"), "{error}");
            failed = true;
        }
    }
    assert!(failed);
    // Placeholder count and videos disagree: an input error, not a crash.
    let mut rx = e
        .submit(Request {
            messages: vec![Message::user_video("what?")],
            videos: vec![],
            generation: greedy(4),
            schedule: Default::default(),
        })
        .unwrap();
    let mut failed = false;
    while let Some(ev) = rx.blocking_recv() {
        failed |= matches!(ev, EngineEvent::Failed { .. });
    }
    assert!(failed);
    // The engine still serves.
    let mut rx = e
        .submit(Request {
            messages: vec![Message::text("user", "hello")],
            videos: vec![],
            generation: greedy(3),
            schedule: Default::default(),
        })
        .unwrap();
    let mut done = false;
    while let Some(ev) = rx.blocking_recv() {
        done |= matches!(ev, EngineEvent::Done { .. });
    }
    assert!(done);
    // Invalid parameters are refused at submit.
    let mut g = greedy(3);
    g.sampling.top_p = 2.0;
    assert!(
        e.submit(Request {
            messages: vec![Message::text("user", "x")],
            videos: vec![],
            generation: g,
            schedule: Default::default()
        })
        .is_err()
    );
    assert!(
        e.submit(Request {
            messages: vec![Message::text("user", "x")],
            videos: vec![],
            generation: greedy(0),
            schedule: Default::default()
        })
        .is_err()
    );
}

#[test]
fn dropping_the_receiver_cancels_and_the_queue_is_bounded() {
    // One request running at a time, so the second waits in the queue.
    let mut opts = LoadOptions::new(model_dir("tiny-tied").to_str().unwrap());
    opts.queue = 1;
    opts.max_running = 1;
    let e = Engine::load(opts).unwrap();
    let long = || Request {
        messages: vec![Message::text("user", "go on")],
        videos: vec![],
        generation: GenerationParams { capture: false, ignore_eos: true, ..greedy(100_000) },
        schedule: Default::default(),
    };
    let mut first = e.submit(long()).unwrap();
    // Wait until the engine works on it, so the queue itself is empty again.
    loop {
        if let Some(EngineEvent::Token { .. }) = first.blocking_recv() {
            break;
        }
    }
    let second = e.submit(long()).unwrap(); // waits in the queue (capacity 1)
    let third = e.submit(long());
    assert!(matches!(third, Err(inference::Error::QueueFull(1))), "{third:?}");
    // Cancel both; the engine drops the running one at its next step and skips the queued one.
    drop(first);
    drop(second);
    let mut rx = e.submit(Request {
        messages: vec![Message::text("user", "hi")],
        videos: vec![],
        generation: greedy(2),
        schedule: Default::default(),
    });
    // The queue frees up once the engine has seen the cancellation.
    let start = std::time::Instant::now();
    while rx.is_err() && start.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(10));
        rx = e.submit(Request {
            messages: vec![Message::text("user", "hi")],
            videos: vec![],
            generation: greedy(2),
            schedule: Default::default(),
        });
    }
    let mut rx = rx.unwrap();
    let mut done = false;
    while let Some(ev) = rx.blocking_recv() {
        done |= matches!(ev, EngineEvent::Done { .. });
    }
    assert!(done, "a cancelled request kept the engine busy");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(e.stats().cancelled.load(Relaxed), 2, "one cancelled while generating, one while queued");
    assert_eq!(e.stats().completed.load(Relaxed), 1);
}

/// A request whose prompt and `max_tokens` need more KV cache than the budget is refused before
/// any work, saying what to change; one that fits exactly is served, and the engine goes on.
#[test]
fn requests_beyond_the_kv_budget_are_refused_with_what_to_change() {
    let all = cases();
    let case = &all["models"]["tiny-tied"][1];
    let r = Reference::load("tiny-tied", "video_system_vp9");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir("tiny-tied").join("config.json")).unwrap()).unwrap();
    let t = &cfg["text_config"];
    let per_token = ["num_hidden_layers", "num_key_value_heads", "head_dim"]
        .iter()
        .map(|k| t[*k].as_u64().unwrap() as usize)
        .product::<usize>()
        * 2
        * 4; // keys and values, f32
    let tokens = r.ids("input_ids").len() + 16;
    let video = r.video(case);
    let outcome = |e: &Engine| {
        let request = Request {
            messages: messages(case),
            videos: vec![video.clone()],
            generation: greedy(16),
            schedule: Default::default(),
        };
        let mut rx = e.submit(request).unwrap();
        loop {
            match rx.blocking_recv().expect("no end") {
                EngineEvent::Done { token_ids, .. } => break Ok(token_ids),
                EngineEvent::Failed { error } => break Err(error.to_string()),
                _ => {}
            }
        }
    };
    let tight = engine_with_kv("tiny-tied", 2, tokens * per_token - 1);
    let error = outcome(&tight).unwrap_err();
    for needle in ["KV cache", "max_tokens 16", "--kv-cache-mb", "max_pixels"] {
        assert!(error.contains(needle), "{needle:?} missing in {error}");
    }
    assert_eq!(tight.stats().vision_encoded.load(std::sync::atomic::Ordering::Relaxed), 0, "refused before any work");
    let exact = engine_with_kv("tiny-tied", 2, tokens * per_token);
    let ids: Vec<i64> = outcome(&exact).unwrap().iter().map(|&i| i as i64).collect();
    assert_eq!(ids, r.ids("generated"));
    assert_eq!(exact.stats().running.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(exact.stats().kv_cache_bytes.load(std::sync::atomic::Ordering::Relaxed), 0, "freed after the request");
    assert_eq!(exact.waiting(), 0);
}
