//! Continuous batching: several sequences decoded in one forward get the tokens, and within 1e-5
//! (relative) the logits, that each gets alone, while they join and leave at different steps; a prompt
//! prefilled (and its video encoded) in chunks gives what the whole one gives; the engine admits
//! within its KV budget, interactive first, and serves a live window while a long clip is still
//! being prefilled.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use candle_core::DType;
use common::*;
use inference::engine::EngineEvent;
use inference::processor::Prompt;
use inference::sampling::{SamplingParams, argmax};
use inference::text::KvCache;
use inference::vision::VisionOutput;
use inference::{Engine, GenerationParams, LoadOptions, Request, Schedule, VideoInput};

const CASES: [&str; 3] = ["video_fps1", "video_system_vp9", "text_only"];

/// A case's prompt and its encoded video (if any), and its video as the engine takes it.
fn prepared(l: &Loaded, index: usize) -> (Prompt, Option<VisionOutput>, Vec<VideoInput>) {
    let all = cases();
    let case = &all["models"]["tiny-tied"][index];
    let r = Reference::load("tiny-tied", CASES[index]);
    let prompt = l.processor.prepare(&messages(case), &r.video_meta(case)).unwrap();
    if !r.has("video_grid_thw") {
        return (prompt, None, vec![]);
    }
    let vision = l.model.encode_video(&r.pixel_values(), &[r.grid()]).unwrap();
    let video = r.video(case);
    (prompt, Some(vision), vec![video])
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

struct Alone {
    tokens: Vec<u32>,
    /// The logits each fed token produced.
    logits: Vec<Vec<f32>>,
}

/// Greedy decoding of one sequence by itself.
fn alone(l: &Loaded, prompt: &Prompt, vision: Option<&VisionOutput>, n: usize) -> Alone {
    let mut cache = l.model.new_cache();
    let mut logits: Vec<f32> =
        l.model.prefill(&prompt.ids, &prompt.kinds, &prompt.positions, vision, &mut cache).unwrap().to_vec1().unwrap();
    let mut out = Alone { tokens: vec![], logits: vec![] };
    let mut position = prompt.ids.len() as i64 + prompt.positions.rope_delta;
    loop {
        let token = argmax(&logits);
        out.tokens.push(token);
        if out.tokens.len() == n {
            return out;
        }
        logits = l.model.decode(token, position, &mut cache).unwrap().to_vec1().unwrap();
        position += 1;
        out.logits.push(logits.clone());
    }
}

struct Running {
    which: usize,
    cache: KvCache,
    logits: Vec<f32>,
    position: i64,
    tokens: Vec<u32>,
    fed_logits: Vec<Vec<f32>>,
}

/// Seven sequences (the three reference cases, each several times with other lengths) join a
/// batch at steps 0 to 6 and leave after 5 to 20 tokens: every step is one batched forward of
/// those still running (1 to 6 rows, so on the CPU the linears cross from the few-row kernel to
/// the packed GEMM and back as the batch grows and shrinks), and each gets its tokens alone and
/// logits within 1e-5 (of the largest logit) of its logits alone.
#[test]
fn batched_decode_matches_one_at_a_time_as_sequences_join_and_leave() {
    let l = load("tiny-tied", DType::F32);
    let inputs: Vec<_> = (0..3).map(|i| prepared(&l, i)).collect();
    // (case, tokens, joins at step)
    let plan = [(0, 5, 0), (2, 14, 0), (1, 20, 3), (2, 9, 6), (0, 12, 1), (1, 16, 2), (2, 11, 4)];
    let expected: Vec<Alone> = plan.iter().map(|&(c, n, _)| alone(&l, &inputs[c].0, inputs[c].1.as_ref(), n)).collect();
    let mut running: Vec<Running> = Vec::new();
    let mut finished: Vec<Option<Running>> = (0..plan.len()).map(|_| None).collect();
    let (mut worst, mut worst_rel) = (0f32, 0f32);
    let mut widest = 0;
    for step in 0.. {
        for (which, &(c, _, at)) in plan.iter().enumerate() {
            if at == step {
                let (prompt, vision, _) = &inputs[c];
                let mut cache = l.model.new_cache();
                let logits =
                    l.model.prefill(&prompt.ids, &prompt.kinds, &prompt.positions, vision.as_ref(), &mut cache);
                running.push(Running {
                    which,
                    cache,
                    logits: logits.unwrap().to_vec1().unwrap(),
                    position: prompt.ids.len() as i64 + prompt.positions.rope_delta,
                    tokens: vec![],
                    fed_logits: vec![],
                });
            }
        }
        if running.is_empty() && finished.iter().all(Option::is_some) {
            break;
        }
        // Sample; the finished leave before the forward.
        let mut feed = Vec::new();
        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            let token = argmax(&r.logits);
            r.tokens.push(token);
            if r.tokens.len() == plan[r.which].1 {
                let r = running.remove(i);
                let which = r.which;
                finished[which] = Some(r);
                continue;
            }
            feed.push((token, r.position));
            r.position += 1;
            i += 1;
        }
        if running.is_empty() {
            continue;
        }
        widest = widest.max(running.len());
        let (tokens, positions): (Vec<u32>, Vec<i64>) = feed.into_iter().unzip();
        let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|r| &mut r.cache).collect();
        let logits: Vec<Vec<f32>> = l.model.decode_batch(&tokens, &positions, &mut caches).unwrap().to_vec2().unwrap();
        for (r, row) in running.iter_mut().zip(logits) {
            r.logits = row.clone();
            r.fed_logits.push(row);
        }
    }
    assert_eq!(widest, 6, "at most six ran together in this plan");
    for (which, (exp, got)) in expected.iter().zip(&finished).enumerate() {
        let got = got.as_ref().unwrap();
        assert_eq!(got.tokens, exp.tokens, "sequence {which}: tokens");
        assert_eq!(got.fed_logits.len(), exp.logits.len());
        for (a, b) in got.fed_logits.iter().zip(&exp.logits) {
            worst = worst.max(max_diff(a, b));
            worst_rel = worst_rel.max(rel_err(a, b));
        }
    }
    println!("logits batched against alone: largest difference {worst:e}, relative to the largest logit {worst_rel:e}");
    assert!(worst_rel <= 1e-5, "batched logits differ from alone by {worst} ({worst_rel:e} of the largest)");
}

