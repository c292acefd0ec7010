//! One admitted request on the engine thread: its vision and prefill done a chunk at a time, then
//! one token a decode step (sampling, the answer's mask, stop strings, end of sequence), then
//! its `Done` event.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use super::{EngineEvent, FinishReason, GenerationParams, Job, Priority, Request, Timings, Usage, VideoInput};
use crate::Error;
use crate::answer::{Decision, LazyGrammars, MaskWorker};
use crate::model::{PrefillInput, Qwen3VL};
use crate::processor::{Processor, Prompt, TokenStream};
use crate::sampling::Sampler;
use crate::text::KvCache;
use crate::vision::VisionOutput;

/// Values per patch row.
const PATCH: usize = 1536;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Where a sequence is.
pub(super) enum Phase {
    /// Frame pairs still to encode.
    Vision(VisionWork),
    /// Prompt positions still to prefill.
    Prefill(PrefillInput),
    /// One token a step.
    Decode(Box<Decoder>),
}

/// An admitted request.
pub(super) struct Sequence {
    pub(super) events: UnboundedSender<EngineEvent>,
    pub(super) priority: Priority,
    /// Bytes of KV cache reserved for it at admission.
    pub(super) kv_bytes: usize,
    pub(super) cache: KvCache,
    pub(super) phase: Phase,
    /// The token to feed in this step's batch, at its position.
    pub(super) feed: Option<(u32, i64)>,
    /// Picks of vision or prefill work that went to others since its last.
    pub(super) passed_over: u32,
    prompt: Prompt,
    generation: GenerationParams,
    queued_at: Instant,
    started: Instant,
    vision_ms: f64,
    prefill_ms: f64,
}

/// Vision work left: the videos (or their first pairs) not encoded yet, and the chunks done.
pub(super) struct VisionWork {
    /// Rows and grids still to encode, in order; chunks are cut from the back so that the rows
    /// left are truncated rather than copied.
    left: Vec<(Vec<f32>, [usize; 3])>,
    /// Chunks encoded, last first.
    done: Vec<VisionOutput>,
}

impl VisionWork {
    fn new(videos: Vec<VideoInput>) -> Self {
        VisionWork { left: videos.into_iter().map(|v| (v.pixel_values, v.grid_thw)).collect(), done: Vec::new() }
    }

    /// Visual tokens left to encode.
    fn tokens(&self) -> usize {
        self.left.iter().map(|(_, g)| g.iter().product::<usize>() / 4).sum()
    }

    /// Visual tokens of the next frame pair to encode (0 when none is left).
    fn next_pair_tokens(&self) -> usize {
        self.left.last().map_or(0, |(_, [_, h, w])| h * w / 4)
    }

    /// The next chunk to encode: the rows and grids of at most `chunk` visual tokens (at least
    /// one frame pair). Everything at once when it fits (the rows are moved, not copied).
    fn take(&mut self, chunk: usize) -> Option<(Vec<f32>, Vec<[usize; 3]>)> {
        if self.done.is_empty() && self.tokens() <= chunk {
            let grids: Vec<[usize; 3]> = self.left.iter().map(|(_, g)| *g).collect();
            let data = if self.left.len() == 1 {
                self.left.pop().map(|(d, _)| d)?
            } else {
                self.left.drain(..).flat_map(|(d, _)| d).collect()
            };
            return Some((data, grids));
        }
        let (rows, [t, h, w]) = self.left.last_mut()?;
        let (t, h, w) = (*t, *h, *w);
        let take = (chunk / (h * w / 4).max(1)).clamp(1, t);
        if take == t {
            let (rows, grid) = self.left.pop()?;
            return Some((rows, vec![grid]));
        }
        let tail = rows.split_off((t - take) * h * w * PATCH);
        if let Some((_, g)) = self.left.last_mut() {
            g[0] = t - take;
        }
        Some((tail, vec![[take, h, w]]))
    }

    /// The chunks (last first) put together in order.
    fn join(mut done: Vec<VisionOutput>) -> candle_core::Result<VisionOutput> {
        if done.len() == 1 {
            return done.pop().ok_or_else(|| candle_core::Error::Msg("no vision output".into()));
        }
        done.reverse();
        let embeds: Vec<&Tensor> = done.iter().map(|o| &o.embeds).collect();
        let taps = done.first().map_or(0, |o| o.deepstack.len());
        let mut deepstack = Vec::with_capacity(taps);
        for k in 0..taps {
            let tap = done.iter().map(|o| o.deepstack.get(k)).collect::<Option<Vec<_>>>();
            let tap = tap.ok_or_else(|| candle_core::Error::Msg("vision chunks with different taps".into()))?;
            deepstack.push(Tensor::cat(&tap, 0)?);
        }
        Ok(VisionOutput { embeds: Tensor::cat(&embeds, 0)?, deepstack })
    }
}

