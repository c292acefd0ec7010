//! Watches: one source's whole pipeline, owned by the server and followed by any number of
//! clients.
//!
//! ```text
//!  source (Sources::open) ──> FrameRing ──> window thread ──> Mailbox ──> watch task ──> Hub ──> subscribers
//!  replay thread, or          (overwrites   (resize once,     (one slot,   (engine, prompt,  (bounded,
//!  RTSP task + decode thread,  the oldest)   cut windows)      newest wins)  status, events)   lag reported)
//!  or a WHIP decode thread
//! ```
//!
//! - [`Watches::start`] checks the request ([`WatchSpec`]), registers the watch and spawns its
//!   task, which opens the source through [`Sources`] (a trait, so tests replace it with a
//!   synthetic source), starts the window thread, waits for the first frame, then analyses each
//!   window with the [`Analyzer`] (the engine, or a fake in unit tests) and publishes every event
//!   to the watch's [`hub::Hub`].
//! - Every thread and task of a watch holds a receiver of the watch's one
//!   [`base::shutdown`] channel. When the watch stops (its owner lets go, a client sends `stop`,
//!   the source ends, the server shuts down) the task signals it, closes the ring, and joins them
//!   all before it publishes `ended` with a typed [`EndReason`].
//! - Time (first-frame deadline, status cadence) is tokio time, so tests can pause the clock.

#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod hub;
mod registry;
#[cfg(test)]
mod tests;
pub(crate) mod windows;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base::shutdown;
use futures_util::future::BoxFuture;
use inference::EngineEvent;
use ingest::live::SourceEvent;
use ingest::replay::Admit;
use ingest::ring::{FrameRing, RingEnd};
use protocol::{EndReason, ErrorCode, ServerMessage, Source, SourceInfo, WatchState, WindowSettings};
use sampler::stream::{WindowPlan, WindowPolicy};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

pub(crate) use hub::Subscription;
pub(crate) use registry::Watches;

/// A request's events; dropping the receiver cancels the request.
pub(crate) type Events = tokio::sync::mpsc::UnboundedReceiver<EngineEvent>;

type SubmitFn = Box<dyn FnOnce(inference::Request) -> Result<Events, inference::Error> + Send>;

/// A place in the analyzer's queue: what is submitted with it is queued at once.
pub(crate) struct Reservation(SubmitFn);

impl Reservation {
    /// A reservation that submits with `f`.
    pub(crate) fn new(f: impl FnOnce(inference::Request) -> Result<Events, inference::Error> + Send + 'static) -> Self {
        Reservation(Box::new(f))
    }

    /// Queues `request` in this place.
    pub(crate) fn submit(self, request: inference::Request) -> Result<Events, inference::Error> {
        (self.0)(request)
    }
}

/// What analyses windows: the engine, or a fake in unit tests.
pub(crate) trait Analyzer: Send + Sync + 'static {
    /// The model's name.
    fn model(&self) -> String;
    /// Waits for a place in the queue; waiters are served first come, first served.
    fn reserve(&self) -> BoxFuture<'_, Result<Reservation, inference::Error>>;
    /// Compiles an answer shape, or says what is wrong with it (CPU work: not on the runtime).
    fn check_answer(&self, spec: &inference::answer::AnswerSpec) -> Result<(), String>;
}

impl Analyzer for inference::Engine {
    fn model(&self) -> String {
        crate::server::model_id(&self.info().model)
    }

    fn reserve(&self) -> BoxFuture<'_, Result<Reservation, inference::Error>> {
        Box::pin(async move {
            let slot = inference::Engine::reserve(self).await?;
            let engine = self.clone();
            Ok(Reservation::new(move |request| engine.submit_in(slot, request)))
        })
    }

    fn check_answer(&self, spec: &inference::answer::AnswerSpec) -> Result<(), String> {
        inference::Engine::check_answer(self, spec).map_err(|e| match e {
            inference::Error::Input(m) => m,
            other => other.to_string(),
        })
    }
}

