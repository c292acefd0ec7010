//! The outbox worker: delivers queued notifications from the store, at least once, in order per
//! incident and target, with exponential backoff between attempts. Webhook POSTs run on
//! blocking threads (ureq), each with a timeout; at most [`IN_FLIGHT`] at a time.
//!
//! A webhook is signed when its target has a secret: `X-Lookout-Signature: sha256=<hex>` is the
//! HMAC-SHA256 of the exact body under the secret. `X-Lookout-Delivery` carries the delivery id
//! (also in the body), which stays the same across retries: receivers drop duplicates by it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hmac::{Hmac, Mac};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::mqtt::Mqtt;
use crate::alerts::{AlertOptions, AlertStats};
use crate::store::{Attempt, DeliveryRow, Store, now_ms};

/// Deliveries attempted at once.
const IN_FLIGHT: usize = 8;
/// Longest idle wait between looks at the store.
const IDLE: Duration = Duration::from_secs(5);

/// A finished attempt: the delivery, and `Err((why, permanent))` when it failed.
type Tried = (DeliveryRow, Result<(), (String, bool)>);

/// The worker's handle.
#[derive(Clone)]
pub(crate) struct Outbox {
    wake: Arc<Notify>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// The signature header's value for `body` under `secret`.
pub(crate) fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One POST (blocking). `Err((why, permanent))`.
fn post(d: &DeliveryRow, options: &AlertOptions) -> Result<(), (String, bool)> {
    let parsed = url::Url::parse(&d.delivery.url).map_err(|e| (format!("invalid url: {e}"), true))?;
    let addr = crate::server::rest::checked_address(&parsed, options.allow_private).map_err(|e| match e {
        crate::server::rest::AddressError::Refused(m) => {
            (format!("{m}; start the server with --allow-private-webhooks to send to it"), true)
        }
        crate::server::rest::AddressError::Unresolved(m) => (m, false),
    })?;
    let agent =
        ureq::AgentBuilder::new().redirects(0).timeout(options.timeout).resolver(move |_: &str| Ok(vec![addr])).build();
    let mut req = agent
        .post(&d.delivery.url)
        .set("Content-Type", "application/json")
        .set("User-Agent", concat!("lookout/", env!("CARGO_PKG_VERSION")))
        .set("X-Lookout-Delivery", &d.delivery.id)
        .set("X-Lookout-Event", &d.delivery.event);
    if let Some(secret) = &d.delivery.secret {
        req = req.set("X-Lookout-Signature", &signature(secret, d.delivery.body.as_bytes()));
    }
    match req.send_string(&d.delivery.body) {
        Ok(r) if (200..300).contains(&r.status()) => Ok(()),
        Ok(r) => Err((format!("the receiver answered HTTP {} (a redirect is not followed)", r.status()), false)),
        // 410 Gone: the receiver says never again.
        Err(ureq::Error::Status(410, _)) => Err(("the receiver answered HTTP 410 Gone".into(), true)),
        Err(ureq::Error::Status(code, _)) => Err((format!("the receiver answered HTTP {code}"), false)),
        // The transport error names the host and the cause, never the body or the secret.
        Err(ureq::Error::Transport(t)) => Err((format!("cannot reach the receiver: {}", t.kind()), false)),
    }
}

impl Outbox {
    /// Starts the worker.
    pub(crate) fn start(store: Store, options: AlertOptions, mqtt: Option<Mqtt>, stats: Arc<AlertStats>) -> Outbox {
        let wake = Arc::new(Notify::new());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let worker = Worker { store, options, mqtt, stats, wake: wake.clone(), stopped };
        let task = tokio::spawn(worker.run());
        Outbox { wake, stop, task: Arc::new(std::sync::Mutex::new(Some(task))) }
    }

    /// Something was queued.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Finishes the attempts in flight (bounded) and stops.
    pub(crate) async fn shutdown(&self) {
        self.stop.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

struct Worker {
    store: Store,
    options: AlertOptions,
    mqtt: Option<Mqtt>,
    stats: Arc<AlertStats>,
    wake: Arc<Notify>,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Worker {
    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(20));
        self.options.retry_initial.saturating_mul(factor).min(self.options.retry_max)
    }

    async fn attempt(
        d: DeliveryRow,
        options: AlertOptions,
        mqtt: Option<Mqtt>,
    ) -> (DeliveryRow, Result<(), (String, bool)>) {
        let r = match d.delivery.kind.as_str() {
            "webhook" => {
                let row = d.clone();
                tokio::task::spawn_blocking(move || post(&row, &options))
                    .await
                    .unwrap_or_else(|e| Err((format!("the attempt failed: {e}"), false)))
            }
            "mqtt" => match mqtt {
                Some(m) => m
                    .publish_acked(&d.delivery.url, d.delivery.body.clone().into_bytes(), options.timeout)
                    .await
                    .map_err(|e| (e, false)),
                None => Err(("the server has no --mqtt-url now".into(), true)),
            },
            other => Err((format!("unknown delivery kind {other:?}"), true)),
        };
        (d, r)
    }

    async fn run(mut self) {
        let mut running: JoinSet<Tried> = JoinSet::new();
        let mut in_flight: HashSet<i64> = HashSet::new();
        loop {
            let stopping = *self.stopped.borrow();
            if !stopping && running.len() < IN_FLIGHT {
                match self.store.due_deliveries(now_ms(), (IN_FLIGHT * 2) as u32).await {
                    Ok(due) => {
                        for d in due {
                            if running.len() >= IN_FLIGHT {
                                break;
                            }
                            if in_flight.insert(d.seq) {
                                running.spawn(Self::attempt(d, self.options.clone(), self.mqtt.clone()));
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the outbox"),
                }
            }
            if stopping && running.is_empty() {
                return;
            }
            let wait = match self.store.next_due().await {
                Ok(Some(at)) => Duration::from_millis((at - now_ms()).clamp(0, IDLE.as_millis() as i64) as u64),
                _ => IDLE,
            };
            // Nothing to start: sleep until the next is due, something is queued or finishes.
            let wait = if running.len() >= IN_FLIGHT || wait.is_zero() && !running.is_empty() { IDLE } else { wait };
            tokio::select! {
                done = running.join_next(), if !running.is_empty() => {
                    if let Some(Ok((d, result))) = done {
                        in_flight.remove(&d.seq);
                        self.finish(d, result).await;
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.stopped.changed() => {}
            }
        }
    }

    async fn finish(&self, d: DeliveryRow, result: Result<(), (String, bool)>) {
        let attempts = d.attempts + 1;
        let attempt = match result {
            Ok(()) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(delivery = %d.delivery.id, event = %d.delivery.event, kind = %d.delivery.kind, attempts, "delivered");
                Attempt::Delivered
            }
            Err((why, permanent)) => {
                self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                if permanent || attempts >= self.options.attempts {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(delivery = %d.delivery.id, kind = %d.delivery.kind, attempts, error = %why, "delivery failed for good");
                    Attempt::Failed(why)
                } else {
                    let wait = self.backoff(attempts);
                    tracing::info!(delivery = %d.delivery.id, kind = %d.delivery.kind, attempts, error = %why, retry_in = ?wait, "delivery failed; retrying");
                    Attempt::Retry(why, now_ms() + wait.as_millis() as i64)
                }
            }
        };
        if let Err(e) = self.store.record_attempt(d.seq, &attempt).await {
            tracing::warn!(delivery = %d.delivery.id, error = %e, "cannot record a delivery attempt");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let body = b"what do ya want for nothing?";
        assert_eq!(
            super::signature("Jefe", body),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
