//! Constrained answers with the fixture models: random weights never comply with a prompt, so
//! every answer that parses does so because the grammar held the sampler to it.

mod common;

use common::*;
use inference::answer::{AnswerOutcome, AnswerSpec, Decision};
use inference::engine::EngineEvent;
use inference::processor::Message;
use inference::sampling::SamplingParams;
use inference::{DeviceChoice, Engine, FinishReason, GenerationParams, LoadOptions, Request};
use serde_json::{Value, json};

fn engine() -> Engine {
    Engine::load(LoadOptions {
        model: model_dir("tiny-tied").to_str().unwrap().into(),
        device: DeviceChoice::Cpu,
        dtype: candle_core::DType::F32,
        queue: 4,
        vision_cache_bytes: 64 << 20,
        kv_cache_bytes: Some(256 << 20),
        max_running: inference::engine::DEFAULT_MAX_RUNNING,
        prefill_chunk: inference::engine::DEFAULT_PREFILL_CHUNK,
    })
    .unwrap()
}

fn params(answer: AnswerSpec, max_tokens: usize, temperature: f64, seed: u64) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams { temperature, top_k: 0, top_p: 1.0, seed, ..SamplingParams::greedy() },
        max_tokens,
        stop: vec![],
        capture: false,
        ignore_eos: false,
        answer: Some(answer),
        stop_when_decided: false,
    }
}

/// What one request produced.
#[derive(Debug)]
struct Run {
    text: String,
    streamed: String,
    finish: FinishReason,
    completion_tokens: usize,
    answer: Option<AnswerOutcome>,
    /// Decisions, with how much text had streamed when each came.
    decisions: Vec<(Decision, usize)>,
}

fn run(e: &Engine, prompt: &str, generation: GenerationParams) -> Run {
    let request = Request {
        messages: vec![Message::text("user", prompt)],
        videos: vec![],
        generation,
        schedule: Default::default(),
    };
    let mut rx = e.submit(request).unwrap();
    let (mut streamed, mut decisions) = (String::new(), Vec::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            EngineEvent::Token { text } => streamed.push_str(&text),
            EngineEvent::Decided(d) => decisions.push((d, streamed.len())),
            EngineEvent::Done { finish_reason, text, usage, answer, .. } => {
                return Run {
                    text,
                    streamed,
                    finish: finish_reason,
                    completion_tokens: usage.completion_tokens,
                    answer,
                    decisions,
                };
            }
            EngineEvent::Failed { error } => panic!("{error}"),
            _ => {}
        }
    }
    panic!("no Done event")
}

const PROMPTS: [&str; 3] = ["Is anyone at the door?", "Count the cars.", "Describe the scene as JSON."];

/// A nested schema with enums, integers, required and optional fields, bounded so that a
/// random model can finish it.
fn scene_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "person": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "weather": {"enum": ["sunny", "rain", "snow"]},
            "vehicles": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"enum": ["car", "bus"]},
                        "moving": {"type": "boolean"}
                    },
                    "required": ["kind", "moving"],
                    "additionalProperties": false
                }
            },
            "note": {"type": "string", "maxLength": 8}
        },
        "required": ["person", "count", "weather", "vehicles"],
        "additionalProperties": false
    })
}

/// The schema's rules, checked by hand.
fn valid_scene(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    for k in o.keys() {
        if !["person", "count", "weather", "vehicles", "note"].contains(&k.as_str()) {
            return Err(format!("unknown field {k}"));
        }
    }
    o.get("person").and_then(Value::as_bool).ok_or("person")?;
    let count = o.get("count").and_then(Value::as_i64).ok_or("count")?;
    if !(0..=99).contains(&count) {
        return Err(format!("count {count}"));
    }
    let w = o.get("weather").and_then(Value::as_str).ok_or("weather")?;
    if !["sunny", "rain", "snow"].contains(&w) {
        return Err(format!("weather {w}"));
    }
    let vehicles = o.get("vehicles").and_then(Value::as_array).ok_or("vehicles")?;
    if vehicles.len() > 2 {
        return Err("too many vehicles".into());
    }
    for x in vehicles {
        let x = x.as_object().ok_or("vehicle")?;
        if x.len() != 2 {
            return Err("vehicle fields".into());
        }
        let kind = x.get("kind").and_then(Value::as_str).ok_or("kind")?;
        if !["car", "bus"].contains(&kind) {
            return Err(format!("kind {kind}"));
        }
        x.get("moving").and_then(Value::as_bool).ok_or("moving")?;
    }
    if let Some(n) = o.get("note") {
        let n = n.as_str().ok_or("note")?;
        if n.chars().count() > 8 {
            return Err("note too long".into());
        }
    }
    Ok(())
}