/// What the engine thread lends a sequence for a step.
pub(super) struct Context<'a> {
    pub(super) model: &'a Qwen3VL,
    pub(super) processor: &'a Arc<Processor>,
    pub(super) grammars: &'a LazyGrammars,
    pub(super) eos: &'a [u32],
    /// Tokens per vision or prefill chunk.
    pub(super) chunk: usize,
}

/// What a decode step's sampling decided.
pub(super) enum Next {
    /// Feed this token at this position.
    Feed(u32, i64),
    /// The answer is over.
    Done,
}

impl Sequence {
    /// Starts work on a request whose prompt is prepared (its place in the queue is given back).
    pub(super) fn admit(job: Job, prompt: Prompt, kv_bytes: usize, model: &Qwen3VL) -> Self {
        let Job { request, events, queued_at, slot } = job;
        drop(slot);
        let Request { videos, generation, schedule, .. } = request;
        let mut cache = model.new_cache();
        // Room for the prompt and a typical answer at once; longer answers grow it.
        cache.reserve(prompt.ids.len() + generation.max_tokens.min(512));
        let phase = Phase::Vision(VisionWork::new(videos));
        Sequence {
            events,
            priority: schedule.priority,
            kv_bytes,
            cache,
            phase,
            feed: None,
            passed_over: 0,
            prompt,
            generation,
            queued_at,
            started: Instant::now(),
            vision_ms: 0.0,
            prefill_ms: 0.0,
        }
    }

    /// Prompt and visual tokens still to encode or prefill (0 once decoding).
    pub(super) fn work_left(&self) -> usize {
        match &self.phase {
            Phase::Vision(v) => v.tokens() + self.prompt.ids.len(),
            Phase::Prefill(p) => p.len() - self.cache.len(),
            Phase::Decode(_) => 0,
        }
    }

    pub(super) fn decoding(&self) -> bool {
        matches!(self.phase, Phase::Decode(_))
    }

    /// Whether frame pairs are left to encode.
    pub(super) fn encoding(&self) -> bool {
        matches!(&self.phase, Phase::Vision(w) if !w.left.is_empty())
    }

    /// Visual tokens of its next frame pair (0 when none is left).
    pub(super) fn next_pair_tokens(&self) -> usize {
        match &self.phase {
            Phase::Vision(w) => w.next_pair_tokens(),
            _ => 0,
        }
    }

    /// Its next chunk of frame pairs to encode, at most `tokens` visual tokens (at least one
    /// pair).
    pub(super) fn vision_chunk(&mut self, tokens: usize) -> Option<(Vec<f32>, Vec<[usize; 3]>)> {
        match &mut self.phase {
            Phase::Vision(w) => w.take(tokens),
            _ => None,
        }
    }

    /// Takes back an encoded chunk (and the time it took); once the video is done, the prompt
    /// is made ready to prefill.
    pub(super) fn vision_done(&mut self, out: VisionOutput, took_ms: f64, cx: &Context<'_>) -> Result<(), Error> {
        self.vision_ms += took_ms;
        if let Phase::Vision(w) = &mut self.phase {
            w.done.push(out);
        }
        self.finish_vision(cx)
    }

    /// Moves on to prefill once nothing is left to encode.
    fn finish_vision(&mut self, cx: &Context<'_>) -> Result<(), Error> {
        let Phase::Vision(work) = &mut self.phase else { return Ok(()) };
        if !work.left.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let done = std::mem::take(&mut work.done);
        let vision = if done.is_empty() { None } else { Some(VisionWork::join(done)?) };
        let p = &self.prompt;
        let input = cx.model.prefill_input(&p.ids, &p.kinds, &p.positions, vision.as_ref())?;
        self.phase = Phase::Prefill(input);
        self.vision_ms += ms(t.elapsed());
        Ok(())
    }

