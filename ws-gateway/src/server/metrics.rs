//! `GET /metrics`: every counter and gauge of the service, and the latency histograms of the
//! windows analysed, encoded by Prometheus' own client (`prometheus-client`, OpenMetrics text).
//!
//! The counters live where they are counted (atomics in the watches, the history writer, the
//! alerts, the engine); each scrape reads them into a collector and encodes that, so nothing is
//! registered twice and no text is formatted by hand. Histogram names follow vLLM's where they
//! mean the same (`time_to_first_token_seconds`, `time_per_output_token_seconds`,
//! `request_queue_time_seconds`, `e2e_request_latency_seconds`, with `lookout_` in front).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{ApiFailure, AppState};

/// Latency histograms of analysed windows (every watch: sessions and monitors).
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    /// Waiting for the engine.
    pub(crate) queue: Histogram,
    /// From the engine taking the window to its first token.
    pub(crate) ttft: Histogram,
    /// Decode time per output token after the first.
    pub(crate) per_token: Histogram,
    /// From the window being cut (its last frame in) to its last token.
    pub(crate) window: Histogram,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            // 5 ms to 160 s.
            queue: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            ttft: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            // 1 ms to 8 s.
            per_token: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            // 10 ms to 330 s.
            window: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
        }
    }
}

impl Latency {
    /// Records a finished window: its timings, and seconds since it was cut.
    pub(crate) fn observe(&self, t: &protocol::Timings, tokens: usize, since_cut_s: f64) {
        self.queue.observe(t.queue_ms / 1000.0);
        self.ttft.observe(t.ttft_ms / 1000.0);
        if tokens > 1 && t.decode_tok_s > 0.0 {
            self.per_token.observe(1.0 / t.decode_tok_s);
        }
        self.window.observe(since_cut_s);
    }
}

/// One value read at scrape time.
#[derive(Debug)]
enum Value {
    Counter(u64),
    Gauge(i64),
}

/// What one scrape encodes.
#[derive(Debug, Default)]
struct Scrape {
    values: Vec<(&'static str, &'static str, Value)>,
    histograms: Vec<(&'static str, &'static str, Histogram)>,
}

