//! The engine thread: takes requests off the queue, admits them within the KV budget and the
//! batch size, and then loops one step at a time: one chunk of vision or prefill work for one
//! admitted request, then one batched decode step for every request that is decoding. Requests
//! join between steps and leave the moment they finish or their client goes.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};

use candle_nn::VarBuilder;

use super::schedule::{Pending, Waiting};
use super::sequence::{Context, Next, Sequence};
use super::{EngineEvent, EngineInfo, EngineStats, Job, LoadOptions};
use crate::Error;
use crate::answer::LazyGrammars;
use crate::config::Config;
use crate::device::DeviceChoice;
use crate::files::ModelFiles;
use crate::model::Qwen3VL;
use crate::processor::{Processor, Prompt, VideoMeta};
use crate::reuse::VisionCache;
use crate::text::KvCache;
use crate::vision::VisionOutput;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One request's frame pairs in a vision pass.
struct Chunk {
    /// Its index among the running requests.
    seq: usize,
    data: Vec<f32>,
    grids: Vec<[usize; 3]>,
}

impl Chunk {
    /// Merged (visual) tokens it yields.
    fn tokens(&self) -> usize {
        self.grids.iter().map(|g| g.iter().product::<usize>() / 4).sum()
    }
}

/// A pass's output cut back into its members' chunks, in order (merged tokens and every
/// DeepStack tap).
fn split(out: &VisionOutput, members: &[Chunk]) -> Result<Vec<VisionOutput>, Error> {
    let mut at = 0;
    let mut parts = Vec::with_capacity(members.len());
    for m in members {
        let n = m.tokens();
        parts.push(VisionOutput {
            embeds: out.embeds.narrow(0, at, n)?,
            deepstack: out.deepstack.iter().map(|d| d.narrow(0, at, n)).collect::<candle_core::Result<_>>()?,
        });
        at += n;
    }
    Ok(parts)
}

pub(super) struct Worker {
    model: Qwen3VL,
    pub(super) processor: Arc<Processor>,
    eos: Vec<u32>,
    stats: Arc<EngineStats>,
    pub(super) grammars: Arc<LazyGrammars>,
    /// Encoded frame pairs of recent windows; only this thread touches it.
    vision_cache: VisionCache,
    kv_budget: usize,
    max_running: usize,
    chunk: usize,
}

/// A request passed over for this many picks of vision or prefill work in a row gets the next,
/// so the shortest-first choice cannot starve a long clip.
const PASSED_OVER: u32 = 8;

/// Runs `f`, turning a panic into this request's error (the engine carries on).
fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Error::Model("the engine hit an internal error on this request".into())))
}

impl Worker {
    pub(super) fn load(opts: &LoadOptions, stats: Arc<EngineStats>) -> Result<(Worker, Arc<EngineInfo>), Error> {
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
        let kv_budget = match opts.kv_cache_bytes {
            Some(bytes) => bytes,
            None => {
                let (bytes, why) = crate::device::default_kv_budget(&device, opts.vision_cache_bytes);
                tracing::info!(mib = bytes >> 20, "KV cache budget: {why} (--kv-cache-mb sets it)");
                bytes
            }
        };
        let info = Arc::new(EngineInfo {
            model: opts.model.clone(),
            device: device_name,
            dtype: format!("{:?}", opts.dtype).to_lowercase(),
            generation: files.generation.clone(),
            kv_budget_bytes: kv_budget,
        });
        tracing::info!(model = %opts.model, device = %info.device, dtype = %info.dtype, "model loaded");
        let grammars = Arc::new(LazyGrammars::new(
            files.tokenizer.clone(),
            processor.tokenizer().clone(),
            cfg.text_config.vocab_size,
            eos.clone(),
        ));
        let worker = Worker {
            model,
            processor,
            eos,
            stats,
            grammars,
            vision_cache: VisionCache::new(opts.vision_cache_bytes),
            kv_budget,
            max_running: opts.max_running.max(1),
            chunk: opts.prefill_chunk.max(1),
        };
        Ok((worker, info))
    }

