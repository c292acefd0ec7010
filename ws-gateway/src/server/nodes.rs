//! Several nodes: `GET /v1/nodes`, and WebSocket subscriptions to a monitor that another node
//! runs, proxied to that node.
//!
//! A proxy rather than a redirect: browsers' WebSockets follow no redirects, a client behind a
//! load balancer may not reach the nodes' own addresses, and a monitor that moves to another
//! node mid-subscription would need every client to know how to chase it. The proxying node
//! subscribes on the client's behalf (one hop at most: a proxied subscription is never proxied
//! again) and relays every event unchanged; when the monitor moves, the relayed `ended` tells
//! the client to subscribe again, which reaches the new node.

use std::sync::Arc;

use axum::extract::State;
use futures_util::{SinkExt, StreamExt};
use protocol::{ClientMessage, EndReason, NodeInfo, Nodes, ServerMessage};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{ApiFailure, AppState};
use crate::alerts::rfc3339;
use crate::watch::hub::{Hub, Subscription};

tokio::task_local! {
    /// Set for a session opened by another node's proxy.
    pub(crate) static PROXIED: bool;
}

/// The query parameter that marks a proxied session.
pub(crate) const PROXIED_PARAM: &str = "proxied";

/// How long a proxy waits for the other node's answer to `subscribe`.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /v1/nodes`.
pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Result<axum::Json<Nodes>, ApiFailure> {
    let Some(cluster) = state.cluster.get() else {
        // One node: itself, with every monitor.
        let monitors: Vec<String> = state.monitors.running().into_iter().map(|(id, _)| id).collect();
        let now = rfc3339(crate::store::now_ms());
        return Ok(axum::Json(Nodes {
            self_id: "local".into(),
            nodes: vec![NodeInfo {
                id: "local".into(),
                address: String::new(),
                capacity: 0,
                monitors,
                load: 0.0,
                started_at: now.clone(),
                heartbeat_at: now,
            }],
        }));
    };
    let rows = state.monitors.store().nodes(cluster.lease().as_millis() as i64).await?;
    Ok(axum::Json(Nodes {
        self_id: cluster.node_id().to_owned(),
        nodes: rows
            .into_iter()
            .map(|n| NodeInfo {
                load: if n.capacity == 0 { 0.0 } else { n.monitors.len() as f64 / f64::from(n.capacity) },
                id: n.id,
                address: n.address,
                capacity: n.capacity,
                monitors: n.monitors,
                started_at: rfc3339(n.started_ms),
                heartbeat_at: rfc3339(n.heartbeat_ms),
            })
            .collect(),
    }))
}

/// A subscription relayed from the node that runs a monitor: its events come on `sub`, which
/// ends when the relay does.
pub(crate) struct Relay {
    /// The relayed events.
    pub(crate) sub: Subscription,
    /// The other node's `subscribed`.
    pub(crate) subscribed: ServerMessage,
    /// The relay task (aborted when the subscriber leaves).
    pub(crate) task: AbortOnDrop,
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Subscribes to `monitor` on the node that runs it, when another node does. `Ok(None)`: no
/// other node runs it (or this session is itself a proxy's).
pub(crate) async fn relay(state: &Arc<AppState>, monitor: &str) -> Result<Option<Relay>, String> {
    if state.cluster.get().is_none() || PROXIED.try_with(|p| *p).unwrap_or(false) {
        return Ok(None);
    }
    let store = state.monitors.store();
    let holder = store.holder(monitor).await.map_err(|e| format!("cannot find the monitor's node: {e}"))?;
    let Some((node, address)) = holder.filter(|(node, _)| Some(node.as_str()) != store.node_id()) else {
        return Ok(None);
    };
    let url = format!("{}/v1/ws?{PROXIED_PARAM}=true", address.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().map_err(|e| format!("node {node} has a bad address: {e}"))?;
    if let Some(key) = &state.config.api_key
        && let Ok(v) = format!("Bearer {key}").parse()
    {
        request.headers_mut().insert(axum::http::header::AUTHORIZATION, v);
    }
    let unreachable = |e: String| format!("monitor {monitor:?} runs on node {node}, which does not answer: {e}");
    let connect = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| e.to_string())?;
        let subscribe = ClientMessage::Subscribe { watch: None, monitor: Some(monitor.to_owned()) };
        let text = serde_json::to_string(&subscribe).unwrap_or_default();
        ws.send(Message::Text(text.into())).await.map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let m: ServerMessage = serde_json::from_str(&t).map_err(|e| e.to_string())?;
                    return Ok::<_, String>((ws, m));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the connection closed".into()),
            }
        }
    };
    let (ws, first) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(unreachable)?;
    let subscribed = match first {
        m @ ServerMessage::Subscribed { .. } => m,
        ServerMessage::Error { message, .. } => return Err(message),
        other => return Err(unreachable(format!("unexpected first message {other:?}"))),
    };
    // Subscribed before the relay starts, so that nothing relayed is missed.
    let publish = Arc::new(Hub::default());
    let sub = publish.subscribe();
    let task = tokio::spawn(async move {
        let mut ws = ws;
        let ended = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(&t) {
                    Ok(m) => {
                        let end = matches!(m, ServerMessage::Ended { .. });
                        publish.publish(m);
                        if end {
                            break true;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "a relayed message does not parse"),
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break false,
            }
        };
        if !ended {
            publish.publish(ServerMessage::Ended {
                reason: EndReason::Stopped,
                message: format!("the node running the monitor ({node}) went away; subscribe again"),
            });
        }
        let _ = ws.close(None).await;
    });
    Ok(Some(Relay { sub, subscribed, task: AbortOnDrop(task) }))
}