/// A prompt prefilled in chunks of 7 positions (a video's placeholders cut anywhere, DeepStack
/// rows with them) gives the logits of prefilling it whole within 1e-5, and the same tokens.
#[test]
fn a_prompt_prefilled_in_chunks_matches_it_prefilled_whole() {
    let l = load("tiny-tied", DType::F32);
    for (index, name) in CASES.iter().enumerate() {
        let (prompt, vision, _) = prepared(&l, index);
        let mut whole = l.model.new_cache();
        let a: Vec<f32> = l
            .model
            .prefill(&prompt.ids, &prompt.kinds, &prompt.positions, vision.as_ref(), &mut whole)
            .unwrap()
            .to_vec1()
            .unwrap();
        let input = l.model.prefill_input(&prompt.ids, &prompt.kinds, &prompt.positions, vision.as_ref()).unwrap();
        let mut chunked = l.model.new_cache();
        let mut chunks = 0;
        let b: Vec<f32> = loop {
            chunks += 1;
            if let Some(logits) = l.model.prefill_chunk(&input, 7, &mut chunked).unwrap() {
                break logits.to_vec1().unwrap();
            }
            assert!(chunked.len() == chunks * 7, "a chunk is 7 positions");
        };
        assert_eq!(chunks, prompt.ids.len().div_ceil(7));
        assert!(max_diff(&a, &b) <= 1e-5, "{}: chunked prefill differs by {}", name, max_diff(&a, &b));
        // And the caches decode alike.
        let first = prompt.ids.len() as i64 + prompt.positions.rope_delta;
        let (mut ta, mut tb) = (argmax(&a), argmax(&b));
        for position in first..first + 6 {
            assert_eq!(ta, tb, "{name}");
            let la: Vec<f32> = l.model.decode(ta, position, &mut whole).unwrap().to_vec1().unwrap();
            let lb: Vec<f32> = l.model.decode(tb, position, &mut chunked).unwrap().to_vec1().unwrap();
            (ta, tb) = (argmax(&la), argmax(&lb));
        }
    }
}