/// Checks a request's answer shape on a blocking thread (compiling a JSON schema can take
/// milliseconds); the error names `field` (where the request gave the shape) and says what to
/// change. Every API checks shapes here.
pub(crate) async fn check_answer(
    analyzer: &Arc<dyn Analyzer>,
    params: &inference::GenerationParams,
    field: &str,
) -> Result<(), String> {
    let Some(spec) = params.answer.clone() else { return Ok(()) };
    let a = analyzer.clone();
    tokio::task::spawn_blocking(move || a.check_answer(&spec))
        .await
        .map_err(|e| format!("checking the answer format failed: {e}"))?
        .map_err(|e| format!("{field}: {e}"))
}

/// What a source is opened into.
pub(crate) struct Feed {
    /// Where decoded frames go.
    pub(crate) ring: Arc<FrameRing>,
    /// Which frames the windows sample (decided from stream time alone).
    pub(crate) admit: Admit,
    /// The watch's shutdown; every thread or task the source starts holds a clone.
    pub(crate) stop: shutdown::Receiver,
    /// Where a live source also keeps its recent encoded frames (a monitor's evidence clips).
    pub(crate) packets: Option<Arc<ingest::evidence::PacketRing>>,
}

/// An opened source.
pub(crate) struct Opened {
    /// What it is; `None` for live sources until their first frame (see `events`).
    pub(crate) info: Option<SourceInfo>,
    /// Live sources' events (first frame, reconnects).
    pub(crate) events: Option<mpsc::Receiver<SourceEvent>>,
    /// Whatever must live as long as the watch (a fetched file, a WHIP attachment); dropped
    /// when the watch ends, after its threads were joined.
    pub(crate) hold: Option<Box<dyn Send>>,
}

/// Why a source could not be opened.
#[derive(Debug, Clone)]
pub(crate) struct SourceError {
    /// Class.
    pub(crate) code: ErrorCode,
    /// What happened, for people.
    pub(crate) message: String,
}

/// Opens sources (the server's real ones, or synthetic ones in tests).
pub(crate) trait Sources: Send + Sync + 'static {
    /// Starts `source` feeding `feed.ring`; `name` names its threads.
    fn open<'a>(&'a self, name: &'a str, source: &'a Source, feed: Feed) -> BoxFuture<'a, Result<Opened, SourceError>>;
}

/// A checked watch request.
#[derive(Debug, Clone)]
pub(crate) struct WatchSpec {
    /// The source.
    pub(crate) source: Source,
    /// The standing prompt.
    pub(crate) prompt: String,
    /// How windows are cut.
    pub(crate) plan: WindowPlan,
    /// How each window's answer is generated.
    pub(crate) generation: inference::GenerationParams,
    /// The monitor this watch runs, if any.
    pub(crate) monitor: Option<String>,
}

/// Encoded frames a monitored camera keeps for evidence clips: at most this many bytes...
const EVIDENCE_BYTES: usize = 16 << 20;
/// ...and this much stream time (pre-roll plus the confirming windows).
const EVIDENCE_SPAN: std::time::Duration = std::time::Duration::from_secs(60);

/// The packet ring of a watch that keeps evidence: monitors of live cameras.
pub(crate) fn evidence_ring(spec: &WatchSpec) -> Option<Arc<ingest::evidence::PacketRing>> {
    (spec.monitor.is_some() && matches!(spec.source, Source::Rtsp { .. }))
        .then(|| Arc::new(ingest::evidence::PacketRing::new(EVIDENCE_BYTES, EVIDENCE_SPAN)))
}

/// The stream-mode window policy of wire settings: every missing field takes the one default.
pub(crate) fn window_policy(w: &WindowSettings) -> WindowPolicy {
    let d = WindowPolicy::DEFAULT;
    WindowPolicy {
        window_s: w.seconds.unwrap_or(d.window_s),
        // A window without a stride follows on from the previous one.
        stride_s: w.stride_seconds.or(w.seconds).unwrap_or(d.stride_s),
        fps: w.fps.unwrap_or(d.fps),
        min_pixels: w.min_pixels.or(d.min_pixels),
        max_pixels: w.max_pixels.or(d.max_pixels),
    }
}

