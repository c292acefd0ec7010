//! Monitors: stored watch definitions the server runs whenever they are enabled, across
//! restarts, whether or not anyone is looking, keeping a searchable history.
//!
//! - The store ([`crate::store`]) holds each monitor's settings; [`Monitors::start_all`] starts
//!   the enabled ones when the server starts (once the model has loaded).
//! - Each monitor has a task that runs a watch of its settings and follows it: the watch's
//!   events go to the monitor's own hub, which outlives the watch, so a viewer subscribed to the
//!   monitor stays subscribed while the watch restarts (new settings, a failed source retried
//!   with backoff). The task learns of changes through a `watch` channel of the desired
//!   settings: a new prompt goes to the running watch (from its next window), other changes
//!   restart it, `enabled: false` pauses it, deletion ends it and its viewers.
//! - Every finished window becomes an event: the watch's [`Observer`] queues it (bounded, never
//!   blocking the watch) to the history writer, which encodes the thumbnail on a blocking
//!   thread and stores both.
//! - A retention task prunes each monitor's history to its limits in the background.

mod history;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use protocol::{EndReason, ErrorCode, MonitorCounters, Retention, ServerMessage, WatchState};
use tokio::sync::watch;

use crate::alerts::evidence::{Evidence, FileClip};
use crate::alerts::{Alerts, MonitorAlerts};
use crate::store::{MonitorRow, Store, StoreError};
use crate::watch::hub::{Hub, Subscription};
use crate::watch::{Analyzer, Stop, WatchSpec, Watches};

pub(crate) use history::{History, jpeg};

/// Gives the analyzer once the model has loaded (or why it never will).
pub(crate) trait Models: Send + Sync + 'static {
    /// Waits for the model.
    fn ready(&self) -> BoxFuture<'_, Result<Arc<dyn Analyzer>, String>>;
}

/// Settings every monitor shares.
#[derive(Debug, Clone)]
pub(crate) struct MonitorOptions {
    /// History limits of monitors that set none.
    pub(crate) retention: Retention,
    /// Between retention passes.
    pub(crate) retention_every: Duration,
    /// First wait before a failed source is tried again; doubled up to `retry_max`.
    pub(crate) retry_initial: Duration,
    /// Longest wait between tries.
    pub(crate) retry_max: Duration,
}