    /// One chunk of prefill (a request without video starts here).
    pub(super) fn prefill_step(&mut self, cx: &Context<'_>) -> Result<(), Error> {
        self.finish_vision(cx)?;
        let Phase::Prefill(input) = &self.phase else { return Ok(()) };
        let t = Instant::now();
        let logits = cx.model.prefill_chunk(input, cx.chunk, &mut self.cache)?;
        self.prefill_ms += ms(t.elapsed());
        if let Some(logits) = logits {
            let logits: Vec<f32> = logits.to_vec1()?;
            if self.generation.capture {
                let _ = self
                    .events
                    .send(EngineEvent::Captured { input_ids: self.prompt.ids.clone(), logits: logits.clone() });
            }
            self.phase = Phase::Decode(Box::new(Decoder::new(&self.prompt, &self.generation, logits, cx)?));
        }
        Ok(())
    }

    /// Samples the next token from the last logits (the first token straight after prefill).
    pub(super) fn sample(&mut self, cx: &Context<'_>) -> Result<Next, Error> {
        let Phase::Decode(d) = &mut self.phase else { return Err(Error::Model("sampled before prefill".into())) };
        let next = d.next(&self.generation, cx, &self.events, self.started)?;
        self.feed = match next {
            Next::Feed(t, p) => Some((t, p)),
            Next::Done => None,
        };
        Ok(next)
    }

    /// The logits the fed token produced.
    pub(super) fn set_logits(&mut self, logits: Vec<f32>) {
        self.feed = None;
        if let Phase::Decode(d) = &mut self.phase {
            d.logits = logits;
        }
    }

    /// The last events: held-back text, then `Done` (the cache is freed here).
    pub(super) fn finish(self) -> Result<Vec<EngineEvent>, Error> {
        let Sequence { phase, prompt, generation, queued_at, started, vision_ms, prefill_ms, .. } = self;
        let Phase::Decode(d) = phase else { return Err(Error::Model("finished before decoding".into())) };
        d.done(
            &generation,
            prompt.ids.len(),
            Timings { queue_ms: ms(started - queued_at), vision_ms, prefill_ms, ..Timings::default() },
        )
    }
}

/// The decoding state of a sequence.
#[derive(Default)]
pub(super) struct Decoder {
    logits: Vec<f32>,
    sampler: Option<Sampler>,
    stream: Option<TokenStream>,
    stops: StopMatcher,
    constrained: Option<MaskWorker>,
    decided: Option<Decision>,
    /// What the grammar forces after a decision that ended generation (`stop_when_decided`).
    forced: String,
    token_ids: Vec<u32>,
    text: String,
    ttft_ms: f64,
    first_at: Option<Instant>,
    finish: Option<FinishReason>,
    next_position: i64,
}

impl Decoder {
    fn new(prompt: &Prompt, params: &GenerationParams, logits: Vec<f32>, cx: &Context<'_>) -> Result<Self, Error> {
        // A constrained answer: its masks are computed on a helper thread, each while the model
        // computes the logits it will apply to.
        let constrained = match &params.answer {
            Some(spec) => {
                let c =
                    cx.grammars.get().and_then(|g| g.start(spec, params.stop_when_decided)).map_err(Error::Input)?;
                Some(MaskWorker::start(c).map_err(|e| Error::Model(format!("cannot start the mask thread: {e}")))?)
            }
            None => None,
        };
        Ok(Decoder {
            sampler: Some(Sampler::new(params.sampling.clone(), logits.len(), &prompt.ids)),
            logits,
            stream: Some(TokenStream::new(cx.processor.clone())),
            stops: StopMatcher::new(&params.stop),
            constrained,
            next_position: prompt.ids.len() as i64 + prompt.positions.rope_delta,
            ..Decoder::default()
        })
    }

    fn send(events: &UnboundedSender<EngineEvent>, ev: EngineEvent) {
        let _ = events.send(ev);
    }

