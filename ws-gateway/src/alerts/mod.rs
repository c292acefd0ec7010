//! Alerts: a monitor's rule decided on each window's answer while its tokens stream, incidents
//! (confirmed positives, with key frames), and notifications that are never lost.
//!
//! - [`rule`] checks a rule against the monitor's answer shape and evaluates it on the partial
//!   answer: the verdict is known the moment the tokens decide it.
//! - [`tracker`] turns verdicts into incidents (N of M confirmation, clearing, cooldown).
//! - [`MonitorAlerts`] runs in the monitor's task, fed the watch's events in order: it stores
//!   each incident change together with the notifications it causes (one transaction), and
//!   publishes `alert` messages to the monitor's viewers.
//! - Delivery is [`crate::notify`]'s: the outbox worker and the MQTT connection.

pub(crate) mod evidence;
pub(crate) mod rule;
pub(crate) mod tracker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::{AlertState, Incident, IncidentState, IncidentWindow, NotifyTarget, ServerMessage};
use serde_json::{Value, json};

use crate::notify::{mqtt, outbox};
use crate::store::{IncidentRow, IncidentWindowRow, NewDelivery, Store, StoreError, now_ms};
pub(crate) use rule::Rule;
use tracker::{Step, Tracker};

/// How notifications are delivered.
#[derive(Debug, Clone)]
pub(crate) struct AlertOptions {
    /// Attempts per delivery before it is marked failed.
    pub(crate) attempts: u32,
    /// Wait after the first failed attempt; doubled after each one, up to `retry_max`.
    pub(crate) retry_initial: Duration,
    /// Longest wait between attempts.
    pub(crate) retry_max: Duration,
    /// Per attempt.
    pub(crate) timeout: Duration,
    /// Webhooks may go to loopback, private and link-local addresses.
    pub(crate) allow_private: bool,
    /// The MQTT broker, when there is one.
    pub(crate) mqtt: Option<mqtt::MqttOptions>,
}

impl Default for AlertOptions {
    fn default() -> Self {
        AlertOptions {
            attempts: 8,
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            allow_private: false,
            mqtt: None,
        }
    }
}

/// Counters (for `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct AlertStats {
    /// Incidents opened.
    pub(crate) opened: AtomicU64,
    /// Incidents resolved.
    pub(crate) resolved: AtomicU64,
    /// Deliveries accepted by their receiver.
    pub(crate) delivered: AtomicU64,
    /// Attempts that failed.
    pub(crate) failed_attempts: AtomicU64,
    /// Deliveries given up.
    pub(crate) failed: AtomicU64,
}

struct Inner {
    store: Store,
    outbox: outbox::Outbox,
    mqtt: Option<mqtt::Mqtt>,
    stats: Arc<AlertStats>,
}

/// The alerts of a node (cheap to clone).
#[derive(Clone)]
pub(crate) struct Alerts(Arc<Inner>);

/// Windows of an incident kept in its record: the opening one and the newest ones (an incident
/// open for a day would otherwise grow without bound, and be rewritten at every window).
const MAX_WINDOWS: usize = 500;
/// Windows of the incident a notification carries (the newest; `windows_total` says how many).
const NOTIFY_WINDOWS: usize = 10;

/// RFC 3339 (UTC) with milliseconds.
pub(crate) fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| format!("{t:.3}")).unwrap_or_default()
}

/// An incident as the API (and notifications) show it.
pub(crate) fn wire_incident(i: &IncidentRow) -> Incident {
    Incident {
        id: i.id.clone(),
        monitor: i.monitor.clone(),
        state: if i.closed_ms.is_some() { IncidentState::Closed } else { IncidentState::Open },
        opened_at: rfc3339(i.opened_ms),
        closed_at: i.closed_ms.map(rfc3339),
        windows: i
            .windows
            .iter()
            .map(|w| IncidentWindow {
                window: w.window,
                start_s: w.start_s,
                end_s: w.end_s,
                decided_at: rfc3339(w.decided_ms),
                text: w.text.clone(),
            })
            .collect(),
        frames: i
            .windows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.frame.is_some())
            .map(|(n, _)| format!("/v1/incidents/{}/frames/{n}.jpg", i.id))
            .collect(),
        clip: i.clip.as_ref().map(|_| format!("/v1/incidents/{}/clip.mp4", i.id)),
    }
}

