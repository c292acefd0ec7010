//! The KV cache grows past its first allocation without changing results: decoding token by token
//! across the growth boundary gives the logits a single prefill of the whole sequence gives.

mod common;

use candle_core::DType;
use common::*;
use inference::positions::{PromptPositions, TokenKind};

#[test]
fn decoding_across_cache_growth_matches_one_prefill() {
    let l = load("tiny-untied", DType::F32);
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 400).collect();
    let positions = |n: usize| {
        let p: Vec<i64> = (0..n as i64).collect();
        PromptPositions { axes: [p.clone(), p.clone(), p], rope_delta: 0 }
    };
    // Prefill 250 tokens (capacity 256), then decode 50 one at a time (growing to 512).
    let mut cache = l.model.new_cache();
    let kinds = vec![TokenKind::Text; 250];
    l.model.prefill(&ids[..250], &kinds, &positions(250), None, &mut cache).unwrap();
    let mut last = Vec::new();
    for (i, &t) in ids[250..].iter().enumerate() {
        last = l.model.decode(t, 250 + i as i64, &mut cache).unwrap().to_vec1::<f32>().unwrap();
    }
    assert_eq!(cache.len(), 300);
    // One prefill of all 300.
    let mut fresh = l.model.new_cache();
    let kinds = vec![TokenKind::Text; 300];
    let whole: Vec<f32> = l.model.prefill(&ids, &kinds, &positions(300), None, &mut fresh).unwrap().to_vec1().unwrap();
    let err = rel_err(&last, &whole);
    assert!(err < 1e-4, "relative error {err}");
    cache.clear();
    assert!(cache.is_empty());
}
