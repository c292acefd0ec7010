//! Parity with transformers 5.24.0 on the tiny random Qwen3-VL fixtures
//! (tools/reference/make_model_fixtures.py): prompt ids, 3-D positions, prefill logits and greedy
//! tokens, in f32 and bf16.

mod common;

use candle_core::DType;
use common::*;
use inference::positions::TokenKind;
use inference::sampling::argmax;

/// f32 logits must agree within this relative error (max |diff| / max |logit|).
const F32_TOL: f32 = 1e-4;
/// bf16: both sides round every activation to 8 bits of mantissa, in different orders.
const BF16_TOL: f32 = 0.03;

fn greedy(
    l: &Loaded,
    prompt: &inference::processor::Prompt,
    vision: Option<&inference::vision::VisionOutput>,
    first: Vec<f32>,
    n: usize,
) -> Vec<i64> {
    let eos: Vec<u32> = l.files.generation.eos_token_id.clone();
    let mut cache = l.model.new_cache();
    // The caller's prefill already ran on another cache; redo it here to own this one.
    let logits = l.model.prefill(&prompt.ids, &prompt.kinds, &prompt.positions, vision, &mut cache).unwrap();
    let mut logits: Vec<f32> = logits.to_vec1().unwrap();
    assert_eq!(logits.len(), first.len());
    let start = prompt.ids.len() as i64 + prompt.positions.rope_delta;
    let mut out = Vec::new();
    for pos in (start..).take(n) {
        let t = argmax(&logits);
        out.push(t as i64);
        if eos.contains(&t) {
            break;
        }
        logits = l.model.decode(t, pos, &mut cache).unwrap().to_vec1().unwrap();
    }
    out
}

fn check_model(name: &str, dtype: DType) {
    let l = load(name, dtype);
    let all = cases();
    let mut report = Vec::new();
    for case in all["models"][name].as_array().unwrap() {
        let case_name = case["case"].as_str().unwrap();
        let r = Reference::load(name, case_name);
        let prompt = l.processor.prepare(&messages(case), &r.video_meta(case)).unwrap();
        assert_eq!(prompt.text, case["expanded"].as_str().unwrap(), "{name}/{case_name}: expanded prompt");
        let ids: Vec<i64> = prompt.ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, r.ids("input_ids"), "{name}/{case_name}: input_ids");
        let kinds: Vec<i64> = prompt
            .kinds
            .iter()
            .map(|k| match k {
                TokenKind::Text => 0,
                TokenKind::Image => 1,
                TokenKind::Video => 2,
            })
            .collect();
        assert_eq!(kinds, r.ids("mm_token_type_ids"), "{name}/{case_name}: token types");
        let pos: Vec<Vec<i64>> = r.tensors["position_ids"].to_vec2().unwrap();
        for (a, (got, want)) in prompt.positions.axes.iter().zip(&pos).enumerate() {
            assert_eq!(got, want, "{name}/{case_name}: position axis {a}");
        }
        assert_eq!(prompt.positions.rope_delta, r.ids("rope_delta")[0], "{name}/{case_name}: rope delta");

        let vision = r.has("pixel_codes").then(|| l.model.encode_video(&r.pixel_values(), &[r.grid()]).unwrap());
        let mut cache = l.model.new_cache();
        let logits: Vec<f32> = l
            .model
            .prefill(&prompt.ids, &prompt.kinds, &prompt.positions, vision.as_ref(), &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
        let (want_logits, want_tokens, tol) = match dtype {
            DType::F32 => (r.f32s("logits_last"), r.ids("generated"), F32_TOL),
            _ => (r.f32s("logits_last_bf16"), r.ids("generated_bf16"), BF16_TOL),
        };
        let err = rel_err(&logits, &want_logits);
        report.push(format!("{name}/{case_name} {dtype:?}: logits rel err {err:.2e}"));
        assert!(err <= tol, "{name}/{case_name}: logits relative error {err} above {tol}");
        let tokens = greedy(&l, &prompt, vision.as_ref(), logits, want_tokens.len());
        if dtype == DType::F32 {
            assert_eq!(tokens, want_tokens, "{name}/{case_name}: greedy tokens");
        } else {
            let same = tokens.iter().zip(&want_tokens).take_while(|(a, b)| a == b).count();
            report.push(format!("  bf16 greedy prefix agreement {same}/{}", want_tokens.len()));
            assert!(same >= 1, "{name}/{case_name}: bf16 first greedy token differs");
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn tiny_tied_f32() {
    check_model("tiny-tied", DType::F32);
}

#[test]
fn tiny_untied_f32() {
    check_model("tiny-untied", DType::F32);
}

#[test]
fn tiny_tied_bf16() {
    check_model("tiny-tied", DType::BF16);
}

#[test]
fn tiny_untied_bf16() {
    check_model("tiny-untied", DType::BF16);
}

/// Attention a few query rows (and frame pairs) at a time, as long prompts are attended within
/// the memory budget, gives the reference's logits and greedy tokens, and the same logits as
/// whole attention (f32, within 1e-6 relative).
#[test]
fn attention_in_blocks_matches_whole_attention_and_the_reference() {
    let whole = load("tiny-tied", DType::F32);
    let mut blocks = load("tiny-tied", DType::F32);
    // One query row per block, one frame pair per batch.
    blocks.model.text.set_attention_budget(1);
    blocks.model.vision.set_attention_budget(1);
    let all = cases();
    let mut checked = 0;
    for case in all["models"]["tiny-tied"].as_array().unwrap() {
        let r = Reference::load("tiny-tied", case["case"].as_str().unwrap());
        let prompt = whole.processor.prepare(&messages(case), &r.video_meta(case)).unwrap();
        let run = |l: &Loaded| -> Vec<f32> {
            let vision = r.has("pixel_codes").then(|| l.model.encode_video(&r.pixel_values(), &[r.grid()]).unwrap());
            let mut cache = l.model.new_cache();
            let logits = l.model.prefill(&prompt.ids, &prompt.kinds, &prompt.positions, vision.as_ref(), &mut cache);
            logits.unwrap().to_vec1().unwrap()
        };
        let (a, b) = (run(&whole), run(&blocks));
        let err = rel_err(&b, &a);
        assert!(err <= 1e-6, "{}: blocks differ from whole attention by {err}", case["case"]);
        assert!(rel_err(&b, &r.f32s("logits_last")) <= F32_TOL);
        let vision = r.has("pixel_codes").then(|| blocks.model.encode_video(&r.pixel_values(), &[r.grid()]).unwrap());
        let want = r.ids("generated");
        assert_eq!(greedy(&blocks, &prompt, vision.as_ref(), b, want.len()), want);
        checked += 1;
    }
    assert!(checked > 0);
}
