//! Alerts with real parts: the service on 127.0.0.1 with the fixture model (its answer fixed by
//! a one-option choice, so the verdict is known), a looped upload, a real HTTP receiver for the
//! webhooks, and Debian's mosquitto as the MQTT broker (started here on a free port).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use protocol::{AlertState, ClientMessage, Delivery, DeliveryList, Incident, IncidentList, Monitor, ServerMessage};
use serde_json::{Value, json};

mod common;
use common::*;

type Posts = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// An HTTP receiver on 127.0.0.1 that records every POST and answers 200.
async fn receiver() -> (String, Posts) {
    let posts: Posts = Arc::default();
    let p = posts.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let p = p.clone();
            async move {
                p.lock().unwrap().push((headers, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, posts)
}

/// Debian's mosquitto on a free port of 127.0.0.1; killed when dropped.
struct Broker {
    port: u16,
    child: Child,
}

impl Broker {
    /// A broker that is listening and still running: a port taken by someone else between
    /// choosing it and mosquitto binding it makes mosquitto exit, and another port is tried
    /// (else the test could talk to another test's broker, which goes when that test ends).
    fn start() -> Broker {
        for _ in 0..5 {
            let mut b = Broker::try_start();
            std::thread::sleep(Duration::from_millis(100));
            if b.child.try_wait().unwrap().is_none() {
                return b;
            }
        }
        panic!("mosquitto would not stay up on a free port");
    }

    fn try_start() -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("lookout-mosquitto-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")).unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut child = child;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            if child.try_wait().unwrap().is_some() {
                break; // exited (the port was taken): the caller tries another
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { port, child }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every message the broker relays under `lookout/#` and `homeassistant/#`: topic → payloads.
type Seen = Arc<Mutex<HashMap<String, Vec<(bool, Vec<u8>)>>>>;

async fn subscriber(port: u16) -> Seen {
    let seen: Seen = Arc::default();
    let mut o = rumqttc::MqttOptions::new(format!("test-{}", rand_suffix()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(o, 64);
    let s = seen.clone();
    tokio::spawn(async move {
        // Subscribed on every connection (a dropped one is made again, and the broker sends the
        // retained messages again), so a blip of the test's own client loses nothing.
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    for topic in ["lookout/#", "homeassistant/#"] {
                        let _ = client.try_subscribe(topic, rumqttc::QoS::AtLeastOnce);
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    s.lock().unwrap().entry(p.topic.clone()).or_default().push((p.retain, p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    seen
}

async fn until<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn last_json(seen: &Seen, topic: &str) -> Option<Value> {
    let s = seen.lock().unwrap();
    let (_, payload) = s.get(topic)?.last()?;
    serde_json::from_slice(payload).ok()
}

/// ffprobe's codec, frame count and duration of an MP4.
fn probe_mp4(bytes: &[u8]) -> (String, usize, f64) {
    let path = std::env::temp_dir().join(format!("lookout-clip-{}-{}.mp4", std::process::id(), rand_suffix()));
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries"])
        .arg("stream=codec_name,nb_read_frames:format=duration,format_name")
        .args(["-of", "json"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "ffprobe: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["format"]["format_name"].as_str().unwrap().contains("mp4"), "{v}");
    let s = &v["streams"][0];
    (
        s["codec_name"].as_str().unwrap().to_owned(),
        s["nb_read_frames"].as_str().unwrap().parse().unwrap(),
        v["format"]["duration"].as_str().unwrap().parse().unwrap(),
    )
}

/// Waits for an incident's clip and checks it is a playable MP4 of the source's own codec.
async fn clip_of(base: &str, incident: &str, codec: &str) -> (usize, f64) {
    let url = format!("http://{base}/v1/incidents/{incident}");
    let i: Incident = until("the clip", 30, async || {
        let (_, v) = http("GET", url.clone(), None).await;
        let i: Incident = serde_json::from_value(v).ok()?;
        i.clip.is_some().then_some(i)
    })
    .await;
    let (status, mp4) = bytes(format!("http://{base}{}", i.clip.unwrap())).await;
    assert_eq!(status, 200);
    assert_eq!(&mp4[4..8], b"ftyp", "an MP4");
    let (c, frames, duration) = probe_mp4(&mp4);
    assert_eq!(c, codec, "remuxed, not re-encoded");
    (frames, duration)
}

async fn upload_fixture(base: &str) -> String {
    let clip = std::fs::read(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let (status, body) = upload(base, clip, None).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_mid_window_and_reaches_a_webhook_and_mqtt_then_clears() {
    let broker = Broker::start();
    let seen = subscriber(broker.port).await;
    let (hook, posts) = receiver().await;
    let mut server = start_server(|c| {
        c.alerts.allow_private_webhooks = true;
        c.alerts.mqtt_url = Some(format!("mqtt://127.0.0.1:{}", broker.port));
    })
    .await;
    let base = server.base.clone();
    let upload = upload_fixture(&base).await;
    let url = format!("http://{base}/v1/monitors");
    let body = |answer: Value, alert: Value| {
        json!({
            "name": "front door", "prompt": "Is anyone at the door? Answer yes or no.",
            "source": {"kind": "upload", "id": upload, "loop": true, "speed": 2.0},
            "window": {"seconds": 1, "fps": 2, "min_pixels": 4096, "max_pixels": 16384},
            "generation": {"max_tokens": 8, "temperature": 0},
            "answer": answer, "alert": alert,
        })
    };

    // Rules that cannot apply to the answer are refused, saying why.
    let bad = [
        (json!({"choice": ["yes"]}), json!({"when": {"pointer": "/person", "equals": true}}), "needs a JSON answer"),
        (json!({"choice": ["yes"]}), json!({"when": {"equals": "maybe"}}), "not one of the choices"),
        (Value::Null, json!({"when": {"matches": "("}}), "not a valid regex"),
        (json!({"choice": ["yes"]}), json!({"when": {"equals": "yes"}, "later": 1}), "unknown field"),
    ];
    for (answer, alert, why) in bad {
        let (s, v) = http("POST", url.clone(), Some(body(answer, alert.clone()))).await;
        assert_eq!(s, 400, "{alert} → {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{alert} → {message}");
    }

    // The one-option choice fixes the model's answer: every window is positive. "yes" without
    // an end anchor matches as soon as it is streamed.
    let rule = json!({
        "when": {"matches": "yes"}, "confirm": {"windows": 2, "of": 2}, "clear_after": 2, "cooldown_s": 3600,
        "notify": [{"webhook": {"url": hook, "secret": "hook-secret"}}],
    });
    let (s, v) = http("POST", url.clone(), Some(body(json!({"choice": ["yes"]}), rule))).await;
    assert_eq!(s, 201, "{v}");
    let m: Monitor = serde_json::from_value(v.clone()).unwrap();
    assert!(!v.to_string().contains("hook-secret"), "the secret is never shown: {v}");
    assert_eq!(v["alert"]["notify"][0]["webhook"]["secret"], "***");

    let mut ws = connect(&base).await;
    send(&mut ws, &ClientMessage::Subscribe { watch: None, monitor: Some(m.id.clone()) }).await;
    let mut messages = Vec::new();
    let (incident, fired_in) = loop {
        let msg = recv(&mut ws).await;
        messages.push(msg.clone());
        if let ServerMessage::Alert { incident, state: AlertState::Firing, window, text, .. } = msg {
            assert_eq!(text, "yes", "decided by the streamed answer");
            break (incident, window);
        }
    };
    let fired_at = Instant::now();
    // The alert came before its window ended, and a window ended before it (2 of 2).
    loop {
        match recv(&mut ws).await {
            ServerMessage::WindowDone { window, .. } if window == fired_in => break,
            ServerMessage::WindowDone { window, .. } => assert!(window > fired_in, "window {window} ended late"),
            _ => {}
        }
    }
    let done_before: Vec<u64> = messages
        .iter()
        .filter_map(|m| if let ServerMessage::WindowDone { window, .. } = m { Some(*window) } else { None })
        .collect();
    assert!(!done_before.is_empty(), "one positive window alone does not confirm 2 of 2");

    // The webhook: opened, signed, then updated with the whole answer.
    let got = until("the webhooks", 30, async || {
        let p = posts.lock().unwrap();
        (p.len() >= 2).then(|| p.clone())
    })
    .await;
    let (h, b) = &got[0];
    assert_eq!(h["x-lookout-event"], "incident.opened");
    let v: Value = serde_json::from_str(b).unwrap();
    assert_eq!(v["incident"]["id"], incident.as_str());
    assert_eq!(v["monitor"]["name"], "front door");
    let sig = h["x-lookout-signature"].to_str().unwrap().strip_prefix("sha256=").unwrap().to_owned();
    assert_eq!(sig.len(), 64);
    assert!(!b.contains("hook-secret"));
    assert_eq!(got[1].0["x-lookout-event"], "incident.updated");
    println!("webhook received {:?} after the alert message", fired_at.elapsed());

    // MQTT: availability, Home Assistant discovery, retained state on, the notification.
    let state_topic = format!("lookout/{}/state", m.id);
    until("MQTT state on", 30, async || (last_json(&seen, &state_topic)?["alert"] == "on").then_some(())).await;
    {
        let s = seen.lock().unwrap();
        assert_eq!(s["lookout/availability"].last().unwrap().1, b"online");
        let alert_cfg: Value = serde_json::from_slice(
            &s[&format!("homeassistant/binary_sensor/lookout_{}/alert/config", m.id)].last().unwrap().1,
        )
        .unwrap();
        assert_eq!(alert_cfg["state_topic"], state_topic.as_str());
        assert_eq!(alert_cfg["device"]["name"], "front door");
        assert!(s.contains_key(&format!("homeassistant/sensor/lookout_{}/answer/config", m.id)));
    }
    // A client that connects later (Home Assistant after a restart) gets the state at once.
    let late = subscriber(broker.port).await;
    until("the retained state", 10, async || {
        let s = late.lock().unwrap();
        let (retained, payload) = s.get(&state_topic)?.first()?.clone();
        let v: Value = serde_json::from_slice(&payload).ok()?;
        (retained && v["alert"] == "on" && v["incident"] == incident.as_str()).then_some(())
    })
    .await;
    let events_topic = format!("lookout/{}/events", m.id);
    let first = until("the MQTT event", 30, async || last_json(&seen, &events_topic)).await;
    assert_eq!(first["incident"]["id"], incident.as_str());

    // The API: the open incident with its key frames, the deliveries.
    let (s, v) = http("GET", format!("http://{base}/v1/incidents?state=open&monitor={}", m.id), None).await;
    assert_eq!(s, 200, "{v}");
    common::openapi::conforms("IncidentList", &v);
    let list: IncidentList = serde_json::from_value(v).unwrap();
    assert_eq!(list.incidents.len(), 1);
    let (s, v) = http("GET", format!("http://{base}/v1/incidents/{incident}"), None).await;
    assert_eq!(s, 200);
    let i: Incident = serde_json::from_value(v).unwrap();
    assert!(!i.frames.is_empty());
    let (status, frame) = bytes(format!("http://{base}{}", i.frames[0])).await;
    assert_eq!(status, 200);
    assert_eq!(&frame[..2], [0xff, 0xd8], "a JPEG key frame");
    assert_eq!(http("GET", format!("http://{base}/v1/incidents/nope"), None).await.0, 404);
    // The evidence clip: cut from the uploaded file (H.264, 25 fps) around the confirming windows
    // (two 1 s windows and 3 s of pre-roll, less where the clip starts).
    let (frames, duration) = clip_of(&base, &incident, "h264").await;
    assert!(frames >= 25 && (1.0..=8.0).contains(&duration), "{frames} frames, {duration} s");
    assert_eq!(http("GET", format!("http://{base}/v1/incidents?state=maybe"), None).await.0, 400);
    let (_, v) = http("GET", format!("http://{base}/v1/monitors/{}", m.id), None).await;
    assert_eq!(v["open_incident"], incident.as_str());

    // Now every window is negative: two in a row clear the incident.
    let (s, v) = http("PATCH", format!("{url}/{}", m.id), Some(json!({"answer": {"choice": ["no"]}}))).await;
    assert_eq!(s, 200, "{v}");
    loop {
        if let ServerMessage::Alert { state: AlertState::Resolved, incident: i, .. } = recv(&mut ws).await {
            assert_eq!(i, incident);
            break;
        }
    }
    until("MQTT state off", 30, async || (last_json(&seen, &state_topic)?["alert"] == "off").then_some(())).await;
    let resolved = until("the resolved webhook", 30, async || {
        let p = posts.lock().unwrap();
        p.iter().find(|(h, _)| h["x-lookout-event"] == "incident.resolved").cloned()
    })
    .await;
    let v: Value = serde_json::from_str(&resolved.1).unwrap();
    assert_eq!(v["incident"]["state"], "closed");
    let (_, v) = http("GET", format!("http://{base}/v1/deliveries?incident={incident}"), None).await;
    common::openapi::conforms("DeliveryList", &v);
    let list: DeliveryList = serde_json::from_value(v).unwrap();
    let webhooks: Vec<&Delivery> = list.deliveries.iter().filter(|d| d.target.starts_with("http")).collect();
    let mqtt: Vec<&Delivery> = list.deliveries.iter().filter(|d| d.target.starts_with("mqtt:")).collect();
    assert!(webhooks.len() >= 3 && mqtt.len() == webhooks.len(), "{list:?}");
    until("every delivery", 30, async || {
        let (_, v) = http("GET", format!("http://{base}/v1/deliveries?incident={incident}"), None).await;
        let list: DeliveryList = serde_json::from_value(v).unwrap();
        list.deliveries.iter().all(|d| d.state == protocol::DeliveryState::Delivered).then_some(())
    })
    .await;

    // Positive windows again, within the cooldown: they are analysed, and no incident opens.
    let (s, v) = http("PATCH", format!("{url}/{}", m.id), Some(json!({"answer": {"choice": ["yes"]}}))).await;
    assert_eq!(s, 200, "{v}");
    let mut positives = 0;
    while positives < 3 {
        match recv(&mut ws).await {
            ServerMessage::WindowDone { text, .. } if text == "yes" => positives += 1,
            ServerMessage::Alert { state, .. } => panic!("an alert ({state:?}) within the cooldown"),
            _ => {}
        }
    }
    let (_, v) = http("GET", format!("http://{base}/v1/incidents?monitor={}", m.id), None).await;
    assert_eq!(serde_json::from_value::<IncidentList>(v).unwrap().incidents.len(), 1, "still one incident");

    // Deleting the monitor removes its Home Assistant entities (empty retained configs).
    assert_eq!(http("DELETE", format!("{url}/{}", m.id), None).await.0, 204);
    let cfg = format!("homeassistant/binary_sensor/lookout_{}/alert/config", m.id);
    until("the discovery config cleared", 30, async || {
        let s = seen.lock().unwrap();
        s.get(&cfg)?.last().filter(|(_, p)| p.is_empty()).map(drop)
    })
    .await;
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
    // The last will or the goodbye says offline.
    until("offline", 10, async || {
        let s = seen.lock().unwrap();
        s.get("lookout/availability")?.last().filter(|(_, p)| p == b"offline").map(drop)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_incident_keeps_a_clip_of_the_cameras_own_packets() {
    let rtsp = RtspServer::start(free_port(), None);
    let mut server = start_server(|_| {}).await;
    let base = server.base.clone();
    let body = json!({
        "name": "yard", "prompt": "Is anyone in the yard?",
        "source": {"kind": "rtsp", "url": format!("rtsp://127.0.0.1:{}/h264", rtsp.port)},
        "window": {"seconds": 1, "fps": 2, "min_pixels": 4096, "max_pixels": 16384},
        "generation": {"max_tokens": 4, "temperature": 0},
        "answer": {"choice": ["yes"]},
        "alert": {"when": {"equals": "yes"}, "confirm": {"windows": 2, "of": 2}},
    });
    let (s, v) = http("POST", format!("http://{base}/v1/monitors"), Some(body)).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let incident = until("an incident", 60, async || {
        let (_, v) = http("GET", format!("http://{base}/v1/incidents?monitor={id}"), None).await;
        let list: IncidentList = serde_json::from_value(v).ok()?;
        list.incidents.first().map(|i| i.id.clone())
    })
    .await;
    let (frames, duration) = clip_of(&base, &incident, "h264").await;
    // At least the opening window's second of video, from the key frame before the windows.
    assert!(frames >= 10 && duration >= 1.0, "{frames} frames, {duration} s");
    println!("camera clip: {frames} frames, {duration:.2} s");
    assert_eq!(http("DELETE", format!("http://{base}/v1/monitors/{id}"), None).await.0, 204);
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap();
}
