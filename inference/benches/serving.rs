//! The engine serving several streams at once, through its real scheduler, in one run:
//! benches/serving.sh runs it.
//!
//! ```text
//! LOOKOUT_BENCH_MODEL=DIR [LOOKOUT_BENCH_PARTS=steps,concurrency,vss,overlap,live] [LOOKOUT_BENCH_DEVICE=cpu]
//!   [LOOKOUT_BENCH_DTYPE=f32] [LOOKOUT_BENCH_REQUESTS=3] [LOOKOUT_BENCH_TOKENS=64]
//!   [LOOKOUT_BENCH_SIDE=224] [LOOKOUT_BENCH_VSS_PAIRS=40] [LOOKOUT_BENCH_VSS_SIDE=448]
//!   [LOOKOUT_BENCH_CLIP_PAIRS=64] [LOOKOUT_BENCH_BATCHES=1,2,4,8,16] cargo bench -p inference --bench serving
//! ```
//!
//! - `steps`: the model alone, one decode step of BATCHES sequences (256-token contexts, room
//!   reserved for every step as the engine reserves a request's) in one batched forward against
//!   as many single steps.
//! - `concurrency`: 1, 2, 4 and 8 streams, each sending REQUESTS windows of one frame pair at
//!   SIDE (SIDE 0: text prompts) and taking TOKENS tokens each (end of sequence ignored), one
//!   window after another as a watch does; the same requests one at a time on the same engine:
//!   windows/s, tokens/s over the wall time, decode tokens/s over the decode steps' time, time to
//!   first token (queue included) p50/p99, and the ratios.
//! - `vss`: windows of VSS_PAIRS pairs (80 frames) at VSS_SIDE, answers of 1 and of 100 tokens:
//!   the seconds of video one window covers (10 s) against the seconds it takes, so how many
//!   streams hold real time.
//! - `overlap`: sliding windows of 8 pairs with a stride of 2 (window/4) against cold windows of
//!   the same size: vision ms and TTFT per window.
//! - `live`: a 4-pair window's TTFT alone, and while a CLIP_PAIRS-pair clip is being analysed.
//!
//! Prints one JSON object per part.
#![allow(clippy::print_stdout, missing_docs)]

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inference::engine::EngineEvent;
use inference::processor::Message;
use inference::sampling::SamplingParams;
use inference::{Engine, GenerationParams, LoadOptions, Request, Schedule, Timings, VideoInput};
use serde_json::json;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Random patch rows of `pairs` frame pairs at `side` x `side`, from `seed`.
fn video(pairs: usize, side: usize, seed: u64) -> VideoInput {
    let g = side / 16;
    let pixel_values = common::pixels(pairs * g * g * 1536, seed);
    VideoInput { pixel_values, grid_thw: [pairs, g, g], timestamps: (0..pairs).map(|i| i as f64).collect() }
}

/// The pairs `from..from + n` of `v`.
fn pairs_of(v: &VideoInput, from: usize, n: usize) -> VideoInput {
    let [_, h, w] = v.grid_thw;
    let per = h * w * 1536;
    VideoInput {
        pixel_values: v.pixel_values[from * per..(from + n) * per].to_vec(),
        grid_thw: [n, h, w],
        timestamps: (from..from + n).map(|i| i as f64).collect(),
    }
}

/// A window of `video`, or (no pairs) a text prompt.
fn request(video: VideoInput, tokens: usize, source: String) -> Request {
    let text = video.grid_thw[0] == 0;
    Request {
        messages: vec![if text {
            Message::text("user", "Describe what happens.")
        } else {
            Message::user_video("Describe what happens.")
        }],
        videos: if text { vec![] } else { vec![video] },
        generation: GenerationParams {
            sampling: SamplingParams::greedy(),
            max_tokens: tokens,
            stop: vec![],
            capture: false,
            ignore_eos: true,
            answer: None,
            stop_when_decided: false,
        },
        schedule: Schedule::background(source),
    }
}

/// What one request took.
#[derive(Clone, Copy)]
struct Served {
    timings: Timings,
    tokens: usize,
}