impl WatchSpec {
    /// Checks a request; the error says what to change.
    pub(crate) fn new(
        source: Source,
        prompt: String,
        window: &WindowSettings,
        generation: inference::GenerationParams,
    ) -> Result<Self, String> {
        let plan = WindowPlan::new(&window_policy(window)).map_err(|e| e.to_string())?;
        generation.sampling.validate()?;
        Ok(WatchSpec { source, prompt, plan, generation, monitor: None })
    }
}

/// Settings every watch of a server shares.
#[derive(Debug, Clone)]
pub(crate) struct WatchOptions {
    /// Longest wait for a live source's first frame.
    pub(crate) first_frame_timeout: Duration,
    /// Between status events (the first comes after a quarter of it).
    pub(crate) status_every: Duration,
    /// Longest wait for a stopping watch's threads and tasks.
    pub(crate) join_timeout: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            first_frame_timeout: Duration::from_secs(20),
            status_every: Duration::from_secs(1),
            join_timeout: Duration::from_secs(10),
        }
    }
}

/// A window that was analysed to the end, for whoever keeps history.
#[derive(Debug, Clone)]
pub(crate) struct WindowRecord {
    /// Window id within the watch.
    pub(crate) window: u64,
    /// Stream time of its first frame.
    pub(crate) start_s: f64,
    /// Stream time of its last frame.
    pub(crate) end_s: f64,
    /// Wall-clock time of its first frame, ms since the epoch.
    pub(crate) started_ms: i64,
    /// The prompt it was asked.
    pub(crate) prompt: String,
    /// The answer.
    pub(crate) text: String,
    /// `stop` or `length`.
    pub(crate) finish_reason: String,
    /// Token counts.
    pub(crate) usage: protocol::Usage,
    /// Timings.
    pub(crate) timings: protocol::Timings,
    /// Its last frame, resized: `(width, height, rgb)`.
    pub(crate) thumbnail: (u32, u32, Vec<u8>),
}

/// Told of every finished window (it must not block: queue and return).
pub(crate) trait Observer: Send + Sync + 'static {
    /// A window was analysed to the end.
    fn window_done(&self, record: WindowRecord);
}

/// Why a watch is asked to stop.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stop {
    pub(crate) reason: EndReason,
    pub(crate) message: String,
}

impl Stop {
    pub(crate) fn new(reason: EndReason, message: impl Into<String>) -> Self {
        Stop { reason, message: message.into() }
    }
}

/// Server-wide counters of every watch (for `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct Totals {
    /// Windows the engine analysed to the end.
    pub(crate) windows: AtomicU64,
    /// Windows dropped because the model fell behind.
    pub(crate) skipped: AtomicU64,
    /// Windows the engine refused (its queue was full) or failed.
    pub(crate) refused: AtomicU64,
    /// Tokens generated.
    pub(crate) tokens: AtomicU64,
    /// Latency histograms of the windows analysed.
    pub(crate) latency: crate::server::metrics::Latency,
}

/// What the registry, the owner and the watch's task share.
pub(crate) struct Shared {
    pub(crate) id: String,
    source: Source,
    monitor: Option<String>,
    model: String,
    prompt: Mutex<String>,
    state: Mutex<WatchState>,
    pub(crate) hub: Arc<hub::Hub>,
    pub(crate) progress: Arc<windows::Progress>,
    windows: AtomicU64,
    skipped: AtomicU64,
    stop: watch::Sender<Option<Stop>>,
    /// A monitored live source's recent encoded frames.
    pub(crate) packets: Option<Arc<ingest::evidence::PacketRing>>,
}