    /// Samples a token, reports its text and decisions, and says whether to go on.
    fn next(
        &mut self,
        params: &GenerationParams,
        cx: &Context<'_>,
        events: &UnboundedSender<EngineEvent>,
        started: Instant,
    ) -> Result<Next, Error> {
        let (Some(sampler), Some(stream)) = (&mut self.sampler, &mut self.stream) else {
            return Err(Error::Model("the decoder was not started".into()));
        };
        if let Some(w) = &self.constrained {
            crate::answer::apply(&w.mask().map_err(Error::Model)?, &mut self.logits);
        }
        let token = sampler.sample(&mut self.logits);
        self.token_ids.push(token);
        if self.token_ids.len() == 1 {
            self.ttft_ms = ms(started.elapsed());
            self.first_at = Some(Instant::now());
        }
        let consumed = match &self.constrained {
            Some(w) => Some(w.consume(token).map_err(Error::Model)?),
            None => None,
        };
        if !params.ignore_eos && cx.eos.contains(&token) {
            if let Some(c) = consumed {
                // The end can decide a regex or a JSON answer.
                for d in c.decisions {
                    Self::send(events, EngineEvent::Decided(d));
                }
            }
            self.finish = Some(FinishReason::Stop);
            return Ok(Next::Done);
        }
        if let Some(piece) = stream.push(token)? {
            let (release, hit) = self.stops.feed(&piece);
            if !release.is_empty() {
                self.text.push_str(&release);
                Self::send(events, EngineEvent::Token { text: release });
            }
            if hit {
                self.finish = Some(FinishReason::Stop);
                return Ok(Next::Done);
            }
        }
        if let Some(c) = consumed {
            let mut rest = None;
            for d in c.decisions {
                if d.path.is_empty() {
                    rest = Some(d.rest.clone());
                    self.decided = Some(d.clone());
                }
                Self::send(events, EngineEvent::Decided(d));
            }
            if c.complete {
                self.finish = Some(FinishReason::Stop);
                return Ok(Next::Done);
            }
            if c.stop {
                self.forced = rest.unwrap_or_default();
                self.finish = Some(FinishReason::Stop);
                return Ok(Next::Done);
            }
        }
        if self.token_ids.len() >= params.max_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(Next::Done);
        }
        let position = self.next_position;
        self.next_position += 1;
        Ok(Next::Feed(token, position))
    }

    /// Flushes held-back text (a last `Token`) and builds the `Done` event.
    fn done(
        mut self,
        params: &GenerationParams,
        prompt_tokens: usize,
        timings: Timings,
    ) -> Result<Vec<EngineEvent>, Error> {
        let finish = self.finish.unwrap_or(FinishReason::Length);
        let mut tail = String::new();
        if finish == FinishReason::Length || !self.stops.hit {
            let mut rest = match &mut self.stream {
                Some(s) => s.flush()?.unwrap_or_default(),
                None => String::new(),
            };
            if !self.stops.hit {
                let (release, _) = self.stops.feed(&rest);
                // The forced rest completes the text as if the model had said it.
                rest = release + &self.stops.drain() + &self.forced;
            }
            tail = rest;
        }
        self.text.push_str(&tail);
        let decode_tok_s = match self.first_at {
            Some(t) if self.token_ids.len() > 1 => {
                (self.token_ids.len() - 1) as f64 / t.elapsed().as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        };
        let usage = Usage { prompt_tokens, completion_tokens: self.token_ids.len() };
        let timings = Timings { ttft_ms: self.ttft_ms, decode_tok_s, ..timings };
        let decided = self.decided.take();
        let answer = self.constrained.take().and_then(MaskWorker::finish).map(|c| {
            // Stopped on request at the decision, or ended by the grammar (or cut short).
            if params.stop_when_decided { c.outcome(decided.as_ref()) } else { c.outcome(None) }
        });
        let done = EngineEvent::Done {
            finish_reason: finish,
            text: std::mem::take(&mut self.text),
            token_ids: std::mem::take(&mut self.token_ids),
            usage,
            timings,
            answer,
        };
        Ok(if tail.is_empty() { vec![done] } else { vec![EngineEvent::Token { text: tail }, done] })
    }
}

/// Holds back text that could be the start of a stop string, and reports when one appears.
#[derive(Default)]
pub(super) struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    hit: bool,
}

impl StopMatcher {
    fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            hit: false,
        }
    }

    /// Adds a piece; returns the text safe to release and whether a stop string was found (the
    /// stop string and anything after it are never released).
    fn feed(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_owned(), false);
        }
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.hit = true;
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1).chain(std::iter::once((s.len(), ' '))) {
                if i <= self.pending.len() && self.pending.ends_with(&s[..i]) && i < s.len() {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, false)
    }

    fn drain(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut m = StopMatcher::new(&["END".into()]);
        assert_eq!(m.feed("hello E"), ("hello ".into(), false));
        assert_eq!(m.feed("N"), (String::new(), false));
        assert_eq!(m.feed("D and more"), (String::new(), true));
        let mut m = StopMatcher::new(&["END".into()]);
        assert_eq!(m.feed("hello E"), ("hello ".into(), false));
        assert_eq!(m.feed("x"), ("Ex".into(), false));
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.feed("anything"), ("anything".into(), false));
    }
}