impl Default for MonitorOptions {
    fn default() -> Self {
        MonitorOptions {
            retention: Retention { days: Some(30), max_events: Some(100_000) },
            retention_every: Duration::from_secs(60),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// What a monitor's task should do.
#[derive(Debug, Clone, PartialEq)]
enum Desired {
    /// Run these settings (or stay paused when they say so).
    Run(Box<MonitorRow>),
    /// The monitor was deleted: end its viewers.
    Deleted,
    /// Another node runs it now (or none may, while the database is away): end its viewers here.
    Moved(String),
    /// The server is stopping.
    Shutdown,
}

/// A running monitor's live state.
pub(crate) struct Status {
    state: Mutex<(WatchState, Option<String>)>,
    /// The watch running it now.
    watch: Mutex<Option<Arc<crate::watch::Shared>>>,
    /// Its events, across watch restarts.
    pub(crate) hub: Arc<Hub>,
    windows: AtomicU64,
    skipped: AtomicU64,
    failures: AtomicU64,
    model: Mutex<String>,
    /// The open incident.
    incident: Mutex<Option<String>>,
}

impl Status {
    fn new() -> Self {
        Status {
            state: Mutex::new((WatchState::Starting, None)),
            watch: Mutex::new(None),
            hub: Arc::default(),
            windows: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            model: Mutex::new(String::new()),
            incident: Mutex::new(None),
        }
    }

    fn set(&self, state: WatchState, reason: Option<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (state, reason);
    }

    /// State and reason.
    pub(crate) fn state(&self) -> (WatchState, Option<String>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The running watch's id.
    pub(crate) fn watch_id(&self) -> Option<String> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|w| w.id.clone())
    }

    fn set_watch(&self, w: Option<Arc<crate::watch::Shared>>) {
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = w;
    }

    /// Counters (events from the store).
    pub(crate) fn counters(&self, events: u64) -> MonitorCounters {
        MonitorCounters {
            windows: self.windows.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            events,
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// The open incident's id.
    pub(crate) fn open_incident(&self) -> Option<String> {
        self.incident.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_incident(&self, id: Option<String>) {
        *self.incident.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// The running watch's prompt.
    pub(crate) fn watch_prompt(&self) -> Option<String> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|w| w.prompt())
    }

    /// The newest frame the monitor's watch analysed.
    pub(crate) fn latest_frame(&self) -> Option<ingest::Frame> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|w| w.progress.latest())
    }

    /// What `subscribe` answers first.
    pub(crate) fn subscribed(&self, monitor: &str, prompt: String) -> ServerMessage {
        ServerMessage::Subscribed {
            watch: self.watch_id().unwrap_or_default(),
            monitor: Some(monitor.to_owned()),
            model: self.model.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            source: self.hub.info(),
            prompt,
        }
    }
}

/// A monitor's evidence: its watch's newest frame, and clips from its camera's packet ring or
/// its uploaded file.
struct MonitorEvidence {
    status: Arc<Status>,
    file: Option<FileClip>,
}

impl Evidence for MonitorEvidence {
    fn frame(&self) -> Option<ingest::Frame> {
        self.status.latest_frame()
    }

    fn clip(&self, from_s: f64, to_s: f64, out: &std::path::Path) -> Result<usize, String> {
        if let Some(f) = &self.file {
            return f.cut(from_s, to_s, out);
        }
        let packets =
            self.status.watch.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|w| w.packets.clone());
        match packets {
            Some(p) => crate::alerts::evidence::live_clip(&p, from_s, to_s, out),
            None => Err("this source keeps no encoded video".into()),
        }
    }
}

struct Running {
    desired: watch::Sender<Desired>,
    status: Arc<Status>,
    task: tokio::task::JoinHandle<()>,
    /// The settings' version it runs (with several nodes, a change made through another node is
    /// noticed by this).
    updated_ms: i64,
}

struct Inner {
    store: Store,
    watches: Watches,
    models: Arc<dyn Models>,
    options: MonitorOptions,
    history: History,
    alerts: Alerts,
    running: Mutex<HashMap<String, Running>>,
    /// With several nodes, the lease loop decides which monitors run here; this wakes it (a
    /// monitor created or enabled through this node is claimed at once, not at the next beat).
    cluster: Option<Arc<tokio::sync::Notify>>,
}

/// The monitors of a node (cheap to clone).
#[derive(Clone)]
pub(crate) struct Monitors(Arc<Inner>);

impl Monitors {
    /// Monitors stored in `store`, run as watches of `watches` once `models` is ready.
    pub(crate) fn new(
        store: Store,
        watches: Watches,
        models: Arc<dyn Models>,
        options: MonitorOptions,
        alerts: Alerts,
    ) -> Self {
        // Several nodes share the store: leases decide what runs here.
        let cluster = store.is_shared().then(Arc::default);
        let history = History::start(store.clone());
        Monitors(Arc::new(Inner {
            store,
            watches,
            models,
            options,
            history,
            alerts,
            running: Mutex::new(HashMap::new()),
            cluster,
        }))
    }

    /// What wakes the lease loop, with several nodes.
    pub(crate) fn cluster_wake(&self) -> Option<&Arc<tokio::sync::Notify>> {
        self.0.cluster.as_ref()
    }

    /// The alerts.
    pub(crate) fn alerts(&self) -> &Alerts {
        &self.0.alerts
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.0.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        &self.0.store
    }

    /// Settings every monitor shares.
    pub(crate) fn options(&self) -> &MonitorOptions {
        &self.0.options
    }

    /// The history writer's counters.
    pub(crate) fn history(&self) -> &History {
        &self.0.history
    }

    /// Starts the task of every stored monitor (with several nodes: none; the lease loop starts
    /// those this node claims), and the retention task.
    pub(crate) async fn start_all(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        if self.0.cluster.is_none() {
            let rows = self.0.store.monitors().await?;
            n = rows.len();
            for row in rows {
                self.spawn(row);
            }
        }
        let me = self.clone();
        tokio::spawn(async move { me.retention_loop().await });
        Ok(n)
    }

    /// Stores and starts a new monitor (with several nodes: whichever node claims it).
    pub(crate) async fn create(&self, row: MonitorRow) -> Result<(), StoreError> {
        self.0.store.create_monitor(&row).await?;
        match &self.0.cluster {
            Some(wake) => wake.notify_one(),
            None => self.spawn(row),
        }
        Ok(())
    }

    /// Stores new settings and tells the monitor's task; false if there is no such monitor.
    /// (With several nodes, the node running it elsewhere notices the change at its next beat.)
    pub(crate) async fn update(&self, row: MonitorRow) -> Result<bool, StoreError> {
        if !self.0.store.update_monitor(&row).await? {
            return Ok(false);
        }
        if let Some(r) = self.lock().get_mut(&row.id) {
            r.updated_ms = row.updated_ms;
            r.desired.send_replace(Desired::Run(Box::new(row)));
        }
        if let Some(wake) = &self.0.cluster {
            wake.notify_one();
        }
        Ok(true)
    }