impl Scrape {
    /// A counter; `name` without `_total` (the encoder adds it).
    fn counter(&mut self, name: &'static str, help: &'static str, v: u64) {
        self.values.push((name, help, Value::Counter(v)));
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, v: u64) {
        self.values.push((name, help, Value::Gauge(i64::try_from(v).unwrap_or(i64::MAX))));
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, help, v) in &self.values {
            match v {
                Value::Counter(c) => {
                    let m = ConstCounter::new(*c);
                    m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
                }
                Value::Gauge(g) => {
                    let m = ConstGauge::new(*g);
                    m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
                }
            }
        }
        for (name, help, h) in &self.histograms {
            h.encode(encoder.encode_descriptor(name, help, None, h.metric_type())?)?;
        }
        Ok(())
    }
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiFailure> {
    let mut s = Scrape::default();
    let m = &state.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    s.gauge(
        "lookout_connections_active",
        "Open WebSocket connections.",
        state.connections.load(Ordering::Relaxed) as u64,
    );
    s.gauge(
        "lookout_sessions_active",
        "Watches started over WebSockets and running.",
        state.sessions.load(Ordering::Relaxed) as u64,
    );
    s.counter("lookout_sessions", "WebSocket sessions started.", load(&m.sessions));
    let w = state.watches.totals();
    s.gauge("lookout_watches_active", "Running watches.", state.watches.len() as u64);
    s.counter("lookout_windows", "Windows analysed to the end.", load(&w.windows));
    s.counter("lookout_windows_skipped", "Windows dropped because the model fell behind.", load(&w.skipped));
    s.counter("lookout_windows_refused", "Windows the engine refused (queue full) or failed.", load(&w.refused));
    s.counter("lookout_tokens", "Tokens generated.", load(&m.tokens) + load(&w.tokens));
    s.counter("lookout_uploads", "Clips uploaded.", load(&m.uploads));
    s.counter("lookout_rest_requests", "REST inference requests answered.", load(&m.requests));
    s.gauge(
        "lookout_monitors",
        "Monitors running on this node (every stored one, on one node).",
        state.monitors.len() as u64,
    );
    let a = state.monitors.alerts().stats();
    s.counter("lookout_incidents_opened", "Incidents opened by alert rules.", load(&a.opened));
    s.counter("lookout_incidents_resolved", "Incidents resolved.", load(&a.resolved));
    s.counter(
        "lookout_notifications_delivered",
        "Notifications accepted by their receiver (webhook 2xx, MQTT PUBACK).",
        load(&a.delivered),
    );
    s.counter(
        "lookout_notification_attempts_failed",
        "Notification attempts that failed (each is retried with backoff until the last).",
        load(&a.failed_attempts),
    );
    s.counter("lookout_notifications_failed", "Notifications given up after their last attempt.", load(&a.failed));
    if let Some(mqtt) = state.monitors.alerts().mqtt() {
        s.gauge("lookout_mqtt_connected", "Whether the MQTT broker is connected.", u64::from(mqtt.connected()));
    }
    if let Some(c) = state.cluster.get() {
        s.gauge(
            "lookout_database_up",
            "Whether the shared database answered this node's last lease beat (its monitors stop while it does not).",
            u64::from(c.standing().error.is_none()),
        );
    }
    let h = state.monitors.history().stats();
    s.counter("lookout_history_events_written", "History events stored.", load(&h.written));
    s.counter(
        "lookout_history_events_dropped",
        "Finished windows not stored (the writer was behind, or storing failed).",
        load(&h.dropped),
    );
    s.counter(
        "lookout_history_insert_microseconds",
        "Time from a window's end to its event stored, summed (divide by the events written).",
        load(&h.latency_us),
    );
    match state.monitors.store().disk_bytes().await {
        Ok(b) => s.gauge("lookout_history_bytes", "Disk used by the history (database and thumbnails).", b),
        Err(e) => tracing::warn!(error = %e, "cannot measure the history's disk use"),
    }
    if let Ok(engine) = state.engine() {
        let e = engine.stats();
        s.counter("lookout_engine_completed", "Engine requests completed.", load(&e.completed));
        s.counter("lookout_engine_cancelled", "Engine requests cancelled by their client.", load(&e.cancelled));
        s.counter("lookout_engine_failed", "Engine requests that failed.", load(&e.failed));
        s.counter(
            "lookout_vision_pairs_reused",
            "Frame pairs whose vision features came from the reuse cache (overlapping windows).",
            load(&e.vision_reused),
        );
        s.counter("lookout_vision_pairs_encoded", "Frame pairs the vision tower encoded.", load(&e.vision_encoded));
        s.counter(
            "lookout_vision_passes",
            "Passes through the vision tower (one pass encodes several requests' frame pairs).",
            load(&e.vision_passes),
        );
        s.gauge(
            "lookout_vision_cache_bytes",
            "Bytes of vision features the reuse cache holds.",
            load(&e.vision_cache_bytes),
        );
        s.gauge(
            "lookout_engine_requests_running",
            "Requests the engine has admitted and serves together now.",
            load(&e.running),
        );
        s.gauge("lookout_engine_requests_waiting", "Requests waiting for admission.", engine.waiting() as u64);
        s.gauge("lookout_kv_cache_bytes", "Bytes of KV cache allocated now.", load(&e.kv_cache_bytes));
        s.gauge(
            "lookout_kv_cache_budget_bytes",
            "Bytes of KV cache the running requests may take together (--kv-cache-mb, or the device's default).",
            engine.info().kv_budget_bytes as u64,
        );
        s.counter(
            "lookout_engine_decode_steps",
            "Batched decode steps (one forward for every request decoding).",
            load(&e.decode_steps),
        );
        s.counter(
            "lookout_engine_decode_tokens",
            "Tokens decoded in those steps (over the steps: the mean batch).",
            load(&e.decode_tokens),
        );
    }
    let l = &w.latency;
    s.histograms = vec![
        ("lookout_request_queue_time_seconds", "Windows' wait for the engine.", l.queue.clone()),
        (
            "lookout_time_to_first_token_seconds",
            "From the engine taking a window to its first token (vision and prefill).",
            l.ttft.clone(),
        ),
        ("lookout_time_per_output_token_seconds", "Decode time per output token.", l.per_token.clone()),
        (
            "lookout_e2e_request_latency_seconds",
            "From a window being cut (its last frame in) to its last token.",
            l.window.clone(),
        ),
    ];
    let mut registry = Registry::default();
    registry.register_collector(Box::new(s));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .map_err(|_| ApiFailure::of(protocol::ErrorCode::Internal, "the metrics could not be encoded"))?;
    Ok(([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], out))
}