impl Shared {
    /// Asks the watch to stop (the first reason given wins).
    pub(crate) fn stop(&self, stop: Stop) {
        self.stop.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(stop);
                true
            } else {
                false
            }
        });
    }

    /// The standing prompt.
    pub(crate) fn prompt(&self) -> String {
        self.prompt.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the standing prompt from the next window on.
    pub(crate) fn set_prompt(&self, text: String) {
        *self.prompt.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    fn set_state(&self, s: WatchState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The newest frame while the watch runs; none once it has ended (its state changes before
    /// `ended` is published, while the registry forgets it only after its task returns).
    pub(crate) fn live_frame(&self) -> Option<ingest::Frame> {
        let state = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(state, WatchState::Ended | WatchState::Failed) { None } else { self.progress.latest() }
    }

    /// What `subscribe` answers first.
    pub(crate) fn subscribed(&self) -> ServerMessage {
        ServerMessage::Subscribed {
            watch: self.id.clone(),
            monitor: self.monitor.clone(),
            model: self.model.clone(),
            source: self.hub.info(),
            prompt: self.prompt(),
        }
    }

    /// The listing of `GET /v1/watches`.
    pub(crate) fn info(&self) -> protocol::WatchInfo {
        protocol::WatchInfo {
            id: self.id.clone(),
            monitor: self.monitor.clone(),
            source: self.source.redacted(),
            prompt: self.prompt(),
            state: *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            info: self.hub.info(),
            subscribers: self.hub.subscribers(),
            windows: self.windows.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

/// The owner's hold on a watch. Dropping it stops the watch with the reason given at start
/// (unless another was given first).
pub(crate) struct WatchHandle {
    shared: Arc<Shared>,
    on_drop: Stop,
}

impl WatchHandle {
    /// The watch.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops the watch.
    pub(crate) fn stop(&self, stop: Stop) {
        self.shared.stop(stop);
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.shared.stop(self.on_drop.clone());
    }
}

/// Everything the watch's task needs.
struct Task {
    shared: Arc<Shared>,
    spec: WatchSpec,
    analyzer: Arc<dyn Analyzer>,
    sources: Arc<dyn Sources>,
    options: WatchOptions,
    totals: Arc<Totals>,
    observer: Option<Arc<dyn Observer>>,
}

fn error(code: ErrorCode, message: impl Into<String>, fatal: bool) -> ServerMessage {
    ServerMessage::Error { code, message: message.into(), fatal }
}

impl Task {
    /// Runs the watch to its end, joins its stages, publishes `ended`.
    async fn run(self, mut stop_rx: watch::Receiver<Option<Stop>>) {
        let (stages, stage_rx) = shutdown::channel();
        let ring = FrameRing::new(self.spec.plan.frames() * 2 + 4);
        let mut hold = None;
        let end = self.drive(&ring, stage_rx, &mut stop_rx, &mut hold).await;
        // Stop every stage, whoever started it, and wait for all of them.
        ring.close(RingEnd::Stopped);
        if tokio::time::timeout(self.options.join_timeout, stages.join()).await.is_err() {
            tracing::warn!(timeout = ?self.options.join_timeout, "a stage of the watch did not stop in time");
        }
        drop(hold);
        self.shared.set_state(if end.reason == EndReason::SourceFailed {
            WatchState::Failed
        } else {
            WatchState::Ended
        });
        tracing::info!(reason = %end.reason, message = %end.message, "watch ended");
        self.shared.hub.publish(ServerMessage::Ended { reason: end.reason, message: end.message });
    }

    /// The watch's phases: open the source, wait for its first frame, analyse windows.
    async fn drive(
        &self,
        ring: &Arc<FrameRing>,
        stage_rx: shutdown::Receiver,
        stop_rx: &mut watch::Receiver<Option<Stop>>,
        hold: &mut Option<Box<dyn Send>>,
    ) -> Stop {
        let shared = &self.shared;
        let mut cadence = self.spec.plan.cadence();
        let admit: Admit = Box::new(move |t| cadence.observe(t.as_secs_f64()) == sampler::stream::Admission::Admit);
        let feed = Feed { ring: ring.clone(), admit, stop: stage_rx.clone(), packets: shared.packets.clone() };
        // 1. Open the source.
        let opened = tokio::select! {
            biased;
            s = stopped(stop_rx) => return s,
            r = self.sources.open(&shared.id, &self.spec.source, feed) => r,
        };
        let mut opened = match opened {
            Ok(o) => o,
            Err(e) => {
                shared.hub.publish(error(e.code, &e.message, true));
                let reason =
                    if e.code == ErrorCode::BadRequest { EndReason::Rejected } else { EndReason::SourceFailed };
                return Stop::new(reason, e.message);
            }
        };
        *hold = opened.hold.take();
        let mailbox = Arc::new(windows::Mailbox::default());
        if let Err(e) =
            windows::spawn(&shared.id, ring.clone(), self.spec.plan, mailbox.clone(), shared.progress.clone(), stage_rx)
        {
            let message = format!("cannot start the window thread: {e}");
            shared.hub.publish(error(ErrorCode::Internal, &message, true));
            return Stop::new(EndReason::SourceFailed, message);
        }
        // 2. A live source says what it is with its first frame.
        let info = match opened.info.take() {
            Some(info) => info,
            None => match self.first_frame(&mut opened.events, &mailbox, stop_rx).await {
                Ok(info) => info,
                Err(stop) => return stop,
            },
        };
        shared.hub.publish(ServerMessage::Ready {
            session: shared.id.clone(),
            model: self.analyzer.model(),
            source: info,
        });
        shared.set_state(WatchState::Running);
        // 3. Windows, live events and status until the end.
        self.analyse(ring, &mut opened.events, &mailbox, stop_rx).await
    }

    async fn first_frame(
        &self,
        events: &mut Option<mpsc::Receiver<SourceEvent>>,
        mailbox: &windows::Mailbox,
        stop_rx: &mut watch::Receiver<Option<Stop>>,
    ) -> Result<SourceInfo, Stop> {
        let timeout = self.options.first_frame_timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut last_error = None;
        let failed = |message: String| {
            self.shared.hub.publish(error(ErrorCode::Source, &message, true));
            Stop::new(EndReason::SourceFailed, message)
        };
        loop {
            tokio::select! {
                biased;
                s = stopped(stop_rx) => return Err(s),
                ev = next_event(events) => match ev {
                    Some(SourceEvent::Started { width, height, codec, fps }) => {
                        return Ok(SourceInfo { width, height, fps, codec });
                    }
                    Some(SourceEvent::Reconnecting { error, .. }) => last_error = Some(error),
                    Some(SourceEvent::Resumed { .. }) => {}
                    // The source closes the ring before it lets go of its events; the window
                    // stage reports how it ended.
                    None => *events = None,
                },
                _ = mailbox.changed() => {
                    if let (_, Some(end)) = mailbox.take() {
                        return Err(failed(match end.end {
                            RingEnd::Failed(e) => e,
                            _ => "the source ended before its first frame".to_owned(),
                        }));
                    }
                    mailbox.poke();
                }
                _ = &mut deadline => {
                    let why = last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
                    return Err(failed(format!("no video arrived within {timeout:?}{why}")));
                }
            }
        }
    }

    async fn analyse(
        &self,
        ring: &FrameRing,
        events: &mut Option<mpsc::Receiver<SourceEvent>>,
        mailbox: &windows::Mailbox,
        stop_rx: &mut watch::Receiver<Option<Stop>>,
    ) -> Stop {
        let shared = &self.shared;
        let every = self.options.status_every;
        let mut status = tokio::time::interval_at(tokio::time::Instant::now() + every / 4, every);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_arrived = (0u64, tokio::time::Instant::now());
        let mut reported_skips = 0u64;
        let mut last_window_end_ms = 0u64;
        loop {
            tokio::select! {
                biased;
                s = stopped(stop_rx) => return s,
                _ = mailbox.changed() => {
                    let (pending, end) = mailbox.take();
                    let skipped = mailbox.skipped();
                    if skipped > reported_skips {
                        let n = skipped - reported_skips;
                        reported_skips = skipped;
                        self.totals.skipped.fetch_add(n, Ordering::Relaxed);
                        shared.skipped.store(skipped, Ordering::Relaxed);
                        shared.hub.publish(ServerMessage::Skipped {
                            windows: n,
                            reason: "the model fell behind; the newest window wins".into(),
                        });
                    }
                    if let Some(w) = pending {
                        // When the window was cut (a newer one taken instead was cut about now).
                        let (mut cut, first) = (std::time::Instant::now(), w.index);
                        let (w, reservation) = match self.reserve(w, mailbox, stop_rx).await {
                            Ok(Some(r)) => r,
                            Ok(None) => continue,
                            Err(s) => return s,
                        };
                        if w.index != first {
                            cut = std::time::Instant::now();
                        }
                        last_window_end_ms = (w.end_s * 1000.0) as u64;
                        if let Some(s) = self.window(w, reservation, cut, stop_rx).await {
                            return s;
                        }
                        // A window may have arrived while this one ran.
                        mailbox.poke();
                    } else if let Some(end) = end {
                        return match end.end {
                            RingEnd::EndOfStream => {
                                let message = match end.nothing_because {
                                    Some(why) => format!("end of stream; nothing was analysed: {why}"),
                                    None => "end of stream".to_owned(),
                                };
                                Stop::new(EndReason::EndOfStream, message)
                            }
                            RingEnd::Stopped => Stop::new(EndReason::Stopped, "the source was stopped"),
                            RingEnd::Failed(e) => {
                                shared.hub.publish(error(ErrorCode::Source, &e, true));
                                Stop::new(EndReason::SourceFailed, e)
                            }
                        };
                    }
                }
                Some(ev) = next_event(events) => match ev {
                    SourceEvent::Started { .. } => {}
                    SourceEvent::Reconnecting { attempt, error, retry_in } => {
                        shared.set_state(WatchState::Reconnecting);
                        shared.hub.publish(ServerMessage::Reconnecting { attempt, error, retry_in_ms: retry_in.as_millis() as u64 });
                    }
                    SourceEvent::Resumed { from, to } => {
                        shared.set_state(WatchState::Running);
                        shared.hub.publish(ServerMessage::Resumed { from_s: from.as_secs_f64(), to_s: to.as_secs_f64() });
                    }
                },
                _ = status.tick() => {
                    let arrived = ring.arrived();
                    let now = tokio::time::Instant::now();
                    let dt = (now - last_arrived.1).as_secs_f64().max(1e-3);
                    let ingest_fps = (arrived - last_arrived.0) as f64 / dt;
                    last_arrived = (arrived, now);
                    let p = &shared.progress;
                    let frames_dropped = ring.overwritten() + ring.lost_upstream() + p.missed.load(Ordering::Relaxed);
                    let lag_ms = p.last_frame_ms.load(Ordering::Relaxed).saturating_sub(last_window_end_ms) as f64;
                    shared.hub.publish(ServerMessage::Status { ingest_fps, frames_dropped, lag_ms });
                }
            }
        }
    }

    /// Waits for a place in the engine's queue for window `w`. A window cut meanwhile replaces it
    /// (the newest wins; the replaced one is counted as skipped). `Err` if the watch must stop;
    /// `Ok(None)` if the engine refused.
    async fn reserve(
        &self,
        w: sampler::stream::StreamWindow,
        mailbox: &windows::Mailbox,
        stop_rx: &mut watch::Receiver<Option<Stop>>,
    ) -> Result<Option<(sampler::stream::StreamWindow, Reservation)>, Stop> {
        let reservation = tokio::select! {
            biased;
            s = stopped(stop_rx) => return Err(s),
            r = self.analyzer.reserve() => r,
        };
        let reservation = match reservation {
            Ok(r) => r,
            Err(e) => {
                self.totals.refused.fetch_add(1, Ordering::Relaxed);
                self.shared.hub.publish(error(ErrorCode::Overloaded, e.to_string(), false));
                return Ok(None);
            }
        };
        Ok(Some((mailbox.take_newer().unwrap_or(w), reservation)))
    }

    /// Analyses one window, publishing its events. Returns `Some` if the watch must stop.
    async fn window(
        &self,
        w: sampler::stream::StreamWindow,
        reservation: Reservation,
        cut: std::time::Instant,
        stop_rx: &mut watch::Receiver<Option<Stop>>,
    ) -> Option<Stop> {
        let shared = &self.shared;
        let frames = w.frame_ids.len();
        // The window's first frame was shown this long before its last one arrived (now).
        let started_ms = crate::store::now_ms() - ((w.end_s - w.start_s).max(0.0) * 1000.0) as i64;
        let prompt = shared.prompt();
        shared.hub.publish(ServerMessage::Window {
            id: w.index,
            start_s: w.start_s,
            end_s: w.end_s,
            frames,
            grid_thw: w.clip.grid_thw,
        });
        let request = inference::Request {
            messages: vec![inference::processor::Message::user_video(&prompt)],
            videos: vec![inference::VideoInput {
                pixel_values: w.clip.pixel_values,
                grid_thw: w.clip.grid_thw,
                timestamps: w.clip.timestamps,
            }],
            generation: self.spec.generation.clone(),
            // A monitor's windows are background work, taking turns with other cameras; a
            // session somebody started is interactive.
            schedule: match &shared.monitor {
                Some(m) => inference::Schedule::background(format!("monitor:{m}")),
                None => inference::Schedule::interactive(format!("watch:{}", shared.id)),
            },
        };
        let shape = (w.clip.grid_thw[2] as u32 * 16, w.clip.grid_thw[1] as u32 * 16);
        let thumbnail = (shape.0, shape.1, w.last_rgb);
        let mut events = match reservation.submit(request) {
            Ok(rx) => rx,
            Err(e) => {
                self.totals.refused.fetch_add(1, Ordering::Relaxed);
                shared.hub.publish(error(ErrorCode::Overloaded, e.to_string(), false));
                return None;
            }
        };
        loop {
            let ev = tokio::select! {
                biased;
                // Dropping `events` cancels the request.
                s = stopped(stop_rx) => return Some(s),
                ev = events.recv() => ev,
            };
            let Some(ev) = ev else {
                // The engine dropped the request without an end (its thread died mid-window):
                // the window ends with an error and the watch goes on with the next one.
                self.totals.refused.fetch_add(1, Ordering::Relaxed);
                shared.hub.publish(error(
                    ErrorCode::Model,
                    format!("the model stopped answering window {} before its end", w.index),
                    false,
                ));
                return None;
            };
            match ev {
                EngineEvent::Queued | EngineEvent::Captured { .. } => {}
                EngineEvent::Token { text } => shared.hub.publish(ServerMessage::Token { window: w.index, text }),
                EngineEvent::Decided(d) => {
                    shared.hub.publish(ServerMessage::Decided { window: w.index, path: d.path, value: d.value });
                }
                EngineEvent::Done { finish_reason, text, usage, timings, answer, .. } => {
                    self.totals.windows.fetch_add(1, Ordering::Relaxed);
                    self.totals.tokens.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                    shared.windows.fetch_add(1, Ordering::Relaxed);
                    let (usage, timings) = (crate::server::wire_usage(usage), crate::server::wire_timings(timings));
                    self.totals.latency.observe(&timings, usage.completion_tokens, cut.elapsed().as_secs_f64());
                    if let Some(o) = &self.observer {
                        o.window_done(WindowRecord {
                            window: w.index,
                            start_s: w.start_s,
                            end_s: w.end_s,
                            started_ms,
                            prompt,
                            text: text.clone(),
                            finish_reason: finish_reason.as_str().into(),
                            usage,
                            timings,
                            thumbnail,
                        });
                    }
                    shared.hub.publish(ServerMessage::WindowDone {
                        window: w.index,
                        text,
                        finish_reason: finish_reason.as_str().into(),
                        usage,
                        timings,
                        answer: answer.map(crate::server::wire_answer),
                    });
                    return None;
                }
                EngineEvent::Failed { error: e } => {
                    self.totals.refused.fetch_add(1, Ordering::Relaxed);
                    shared.hub.publish(error(ErrorCode::Model, e.to_string(), false));
                    return None;
                }
            }
        }
    }
}

/// Resolves when the watch is asked to stop; a dropped sender (it never is while the shared
/// state lives) counts as a shutdown.
async fn stopped(rx: &mut watch::Receiver<Option<Stop>>) -> Stop {
    match rx.wait_for(Option::is_some).await {
        Ok(s) => s.clone().unwrap_or_else(|| Stop::new(EndReason::Shutdown, "the server is shutting down")),
        Err(_) => Stop::new(EndReason::Shutdown, "the server is shutting down"),
    }
}

/// The next live event, or never for sources without events.
async fn next_event(events: &mut Option<mpsc::Receiver<SourceEvent>>) -> Option<SourceEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Spawns the task of a registered watch.
fn spawn(task: Task, stop_rx: watch::Receiver<Option<Stop>>) -> tokio::task::JoinHandle<()> {
    let span = tracing::info_span!("watch", id = %task.shared.id);
    tokio::spawn(task.run(stop_rx).instrument(span))
}
