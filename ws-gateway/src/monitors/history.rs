//! The history writer: finished windows of every monitor, queued by the watches' observers and
//! stored in order by one task (thumbnails encoded on a blocking thread first).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::store::{NewEvent, Store};
use crate::watch::{Observer, WindowRecord};

/// Windows that may wait for the writer. One window every few seconds per monitor is the
/// normal rate; the bound is reached only if the disk stalls, and then a window is dropped
/// (counted and logged) rather than the watch held up.
const QUEUE: usize = 256;

/// JPEG quality of thumbnails.
const QUALITY: u8 = 75;

enum Job {
    /// Store a window.
    Store {
        monitor: String,
        record: Box<WindowRecord>,
        /// When it was queued (the insert latency counts from here).
        queued: Instant,
    },
    /// Say when everything queued before is stored.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Counters of the writer (for `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct HistoryStats {
    /// Events stored.
    pub(crate) written: AtomicU64,
    /// Windows dropped: the queue was full or storing failed.
    pub(crate) dropped: AtomicU64,
    /// Sum of queue-to-stored times, microseconds.
    pub(crate) latency_us: AtomicU64,
}

/// The writer's handle.
#[derive(Clone)]
pub(crate) struct History {
    tx: mpsc::Sender<Job>,
    stats: Arc<HistoryStats>,
}

struct MonitorObserver {
    monitor: String,
    tx: mpsc::Sender<Job>,
    stats: Arc<HistoryStats>,
}

impl Observer for MonitorObserver {
    fn window_done(&self, record: WindowRecord) {
        let job = Job::Store { monitor: self.monitor.clone(), record: Box::new(record), queued: Instant::now() };
        if self.tx.try_send(job).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(monitor = %self.monitor, "the history writer is behind; a window was not stored");
        }
    }
}

/// A frame as JPEG (none when it is too large for the format).
pub(crate) fn jpeg((width, height, rgb): &(u32, u32, Vec<u8>)) -> Option<Vec<u8>> {
    let (w, h) = (u16::try_from(*width).ok()?, u16::try_from(*height).ok()?);
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, QUALITY).encode(rgb, w, h, jpeg_encoder::ColorType::Rgb).ok()?;
    Some(out)
}

impl History {
    /// Starts the writer task.
    pub(crate) fn start(store: Store) -> History {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let stats = Arc::new(HistoryStats::default());
        let s = stats.clone();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let (monitor, r, queued) = match job {
                    Job::Store { monitor, record, queued } => (monitor, record, queued),
                    Job::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                let r = *r;
                let thumbnail = r.thumbnail;
                let encoded = tokio::task::spawn_blocking(move || jpeg(&thumbnail)).await.ok().flatten();
                let event = NewEvent {
                    monitor: monitor.clone(),
                    window: r.window,
                    start_s: r.start_s,
                    end_s: r.end_s,
                    started_ms: r.started_ms,
                    prompt: r.prompt,
                    text: r.text,
                    finish_reason: r.finish_reason,
                    usage: r.usage,
                    timings: r.timings,
                };
                match store.insert_event(&event, encoded.as_deref()).await {
                    Ok(_) => {
                        s.written.fetch_add(1, Ordering::Relaxed);
                        s.latency_us.fetch_add(queued.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // A monitor deleted meanwhile has no row to refer to; anything else is
                        // worth a warning.
                        s.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%monitor, error = %e, "a window could not be stored");
                    }
                }
            }
        });
        History { tx, stats }
    }

    /// The observer a monitor's watches report to.
    pub(crate) fn observer(&self, monitor: &str) -> Arc<dyn Observer> {
        Arc::new(MonitorObserver { monitor: monitor.to_owned(), tx: self.tx.clone(), stats: self.stats.clone() })
    }

    /// Counters.
    pub(crate) fn stats(&self) -> &HistoryStats {
        &self.stats
    }

    /// Waits until everything queued so far is stored (bounded: a stalled disk does not hold
    /// up a shutdown for long).
    pub(crate) async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send(Job::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        }
    }
}