/// Greedy and sampled runs of every prompt; each answer must be complete and valid.
fn all_runs(e: &Engine, spec: &AnswerSpec, max_tokens: usize, check: impl Fn(&Run)) -> usize {
    let mut n = 0;
    for prompt in PROMPTS {
        for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)] {
            let r = run(e, prompt, params(spec.clone(), max_tokens, temperature, seed));
            assert_eq!(r.text, r.streamed, "the stream adds up to the answer");
            assert_eq!(r.finish, FinishReason::Stop, "{prompt:?} t={temperature} ended by length: {r:?}");
            let a = r.answer.as_ref().expect("a constrained request reports its answer");
            assert!(a.complete, "{r:?}");
            check(&r);
            n += 1;
        }
    }
    n
}

#[test]
fn every_choice_regex_schema_and_object_answer_parses_and_validates() {
    let e = engine();
    let choices = vec!["yes".to_owned(), "no".to_owned(), "not sure".to_owned()];
    let n = all_runs(&e, &AnswerSpec::Choice(choices.clone()), 16, |r| {
        assert!(choices.contains(&r.text), "{:?}", r.text);
        assert_eq!(r.answer.as_ref().unwrap().value, Some(json!(r.text)));
        // "no" begins "not sure": it is decided only at the end, the others earlier.
        let decided: Vec<&Value> = r.decisions.iter().map(|(d, _)| &d.value).collect();
        assert_eq!(decided, [&json!(r.text)], "{r:?}");
    });
    assert_eq!(n, 12);

    let rx = "(yes|no), [0-9]{1,2} (cars?|people)";
    let re = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
    all_runs(&e, &AnswerSpec::Regex(rx.into()), 32, |r| {
        assert!(re.is_match(&r.text), "{:?}", r.text);
    });

    all_runs(&e, &AnswerSpec::JsonSchema(scene_schema()), 160, |r| {
        let v: Value = serde_json::from_str(&r.text).unwrap_or_else(|err| panic!("{err}: {:?}", r.text));
        valid_scene(&v).unwrap_or_else(|err| panic!("{err}: {v}"));
        assert_eq!(r.answer.as_ref().unwrap().value.as_ref(), Some(&v));
    });

    // Any object: a random model's object may be long, so only count the ones that finish.
    let mut finished = 0;
    for seed in 0..6 {
        let r = run(&e, PROMPTS[seed as usize % 3], params(AnswerSpec::JsonObject, 96, 1.0, seed));
        let a = r.answer.clone().unwrap();
        if r.finish == FinishReason::Stop {
            let v: Value = serde_json::from_str(&r.text).unwrap_or_else(|err| panic!("{err}: {:?}", r.text));
            assert!(v.is_object(), "{v}");
            assert_eq!(a.value, Some(v));
            finished += 1;
        } else {
            assert!(!a.complete && a.value.is_none(), "a cut answer is never passed off as valid");
        }
    }
    assert!(finished > 0, "no object finished in 96 tokens");
}

#[test]
fn an_answer_cut_by_max_tokens_is_length_and_incomplete() {
    let e = engine();
    let r = run(&e, PROMPTS[2], params(AnswerSpec::JsonSchema(scene_schema()), 3, 0.0, 0));
    assert_eq!(r.finish, FinishReason::Length);
    assert_eq!(r.completion_tokens, 3);
    assert_eq!(r.answer, Some(AnswerOutcome { complete: false, value: None }));
    assert!(serde_json::from_str::<Value>(&r.text).is_err(), "three tokens cannot make this object: {:?}", r.text);
}