impl Served {
    /// Time to first token as its client sees it: queue and work.
    fn ttft_ms(&self) -> f64 {
        self.timings.queue_ms + self.timings.ttft_ms
    }
}

fn serve(engine: &Engine, request: Request) -> Served {
    let mut rx = engine.submit(request).expect("the queue has room");
    loop {
        match rx.blocking_recv().expect("no Done") {
            EngineEvent::Done { timings, usage, .. } => return Served { timings, tokens: usage.completion_tokens },
            EngineEvent::Failed { error } => panic!("{error}"),
            _ => {}
        }
    }
}

/// Streams run side by side, each sending its requests one after another; returns every
/// request's outcome and the wall time.
fn streams(engine: &Engine, work: Vec<Vec<Request>>) -> (Vec<Served>, f64) {
    let t = Instant::now();
    let served = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .into_iter()
            .map(|reqs| s.spawn(move || reqs.into_iter().map(|r| serve(engine, r)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a stream thread panicked")).collect::<Vec<_>>()
    });
    (served, t.elapsed().as_secs_f64())
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn main() {
    let Ok(dir) = std::env::var("LOOKOUT_BENCH_MODEL") else {
        println!("set LOOKOUT_BENCH_MODEL to a checkpoint directory (benches/serving.sh makes one)");
        return;
    };
    let parts: String = env("LOOKOUT_BENCH_PARTS", "steps,concurrency,vss,overlap,live".to_owned());
    let mut opts = LoadOptions::new(dir.clone());
    opts.device = env("LOOKOUT_BENCH_DEVICE", "cpu".to_owned()).parse().unwrap();
    opts.dtype = inference::parse_dtype(&env("LOOKOUT_BENCH_DTYPE", "f32".to_owned())).unwrap();
    opts.queue = 64;
    opts.max_running = 8;
    let load = |vision_cache_bytes: usize| {
        let mut o = opts.clone();
        o.vision_cache_bytes = vision_cache_bytes;
        Engine::load(o).unwrap()
    };
    println!(
        "{}",
        json!({ "model": dir, "device": env("LOOKOUT_BENCH_DEVICE", "cpu".to_owned()), "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) })
    );

    if parts.contains("steps") {
        // The model alone: one decode step of B sequences (a 256-token prompt each) in one
        // batched forward, against B single steps.
        let files = inference::files::ModelFiles::resolve(&dir).unwrap();
        let cfg = inference::config::Config::from_json(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
        let device = opts.device.open().unwrap();
        #[allow(unsafe_code)]
        // SAFETY: the bench does not modify the weights while they are mapped.
        let vb =
            unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files.weights, opts.dtype, &device) }.unwrap();
        let model = inference::model::Qwen3VL::new(&cfg, vb).unwrap();
        let prompt: Vec<u32> = (0..256).map(|i| 100 + i).collect();
        let mut rows = Vec::new();
        let steps = 16;
        let batches: String = env("LOOKOUT_BENCH_BATCHES", "1,2,4,8,16".to_owned());
        for b in batches.split(',').filter_map(|b| b.trim().parse::<usize>().ok()) {
            let mut caches: Vec<_> = (0..b)
                .map(|_| {
                    let mut c = model.new_cache();
                    // Room for the prompt and every step, as the engine reserves a request's.
                    c.reserve(prompt.len() + 2 * steps);
                    let kinds = vec![inference::positions::TokenKind::Text; prompt.len()];
                    let p: Vec<i64> = (0..prompt.len() as i64).collect();
                    let positions =
                        inference::positions::PromptPositions { axes: [p.clone(), p.clone(), p], rope_delta: 0 };
                    model.prefill(&prompt, &kinds, &positions, None, &mut c).unwrap();
                    c
                })
                .collect();
            let t = Instant::now();
            for k in 0..steps {
                let tokens = vec![7u32; b];
                let pos = vec![256 + k as i64; b];
                let mut refs: Vec<_> = caches.iter_mut().collect();
                model.decode_batch(&tokens, &pos, &mut refs).unwrap();
            }
            let batched = t.elapsed().as_secs_f64() / steps as f64;
            let t = Instant::now();
            for k in 0..steps {
                for c in caches.iter_mut() {
                    model.decode(7, 256 + steps as i64 + k as i64, c).unwrap();
                }
            }
            let single = t.elapsed().as_secs_f64() / steps as f64;
            rows.push(json!({ "batch": b, "batched_step_ms": round(batched * 1000.0), "single_steps_ms": round(single * 1000.0),
                              "tokens_per_s": round(b as f64 / batched), "speedup": round(single / batched) }));
        }
        println!("{}", json!({ "part": "steps", "rows": rows }));
    }

    if parts.contains("concurrency") {
        let requests: usize = env("LOOKOUT_BENCH_REQUESTS", 3);
        let tokens: usize = env("LOOKOUT_BENCH_TOKENS", 64);
        let side: usize = env("LOOKOUT_BENCH_SIDE", 224);
        // No reuse: every window is new content.
        let engine = load(0);
        // SIDE 0: text prompts (decode-bound).
        let pairs = usize::from(side > 0);
        let side = side.max(16);
        let work = |n: usize, salt: u64| -> Vec<Vec<Request>> {
            (0..n)
                .map(|s| {
                    (0..requests)
                        .map(|k| request(video(pairs, side, salt + (s * 100 + k) as u64), tokens, format!("cam{s}")))
                        .collect()
                })
                .collect()
        };
        serve(&engine, request(video(pairs, side, 999), 4, "warmup".into()));
        let decode = |e: &Engine| (e.stats().decode_tokens.load(Relaxed), e.stats().decode_micros.load(Relaxed));
        let mut rows = Vec::new();
        let mut one_tok_s = 0.0;
        let mut one_decode = 0.0;
        for (i, n) in [1usize, 2, 4, 8].into_iter().enumerate() {
            let d0 = decode(&engine);
            let (served, wall) = streams(&engine, work(n, 10_000 * i as u64));
            let d1 = decode(&engine);
            let (serial, serial_wall) =
                streams(&engine, vec![work(n, 10_000 * i as u64 + 5_000).into_iter().flatten().collect()]);
            let d2 = decode(&engine);
            // Decode tokens per second of decode steps.
            let rate = |a: (u64, u64), b: (u64, u64)| (b.0 - a.0) as f64 / ((b.1 - a.1) as f64 / 1e6).max(1e-9);
            let (decode_rate, serial_decode_rate) = (rate(d0, d1), rate(d1, d2));
            if n == 1 {
                one_decode = decode_rate;
            }
            let tok: usize = served.iter().map(|s| s.tokens).sum();
            let tok_s = tok as f64 / wall;
            if n == 1 {
                one_tok_s = tok_s;
            }
            let serial_tok_s = serial.iter().map(|s| s.tokens).sum::<usize>() as f64 / serial_wall;
            let ttft: Vec<f64> = served.iter().map(Served::ttft_ms).collect();
            let serial_ttft: Vec<f64> = serial.iter().map(Served::ttft_ms).collect();
            rows.push(json!({
                "streams": n,
                "windows_per_s": round(served.len() as f64 / wall),
                "tokens_per_s": round(tok_s),
                "ttft_ms_p50": round(percentile(&ttft, 0.5)),
                "ttft_ms_p99": round(percentile(&ttft, 0.99)),
                "serial_windows_per_s": round(serial.len() as f64 / serial_wall),
                "serial_tokens_per_s": round(serial_tok_s),
                "serial_ttft_ms_p50": round(percentile(&serial_ttft, 0.5)),
                "serial_ttft_ms_p99": round(percentile(&serial_ttft, 0.99)),
                "tokens_per_s_vs_serial": round(tok_s / serial_tok_s),
                "tokens_per_s_vs_one_stream": round(tok_s / one_tok_s),
                "decode_tokens_per_s": round(decode_rate),
                "serial_decode_tokens_per_s": round(serial_decode_rate),
                "decode_tokens_per_s_vs_one_stream": round(decode_rate / one_decode),
            }));
        }
        let (steps, decoded) = (engine.stats().decode_steps.load(Relaxed), engine.stats().decode_tokens.load(Relaxed));
        println!(
            "{}",
            json!({ "part": "concurrency", "pairs": pairs, "side": side, "tokens": tokens, "requests_per_stream": requests,
                    "mean_batch": round(decoded as f64 / steps.max(1) as f64), "rows": rows })
        );
    }

    if parts.contains("vss") {
        let pairs: usize = env("LOOKOUT_BENCH_VSS_PAIRS", 40);
        let side: usize = env("LOOKOUT_BENCH_VSS_SIDE", 448);
        let engine = load(0);
        let mut rows = Vec::new();
        for tokens in [1usize, 100] {
            let t = Instant::now();
            let s = serve(&engine, request(video(pairs, side, tokens as u64), tokens, "vss".into()));
            let took = t.elapsed().as_secs_f64();
            // Frames are two per pair at 8 fps: 80 frames are 10 s.
            let covers = pairs as f64 * 2.0 / 8.0;
            rows.push(json!({
                "answer_tokens": tokens,
                "window_s_of_video": covers,
                "window_s_to_analyse": round(took),
                "vision_ms": round(s.timings.vision_ms),
                "prefill_ms": round(s.timings.prefill_ms),
                "ttft_ms": round(s.ttft_ms()),
                "streams_in_real_time": (covers / took).floor(),
            }));
        }
        println!("{}", json!({ "part": "vss", "pairs": pairs, "side": side, "rows": rows }));
    }

    if parts.contains("overlap") {
        let side: usize = env("LOOKOUT_BENCH_SIDE", 224);
        let (window, stride, windows) = (8usize, 2usize, 6usize);
        let stream = video((windows - 1) * stride + window, side, 77);
        let run = |engine: &Engine| -> (f64, f64) {
            let served: Vec<Served> = (0..windows)
                .map(|k| serve(engine, request(pairs_of(&stream, k * stride, window), 1, "cam".into())))
                .collect();
            // The first window is cold either way.
            let rest = &served[1..];
            let n = rest.len() as f64;
            (
                rest.iter().map(|s| s.timings.vision_ms).sum::<f64>() / n,
                rest.iter().map(Served::ttft_ms).sum::<f64>() / n,
            )
        };
        let (cold_vision, cold_ttft) = run(&load(0));
        let (warm_vision, warm_ttft) = run(&load(512 << 20));
        println!(
            "{}",
            json!({ "part": "overlap", "window_pairs": window, "stride_pairs": stride, "side": side,
                    "cold_vision_ms": round(cold_vision), "overlapped_vision_ms": round(warm_vision),
                    "vision_share": round(warm_vision / cold_vision),
                    "cold_ttft_ms": round(cold_ttft), "overlapped_ttft_ms": round(warm_ttft) })
        );
    }

    if parts.contains("live") {
        let side: usize = env("LOOKOUT_BENCH_SIDE", 224);
        let clip_pairs: usize = env("LOOKOUT_BENCH_CLIP_PAIRS", 64);
        let engine = load(0);
        let live = |seed: u64| {
            let mut r = request(video(4, side, seed), 16, "camera".into());
            r.schedule = Schedule::background("camera");
            r
        };
        serve(&engine, live(1));
        let alone: Vec<f64> = (0..3).map(|k| serve(&engine, live(10 + k)).ttft_ms()).collect();
        let (during, clip_s) = std::thread::scope(|s| {
            let clip = s.spawn(|| {
                let t = Instant::now();
                serve(&engine, request(video(clip_pairs, side, 5), 16, "upload".into()));
                t.elapsed().as_secs_f64()
            });
            // Let the clip's work start.
            while engine.stats().running.load(Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(200));
            let during: Vec<f64> = (0..3).map(|k| serve(&engine, live(20 + k)).ttft_ms()).collect();
            (during, clip.join().expect("the clip thread panicked"))
        });
        let (a, d) = (percentile(&alone, 0.5), percentile(&during, 0.5));
        println!(
            "{}",
            json!({ "part": "live", "side": side, "clip_pairs": clip_pairs, "clip_s": round(clip_s),
                    "live_ttft_ms_alone": round(a), "live_ttft_ms_during_clip": round(d), "ratio": round(d / a) })
        );
    }
}
