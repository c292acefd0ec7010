//! MQTT (rumqttc, QoS 1): for every monitor, a retained state topic (`<prefix>/<monitor>/state`:
//! alert on or off, the open incident, the last answer) and an events topic (the outbox's
//! notifications, each acknowledged by the broker before it counts as delivered); one retained
//! availability topic (`<prefix>/availability`, `online`, with a last will of `offline`), and Home
//! Assistant MQTT discovery: each monitor appears as a binary sensor (its alert) and a sensor
//! (its last answer).
//!
//! The connection task owns the client. Publishes are matched to the broker's acknowledgements by
//! order: rumqttc sends requests in the order they are queued, and reports each QoS 1 publish's
//! packet id as it goes out. A lost connection fails the waiting publishes (the outbox retries
//! them) and a new client is made; on every connection the availability, the discovery
//! configurations and each monitor's state are published again, so the broker's retained view
//! is always current.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, Outgoing, Packet, QoS};
use serde_json::json;
use tokio::sync::oneshot;

/// Largest MQTT packet sent or taken (rumqttc's default is 10 KiB; a notification with a long
/// answer is more). Larger payloads are refused before they are queued: one message that the
/// connection cannot carry must not take the connection down with it.
const MAX_PACKET: usize = 1 << 20;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MqttOptions {
    /// Host.
    pub(crate) host: String,
    /// Port.
    pub(crate) port: u16,
    /// User and password, when the broker wants them.
    pub(crate) credentials: Option<(String, String)>,
    /// Topic prefix (`lookout`).
    pub(crate) prefix: String,
    /// Home Assistant's discovery prefix (`homeassistant`).
    pub(crate) discovery_prefix: String,
    /// Client id.
    pub(crate) client_id: String,
}

impl MqttOptions {
    /// Parses `mqtt://[user:password@]host[:port]`. The error never repeats the password.
    pub(crate) fn parse(url: &str) -> Result<MqttOptions, String> {
        const FORM: &str = "it must be mqtt://[user:password@]host[:port]";
        let u = url::Url::parse(url).map_err(|e| format!("--mqtt-url {:?}: {e}; {FORM}", protocol::redact_url(url)))?;
        if u.scheme() != "mqtt" {
            return Err(format!(
                "--mqtt-url {}: the scheme is mqtt:// (TLS is not built in; put a TLS proxy on the broker's host); {FORM}",
                protocol::redact_url(url)
            ));
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("--mqtt-url needs a host; {FORM}"))?
            .to_owned();
        let credentials = (!u.username().is_empty())
            .then(|| (percent_decode(u.username()), percent_decode(u.password().unwrap_or(""))));
        Ok(MqttOptions {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: u.port().unwrap_or(1883),
            credentials,
            prefix: "lookout".into(),
            discovery_prefix: "homeassistant".into(),
            client_id: format!("lookout-{}", std::process::id()),
        })
    }
}

/// `%XX` escapes of a URL's user or password decoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A monitor as the broker shows it.
#[derive(Debug, Clone)]
struct Known {
    name: String,
    incident: Option<String>,
    last_answer: String,
}

#[derive(Default)]
struct Shared {
    client: Option<AsyncClient>,
    /// QoS 1 publishes queued and not yet given a packet id, in order (`None`: nobody waits).
    queued: VecDeque<Option<oneshot::Sender<Result<(), String>>>>,
    /// Sent, waiting for the broker's PUBACK.
    sent: HashMap<u16, oneshot::Sender<Result<(), String>>>,
    monitors: HashMap<String, Known>,
    connected: bool,
    stopping: bool,
}