#[test]
fn a_stop_string_cuts_a_constrained_answer_and_it_is_incomplete() {
    let e = engine();
    let choice = AnswerSpec::Choice(vec!["all clear".into(), "intruder alert".into()]);
    let mut g = params(choice, 16, 0.0, 0);
    g.stop = vec![" ".into()];
    let r = run(&e, PROMPTS[0], g);
    assert_eq!(r.finish, FinishReason::Stop);
    assert!(r.text == "all" || r.text == "intruder", "{:?}", r.text);
    assert_eq!(r.answer, Some(AnswerOutcome { complete: false, value: None }));
}

#[test]
fn decisions_come_as_soon_as_they_are_made_and_a_request_may_stop_there() {
    let e = engine();
    // Options that differ from their first letter and take the tiny tokenizer several tokens.
    let options = vec!["absolutely".to_owned(), "negative".to_owned()];
    let full = run(&e, PROMPTS[0], params(AnswerSpec::Choice(options.clone()), 16, 0.0, 0));
    assert!(full.completion_tokens > 2, "{full:?}");
    let (d, at) = &full.decisions[0];
    assert_eq!(full.decisions.len(), 1);
    assert_eq!((d.path.as_str(), &d.value), ("", &json!(full.text)));
    assert!(*at < full.text.len(), "the choice was decided before its last letters streamed: {full:?}");
    assert_eq!(format!("{}{}", &full.text[..*at], d.rest), full.text);

    let mut g = params(AnswerSpec::Choice(options), 16, 0.0, 0);
    g.stop_when_decided = true;
    let early = run(&e, PROMPTS[0], g);
    assert_eq!(early.text, full.text, "the forced rest completes the text");
    assert_eq!(early.streamed, early.text);
    assert_eq!(early.finish, FinishReason::Stop);
    assert!(early.completion_tokens < full.completion_tokens, "{early:?} vs {full:?}");
    assert_eq!(early.answer, Some(AnswerOutcome { complete: true, value: Some(json!(full.text)) }));

    // JSON: each field as its value completes, then the whole answer.
    let r = run(&e, PROMPTS[2], params(AnswerSpec::JsonSchema(scene_schema()), 160, 0.0, 0));
    let v: Value = serde_json::from_str(&r.text).unwrap();
    let paths: Vec<&str> = r.decisions.iter().map(|(d, _)| d.path.as_str()).collect();
    assert_eq!(paths[..3], ["/person", "/count", "/weather"], "{paths:?}");
    assert_eq!(paths.last(), Some(&""));
    for (d, at) in &r.decisions {
        assert_eq!(v.pointer(&d.path), Some(&d.value), "{}", d.path);
        if !d.path.is_empty() {
            assert!(*at < r.text.len(), "{} was decided before the end", d.path);
        }
    }
}

#[test]
fn shapes_that_cannot_compile_say_what_is_wrong() {
    let e = engine();
    let err = |spec: AnswerSpec| e.check_answer(&spec).unwrap_err().to_string();
    assert!(err(AnswerSpec::Choice(vec![])).contains("at least one option"));
    assert!(err(AnswerSpec::Choice(vec!["a".into(), String::new()])).contains("option 1 is empty"));
    let e1 = err(AnswerSpec::Regex("(unclosed".into()));
    assert!(e1.to_lowercase().contains("regex") || e1.contains("unclosed"), "{e1}");
    let e2 = err(AnswerSpec::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "strnig"}}})));
    assert!(e2.contains("strnig"), "{e2}");
    let e3 = err(AnswerSpec::JsonSchema(json!([1, 2])));
    assert!(e3.contains("must be an object"), "{e3}");
    // Good shapes compile, and the engine still serves.
    e.check_answer(&AnswerSpec::JsonSchema(scene_schema())).unwrap();
    e.check_answer(&AnswerSpec::JsonObject).unwrap();
    let r = run(&e, PROMPTS[1], params(AnswerSpec::Regex("[0-9]{2}".into()), 8, 0.0, 0));
    assert_eq!(r.text.len(), 2);
}
