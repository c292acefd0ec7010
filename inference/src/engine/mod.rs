//! The engine: one thread owns the model and serves several requests at once (continuous
//! batching); requests arrive through a bounded queue; each request gets its own stream of
//! events. Dropping that stream cancels the request and frees its KV cache.
//!
//! - `worker`: the engine thread's loop: intake, admission, one step at a time.
//! - `schedule`: who is admitted next (interactive first, then fair across sources) within the
//!   KV budget.
//! - `sequence`: one request's state: vision and prefill in chunks, then decoding one token a
//!   step with sampling, answer masks and stop strings.

mod schedule;
mod sequence;
mod worker;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use candle_core::DType;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::Error;
use crate::answer::{AnswerOutcome, AnswerSpec, Decision, LazyGrammars};
use crate::device::DeviceChoice;
use crate::files::GenerationConfig;
use crate::processor::{Message, Processor};
use crate::sampling::SamplingParams;
use worker::Worker;

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
    /// Bytes of KV cache the running requests may take together, each counted at its prompt
    /// plus `max_tokens`: a request waits until it fits, and one that could never fit is
    /// refused before any work with what to change. `None`: the device's default, measured
    /// once the weights are loaded (see [`crate::device::default_kv_budget`]).
    pub kv_cache_bytes: Option<usize>,
    /// Requests decoded together in one batch at most.
    pub max_running: usize,
    /// Prompt tokens prefilled (and visual tokens encoded) in one step, between decode steps
    /// of the running requests: a long clip does not hold up the others' tokens.
    pub prefill_chunk: usize,
}

impl LoadOptions {
    /// Defaults for `model` on the CPU in f32.
    pub fn new(model: impl Into<String>) -> Self {
        LoadOptions {
            model: model.into(),
            device: DeviceChoice::Cpu,
            dtype: DType::F32,
            queue: 8,
            vision_cache_bytes: 512 << 20,
            kv_cache_bytes: None,
            max_running: DEFAULT_MAX_RUNNING,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// Requests decoded together at most, by default.
pub const DEFAULT_MAX_RUNNING: usize = 16;
/// Prompt tokens per prefill step, by default.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Who a request is for, which decides when it is admitted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// The stream or client it belongs to (a monitor, a watch, a chat client): waiting requests
    /// are admitted in turn across sources, so no camera starves another.
    pub source: String,
    /// Interactive requests go before background ones.
    pub priority: Priority,
}

impl Schedule {
    /// A background request of `source` (a monitor's windows).
    pub fn background(source: impl Into<String>) -> Self {
        Schedule { source: source.into(), priority: Priority::Background }
    }

    /// An interactive request of `source` (chat, an ad-hoc session, a REST call).
    pub fn interactive(source: impl Into<String>) -> Self {
        Schedule { source: source.into(), priority: Priority::Interactive }
    }
}

/// How urgent a request is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Somebody is waiting for it: admitted first, its prefill first.
    #[default]
    Interactive,
    /// A monitor nobody watches live.
    Background,
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
    /// Passes through the vision tower (one pass can encode several requests' pairs).
    pub vision_passes: AtomicU64,
    /// Bytes the reuse cache holds now.
    pub vision_cache_bytes: AtomicU64,
    /// Requests being served now (admitted: encoding, prefilling or decoding).
    pub running: AtomicU64,
    /// Batched decode steps run.
    pub decode_steps: AtomicU64,
    /// Tokens those steps decoded (over `decode_steps`: the mean batch).
    pub decode_tokens: AtomicU64,
    /// Microseconds those steps' forwards took.
    pub decode_micros: AtomicU64,
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
    /// Who it is for.
    pub schedule: Schedule,
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
    /// Bytes of KV cache the running requests may take together: `--kv-cache-mb`, or the
    /// device's default.
    pub kv_budget_bytes: usize,
}

struct Job {
    request: Request,
    events: UnboundedSender<EngineEvent>,
    queued_at: Instant,
    /// The job's place in the queue, given back when the engine admits it.
    slot: Option<Slot>,
}

/// A place in the engine's queue ([`Engine::reserve`]); dropping it gives the place back.
#[derive(Debug)]
pub struct Slot(
    // Held, never read: dropping it releases the place.
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
);

/// A handle to the engine thread. Clones share the engine; when the last one is dropped the thread
/// finishes the requests it has and exits.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_spell_like_openai() {
        assert_eq!(FinishReason::Stop.as_str(), "stop");
        assert_eq!(FinishReason::Length.as_str(), "length");
    }
}