impl Alerts {
    /// Starts the outbox (and the MQTT connection, when configured).
    pub(crate) fn start(store: Store, options: AlertOptions) -> Alerts {
        let stats = Arc::new(AlertStats::default());
        let mqtt = options.mqtt.clone().map(mqtt::Mqtt::start);
        let outbox = outbox::Outbox::start(store.clone(), options.clone(), mqtt.clone(), stats.clone());
        Alerts(Arc::new(Inner { store, outbox, mqtt, stats }))
    }

    /// Counters.
    pub(crate) fn stats(&self) -> &AlertStats {
        &self.0.stats
    }

    /// The MQTT connection, when there is one.
    pub(crate) fn mqtt(&self) -> Option<&mqtt::Mqtt> {
        self.0.mqtt.as_ref()
    }

    /// Delivers what is due, then stops (server shutdown; what is left goes at the next start).
    pub(crate) async fn shutdown(&self) {
        self.0.outbox.shutdown().await;
        if let Some(m) = &self.0.mqtt {
            m.shutdown().await;
        }
    }

    /// Forgets a deleted monitor (its Home Assistant entities are removed).
    pub(crate) fn forget(&self, monitor: &str) {
        if let Some(m) = &self.0.mqtt {
            m.forget(monitor);
        }
    }
}

/// The window being analysed.
#[derive(Debug, Default)]
struct Current {
    window: u64,
    start_s: f64,
    end_s: f64,
    text: String,
    /// The verdict is known (positive, negative, or none for a cut answer).
    decided: bool,
    /// The decided value (for notifications).
    value: Option<Value>,
    /// What the verdict did.
    step: Option<Step>,
}

/// One monitor's alerting, driven by its task.
pub(crate) struct MonitorAlerts {
    alerts: Alerts,
    monitor: String,
    name: String,
    rule: Option<Rule>,
    tracker: Option<Tracker>,
    open: Option<IncidentRow>,
    current: Option<Current>,
    /// Stream times of the last windows (as many as the rule's confirmation span), oldest first.
    recent: std::collections::VecDeque<f64>,
    /// Key frames and clips.
    evidence: Arc<dyn evidence::Evidence>,
}

impl MonitorAlerts {
    /// A monitor's alerting, with its open incident (from before a restart) restored.
    pub(crate) async fn new(
        alerts: Alerts,
        row: &crate::store::MonitorRow,
        evidence: Arc<dyn evidence::Evidence>,
    ) -> Result<MonitorAlerts, StoreError> {
        let open = alerts.0.store.open_incident(&row.id).await?;
        let mut me = MonitorAlerts {
            alerts,
            monitor: row.id.clone(),
            name: row.name.clone(),
            rule: None,
            tracker: None,
            open,
            current: None,
            recent: std::collections::VecDeque::new(),
            evidence,
        };
        me.set_rule(row).await;
        if let Some(m) = &me.alerts.0.mqtt {
            m.register(&me.monitor, &me.name, me.open.as_ref().map(|i| i.id.clone()));
        }
        Ok(me)
    }

    /// The open incident's id.
    pub(crate) fn open_incident(&self) -> Option<String> {
        self.open.as_ref().map(|i| i.id.clone())
    }

