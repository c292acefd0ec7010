//! What constrained answers cost, measured in one run (`benches/answers.sh`).
//!
//! 1. Per token, for a choice, a regex and a JSON schema: llguidance's mask computation and the
//!    token's consumption, walking the canonical tokens of a valid answer. Once with the fixture
//!    tokenizer (448 tokens) and once with a Qwen-sized vocabulary (151,643 tokens): a real
//!    checkpoint's `tokenizer.json` when `LOOKOUT_BENCH_TOKENIZER` names one, otherwise a
//!    byte-level BPE trained here on text files of the machine (cached under `.bench/`), with
//!    the fixture's pre-tokenizer, decoder and special tokens.
//! 2. End to end on the fixture model: decode tokens/s of unconstrained requests and of
//!    constrained ones (the mask is computed while the model runs), as a ratio.
//!
//! Prints one JSON line at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use inference::answer::{AnswerSpec, Grammars};
use inference::engine::EngineEvent;
use inference::processor::Message;
use inference::sampling::SamplingParams;
use inference::{DeviceChoice, Engine, GenerationParams, LoadOptions, Request};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "person": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "weather": {"enum": ["sunny", "rain", "snow"]},
            "vehicles": {"type": "array", "maxItems": 4, "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["car", "bus", "truck"]}, "moving": {"type": "boolean"}},
                "required": ["kind", "moving"], "additionalProperties": false}},
            "note": {"type": "string", "maxLength": 64}
        },
        "required": ["person", "count", "weather", "vehicles", "note"],
        "additionalProperties": false
    })
}

/// The kinds, each with an answer it accepts.
fn kinds() -> Vec<(&'static str, AnswerSpec, &'static str)> {
    vec![
        (
            "choice",
            AnswerSpec::Choice(vec![
                "nobody is at the door".into(),
                "a delivery person is at the door".into(),
                "a stranger is at the door".into(),
            ]),
            "a delivery person is at the door",
        ),
        ("regex", AnswerSpec::Regex("(yes|no), [0-9]{1,3} (cars?|people|trucks?)".into()), "yes, 12 cars"),
        (
            "json_schema",
            AnswerSpec::JsonSchema(schema()),
            r#"{"person":true,"count":3,"weather":"rain","vehicles":[{"kind":"car","moving":true},{"kind":"bus","moving":false}],"note":"a man in a red coat waits by the gate"}"#,
        ),
    ]
}

/// Mean microseconds per token of (mask, consume) over `rounds` walks of the answer.
fn per_token(g: &Grammars, tokenizer: &tokenizers::Tokenizer, spec: &AnswerSpec, answer: &str) -> (f64, f64, usize) {
    let ids = tokenizer.encode(answer, false).unwrap().get_ids().to_vec();
    let rounds = 20;
    let (mut mask_s, mut consume_s) = (0.0, 0.0);
    for _ in 0..rounds {
        let mut c = g.start(spec, false).unwrap();
        for &t in &ids {
            let t0 = Instant::now();
            let m = c.mask().unwrap();
            mask_s += t0.elapsed().as_secs_f64();
            assert!(m.is_allowed(t), "token {t} of {answer:?} is not allowed");
            let t1 = Instant::now();
            c.consume(t).unwrap();
            consume_s += t1.elapsed().as_secs_f64();
        }
    }
    let n = (rounds * ids.len()) as f64;
    (mask_s / n * 1e6, consume_s / n * 1e6, ids.len())
}

/// A Qwen-sized byte-level BPE, trained once on text files of this machine.
fn big_tokenizer() -> PathBuf {
    if let Ok(p) = std::env::var("LOOKOUT_BENCH_TOKENIZER") {
        return p.into();
    }
    let out = root().join(".bench/bpe-151643/tokenizer.json");
    if out.is_file() {
        return out;
    }
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let fixture = root().join("fixtures/models/tiny-tied/tokenizer.json");
    let mut files = Vec::new();
    let mut bytes = 0u64;
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"));
    let mut dirs = vec![home.join("registry/src"), PathBuf::from("/usr/share/doc")];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("rs" | "md" | "txt")) && bytes < 48 << 20 {
                bytes += e.metadata().map_or(0, |m| m.len());
                files.push(p.to_string_lossy().into_owned());
            }
        }
    }
    eprintln!("training a 151,643-token byte-level BPE on {} files ({} MiB); once", files.len(), bytes >> 20);
    let t = Instant::now();
    let base: Value = serde_json::from_str(&std::fs::read_to_string(&fixture).unwrap()).unwrap();
    let mut tokenizer = tokenizers::Tokenizer::from_file(&fixture).unwrap();
    let specials: Vec<tokenizers::AddedToken> = base["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| tokenizers::AddedToken::from(a["content"].as_str().unwrap().to_owned(), true))
        .collect();
    let mut trainer: tokenizers::models::TrainerWrapper = tokenizers::models::bpe::BpeTrainerBuilder::new()
        .vocab_size(151_643)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer.with_model(tokenizers::models::bpe::BPE::default());
    tokenizer.train_from_files(&mut trainer, files).unwrap();
    tokenizer.save(&out, false).unwrap();
    eprintln!("trained in {:.0} s: {} tokens", t.elapsed().as_secs_f64(), tokenizer.get_vocab_size(true));
    out
}