/// The MQTT connection (cheap to clone).
#[derive(Clone)]
pub(crate) struct Mqtt {
    options: Arc<MqttOptions>,
    shared: Arc<Mutex<Shared>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

fn fail_all(s: &mut Shared, why: &str) {
    for tx in s.queued.drain(..).flatten() {
        let _ = tx.send(Err(why.to_owned()));
    }
    for (_, tx) in s.sent.drain() {
        let _ = tx.send(Err(why.to_owned()));
    }
}

impl Mqtt {
    /// Connects (and keeps reconnecting) in a task of its own.
    pub(crate) fn start(options: MqttOptions) -> Mqtt {
        let m = Mqtt { options: Arc::new(options), shared: Arc::default(), task: Arc::default() };
        let task = tokio::spawn(m.clone().run());
        *m.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the broker is connected now.
    pub(crate) fn connected(&self) -> bool {
        self.lock().connected
    }

    fn topic(&self, monitor: &str, leaf: &str) -> String {
        format!("{}/{monitor}/{leaf}", self.options.prefix)
    }

    /// The topic a monitor's notifications go to.
    pub(crate) fn events_topic(&self, monitor: &str) -> String {
        self.topic(monitor, "events")
    }

    fn availability(&self) -> String {
        format!("{}/availability", self.options.prefix)
    }

    /// Queues a publish; `wait` gets the broker's acknowledgement.
    fn publish(
        s: &mut Shared,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        wait: Option<oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), String> {
        if payload.len() + topic.len() + 16 > MAX_PACKET {
            return Err(format!("the MQTT message is {} bytes, over the {MAX_PACKET}-byte limit", payload.len()));
        }
        let client = s.client.as_ref().filter(|_| s.connected).ok_or("the MQTT broker is not connected")?;
        client.try_publish(topic, QoS::AtLeastOnce, retain, payload).map_err(|e| format!("MQTT: {e}"))?;
        s.queued.push_back(wait);
        Ok(())
    }

    /// Publishes and waits for the broker to acknowledge (the outbox's MQTT deliveries).
    pub(crate) async fn publish_acked(&self, topic: &str, payload: Vec<u8>, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.lock();
            Self::publish(&mut s, topic.to_owned(), false, payload, Some(tx))?;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the MQTT connection was reset".into()),
            Err(_) => Err(format!("the MQTT broker did not acknowledge within {timeout:?}")),
        }
    }

    fn state_payload(k: &Known) -> Vec<u8> {
        json!({
            "alert": if k.incident.is_some() { "on" } else { "off" },
            "incident": k.incident,
            "last_answer": k.last_answer,
        })
        .to_string()
        .into_bytes()
    }

    fn discovery(&self, monitor: &str, k: &Known) -> [(String, Vec<u8>); 2] {
        let device = json!({"identifiers": [format!("lookout_{monitor}")], "name": k.name, "manufacturer": "Lookout"});
        let state = self.topic(monitor, "state");
        let alert = json!({
            "name": "Alert",
            "unique_id": format!("lookout_{monitor}_alert"),
            "state_topic": state,
            "value_template": "{{ value_json.alert }}",
            "payload_on": "on",
            "payload_off": "off",
            "availability_topic": self.availability(),
            "json_attributes_topic": state,
            "device": device,
        });
        let answer = json!({
            "name": "Answer",
            "unique_id": format!("lookout_{monitor}_answer"),
            "state_topic": state,
            // Home Assistant keeps at most 255 characters of a state.
            "value_template": "{{ value_json.last_answer[:255] }}",
            "availability_topic": self.availability(),
            "device": device,
        });
        let d = &self.options.discovery_prefix;
        [
            (format!("{d}/binary_sensor/lookout_{monitor}/alert/config"), alert.to_string().into_bytes()),
            (format!("{d}/sensor/lookout_{monitor}/answer/config"), answer.to_string().into_bytes()),
        ]
    }

    /// A monitor runs: announce it (now, or when the broker connects).
    pub(crate) fn register(&self, monitor: &str, name: &str, incident: Option<String>) {
        let mut s = self.lock();
        let last_answer = s.monitors.get(monitor).map(|k| k.last_answer.clone()).unwrap_or_default();
        let k = Known { name: name.to_owned(), incident, last_answer };
        s.monitors.insert(monitor.to_owned(), k.clone());
        for (topic, payload) in self.discovery(monitor, &k) {
            let _ = Self::publish(&mut s, topic, true, payload, None);
        }
        let _ = Self::publish(&mut s, self.topic(monitor, "state"), true, Self::state_payload(&k), None);
    }

    /// A monitor's alert state or last answer changed.
    pub(crate) fn state(&self, monitor: &str, incident: Option<String>, last_answer: &str) {
        let mut s = self.lock();
        let Some(k) = s.monitors.get_mut(monitor) else { return };
        k.incident = incident;
        last_answer.clone_into(&mut k.last_answer);
        let payload = Self::state_payload(k);
        // Not connected: published again on connection, from `monitors`.
        let _ = Self::publish(&mut s, self.topic(monitor, "state"), true, payload, None);
    }