    /// New settings: the rule from them (an open incident is resolved when the rule goes).
    /// Returns the `alert` message to publish, if any.
    pub(crate) async fn set_rule(&mut self, row: &crate::store::MonitorRow) -> Option<ServerMessage> {
        self.name.clone_from(&row.name);
        let rule = match &row.alert {
            Some(r) => match Rule::check(r, row.generation.answer.as_ref()) {
                Ok(rule) => Some(rule),
                Err(e) => {
                    // Checked when stored; a rule stored by an older version may not pass.
                    tracing::warn!(monitor = %self.monitor, error = %e, "the alert rule does not apply; alerts are off");
                    None
                }
            },
            None => None,
        };
        let changed = match (&self.rule, &rule) {
            (Some(a), Some(b)) => {
                a.confirm != b.confirm || a.clear_after != b.clear_after || a.cooldown_ms != b.cooldown_ms
            }
            (None, None) => false,
            _ => true,
        };
        self.rule = rule;
        if changed || self.tracker.is_none() {
            self.tracker =
                self.rule.as_ref().map(|r| Tracker::new(r.confirm, r.clear_after, r.cooldown_ms, self.open.is_some()));
        }
        if self.rule.is_none() && self.open.is_some() {
            let (window, text) = self.current.as_ref().map_or((0, String::new()), |c| (c.window, c.text.clone()));
            return self.resolve(window, text).await;
        }
        None
    }

    /// Takes one event of the monitor's watch, in order. Returns `alert` messages to publish.
    pub(crate) async fn observe(&mut self, m: &ServerMessage) -> Vec<ServerMessage> {
        let mut out = Vec::new();
        match m {
            ServerMessage::Window { id, start_s, end_s, .. } => {
                self.current = Some(Current { window: *id, start_s: *start_s, end_s: *end_s, ..Default::default() });
                let span = self.rule.as_ref().map_or(1, |r| r.confirm.1 as usize);
                self.recent.push_back(*start_s);
                while self.recent.len() > span {
                    self.recent.pop_front();
                }
            }
            ServerMessage::Token { window, text } => {
                // Without a rule there is nothing to decide until the window's whole text.
                if self.rule.is_none() {
                    return out;
                }
                let Some(c) = self.current.as_mut().filter(|c| c.window == *window) else { return out };
                c.text.push_str(text);
                if !c.decided
                    && let Some(v) = self.rule.as_ref().and_then(|r| r.on_text(&c.text))
                {
                    out.extend(self.decide(Some(v), None).await);
                }
            }
            ServerMessage::Decided { window, path, value } => {
                let Some(c) = self.current.as_ref().filter(|c| c.window == *window) else { return out };
                if !c.decided
                    && let Some(v) = self.rule.as_ref().and_then(|r| r.on_decided(path, value))
                {
                    out.extend(self.decide(Some(v), Some(value.clone())).await);
                }
            }
            ServerMessage::WindowDone { window, text, answer, .. } => {
                let Some(mut c) = self.current.take().filter(|c| c.window == *window) else { return out };
                c.text.clone_from(text);
                let decided = c.decided;
                self.current = Some(c);
                if !decided && self.rule.is_some() {
                    let v = self.rule.as_ref().and_then(|r| r.at_end(text, answer.as_ref()));
                    let value = answer.as_ref().and_then(|a| a.value.clone());
                    out.extend(self.decide(v, value).await);
                } else if matches!(self.current.as_ref().and_then(|c| c.step), Some(Step::Open | Step::Extend)) {
                    // The window that opened or extended the incident is complete: its clip (for
                    // the opening one), then its whole answer, which the notification carries.
                    if self.current.as_ref().and_then(|c| c.step) == Some(Step::Open) {
                        self.write_clip().await;
                    }
                    self.update_window_text(text).await;
                }
                if !decided && self.current.as_ref().and_then(|c| c.step) == Some(Step::Open) {
                    self.write_clip().await;
                }
                if let Some(mq) = &self.alerts.0.mqtt {
                    mq.state(&self.monitor, self.open_incident(), text);
                }
                self.current = None;
            }
            _ => {}
        }
        out
    }

