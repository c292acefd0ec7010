//! A watch's events, fanned out to any number of subscribers.
//!
//! The watch publishes every event once; each subscriber reads at its own pace from a bounded
//! broadcast. Publishing never waits. A subscriber that falls more than the bound behind is told
//! `lagged` with how many events it missed and goes on from the newest, after the current
//! window's text so far (the same catch-up a subscriber joining mid-window gets), so a slow
//! client never slows the watch or any other client.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use protocol::{ServerMessage, SourceInfo};
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it is told it lagged.
pub(crate) const SUBSCRIBER_BOUND: usize = 256;

/// What a subscriber joining now must be told first.
#[derive(Debug, Default)]
struct Snapshot {
    /// The source, once it is open.
    info: Option<SourceInfo>,
    /// The window being analysed and its text so far.
    window: Option<(ServerMessage, String)>,
    /// The watch's last event, once it ended.
    ended: Option<Arc<ServerMessage>>,
}

/// The publishing side.
#[derive(Debug)]
pub(crate) struct Hub {
    snapshot: Mutex<Snapshot>,
    tx: broadcast::Sender<Arc<ServerMessage>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub { snapshot: Mutex::new(Snapshot::default()), tx: broadcast::channel(SUBSCRIBER_BOUND).0 }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes an event to every subscriber (never waits).
    pub(crate) fn publish(&self, m: ServerMessage) {
        let m = Arc::new(m);
        // The snapshot and the broadcast change under one lock, so that a subscriber joining
        // between two events sees each event exactly once: in its snapshot or on its receiver.
        let mut s = self.lock();
        match &*m {
            ServerMessage::Ready { source, .. } => s.info = Some(source.clone()),
            ServerMessage::Window { .. } => s.window = Some(((*m).clone(), String::new())),
            ServerMessage::Token { window, text } => {
                if let Some((ServerMessage::Window { id, .. }, so_far)) = &mut s.window
                    && id == window
                {
                    so_far.push_str(text);
                }
            }
            ServerMessage::WindowDone { .. } => s.window = None,
            ServerMessage::Ended { .. } => s.ended = Some(m.clone()),
            _ => {}
        }
        // An error only means nobody subscribes right now.
        let _ = self.tx.send(m);
    }

    /// How many clients follow the watch.
    pub(crate) fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// The source, once it is open.
    pub(crate) fn info(&self) -> Option<SourceInfo> {
        self.lock().info.clone()
    }

    /// A new subscriber, starting with the catch-up of the current window.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Subscription {
        let mut pending = Vec::new();
        let rx = self.resubscribe(&mut pending);
        pending.reverse();
        Subscription { hub: Arc::downgrade(self), rx, pending }
    }

    fn resubscribe(&self, pending: &mut Vec<Arc<ServerMessage>>) -> broadcast::Receiver<Arc<ServerMessage>> {
        let s = self.lock();
        let rx = self.tx.subscribe();
        if let Some(end) = &s.ended {
            pending.push(end.clone());
        } else if let Some((window, so_far)) = &s.window {
            pending.push(Arc::new(window.clone()));
            if let ServerMessage::Window { id, .. } = window
                && !so_far.is_empty()
            {
                pending.push(Arc::new(ServerMessage::Token { window: *id, text: so_far.clone() }));
            }
        }
        rx
    }
}

/// One subscriber's view of a watch. It does not keep the watch alive: once the watch is gone
/// (after its `ended` event), the subscription ends.
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Weak<Hub>,
    rx: broadcast::Receiver<Arc<ServerMessage>>,
    /// Catch-up events to hand out before the receiver's (in reverse order).
    pending: Vec<Arc<ServerMessage>>,
}

impl Subscription {
    /// Starts over from the newest event: `lagged` first (when `missed` is given), then the
    /// current window and its text so far.
    fn catch_up(&mut self, missed: u64) {
        let mut pending = vec![Arc::new(ServerMessage::Lagged { missed })];
        if let Some(hub) = self.hub.upgrade() {
            self.rx = hub.resubscribe(&mut pending);
        }
        pending.reverse();
        self.pending = pending;
    }

    /// The next event; `None` once the watch is gone and every event was read.
    pub(crate) async fn next(&mut self) -> Option<Arc<ServerMessage>> {
        loop {
            if let Some(m) = self.pending.pop() {
                return Some(m);
            }
            match self.rx.recv().await {
                Ok(m) => return Some(m),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Skip what is still queued too: the subscriber goes on from the newest.
                    let queued = self.rx.len() as u64;
                    self.catch_up(n + queued);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(id: u64) -> ServerMessage {
        ServerMessage::Window { id, start_s: 0.0, end_s: 1.0, frames: 2, grid_thw: [1, 2, 2] }
    }

    fn token(window: u64, text: &str) -> ServerMessage {
        ServerMessage::Token { window, text: text.into() }
    }

    #[tokio::test]
    async fn a_late_subscriber_gets_the_current_window_so_far_then_live_events() {
        let hub = Arc::new(Hub::default());
        let mut early = hub.subscribe();
        hub.publish(window(0));
        hub.publish(token(0, "A "));
        hub.publish(token(0, "car"));
        let mut late = hub.subscribe();
        hub.publish(token(0, " stops"));
        assert_eq!(*late.next().await.unwrap(), window(0));
        assert_eq!(*late.next().await.unwrap(), token(0, "A car"));
        assert_eq!(*late.next().await.unwrap(), token(0, " stops"));
        for want in [window(0), token(0, "A "), token(0, "car"), token(0, " stops")] {
            assert_eq!(*early.next().await.unwrap(), want);
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_and_resumes_from_the_newest() {
        let hub = Arc::new(Hub::default());
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        hub.publish(window(0));
        for i in 0..(SUBSCRIBER_BOUND + 10) {
            hub.publish(token(0, if i % 2 == 0 { "a" } else { "b" }));
            // The fast one keeps up: it never lags.
            let m = fast.next().await.unwrap();
            assert!(!matches!(*m, ServerMessage::Lagged { .. }));
        }
        hub.publish(token(0, "!"));
        let first = slow.next().await.unwrap();
        let ServerMessage::Lagged { missed } = *first else { panic!("{first:?}") };
        // Everything but the catch-up was skipped.
        assert_eq!(missed, SUBSCRIBER_BOUND as u64 + 12);
        assert_eq!(*slow.next().await.unwrap(), window(0));
        let ServerMessage::Token { text, .. } = &*slow.next().await.unwrap() else { panic!() };
        assert_eq!(text.len(), SUBSCRIBER_BOUND + 11);
        assert!(text.ends_with('!'));
        hub.publish(token(0, "next"));
        assert_eq!(*slow.next().await.unwrap(), token(0, "next"));
    }

    #[tokio::test]
    async fn after_the_end_a_subscriber_gets_the_ending_then_none() {
        let hub = Arc::new(Hub::default());
        let end = ServerMessage::Ended { reason: protocol::EndReason::EndOfStream, message: "done".into() };
        hub.publish(end.clone());
        let mut sub = hub.subscribe();
        let mut live = hub.subscribe();
        assert_eq!(*sub.next().await.unwrap(), end);
        drop(hub);
        // Once the watch is gone the subscription ends; a live one read the ending first.
        assert!(live.next().await.is_some());
        assert!(live.next().await.is_none());
    }
}