    /// Gives a running monitor's task settings changed (through another node) since it started
    /// (nothing when they are the version it runs).
    pub(crate) fn refresh(&self, row: MonitorRow) {
        if let Some(r) = self.lock().get_mut(&row.id)
            && r.updated_ms != row.updated_ms
        {
            r.updated_ms = row.updated_ms;
            r.desired.send_replace(Desired::Run(Box::new(row)));
        }
    }

    /// Starts a monitor's task on this node (the lease loop, once it holds the lease).
    pub(crate) fn run_here(&self, row: MonitorRow) {
        if !self.lock().contains_key(&row.id) {
            self.spawn(row);
        }
    }

    /// Stops a monitor's task on this node and waits for it (its watch's threads joined, and
    /// with `flush` its last windows stored): before its lease is given up, so that two nodes
    /// never run it at once. Its viewers here are told `why`.
    pub(crate) async fn stop_here(&self, id: &str, why: &str, flush: bool) {
        let running = self.lock().remove(id);
        if let Some(r) = running {
            r.desired.send_replace(Desired::Moved(why.to_owned()));
            let _ = r.task.await;
            self.0.alerts.forget(id);
            // Its last windows are stored while the lease is still held.
            if flush {
                self.0.history.flush().await;
            }
            tracing::info!(monitor = %id, why, "monitor stopped on this node");
        }
    }