    /// The current window's verdict is known.
    async fn decide(&mut self, verdict: Option<bool>, value: Option<Value>) -> Option<ServerMessage> {
        let c = self.current.as_mut()?;
        c.decided = true;
        c.value = value;
        let step = self.tracker.as_mut()?.record(verdict, now_ms());
        c.step = Some(step);
        let (window, text) = (c.window, c.text.clone());
        match step {
            Step::Nothing => None,
            Step::Open => self.open(window, text).await,
            Step::Extend => {
                let w = self.window_row().await;
                let mut incident = self.open.clone()?;
                incident.windows.push(w);
                if incident.windows.len() > MAX_WINDOWS {
                    // Keep the opening window; the oldest of the rest go, with their key frames.
                    let gone = incident.windows.remove(1);
                    if let Some(f) = gone.frame {
                        let _ = tokio::fs::remove_file(self.alerts.0.store.incident_file(&f)).await;
                    }
                }
                self.save(incident, None).await;
                None
            }
            Step::Resolve => self.resolve(window, text).await,
        }
    }

    /// The current window as an incident's window, with its key frame written.
    async fn window_row(&self) -> IncidentWindowRow {
        let c = self.current.as_ref();
        let mut row = IncidentWindowRow {
            window: c.map_or(0, |c| c.window),
            start_s: c.map_or(0.0, |c| c.start_s),
            end_s: c.map_or(0.0, |c| c.end_s),
            decided_ms: now_ms(),
            text: c.map(|c| c.text.clone()).unwrap_or_default(),
            frame: None,
        };
        if let (Some(frame), Some(incident)) = (self.evidence.frame(), self.open.as_ref().map(|i| i.id.clone())) {
            row.frame = self.write_frame(&incident, &format!("{}-{}", row.window, row.decided_ms), frame).await;
        }
        row
    }

