//! The server's running watches: started here, found here by id, stopped together at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use protocol::{EndReason, WatchState};
use tokio::sync::watch;

use super::{
    Analyzer, Observer, Shared, Sources, Stop, Subscription, Task, Totals, WatchHandle, WatchOptions, WatchSpec,
};

struct Entry {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    watches: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    sources: Arc<dyn Sources>,
    options: WatchOptions,
    totals: Arc<Totals>,
}

/// The running watches (cheap to clone).
#[derive(Clone)]
pub(crate) struct Watches(Arc<Inner>);

impl Watches {
    /// A registry whose watches open sources with `sources`.
    pub(crate) fn new(sources: Arc<dyn Sources>, options: WatchOptions) -> Self {
        Watches(Arc::new(Inner {
            watches: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            sources,
            options,
            totals: Arc::default(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.0.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters over every watch so far.
    pub(crate) fn totals(&self) -> &Totals {
        &self.0.totals
    }

    /// Starts a watch of `spec` analysed by `analyzer`, telling `observer` of each finished
    /// window. The returned handle owns it (dropping the handle stops it with `on_drop`); the
    /// subscription, made before the watch runs, sees every one of its events.
    pub(crate) fn start(
        &self,
        spec: WatchSpec,
        analyzer: Arc<dyn Analyzer>,
        on_drop: Stop,
        observer: Option<Arc<dyn Observer>>,
    ) -> (WatchHandle, Subscription) {
        let id = format!("s{}", self.0.next_id.fetch_add(1, Ordering::Relaxed));
        let (stop, stop_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            id: id.clone(),
            source: spec.source.clone(),
            monitor: spec.monitor.clone(),
            model: analyzer.model(),
            prompt: Mutex::new(spec.prompt.clone()),
            state: Mutex::new(WatchState::Starting),
            hub: Arc::default(),
            progress: Arc::default(),
            windows: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            stop,
            packets: super::evidence_ring(&spec),
        });
        let subscription = shared.hub.subscribe();
        let task = Task {
            shared: shared.clone(),
            spec,
            analyzer,
            sources: self.0.sources.clone(),
            options: self.0.options.clone(),
            totals: self.0.totals.clone(),
            observer,
        };
        // Registered before it runs, so that its removal at the end cannot come first.
        self.lock().insert(id.clone(), Entry { shared: shared.clone(), task: None });
        let registry = self.clone();
        let handle = super::spawn(task, stop_rx);
        let done = tokio::spawn({
            let id = id.clone();
            async move {
                if let Err(e) = handle.await {
                    tracing::error!(watch = %id, error = %e, "a watch task failed");
                }
                registry.lock().remove(&id);
            }
        });
        if let Some(e) = self.lock().get_mut(&id) {
            e.task = Some(done);
        }
        (WatchHandle { shared, on_drop }, subscription)
    }

    /// A running watch.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Shared>> {
        self.lock().get(id).map(|e| e.shared.clone())
    }

    /// Every running watch, oldest first.
    pub(crate) fn list(&self) -> Vec<protocol::WatchInfo> {
        let mut all: Vec<(u64, protocol::WatchInfo)> = self
            .lock()
            .values()
            .map(|e| (e.shared.id.trim_start_matches('s').parse().unwrap_or(0), e.shared.info()))
            .collect();
        all.sort_by_key(|(n, _)| *n);
        all.into_iter().map(|(_, w)| w).collect()
    }

    /// Running watches.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Stops every watch and waits until each has ended (server shutdown).
    pub(crate) async fn shutdown(&self) {
        let entries: Vec<(Arc<Shared>, Option<tokio::task::JoinHandle<()>>)> =
            self.lock().values_mut().map(|e| (e.shared.clone(), e.task.take())).collect();
        for (shared, _) in &entries {
            shared.stop(Stop::new(EndReason::Shutdown, "the server is shutting down"));
        }
        for (_, task) in entries {
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }
}