fn engine(queue: usize, kv: usize, max_running: usize, chunk: usize, vision_cache: usize) -> Engine {
    let mut opts = LoadOptions::new(model_dir("tiny-tied").to_str().unwrap());
    opts.queue = queue;
    opts.kv_cache_bytes = Some(kv);
    opts.max_running = max_running;
    opts.prefill_chunk = chunk;
    opts.vision_cache_bytes = vision_cache;
    Engine::load(opts).unwrap()
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        capture: false,
        ignore_eos: false,
        answer: None,
        stop_when_decided: false,
    }
}

fn request(index: usize, max_tokens: usize, videos: Vec<VideoInput>, schedule: Schedule) -> Request {
    let all = cases();
    Request { messages: messages(&all["models"]["tiny-tied"][index]), videos, generation: greedy(max_tokens), schedule }
}

/// The token ids of a request's `Done` (panics on `Failed`).
fn done(rx: &mut tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) -> Vec<i64> {
    loop {
        match rx.blocking_recv().expect("no Done") {
            EngineEvent::Done { token_ids, .. } => return token_ids.iter().map(|&t| t as i64).collect(),
            EngineEvent::Failed { error } => panic!("{error}"),
            _ => {}
        }
    }
}

/// Through the engine: the three reference cases submitted at once (one more joining when the
/// first ends), decoded in shared steps, each with the reference's tokens.
#[test]
fn the_engine_batches_requests_and_each_gets_the_reference_tokens() {
    let l = load("tiny-tied", DType::F32);
    let e = engine(8, 256 << 20, 8, 512, 64 << 20);
    let videos: Vec<Vec<VideoInput>> = (0..3).map(|i| prepared(&l, i).2).collect();
    let reference: Vec<Vec<i64>> = CASES.iter().map(|c| Reference::load("tiny-tied", c).ids("generated")).collect();
    let mut rxs: Vec<_> = (0..3)
        .map(|i| e.submit(request(i, 16, videos[i].clone(), Schedule::background(format!("cam{i}")))).unwrap())
        .collect();
    let first = done(&mut rxs[0]);
    let mut late = e.submit(request(2, 16, vec![], Schedule::interactive("chat"))).unwrap();
    assert_eq!(first, reference[0]);
    for (i, rx) in rxs.iter_mut().enumerate().skip(1) {
        assert_eq!(done(rx), reference[i], "{}", CASES[i]);
    }
    assert_eq!(done(&mut late), reference[2], "the request that joined late");
    let (steps, tokens) = (e.stats().decode_steps.load(Relaxed), e.stats().decode_tokens.load(Relaxed));
    assert!(tokens > steps, "no step decoded more than one request ({tokens} tokens in {steps} steps)");
    assert_eq!(e.stats().completed.load(Relaxed), 4);
    assert_eq!(e.stats().running.load(Relaxed), 0);
    assert_eq!(e.stats().kv_cache_bytes.load(Relaxed), 0);
}

/// A budget with room for one request's KV cache: the second waits for the first (it is not
/// refused) and the two never decode in the same step.
#[test]
fn a_request_waits_for_kv_room_instead_of_being_refused() {
    let l = load("tiny-tied", DType::F32);
    let (prompt, ..) = prepared(&l, 2);
    let per_token = l.model.kv_bytes_per_token();
    let e = engine(4, (prompt.ids.len() + 16) * per_token, 8, 512, 0);
    let reference = Reference::load("tiny-tied", "text_only").ids("generated");
    let mut a = e.submit(request(2, 16, vec![], Schedule::background("a"))).unwrap();
    let mut b = e.submit(request(2, 16, vec![], Schedule::background("b"))).unwrap();
    assert_eq!(done(&mut a), reference);
    assert_eq!(done(&mut b), reference);
    let (steps, tokens) = (e.stats().decode_steps.load(Relaxed), e.stats().decode_tokens.load(Relaxed));
    assert_eq!(tokens, steps, "the second ran beside the first beyond the KV budget");
    assert_eq!(e.stats().failed.load(Relaxed), 0);
}

/// One request at a time: an interactive request that arrives after a background one is served
/// before it.
#[test]
fn interactive_requests_are_admitted_before_background_ones() {
    let e = engine(4, 256 << 20, 1, 512, 0);
    // Long enough that the two others arrive while it runs.
    let long = Request {
        generation: GenerationParams { ignore_eos: true, ..greedy(200) },
        ..request(2, 200, vec![], Schedule::background("cam0"))
    };
    let mut running = e.submit(long).unwrap();
    while e.stats().running.load(Relaxed) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut background = e.submit(request(2, 4, vec![], Schedule::background("cam1"))).unwrap();
    let mut interactive = e.submit(request(2, 4, vec![], Schedule::interactive("chat"))).unwrap();
    done(&mut running);
    done(&mut interactive);
    assert_eq!(e.stats().completed.load(Relaxed), 2, "the background request went first");
    done(&mut background);
}

