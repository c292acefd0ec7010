//! The engine: one thread owns the model; requests arrive through a bounded queue; each request
//! gets its own stream of events. Dropping that stream cancels the request and frees its KV cache.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use candle_core::DType;
use candle_nn::VarBuilder;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::Error;
use crate::answer::{AnswerOutcome, AnswerSpec, Decision, LazyGrammars, MaskWorker};
use crate::config::Config;
use crate::device::DeviceChoice;
use crate::files::{GenerationConfig, ModelFiles};
use crate::model::Qwen3VL;
use crate::processor::{Message, Processor, TokenStream, VideoMeta};
use crate::reuse::VisionCache;
use crate::sampling::{Sampler, SamplingParams};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A local directory or a Hub id.
    pub model: String,
    /// Where to run.
    pub device: DeviceChoice,
    /// Weight and activation dtype.
    pub dtype: DType,
    /// Requests that may wait in the queue.
    pub queue: usize,
    /// Bytes of encoded frame pairs kept for overlapping windows (0: no reuse).
    pub vision_cache_bytes: usize,
    /// Bytes of KV cache a request may take: its prompt and `max_tokens` must fit, or it is
    /// refused before any work with what to change.
    pub kv_cache_bytes: usize,
}

/// One video of a request: the sampler's output.
#[derive(Debug, Clone)]
pub struct VideoInput {
    /// `rows x 1536` patch rows.
    pub pixel_values: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]`.
    pub grid_thw: [usize; 3],
    /// One timestamp per temporal group, seconds.
    pub timestamps: Vec<f64>,
}

/// Generation settings of a request.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Token choice.
    pub sampling: SamplingParams,
    /// At most this many new tokens.
    pub max_tokens: usize,
    /// Stop (without including it) when the output contains one of these.
    pub stop: Vec<String>,
    /// Also report the prompt ids and the prefill logits (for parity dumps).
    pub capture: bool,
    /// Keep going past end-of-sequence tokens (benchmarks with a fixed length).
    pub ignore_eos: bool,
    /// The shape the answer must have, enforced while decoding.
    pub answer: Option<AnswerSpec>,
    /// With `answer`: stop as soon as the whole answer is decided (a choice fixed by its first
    /// letters), completing the text with what the grammar forces.
    pub stop_when_decided: bool,
}

/// Counters of what the engine did.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests that finished.
    pub completed: AtomicU64,
    /// Requests dropped by their client (while queued or while generating).
    pub cancelled: AtomicU64,
    /// Requests that failed.
    pub failed: AtomicU64,
    /// Frame pairs whose vision features came from the reuse cache.
    pub vision_reused: AtomicU64,
    /// Frame pairs the vision tower encoded.
    pub vision_encoded: AtomicU64,
    /// Bytes the reuse cache holds now.
    pub vision_cache_bytes: AtomicU64,
    /// Requests being served now (0 or 1: one at a time).
    pub running: AtomicU64,
    /// Bytes of KV cache allocated now.
    pub kv_cache_bytes: AtomicU64,
}

/// A request to the engine.
#[derive(Debug, Clone)]
pub struct Request {
    /// The conversation; video parts match `videos` in order.
    pub messages: Vec<Message>,
    /// The clips.
    pub videos: Vec<VideoInput>,
    /// How to generate.
    pub generation: GenerationParams,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// `stop` or `length`, as OpenAI spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (placeholders included).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Waiting in the queue.
    pub queue_ms: f64,
    /// Vision tower.
    pub vision_ms: f64,
    /// Text prefill.
    pub prefill_ms: f64,
    /// From the start of work on the request to the first token.
    pub ttft_ms: f64,
    /// Decode speed after the first token.
    pub decode_tok_s: f64,
}

/// What a request's stream carries.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Accepted; waiting for the engine.
    Queued,
    /// Prompt ids and the logits at the last prompt position (only with `capture`).
    Captured {
        /// Prompt token ids.
        input_ids: Vec<u32>,
        /// f32 logits before any generated token.
        logits: Vec<f32>,
    },
    /// A piece of text (never a broken UTF-8 character).
    Token {
        /// The text.
        text: String,
    },
    /// Part of a constrained answer can no longer change (after the tokens that decided it).
    Decided(Decision),
    /// Finished.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// The whole answer.
        text: String,
        /// Generated ids (including a final end-of-sequence token, if any).
        token_ids: Vec<u32>,
        /// Token counts.
        usage: Usage,
        /// Timings.
        timings: Timings,
        /// How a constrained answer ended (only with `answer`).
        answer: Option<AnswerOutcome>,
    },
    /// The request failed; the engine carries on.
    Failed {
        /// Why.
        error: Error,
    },
}

/// Facts about the loaded model.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// What was asked for (directory or Hub id).
    pub model: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Generation defaults of the checkpoint.
    pub generation: GenerationConfig,
}

struct Job {
    request: Request,
    events: UnboundedSender<EngineEvent>,
    queued_at: Instant,
    /// The job's place in the queue, given back when the engine takes it.
    slot: Option<Slot>,
}

/// A place in the engine's queue ([`Engine::reserve`]); dropping it gives the place back.
#[derive(Debug)]
pub struct Slot(
    // Held, never read: dropping it releases the place.
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
);

/// A handle to the engine thread. Clones share the engine; when the last one is dropped the thread
/// finishes its current request and exits.
#[derive(Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    queue: usize,
    /// One permit per place in the queue: waiters are served first come, first served.
    places: Arc<tokio::sync::Semaphore>,
    info: Arc<EngineInfo>,
    processor: Arc<Processor>,
    stats: Arc<EngineStats>,
    grammars: Arc<LazyGrammars>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish_non_exhaustive()
    }
}

struct Worker {
    model: Qwen3VL,
    processor: Arc<Processor>,
    eos: Vec<u32>,
    stats: Arc<EngineStats>,
    grammars: Arc<LazyGrammars>,
    /// Encoded frame pairs of recent windows; only this thread touches it.
    vision_cache: RefCell<VisionCache>,
    kv_budget: usize,
}

type Ready = Result<(Arc<EngineInfo>, Arc<Processor>, Arc<LazyGrammars>), Error>;

impl Engine {
    /// Loads the model on a new engine thread and returns once it is ready (or failed to load).
    pub fn load(opts: LoadOptions) -> Result<Self, Error> {
        let (ready_tx, ready_rx) = sync_channel::<Ready>(1);
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(opts.queue.max(1));
        let queue = opts.queue.max(1);
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| Worker::load(&opts, worker_stats)))
                    .unwrap_or_else(|_| Err(Error::Model("loading the model panicked".into())));
                match loaded {
                    Ok((worker, info)) => {
                        let _ = ready_tx.send(Ok((info, worker.processor.clone(), worker.grammars.clone())));
                        worker.run(jobs_rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Model(format!("cannot start the engine thread: {e}")))?;
        let (info, processor, grammars) = ready_rx.recv().map_err(|_| Error::Stopped)??;
        let places = Arc::new(tokio::sync::Semaphore::new(queue));
        Ok(Engine { jobs: jobs_tx, queue, places, info, processor, stats, grammars })
    }

    /// What the engine has done so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests waiting in the queue now (not yet taken by the engine thread).
    pub fn waiting(&self) -> usize {
        self.queue.saturating_sub(self.places.available_permits())
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Compiles an answer shape (kept for the requests that use it), or says what is wrong with
    /// it. CPU work of a few milliseconds: call it off the async runtime.
    pub fn check_answer(&self, spec: &AnswerSpec) -> Result<(), Error> {
        self.grammars.get().and_then(|g| g.check(spec)).map_err(Error::Input)
    }

    /// The model's processor (chat template and tokenizer).
    pub fn processor(&self) -> &Arc<Processor> {
        &self.processor
    }

    /// Queues a request if the queue has room. The receiver yields `Queued`, then tokens, then
    /// `Done` or `Failed`. Dropping the receiver cancels the request.
    pub fn submit(&self, request: Request) -> Result<UnboundedReceiver<EngineEvent>, Error> {
        let slot = self.places.clone().try_acquire_owned().map_err(|_| Error::QueueFull(self.queue))?;
        self.submit_in(Slot(slot), request)
    }

    /// Waits for a place in the queue. Waiters get places in the order they asked, so a client
    /// that just finished a request does not jump ahead of one that has been waiting.
    pub async fn reserve(&self) -> Result<Slot, Error> {
        self.places.clone().acquire_owned().await.map(Slot).map_err(|_| Error::Stopped)
    }

    /// Queues a request in a place reserved with [`reserve`](Self::reserve).
    pub fn submit_in(&self, slot: Slot, request: Request) -> Result<UnboundedReceiver<EngineEvent>, Error> {
        request.generation.sampling.validate().map_err(Error::Input)?;
        if request.generation.max_tokens == 0 {
            return Err(Error::Input("max_tokens must be at least 1".into()));
        }
        let (tx, rx) = unbounded_channel();
        let _ = tx.send(EngineEvent::Queued);
        let job = Job { request, events: tx, queued_at: Instant::now(), slot: Some(slot) };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            // Places never outnumber the channel's capacity.
            Err(TrySendError::Full(_)) => Err(Error::QueueFull(self.queue)),
            Err(TrySendError::Disconnected(_)) => Err(Error::Stopped),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Worker {
    fn load(opts: &LoadOptions, stats: Arc<EngineStats>) -> Result<(Worker, Arc<EngineInfo>), Error> {
        let device = opts.device.open()?;
        let files = ModelFiles::resolve(&opts.model)?;
        let cfg = Config::from_json(
            &std::fs::read_to_string(&files.config).map_err(|e| Error::Files(format!("config.json: {e}")))?,
        )?;
        let processor = Arc::new(Processor::new(&files, &cfg)?);
        // SAFETY: the weight files are memory-mapped read-only; like every mmap-based loader we
        // rely on nobody truncating them while the model is loaded.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, opts.dtype, &device) }
            .map_err(|e| Error::Files(format!("cannot map the weights: {e}")))?;
        let model =
            Qwen3VL::new(&cfg, vb).map_err(|e| Error::Files(format!("the weights do not fit config.json: {e}")))?;
        let mut eos = files.generation.eos_token_id.clone();
        if eos.is_empty()
            && let Some(id) =
                files.tokenizer_config["eos_token"].as_str().and_then(|t| processor.tokenizer().token_to_id(t))
        {
            eos.push(id);
        }
        if eos.is_empty() {
            return Err(Error::Config(
                "no end-of-sequence id in generation_config.json or tokenizer_config.json".into(),
            ));
        }
        let device_name = match opts.device {
            DeviceChoice::Cpu => "cpu".to_owned(),
            DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        };
        let info = Arc::new(EngineInfo {
            model: opts.model.clone(),
            device: device_name,
            dtype: format!("{:?}", opts.dtype).to_lowercase(),
            generation: files.generation.clone(),
        });
        tracing::info!(model = %opts.model, device = %info.device, dtype = %info.dtype, "model loaded");
        let grammars = Arc::new(LazyGrammars::new(
            files.tokenizer.clone(),
            processor.tokenizer().clone(),
            cfg.text_config.vocab_size,
            eos.clone(),
        ));
        let vision_cache = RefCell::new(VisionCache::new(opts.vision_cache_bytes));
        Ok((Worker { model, processor, eos, stats, grammars, vision_cache, kv_budget: opts.kv_cache_bytes }, info))
    }

    fn run(self, jobs: Receiver<Job>) {
        while let Ok(mut job) = jobs.recv() {
            // Taken off the queue: its place goes to the next waiter.
            drop(job.slot.take());
            if job.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue; // cancelled while queued
            }
            let events = job.events.clone();
            self.stats.running.store(1, Ordering::Relaxed);
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve(job)));
            self.stats.running.store(0, Ordering::Relaxed);
            self.stats.kv_cache_bytes.store(0, Ordering::Relaxed);
            let error = match outcome {
                Ok(Ok(())) if events.is_closed() => {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Ok(Ok(())) => {
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Ok(Err(e)) => Some(e),
                Err(_) => {
                    // A panic may have left the reuse cache half-updated.
                    self.vision_cache.borrow_mut().clear();
                    Some(Error::Model("the engine hit an internal error on this request".into()))
                }
            };
            if let Some(error) = error {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "request failed");
                let _ = events.send(EngineEvent::Failed { error });
            }
        }
        tracing::debug!("engine stopped");
    }

    fn serve(&self, job: Job) -> Result<(), Error> {
        let started = Instant::now();
        let queue_ms = ms(started - job.queued_at);
        let Job { request, events, .. } = job;
        let Request { messages, videos, generation } = request;
        let metas: Vec<VideoMeta> =
            videos.iter().map(|v| VideoMeta { grid_thw: v.grid_thw, timestamps: v.timestamps.clone() }).collect();
        let prompt = self.processor.prepare(&messages, &metas)?;
        let kv_tokens = prompt.ids.len() + generation.max_tokens;
        let kv_need = kv_tokens.saturating_mul(self.model.kv_bytes_per_token());
        if kv_need > self.kv_budget {
            let mib = |b: usize| b.div_ceil(1 << 20);
            return Err(Error::Input(format!(
                "this request needs {} MiB of KV cache ({} prompt tokens + max_tokens {}) but the engine's \
                 budget is {} MiB: lower max_tokens, the window's fps or max_pixels (fewer visual tokens), or \
                 raise --kv-cache-mb",
                mib(kv_need),
                prompt.ids.len(),
                generation.max_tokens,
                mib(self.kv_budget)
            )));
        }
        let device = self.model.device();

        // Vision: all videos of the request in one pass. The pixel data is moved, not copied, when
        // there is one video (a long clip can be a gigabyte), and reaches the tower uncopied when
        // nothing of it is reused.
        let t0 = Instant::now();
        let vision = if videos.is_empty() {
            None
        } else {
            let grids: Vec<[usize; 3]> = videos.iter().map(|v| v.grid_thw).collect();
            for v in &videos {
                let r: usize = v.grid_thw.iter().product();
                if v.pixel_values.len() != r * 1536 {
                    return Err(Error::Input(format!(
                        "a video has {} pixel values but its grid {:?} needs {}",
                        v.pixel_values.len(),
                        v.grid_thw,
                        r * 1536
                    )));
                }
            }
            let data: Vec<f32> = if videos.len() == 1 {
                videos.into_iter().next().map(|v| v.pixel_values).unwrap_or_default()
            } else {
                videos.into_iter().flat_map(|v| v.pixel_values).collect()
            };
            let mut cache = self.vision_cache.borrow_mut();
            let encoded = cache.encode(&self.model.vision, device, data, &grids);
            match encoded {
                Ok((out, count)) => {
                    self.stats.vision_reused.fetch_add(count.hits as u64, Ordering::Relaxed);
                    self.stats.vision_encoded.fetch_add(count.misses as u64, Ordering::Relaxed);
                    self.stats.vision_cache_bytes.store(cache.bytes() as u64, Ordering::Relaxed);
                    Some(out)
                }
                Err(e) => {
                    cache.clear();
                    self.stats.vision_cache_bytes.store(0, Ordering::Relaxed);
                    return Err(e.into());
                }
            }
        };
        let vision_ms = ms(t0.elapsed());
        if events.is_closed() {
            return Ok(());
        }

        let t1 = Instant::now();
        let mut cache = self.model.new_cache();
        // Room for the prompt and a typical answer at once; longer answers grow it.
        cache.reserve(prompt.ids.len() + generation.max_tokens.min(512));
        let logits = self.model.prefill(&prompt.ids, &prompt.kinds, &prompt.positions, vision.as_ref(), &mut cache)?;
        let mut logits: Vec<f32> = logits.to_vec1()?;
        let prefill_ms = ms(t1.elapsed());
        self.stats.kv_cache_bytes.store(cache.bytes() as u64, Ordering::Relaxed);
        if generation.capture {
            let _ = events.send(EngineEvent::Captured { input_ids: prompt.ids.clone(), logits: logits.clone() });
        }

        let params = &generation;
        // A constrained answer: its masks are computed on a helper thread, each while the model
        // computes the logits it will apply to.
        let constrained = match &params.answer {
            Some(spec) => {
                let c =
                    self.grammars.get().and_then(|g| g.start(spec, params.stop_when_decided)).map_err(Error::Input)?;
                Some(MaskWorker::start(c).map_err(|e| Error::Model(format!("cannot start the mask thread: {e}")))?)
            }
            None => None,
        };
        let mut decided: Option<Decision> = None;
        // What the grammar forces after a decision that ended generation (`stop_when_decided`).
        let mut forced = String::new();
        let mut sampler = Sampler::new(params.sampling.clone(), logits.len(), &prompt.ids);
        let mut stream = TokenStream::new(self.processor.clone());
        let mut stops = StopMatcher::new(&params.stop);
        let mut token_ids = Vec::new();
        let mut text = String::new();
        let mut ttft_ms = 0.0;
        let mut first_at = None;
        let mut finish = FinishReason::Length;
        let first_position = prompt.ids.len() as i64 + prompt.positions.rope_delta;
        'generate: for (step, position) in (0..params.max_tokens).zip(first_position..) {
            if events.is_closed() {
                return Ok(()); // cancelled: the cache is dropped here
            }
            if let Some(w) = &constrained {
                crate::answer::apply(&w.mask().map_err(Error::Model)?, &mut logits);
            }
            let token = sampler.sample(&mut logits);
            token_ids.push(token);
            if step == 0 {
                ttft_ms = ms(started.elapsed());
                first_at = Some(Instant::now());
            }
            let consumed = match &constrained {
                Some(w) => Some(w.consume(token).map_err(Error::Model)?),
                None => None,
            };
            if !params.ignore_eos && self.eos.contains(&token) {
                if let Some(c) = consumed {
                    // The end can decide a regex or a JSON answer.
                    for d in c.decisions {
                        let _ = events.send(EngineEvent::Decided(d));
                    }
                }
                finish = FinishReason::Stop;
                break;
            }
            if let Some(piece) = stream.push(token)? {
                let (release, hit) = stops.feed(&piece);
                if !release.is_empty() {
                    text.push_str(&release);
                    let _ = events.send(EngineEvent::Token { text: release });
                }
                if hit {
                    finish = FinishReason::Stop;
                    break 'generate;
                }
            }
            if let Some(c) = consumed {
                let mut rest = None;
                for d in c.decisions {
                    if d.path.is_empty() {
                        rest = Some(d.rest.clone());
                        decided = Some(d.clone());
                    }
                    let _ = events.send(EngineEvent::Decided(d));
                }
                if c.complete {
                    finish = FinishReason::Stop;
                    break;
                }
                if c.stop {
                    forced = rest.unwrap_or_default();
                    finish = FinishReason::Stop;
                    break;
                }
            }
            if step + 1 == params.max_tokens {
                break;
            }
            logits = self.model.decode(token, position, &mut cache)?.to_vec1()?;
            self.stats.kv_cache_bytes.store(cache.bytes() as u64, Ordering::Relaxed);
        }
        if finish == FinishReason::Length || !stops.hit {
            let mut rest = stream.flush()?.unwrap_or_default();
            if !stops.hit {
                let (release, _) = stops.feed(&rest);
                // The forced rest completes the text as if the model had said it.
                rest = release + &stops.drain() + &forced;
            }
            if !rest.is_empty() {
                text.push_str(&rest);
                let _ = events.send(EngineEvent::Token { text: rest });
            }
        }
        let decode_tok_s = match first_at {
            Some(t) if token_ids.len() > 1 => (token_ids.len() - 1) as f64 / t.elapsed().as_secs_f64().max(1e-9),
            _ => 0.0,
        };
        let usage = Usage { prompt_tokens: prompt.ids.len(), completion_tokens: token_ids.len() };
        let timings = Timings { queue_ms, vision_ms, prefill_ms, ttft_ms, decode_tok_s };
        let answer = constrained.and_then(MaskWorker::finish).map(|c| {
            // Stopped on request at the decision, or ended by the grammar (or cut short).
            if params.stop_when_decided { c.outcome(decided.as_ref()) } else { c.outcome(None) }
        });
        // The gauges say the request is over before its client hears it (the cache goes next).
        drop(cache);
        self.stats.kv_cache_bytes.store(0, Ordering::Relaxed);
        self.stats.running.store(0, Ordering::Relaxed);
        let _ = events.send(EngineEvent::Done { finish_reason: finish, text, token_ids, usage, timings, answer });
        Ok(())
    }
}

/// Holds back text that could be the start of a stop string, and reports when one appears.
struct StopMatcher {
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

    #[test]
    fn finish_reasons_spell_like_openai() {
        assert_eq!(FinishReason::Stop.as_str(), "stop");
        assert_eq!(FinishReason::Length.as_str(), "length");
    }
}