    /// A monitor was deleted: its retained topics are cleared (Home Assistant removes it).
    pub(crate) fn forget(&self, monitor: &str) {
        let mut s = self.lock();
        let Some(k) = s.monitors.remove(monitor) else { return };
        for (topic, _) in self.discovery(monitor, &k) {
            let _ = Self::publish(&mut s, topic, true, Vec::new(), None);
        }
        let _ = Self::publish(&mut s, self.topic(monitor, "state"), true, Vec::new(), None);
    }

    /// Says `offline` and disconnects.
    pub(crate) async fn shutdown(&self) {
        let client = {
            let mut s = self.lock();
            s.stopping = true;
            let _ = Self::publish(&mut s, self.availability(), true, b"offline".to_vec(), None);
            s.client.clone()
        };
        if let Some(c) = client {
            // The event loop sends what is queued, then the DISCONNECT.
            let _ = c.disconnect().await;
        }
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task
            && tokio::time::timeout(Duration::from_secs(3), t).await.is_err()
        {
            tracing::debug!("the MQTT connection did not close in time");
        }
    }

    fn connect(&self) -> (AsyncClient, EventLoop) {
        let o = &self.options;
        let mut opts = rumqttc::MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        opts.set_last_will(LastWill::new(self.availability(), "offline", QoS::AtLeastOnce, true));
        if let Some((u, p)) = &o.credentials {
            opts.set_credentials(u.clone(), p.clone());
        }
        AsyncClient::new(opts, 256)
    }

    fn on_connected(&self) {
        let mut s = self.lock();
        s.connected = true;
        let _ = Self::publish(&mut s, self.availability(), true, b"online".to_vec(), None);
        let known: Vec<(String, Known)> = s.monitors.iter().map(|(id, k)| (id.clone(), k.clone())).collect();
        for (id, k) in known {
            for (topic, payload) in self.discovery(&id, &k) {
                let _ = Self::publish(&mut s, topic, true, payload, None);
            }
            let _ = Self::publish(&mut s, self.topic(&id, "state"), true, Self::state_payload(&k), None);
        }
    }

    async fn run(self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let (client, mut events) = self.connect();
            self.lock().client = Some(client);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!(host = %self.options.host, port = self.options.port, "MQTT connected");
                        backoff = Duration::from_millis(500);
                        self.on_connected();
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let mut s = self.lock();
                        if let Some(Some(tx)) = s.queued.pop_front() {
                            s.sent.insert(pkid, tx);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(tx) = self.lock().sent.remove(&ack.pkid) {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        let mut s = self.lock();
                        s.connected = false;
                        fail_all(&mut s, "the server is stopping");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let mut s = self.lock();
                        if s.connected {
                            tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                        } else {
                            tracing::debug!(error = %e, "MQTT connection failed");
                        }
                        s.connected = false;
                        s.client = None;
                        fail_all(&mut s, "the MQTT connection was lost");
                        if s.stopping {
                            return;
                        }
                        break;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_PACKET, Mqtt, MqttOptions, Shared};

    #[test]
    fn a_message_too_large_for_a_packet_is_refused_before_it_is_queued() {
        let mut s = Shared::default();
        let e = Mqtt::publish(&mut s, "lookout/m/events".into(), false, vec![b'x'; MAX_PACKET], None).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        assert!(s.queued.is_empty());
    }

    #[test]
    fn broker_urls_parse_and_errors_hide_the_password() {
        let o = MqttOptions::parse("mqtt://ha:s%40cret@broker.lan:1884").unwrap();
        assert_eq!((o.host.as_str(), o.port), ("broker.lan", 1884));
        assert_eq!(o.credentials, Some(("ha".into(), "s@cret".into())));
        assert_eq!(MqttOptions::parse("mqtt://127.0.0.1").unwrap().port, 1883);
        let e = MqttOptions::parse("mqtts://ha:topsecret@broker.lan").unwrap_err();
        assert!(e.contains("scheme is mqtt://") && !e.contains("topsecret"), "{e}");
    }
}