fn grammars(path: &Path) -> (Grammars, tokenizers::Tokenizer, usize) {
    let tokenizer = tokenizers::Tokenizer::from_file(path).unwrap();
    let vocab = tokenizer.get_vocab_size(true).div_ceil(128) * 128;
    let eos = tokenizer.token_to_id("<|im_end|>").unwrap();
    let t = Instant::now();
    let g = Grammars::new(&std::fs::read_to_string(path).unwrap(), tokenizer.clone(), vocab, &[eos]).unwrap();
    eprintln!("  token trie of {vocab} ids built in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    (g, tokenizer, vocab)
}

fn decode_rate(e: &Engine, answer: Option<AnswerSpec>, seed: u64) -> (f64, usize) {
    let generation = GenerationParams {
        sampling: SamplingParams { temperature: 1.0, seed, ..SamplingParams::greedy() },
        max_tokens: 96,
        stop: vec![],
        capture: false,
        ignore_eos: false,
        answer,
        stop_when_decided: false,
    };
    let request = Request {
        messages: vec![Message::text("user", "Describe the scene at the door as JSON.")],
        videos: vec![],
        generation,
        schedule: Default::default(),
    };
    let mut rx = e.submit(request).unwrap();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            EngineEvent::Done { timings, usage, .. } => return (timings.decode_tok_s, usage.completion_tokens),
            EngineEvent::Failed { error } => panic!("{error}"),
            _ => {}
        }
    }
    panic!("no Done")
}

fn main() {
    let mut report = serde_json::Map::new();
    let fixture = root().join("fixtures/models/tiny-tied/tokenizer.json");
    for (label, path) in [("fixture", fixture), ("large", big_tokenizer())] {
        let (g, tokenizer, vocab) = grammars(&path);
        let mut row = serde_json::Map::new();
        row.insert("vocab".into(), json!(vocab));
        for (kind, spec, answer) in kinds() {
            let t = Instant::now();
            g.check(&spec).unwrap();
            let compile_ms = t.elapsed().as_secs_f64() * 1e3;
            let (mask_us, consume_us, tokens) = per_token(&g, &tokenizer, &spec, answer);
            eprintln!(
                "{label:>8} vocab {vocab:>6} {kind:>11}: mask {mask_us:8.1} µs/token, consume {consume_us:6.1} µs/token \
                 ({tokens} tokens; compiled in {compile_ms:.1} ms)"
            );
            row.insert(
                kind.into(),
                json!({"mask_us": mask_us, "consume_us": consume_us, "tokens": tokens, "compile_ms": compile_ms}),
            );
        }
        report.insert(label.into(), Value::Object(row));
    }

    // End to end on the fixture model: unconstrained and constrained requests interleaved.
    let e = Engine::load(LoadOptions {
        model: root().join("fixtures/models/tiny-tied").to_string_lossy().into_owned(),
        device: DeviceChoice::Cpu,
        dtype: candle_core::DType::F32,
        queue: 4,
        vision_cache_bytes: 64 << 20,
        kv_cache_bytes: Some(256 << 20),
        max_running: inference::engine::DEFAULT_MAX_RUNNING,
        prefill_chunk: inference::engine::DEFAULT_PREFILL_CHUNK,
    })
    .unwrap();
    let mut rates: Vec<(&str, Vec<f64>)> =
        vec![("none", vec![]), ("choice", vec![]), ("regex", vec![]), ("json_schema", vec![])];
    for seed in 0..12 {
        for (i, (kind, spec, _)) in
            std::iter::once(("none", None, "")).chain(kinds().into_iter().map(|(k, s, a)| (k, Some(s), a))).enumerate()
        {
            let (rate, n) = decode_rate(&e, spec, seed);
            if n > 4 {
                debug_assert_eq!(rates[i].0, kind);
                rates[i].1.push(rate);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let base = median(&mut rates[0].1.clone());
    let mut e2e = serde_json::Map::new();
    for (kind, v) in &mut rates {
        let m = median(v);
        eprintln!("end to end (fixture model): {kind:>11}: decode {m:8.0} tok/s, {:.2}x unconstrained", m / base);
        e2e.insert((*kind).into(), json!({"decode_tok_s": m, "ratio": m / base}));
    }
    report.insert("end_to_end".into(), Value::Object(e2e));
    println!("{}", Value::Object(report));
}