/// The reference's video repeated into a clip of many pairs, prefilled and encoded 32 tokens a
/// step: a live window submitted while the clip is in progress finishes first, with the
/// reference's tokens, and the clip's answer is the one it gets in one piece.
#[test]
fn a_live_window_is_served_while_a_long_clip_is_prefilled_in_chunks() {
    let l = load("tiny-tied", DType::F32);
    let (_, _, video) = prepared(&l, 1);
    let video = &video[0];
    let repeat = 12;
    let [t, h, w] = video.grid_thw;
    let clip = VideoInput {
        pixel_values: video.pixel_values.repeat(repeat),
        grid_thw: [t * repeat, h, w],
        timestamps: (0..t * repeat).map(|i| i as f64).collect(),
    };
    let all = cases();
    let case = &all["models"]["tiny-tied"][1];
    let clip_request = || Request {
        messages: messages(case),
        videos: vec![clip.clone()],
        generation: greedy(8),
        schedule: Schedule::background("upload"),
    };
    // The clip alone, in one piece.
    let whole = engine(4, 256 << 20, 8, usize::MAX, 0);
    let clip_alone = done(&mut whole.submit(clip_request()).unwrap());
    drop(whole);

    let e = engine(4, 256 << 20, 8, 32, 0);
    let mut clip_rx = e.submit(clip_request()).unwrap();
    while e.stats().vision_encoded.load(Relaxed) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut live = e.submit(request(1, 16, vec![video.clone()], Schedule::background("camera"))).unwrap();
    let mut order = Vec::new();
    let (mut clip_ids, mut live_ids) = (None, None);
    while clip_ids.is_none() || live_ids.is_none() {
        if live_ids.is_none()
            && let Ok(ev) = live.try_recv()
        {
            if let EngineEvent::Done { token_ids, .. } = ev {
                live_ids = Some(token_ids.iter().map(|&t| t as i64).collect::<Vec<_>>());
                order.push("live");
            }
            continue;
        }
        if clip_ids.is_none()
            && let Ok(ev) = clip_rx.try_recv()
        {
            if let EngineEvent::Done { token_ids, .. } = ev {
                clip_ids = Some(token_ids.iter().map(|&t| t as i64).collect::<Vec<_>>());
                order.push("clip");
            }
            continue;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(order, ["live", "clip"], "the live window waited for the whole clip");
    assert_eq!(live_ids.unwrap(), Reference::load("tiny-tied", "video_system_vp9").ids("generated"));
    assert_eq!(clip_ids.unwrap(), clip_alone, "the clip in chunks answered differently");
    assert_eq!(e.stats().vision_encoded.load(Relaxed), (t * repeat + t) as u64);
}

/// Windows of several cameras that are waiting for the vision tower together are encoded in one
/// pass, and each still gets the reference's tokens (the tower attends within a pair, so a
/// pair's features do not depend on what else is in the pass).
#[test]
fn windows_of_several_cameras_share_a_vision_pass() {
    let l = load("tiny-tied", DType::F32);
    let video = prepared(&l, 1).2;
    let reference = Reference::load("tiny-tied", "video_system_vp9").ids("generated");
    let pairs = video[0].grid_thw[0] as u64;
    // The three requests reach the engine between two of its steps nearly always; a run where
    // the engine woke up between two submissions is tried again.
    for attempt in 0..5 {
        // No reuse: every camera's pairs are encoded.
        let e = engine(8, 256 << 20, 8, 4096, 0);
        let mut rxs: Vec<_> = (0..3)
            .map(|i| e.submit(request(1, 16, video.clone(), Schedule::background(format!("cam{i}")))).unwrap())
            .collect();
        for rx in &mut rxs {
            assert_eq!(done(rx), reference);
        }
        assert_eq!(e.stats().vision_encoded.load(Relaxed), 3 * pairs);
        let passes = e.stats().vision_passes.load(Relaxed);
        if passes < 3 {
            return;
        }
        println!("attempt {attempt}: {passes} passes");
    }
    panic!("three windows waiting together never shared a vision pass");
}