    /// The monitors with a task on this node, and their live state.
    pub(crate) fn running(&self) -> Vec<(String, Arc<Status>)> {
        let mut all: Vec<_> = self.lock().iter().map(|(id, r)| (id.clone(), r.status.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Stops a monitor (its viewers get `ended {deleted}`) and deletes it with its history.
    pub(crate) async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.end_deleted(id).await;
        self.0.store.delete_monitor(id).await
    }

    /// Ends a deleted monitor's task here (its viewers get `ended {deleted}`); with several
    /// nodes, also what the node running a monitor deleted through another does.
    pub(crate) async fn end_deleted(&self, id: &str) {
        let running = self.lock().remove(id);
        if let Some(r) = running {
            r.desired.send_replace(Desired::Deleted);
            let _ = r.task.await;
            tracing::info!(monitor = %id, why = "deleted", "monitor stopped on this node");
        }
        self.0.alerts.forget(id);
    }

    /// Monitors with a task on this node (every stored one, on one node).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// A monitor's live state.
    pub(crate) fn status(&self, id: &str) -> Option<Arc<Status>> {
        self.lock().get(id).map(|r| r.status.clone())
    }

    /// Follows a monitor: its events from now on, across watch restarts.
    pub(crate) fn subscribe(&self, id: &str) -> Option<(Subscription, Arc<Status>)> {
        let status = self.status(id)?;
        Some((status.hub.subscribe(), status))
    }

    /// Stops every monitor's task (server shutdown); their watches end with them.
    pub(crate) async fn shutdown(&self) {
        let all: Vec<Running> = self.lock().drain().map(|(_, r)| r).collect();
        for r in &all {
            r.desired.send_replace(Desired::Shutdown);
        }
        for r in all {
            let _ = r.task.await;
        }
        self.0.history.flush().await;
        self.0.alerts.shutdown().await;
    }

    fn spawn(&self, row: MonitorRow) {
        let id = row.id.clone();
        let updated_ms = row.updated_ms;
        let (desired, rx) = watch::channel(Desired::Run(Box::new(row)));
        let status = Arc::new(Status::new());
        let run =
            MonitorTask { id: id.clone(), monitors: self.clone(), status: status.clone(), desired: rx, alerts: None };
        let span = tracing::info_span!("monitor", id = %id);
        tracing::info!(monitor = %id, "monitor started on this node");
        let task = tokio::spawn(tracing::Instrument::instrument(run.run(), span));
        self.lock().insert(id, Running { desired, status, task, updated_ms });
    }

    async fn retention_loop(&self) {
        let mut every = tokio::time::interval(self.0.options.retention_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(e) = self.prune_all().await {
                tracing::warn!(error = %e, "retention pass failed");
            }
            // The same pass keeps the write-ahead log short (see `Store::checkpoint`).
            match self.0.store.checkpoint().await {
                Ok(true) => tracing::debug!("checkpoint incomplete: a reader held the log"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
            }
        }
    }

    /// One retention pass over every monitor.
    pub(crate) async fn prune_all(&self) -> Result<crate::store::Pruned, StoreError> {
        let mut total = crate::store::Pruned::default();
        for m in self.0.store.monitors().await? {
            let r = Store::effective(m.retention, self.0.options.retention);
            let older = r.days.map(|d| crate::store::now_ms() - i64::from(d) * 86_400_000);
            let p = self.0.store.prune(&m.id, older, r.max_events).await?;
            if p.events > 0 {
                tracing::info!(monitor = %m.id, events = p.events, thumbnails = p.thumbnails, "history pruned");
            }
            total.events += p.events;
            total.thumbnails += p.thumbnails;
        }
        Ok(total)
    }
}

/// How one run of a watch ended.
enum Outcome {
    /// The watch ended by itself.
    Ended(EndReason, String),
    /// New settings: run again.
    Restart,
    /// Deleted or shutting down: the monitor's task ends.
    Finish(EndReason, String),
}

/// Whether two settings differ only in what a running watch takes as it is (the prompt, from
/// its next window) or does not use (name, retention).
fn same_watch(a: &MonitorRow, b: &MonitorRow) -> bool {
    a.source == b.source && a.window == b.window && a.generation == b.generation && a.enabled == b.enabled
}

struct MonitorTask {
    id: String,
    monitors: Monitors,
    status: Arc<Status>,
    desired: watch::Receiver<Desired>,
    alerts: Option<MonitorAlerts>,
}

impl MonitorTask {
    /// Brings the alert rule up to date with `row` (starting the monitor's alerting once).
    async fn alert_settings(&mut self, row: &MonitorRow) {
        let message = match &mut self.alerts {
            Some(a) => a.set_rule(row).await,
            None => {
                let evidence = Arc::new(MonitorEvidence {
                    status: self.status.clone(),
                    file: match &row.source {
                        protocol::Source::Upload { id, looped, .. } => {
                            crate::server::upload_path(self.monitors.0.store.data_dir(), id)
                                .map(|path| FileClip { path, looped: looped.unwrap_or(false) })
                        }
                        _ => None,
                    },
                });
                match MonitorAlerts::new(self.monitors.0.alerts.clone(), row, evidence).await {
                    Ok(a) => self.alerts = Some(a),
                    Err(e) => tracing::error!(error = %e, "cannot read the monitor's incidents; its alerts are off"),
                }
                None
            }
        };
        self.after_alerts(message.into_iter().collect());
    }

    fn after_alerts(&self, messages: Vec<ServerMessage>) {
        self.status.set_incident(self.alerts.as_ref().and_then(MonitorAlerts::open_incident));
        for m in messages {
            self.status.hub.publish(m);
        }
    }

    async fn run(mut self) {
        let mut backoff = self.monitors.0.options.retry_initial;
        loop {
            let desired = self.desired.borrow_and_update().clone();
            let row = match desired {
                Desired::Run(r) => *r,
                Desired::Deleted => return self.finish(EndReason::Deleted, "the monitor was deleted"),
                Desired::Moved(why) => return self.finish(EndReason::Stopped, &why),
                Desired::Shutdown => return self.finish(EndReason::Shutdown, "the server is shutting down"),
            };
            self.alert_settings(&row).await;
            if !row.enabled {
                self.status.set(WatchState::Paused, None);
                if self.desired.changed().await.is_err() {
                    return;
                }
                continue;
            }
            self.status.set(WatchState::Starting, None);
            let analyzer = tokio::select! {
                a = self.monitors.0.models.ready() => a,
                _ = self.desired.changed() => continue,
            };
            let analyzer = match analyzer {
                Ok(a) => a,
                Err(e) => {
                    self.status.set(WatchState::Failed, Some(e));
                    if self.desired.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            *self.status.model.lock().unwrap_or_else(|e| e.into_inner()) = analyzer.model();
            let params = crate::server::generation(&row.generation, 128);
            let mut spec = match WatchSpec::new(row.source.clone(), row.prompt.clone(), &row.window, params) {
                Ok(s) => s,
                Err(e) => {
                    self.status.set(WatchState::Failed, Some(e));
                    if self.desired.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            spec.monitor = Some(self.id.clone());
            let observer = self.monitors.0.history.observer(&self.id);
            let on_drop = Stop::new(EndReason::Stopped, "the monitor stopped");
            let (handle, sub) = self.monitors.0.watches.start(spec, analyzer, on_drop, Some(observer));
            self.status.set_watch(Some(handle.shared().clone()));
            tracing::info!(watch = %handle.shared().id, "monitor running");
            let outcome = self.follow(row, &handle, sub).await;
            self.status.set_watch(None);
            match outcome {
                Outcome::Restart => backoff = self.monitors.0.options.retry_initial,
                Outcome::Finish(reason, message) => return self.finish(reason, &message),
                Outcome::Ended(EndReason::EndOfStream, message) => {
                    self.status.set(WatchState::Ended, Some(message.clone()));
                    let note = format!("{message}; the monitor is ended (PATCH it to run again)");
                    self.status.hub.publish(ServerMessage::Error {
                        code: ErrorCode::Source,
                        message: note,
                        fatal: false,
                    });
                    if self.desired.changed().await.is_err() {
                        return;
                    }
                }
                Outcome::Ended(reason, message) => {
                    // The source failed (a camera that is off, an address that does not answer):
                    // a monitor keeps trying, with backoff.
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    self.status.set(WatchState::Failed, Some(message.clone()));
                    let note = format!("{message} ({reason}); trying again in {backoff:?}");
                    tracing::warn!(%reason, %message, retry_in = ?backoff, "monitor's watch ended");
                    self.status.hub.publish(ServerMessage::Error {
                        code: ErrorCode::Source,
                        message: note,
                        fatal: false,
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        r = self.desired.changed() => if r.is_err() { return },
                    }
                    backoff = (backoff * 2).min(self.monitors.0.options.retry_max);
                }
            }
        }
    }

    /// Forwards the watch's events to the monitor's hub until the watch ends or the settings
    /// change.
    async fn follow(
        &mut self,
        mut row: MonitorRow,
        handle: &crate::watch::WatchHandle,
        mut sub: Subscription,
    ) -> Outcome {
        let mut stopping: Option<Outcome> = None;
        loop {
            tokio::select! {
                ev = sub.next() => {
                    let Some(m) = ev else { return stopping.unwrap_or(Outcome::Ended(EndReason::EndOfStream, "the watch ended".into())) };
                    match &*m {
                        ServerMessage::Ended { reason, message } => {
                            return stopping.unwrap_or_else(|| Outcome::Ended(*reason, message.clone()));
                        }
                        ServerMessage::Ready { .. } | ServerMessage::Resumed { .. } => self.status.set(WatchState::Running, None),
                        ServerMessage::Reconnecting { error, .. } => {
                            self.status.failures.fetch_add(1, Ordering::Relaxed);
                            self.status.set(WatchState::Reconnecting, Some(error.clone()));
                        }
                        ServerMessage::WindowDone { .. } => {
                            self.status.windows.fetch_add(1, Ordering::Relaxed);
                        }
                        ServerMessage::Skipped { windows, .. } => {
                            self.status.skipped.fetch_add(*windows, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    // Only the monitor's ending ends its viewers; the watch's is kept above.
                    self.status.hub.publish((*m).clone());
                    if let Some(a) = &mut self.alerts {
                        let alerts = a.observe(&m).await;
                        self.after_alerts(alerts);
                    }
                }
                changed = self.desired.changed(), if stopping.is_none() => {
                    let next = if changed.is_err() { Desired::Shutdown } else { self.desired.borrow_and_update().clone() };
                    let (stop, outcome) = match next {
                        Desired::Run(new) if same_watch(&row, &new) => {
                            if new.prompt != row.prompt {
                                handle.shared().set_prompt(new.prompt.clone());
                            }
                            self.alert_settings(&new).await;
                            row = *new;
                            continue;
                        }
                        Desired::Run(_) => (Stop::new(EndReason::Stopped, "the monitor's settings changed"), Outcome::Restart),
                        Desired::Deleted => (Stop::new(EndReason::Deleted, "the monitor was deleted"), Outcome::Finish(EndReason::Deleted, "the monitor was deleted".into())),
                        Desired::Moved(why) => (Stop::new(EndReason::Stopped, why.clone()), Outcome::Finish(EndReason::Stopped, why)),
                        Desired::Shutdown => (Stop::new(EndReason::Shutdown, "the server is shutting down"), Outcome::Finish(EndReason::Shutdown, "the server is shutting down".into())),
                    };
                    // Wait for the watch to end (its threads joined) before going on.
                    handle.stop(stop);
                    stopping = Some(outcome);
                }
            }
        }
    }

    fn finish(&self, reason: EndReason, message: &str) {
        self.status.set(WatchState::Ended, Some(message.to_owned()));
        self.status.hub.publish(ServerMessage::Ended { reason, message: message.to_owned() });
    }
}