    /// Serves until every handle is dropped and every request taken is done.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
        let mut waiting: Waiting<(Job, Prompt)> = Waiting::new();
        let mut running: Vec<Sequence> = Vec::new();
        let mut open = true;
        loop {
            if running.is_empty() && waiting.is_empty() {
                if !open {
                    break;
                }
                // Idle: block for the next request.
                match jobs.recv() {
                    Ok(job) => self.intake(job, &mut waiting),
                    Err(_) => break,
                }
            }
            while open {
                match jobs.try_recv() {
                    Ok(job) => self.intake(job, &mut waiting),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            let gone = waiting.remove_where(|(job, _)| job.events.is_closed());
            self.stats.cancelled.fetch_add(gone.len() as u64, Ordering::Relaxed);
            running.retain(|s| {
                let closed = s.events.is_closed();
                if closed {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                !closed
            });
            let mut reserved: usize = running.iter().map(|s| s.kv_bytes).sum();
            while running.len() < self.max_running {
                let Some(((job, prompt), kv)) = waiting.admit(self.kv_budget.saturating_sub(reserved)) else {
                    break;
                };
                reserved += kv;
                running.push(Sequence::admit(job, prompt, kv, &self.model));
            }
            self.publish(&running);
            if let Some(i) = Self::pick(&mut running) {
                if running[i].encoding() {
                    self.vision_step(&mut running, i);
                } else {
                    let cx = self.context();
                    if let Err(e) = guard(|| running[i].prefill_step(&cx)) {
                        let seq = running.remove(i);
                        self.fail(seq, e, &running);
                    }
                }
            }
            self.decode_step(&mut running);
        }
        tracing::debug!("engine stopped");
    }

    fn context(&self) -> Context<'_> {
        Context {
            model: &self.model,
            processor: &self.processor,
            grammars: &self.grammars,
            eos: &self.eos,
            chunk: self.chunk,
        }
    }

    /// One pass of the vision tower: the next chunk of request `first`, and the next chunks of
    /// other requests that are encoding while they fit in the step's visual tokens (a quarter of
    /// the prefill chunk: a visual token is four patch rows through the tower), so that windows
    /// of several cameras are encoded together. If the pass fails, each chunk is encoded alone,
    /// so that only a request whose own chunk fails fails.
    fn vision_step(&mut self, running: &mut Vec<Sequence>, first: usize) {
        let budget = (self.chunk / 4).max(1);
        let mut members: Vec<Chunk> = Vec::new();
        let mut used = 0;
        let order = std::iter::once(first).chain((0..running.len()).filter(|&j| j != first));
        for j in order {
            let s = &mut running[j];
            if !s.encoding() || (!members.is_empty() && used + s.next_pair_tokens() > budget) {
                continue;
            }
            if let Some((data, grids)) = s.vision_chunk(budget.saturating_sub(used).max(1)) {
                let chunk = Chunk { seq: j, data, grids };
                used += chunk.tokens();
                members.push(chunk);
            }
            if used >= budget {
                break;
            }
        }
        let t = std::time::Instant::now();
        // (request, its visual tokens, its features)
        let mut outcomes: Vec<(usize, usize, Result<VisionOutput, Error>)> = Vec::new();
        let together = if members.len() == 1 {
            None
        } else {
            let data: Vec<f32> = members.iter().flat_map(|m| m.data.iter().copied()).collect();
            let grids: Vec<[usize; 3]> = members.iter().flat_map(|m| m.grids.iter().copied()).collect();
            Some(self.encode(data, &grids).and_then(|out| split(&out, &members)))
        };
        match together {
            Some(Ok(parts)) => {
                outcomes.extend(members.iter().zip(parts).map(|(m, part)| (m.seq, m.tokens(), Ok(part))));
            }
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(error = %e, chunks = members.len(), "a batched vision pass failed; encoding its chunks alone");
                }
                for m in members {
                    let n = m.tokens();
                    outcomes.push((m.seq, n, self.encode(m.data, &m.grids)));
                }
            }
        }
        // The pass's time, shared by visual tokens.
        let took = ms(t.elapsed());
        let total = used.max(1) as f64;
        let mut failed = Vec::new();
        {
            let cx = self.context();
            for (j, n, out) in outcomes {
                let share = took * n as f64 / total;
                if let Err(e) = out.and_then(|out| guard(|| running[j].vision_done(out, share, &cx))) {
                    failed.push((j, e));
                }
            }
        }
        self.stats.vision_cache_bytes.store(self.vision_cache.bytes() as u64, Ordering::Relaxed);
        failed.sort_by_key(|(j, _)| std::cmp::Reverse(*j));
        for (j, e) in failed {
            let seq = running.remove(j);
            self.fail(seq, e, running);
        }
    }

    /// Encodes rows through the reuse cache, counting what it reused; a failure (or a panic)
    /// clears the cache, which it may have left half-updated.
    fn encode(&mut self, data: Vec<f32>, grids: &[[usize; 3]]) -> Result<VisionOutput, Error> {
        let (model, cache) = (&self.model, &mut self.vision_cache);
        match guard(|| Ok(cache.encode(&model.vision, model.device(), data, grids)?)) {
            Ok((out, count)) => {
                self.stats.vision_passes.fetch_add(1, Ordering::Relaxed);
                self.stats.vision_reused.fetch_add(count.hits as u64, Ordering::Relaxed);
                self.stats.vision_encoded.fetch_add(count.misses as u64, Ordering::Relaxed);
                Ok(out)
            }
            Err(e) => {
                self.vision_cache.clear();
                Err(e)
            }
        }
    }

    /// Bytes of KV cache a request reserves: its prompt plus `max_tokens`.
    fn kv_need(&self, prompt: &Prompt, max_tokens: usize) -> usize {
        (prompt.ids.len() + max_tokens).saturating_mul(self.model.kv_bytes_per_token())
    }

    /// Prepares a new request's prompt and queues it for admission, or fails it at once.
    fn intake(&self, job: Job, waiting: &mut Waiting<(Job, Prompt)>) {
        if job.events.is_closed() {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return; // cancelled while queued
        }
        match guard(|| self.check(&job)) {
            Ok((prompt, kv_bytes)) => {
                let s = &job.request.schedule;
                let (source, priority) = (s.source.clone(), s.priority);
                waiting.push(Pending { item: (job, prompt), source, priority, kv_bytes });
            }
            Err(error) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "request refused");
                let _ = job.events.send(EngineEvent::Failed { error });
            }
        }
    }

    /// The request's prompt and the KV bytes it reserves, if its videos match their grids and it
    /// can ever fit the KV budget.
    fn check(&self, job: &Job) -> Result<(Prompt, usize), Error> {
        let request = &job.request;
        for v in &request.videos {
            let rows: usize = v.grid_thw.iter().product();
            if v.pixel_values.len() != rows * 1536 {
                return Err(Error::Input(format!(
                    "a video has {} pixel values but its grid {:?} needs {}",
                    v.pixel_values.len(),
                    v.grid_thw,
                    rows * 1536
                )));
            }
        }
        let metas: Vec<VideoMeta> = request
            .videos
            .iter()
            .map(|v| VideoMeta { grid_thw: v.grid_thw, timestamps: v.timestamps.clone() })
            .collect();
        let prompt = self.processor.prepare(&request.messages, &metas)?;
        let max_tokens = request.generation.max_tokens;
        let need = self.kv_need(&prompt, max_tokens);
        if need > self.kv_budget {
            let mib = |b: usize| b.div_ceil(1 << 20);
            return Err(Error::Input(format!(
                "this request needs {} MiB of KV cache ({} prompt tokens + max_tokens {max_tokens}) but the \
                 engine's budget is {} MiB: lower max_tokens, the window's fps or max_pixels (fewer visual \
                 tokens), or raise --kv-cache-mb",
                mib(need),
                prompt.ids.len(),
                mib(self.kv_budget)
            )));
        }
        Ok((prompt, need))
    }

    /// Which admitted request gets this step's vision or prefill chunk: one passed over too
    /// often, else interactive before background and then the one with the least work left (a
    /// live window's first token is not stuck behind a long clip).
    fn pick(running: &mut [Sequence]) -> Option<usize> {
        let preparing = || running.iter().enumerate().filter(|(_, s)| !s.decoding());
        let starved = preparing()
            .filter(|(_, s)| s.passed_over >= PASSED_OVER)
            .max_by_key(|(i, s)| (s.passed_over, std::cmp::Reverse(*i)));
        let chosen = match starved {
            Some((i, _)) => i,
            None => {
                let best = preparing().map(|(_, s)| s.priority).min()?;
                preparing()
                    .filter(|(_, s)| s.priority == best)
                    .min_by_key(|(i, s)| (s.work_left(), *i))
                    .map(|(i, _)| i)?
            }
        };
        for (i, s) in running.iter_mut().enumerate().filter(|(_, s)| !s.decoding()) {
            s.passed_over = if i == chosen { 0 } else { s.passed_over + 1 };
        }
        Some(chosen)
    }

    /// Samples a token for every decoding request, then feeds those that go on through the
    /// model together; the finished leave with their `Done`.
    fn decode_step(&mut self, running: &mut Vec<Sequence>) {
        let mut ended: Vec<(usize, Result<(), Error>)> = Vec::new();
        {
            let cx = self.context();
            for (i, s) in running.iter_mut().enumerate().filter(|(_, s)| s.decoding()) {
                match guard(|| s.sample(&cx)) {
                    Ok(Next::Feed(..)) => {}
                    Ok(Next::Done) => ended.push((i, Ok(()))),
                    Err(e) => ended.push((i, Err(e))),
                }
            }
        }
        let fed: Vec<usize> = (0..running.len()).filter(|&i| running[i].feed.is_some()).collect();
        if !fed.is_empty() {
            let failed = self.forward(running, &fed);
            ended.extend(failed.into_iter().map(|(i, e)| (i, Err(e))));
        }
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, outcome) in ended {
            let seq = running.remove(i);
            match outcome {
                Ok(()) => self.complete(seq, running),
                Err(e) => self.fail(seq, e, running),
            }
        }
        self.publish(running);
    }

    /// One batched forward of the fed tokens; if it fails, each request is run alone so that
    /// only the ones that fail alone fail. Returns those, with their errors.
    fn forward(&self, running: &mut [Sequence], fed: &[usize]) -> Vec<(usize, Error)> {
        let lens: Vec<usize> = fed.iter().map(|&i| running[i].cache.len()).collect();
        let (tokens, positions): (Vec<u32>, Vec<i64>) = fed.iter().filter_map(|&i| running[i].feed).unzip();
        let t = std::time::Instant::now();
        let batched = guard(|| {
            let mut caches: Vec<&mut KvCache> =
                running.iter_mut().filter(|s| s.feed.is_some()).map(|s| &mut s.cache).collect();
            let logits = self.model.decode_batch(&tokens, &positions, &mut caches)?;
            Ok(logits.to_vec2::<f32>()?)
        });
        self.stats.decode_micros.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.stats.decode_tokens.fetch_add(fed.len() as u64, Ordering::Relaxed);
        match batched {
            Ok(rows) if rows.len() == fed.len() => {
                for (&i, row) in fed.iter().zip(rows) {
                    running[i].set_logits(row);
                }
                Vec::new()
            }
            outcome => {
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, rows = fed.len(), "a batched decode step failed; running its rows alone");
                }
                let mut failed = Vec::new();
                for (&i, &len) in fed.iter().zip(&lens) {
                    let s = &mut running[i];
                    s.cache.truncate(len);
                    let (t, p) = s.feed.unwrap_or_default();
                    match guard(|| Ok(self.model.decode(t, p, &mut s.cache)?.to_vec1::<f32>()?)) {
                        Ok(row) => s.set_logits(row),
                        Err(e) => failed.push((i, e)),
                    }
                }
                failed
            }
        }
    }

    /// Sends a finished request's last events (the gauges first say it has left).
    fn complete(&self, seq: Sequence, running: &[Sequence]) {
        let events = seq.events.clone();
        match guard(|| seq.finish()) {
            Ok(last) => {
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                self.publish(running);
                for ev in last {
                    let _ = events.send(ev);
                }
            }
            Err(e) => self.fail_events(&events, e, running),
        }
    }

    fn fail(&self, seq: Sequence, error: Error, running: &[Sequence]) {
        let events = seq.events.clone();
        drop(seq);
        self.fail_events(&events, error, running);
    }

    fn fail_events(
        &self,
        events: &tokio::sync::mpsc::UnboundedSender<EngineEvent>,
        error: Error,
        running: &[Sequence],
    ) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.publish(running);
        tracing::warn!(%error, "request failed");
        let _ = events.send(EngineEvent::Failed { error });
    }

    /// The gauges: requests running and KV cache allocated.
    fn publish(&self, running: &[Sequence]) {
        self.stats.running.store(running.len() as u64, Ordering::Relaxed);
        let kv: usize = running.iter().map(|s| s.cache.bytes()).sum();
        self.stats.kv_cache_bytes.store(kv as u64, Ordering::Relaxed);
    }
}