    async fn write_frame(&self, incident: &str, key: &str, frame: ingest::Frame) -> Option<String> {
        let name = format!("{incident}/{key}.jpg");
        let path = self.alerts.0.store.incident_file(&name);
        let written = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let jpeg = crate::monitors::jpeg(&(frame.width, frame.height, frame.rgb.to_vec()))
                .ok_or("the frame does not encode")?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            }
            std::fs::write(&path, jpeg).map_err(|e| e.to_string())
        })
        .await;
        match written {
            Ok(Ok(())) => Some(name),
            Ok(Err(e)) => {
                tracing::warn!(%incident, error = %e, "cannot keep a key frame");
                None
            }
            Err(_) => None,
        }
    }

    async fn open(&mut self, window: u64, text: String) -> Option<ServerMessage> {
        let id = format!("i{}", crate::server::new_id());
        let now = now_ms();
        self.open = Some(IncidentRow {
            id: id.clone(),
            monitor: self.monitor.clone(),
            opened_ms: now,
            closed_ms: None,
            windows: vec![],
            clip: None,
        });
        let w = self.window_row().await;
        let mut incident = self.open.clone()?;
        incident.windows.push(w);
        self.alerts.0.stats.opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(monitor = %self.monitor, %incident.id, window, "incident opened");
        self.save(incident, Some("incident.opened")).await;
        if let Some(m) = &self.alerts.0.mqtt {
            m.state(&self.monitor, Some(id.clone()), &text);
        }
        Some(ServerMessage::Alert {
            monitor: self.monitor.clone(),
            incident: id,
            state: AlertState::Firing,
            window,
            text,
        })
    }

    async fn resolve(&mut self, window: u64, text: String) -> Option<ServerMessage> {
        let mut incident = self.open.clone()?;
        incident.closed_ms = Some(now_ms());
        self.alerts.0.stats.resolved.fetch_add(1, Ordering::Relaxed);
        tracing::info!(monitor = %self.monitor, %incident.id, window, "incident resolved");
        let id = incident.id.clone();
        self.save(incident, Some("incident.resolved")).await;
        self.open = None;
        if let Some(m) = &self.alerts.0.mqtt {
            m.state(&self.monitor, None, &text);
        }
        Some(ServerMessage::Alert {
            monitor: self.monitor.clone(),
            incident: id,
            state: AlertState::Resolved,
            window,
            text,
        })
    }

    /// The opening window has ended: its clip, from the first of the windows that confirmed it
    /// (with pre-roll) to its end, stored with the incident. A source without encoded frames to
    /// cut (a URL, a WHIP stream) has none.
    async fn write_clip(&mut self) {
        let Some(mut incident) = self.open.clone() else { return };
        let Some(c) = self.current.as_ref() else { return };
        let from = self.recent.iter().copied().fold(c.start_s, f64::min) - evidence::PREROLL_S;
        // The last frame's time plus about one sampling interval.
        let to = c.end_s + 0.5;
        let name = format!("{}/clip.mp4", incident.id);
        let path = self.alerts.0.store.incident_file(&name);
        let evidence = self.evidence.clone();
        let written = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            }
            evidence.clip(from, to, &path)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match written {
            Ok(frames) => {
                tracing::info!(incident = %incident.id, frames, from, to, "evidence clip written");
                incident.clip = Some(name);
                self.save(incident, None).await;
            }
            Err(e) => tracing::info!(incident = %incident.id, error = %e, "no evidence clip"),
        }
    }

    async fn update_window_text(&mut self, text: &str) {
        let Some(mut incident) = self.open.clone() else { return };
        let window = self.current.as_ref().map(|c| c.window);
        let Some(w) = incident.windows.iter_mut().rev().find(|w| Some(w.window) == window) else { return };
        // Sent even when the text did not change: each window of an incident gets exactly one
        // `incident.updated`, when its whole answer is in.
        text.clone_into(&mut w.text);
        self.save(incident, Some("incident.updated")).await;
    }

    /// Stores the incident and queues `event`'s notifications with it.
    async fn save(&mut self, incident: IncidentRow, event: Option<&str>) {
        let deliveries = match event {
            Some(event) => self.deliveries(&incident, event),
            None => Vec::new(),
        };
        if incident.closed_ms.is_none() {
            self.open = Some(incident.clone());
        }
        match self.alerts.0.store.save_incident(&incident, &deliveries).await {
            Ok(()) => {
                if !deliveries.is_empty() {
                    self.alerts.0.outbox.wake();
                }
            }
            Err(e) => tracing::error!(monitor = %self.monitor, error = %e, "cannot store an incident"),
        }
    }

    fn deliveries(&self, incident: &IncidentRow, event: &str) -> Vec<NewDelivery> {
        let c = self.current.as_ref();
        let mut targets: Vec<(&str, String, Option<String>)> = Vec::new();
        for NotifyTarget::Webhook(w) in self.rule.iter().flat_map(|r| &r.notify) {
            targets.push(("webhook", w.url.clone(), w.secret.clone()));
        }
        if let Some(m) = &self.alerts.0.mqtt {
            targets.push(("mqtt", m.events_topic(&self.monitor), None));
        }
        targets
            .into_iter()
            .map(|(kind, url, secret)| {
                let id = format!("d{}", crate::server::new_id());
                let mut summary = wire_incident(incident);
                let total = summary.windows.len();
                let keep = total.saturating_sub(NOTIFY_WINDOWS);
                summary.windows.drain(..keep);
                // Frame URLs end in their window's index.
                summary.frames.retain(|f| {
                    f.rsplit('/')
                        .next()
                        .and_then(|n| n.strip_suffix(".jpg")?.parse::<usize>().ok())
                        .is_some_and(|n| n >= keep)
                });
                let body = json!({
                    "delivery": id,
                    "event": event,
                    "created_at": rfc3339(now_ms()),
                    "monitor": {"id": self.monitor, "name": self.name},
                    "incident": summary,
                    "windows_total": total,
                    "window": c.map(|c| json!({
                        "window": c.window, "start_s": c.start_s, "end_s": c.end_s, "text": c.text,
                        "value": c.value,
                    })),
                });
                NewDelivery {
                    id,
                    incident: incident.id.clone(),
                    monitor: self.monitor.clone(),
                    event: event.to_owned(),
                    kind: kind.to_owned(),
                    url,
                    secret,
                    body: body.to_string(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
