//! Choosing the next token: greedy, or temperature / top-k / top-p sampling with repetition and
//! presence penalties, in the order transformers applies them.

use rand::{Rng, SeedableRng, rngs::SmallRng};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f64,
    /// transformers' repetition penalty over prompt and output (1.0 = off).
    pub repetition_penalty: f32,
    /// vLLM-style presence penalty, subtracted once per token already generated (0 = off).
    pub presence_penalty: f32,
    /// Seed of the sampler's random generator.
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be 0 or more, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be positive, got {}", self.repetition_penalty));
        }
        if !self.presence_penalty.is_finite() {
            return Err("presence_penalty must be finite".into());
        }
        Ok(())
    }
}

/// A stateful sampler for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SmallRng,
    seen: Vec<bool>,
    generated: Vec<bool>,
}

impl Sampler {
    /// A sampler that knows the prompt (for the repetition penalty).
    pub fn new(params: SamplingParams, vocab: usize, prompt: &[u32]) -> Self {
        let mut seen = vec![false; vocab];
        for &t in prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Sampler { rng: SmallRng::seed_from_u64(params.seed), params, seen, generated: vec![false; vocab] }
    }

    /// Picks the next token from `logits` and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (l, &s) in logits.iter_mut().zip(&self.seen) {
                if s {
                    *l = if *l < 0.0 { *l * p.repetition_penalty } else { *l / p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 {
            for (l, &g) in logits.iter_mut().zip(&self.generated) {
                if g {
                    *l -= p.presence_penalty;
                }
            }
        }
        let token = if p.temperature <= 0.0 { argmax(logits) } else { self.draw(logits) };
        if let Some(s) = self.seen.get_mut(token as usize) {
            *s = true;
        }
        if let Some(g) = self.generated.get_mut(token as usize) {
            *g = true;
        }
        token
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let t = p.temperature as f32;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let mut r: f64 = self.rng.random();
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return cand[i].0;
            }
            r -= x;
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy(), 4, &[]);
        assert_eq!(s.sample(&mut [0.1, 0.9, 0.9, 0.2]), 1);
    }

    #[test]
    fn penalties_change_the_choice() {
        let params = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params, 3, &[0]);
        // 1.0 / 2 = 0.5 < 0.8: token 0 from the prompt is penalized.
        assert_eq!(s.sample(&mut [1.0, 0.8, 0.1]), 1);
        let params = SamplingParams { presence_penalty: 1.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params, 3, &[]);
        assert_eq!(s.sample(&mut [1.0, 0.5, 0.1]), 0);
        assert_eq!(s.sample(&mut [1.0, 0.5, 0.1]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let params = SamplingParams { temperature: 1.0, top_k: 1, seed: 7, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params, 4, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 3.0, 2.9, 1.0]), 1);
        }
        let params = SamplingParams { temperature: 1.0, seed: 42, ..SamplingParams::greedy() };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), 4, &[]);
            (0..32).map(|_| s.sample(&mut [0.0, 0.5, 0.4, 0.3])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        assert!(draw(&params).iter().any(|&t| t != draw(&params)[0]));
    }

    #[test]
    fn top_p_cuts_the_tail() {
        let params = SamplingParams { temperature: 1.0, top_p: 0.5, seed: 3, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params, 3, &[]);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [5.0, 0.0, 0.0]), 0);
        }
        assert!(SamplingParams { top_p: 0.0, ..SamplingParams::greedy() }.validate().is_err());
        assert!(SamplingParams { temperature: -1.0, ..SamplingParams::greedy() }.validate().is_err());
    }
}
