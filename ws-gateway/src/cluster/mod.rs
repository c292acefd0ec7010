//! Several nodes: which node runs which monitor, through leases in the shared PostgreSQL
//! database (the queries are in [`crate::store`]).
//!
//! Each node runs one lease loop. Every beat (a third of the lease time) it heartbeats, renews
//! its leases and reports its monitors' states; starts the monitors it holds and stops those it
//! lost; claims free monitors up to its share; and, when another live node is below its share,
//! gives back what it holds beyond its own (stopping each monitor, and storing its last windows,
//! before releasing its lease). A node's share is the enabled monitors split by capacity
//! (`--max-monitors`), never more than its capacity.
//!
//! A node that cannot renew stops every monitor before its leases can run out (one beat early),
//! says so in `/v1/health` and its monitors' states, and claims again once the database answers:
//! monitors do not keep running unrecorded, and no two nodes ever run one at once (writes are
//! also fenced by the lease generation, see the store). A node that dies (`kill -9`) stops
//! renewing; another claims its monitors once the leases run out, within a lease time and a
//! beat. A node shutting down stops its monitors and releases everything at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::monitors::Monitors;
use crate::store::{Store, StoreError};

/// Settings of a node that shares its database with others.
#[derive(Debug, Clone)]
pub(crate) struct ClusterConfig {
    /// This node's id (unique among the nodes; stable across restarts is best).
    pub(crate) node_id: String,
    /// Where the other nodes reach this node's API (`http://host:port`).
    pub(crate) address: String,
    /// Most monitors this node runs.
    pub(crate) max_monitors: u32,
    /// How long a lease lasts without renewal (a dead node's monitors move after this).
    pub(crate) lease: Duration,
}

/// How the node stands with the database (for `/v1/health`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Standing {
    /// Why the last beat failed, while it does.
    pub(crate) error: Option<String>,
}

/// A node's lease loop and what it knows.
pub(crate) struct Cluster {
    store: Store,
    monitors: Monitors,
    config: ClusterConfig,
    standing: Mutex<Standing>,
}

/// The monitors a node should hold: its capacity's part of `enabled`, rounded up, at most its
/// capacity. With every node at its share, no node is below its own and none gives any back.
pub(crate) fn share(enabled: u64, capacity: u32, total_capacity: u64) -> u64 {
    if total_capacity == 0 {
        return 0;
    }
    (enabled * u64::from(capacity)).div_ceil(total_capacity).min(u64::from(capacity))
}

fn state_name(s: protocol::WatchState) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

impl Cluster {
    /// Joins the cluster (giving up what an earlier run of this node held).
    pub(crate) async fn join(store: Store, monitors: Monitors, config: ClusterConfig) -> Result<Arc<Self>, StoreError> {
        store.join(&config.address, config.max_monitors).await?;
        Ok(Arc::new(Cluster { store, monitors, config, standing: Mutex::default() }))
    }

    /// The node's id.
    pub(crate) fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// The lease time.
    pub(crate) fn lease(&self) -> Duration {
        self.config.lease
    }

    /// How the node stands with the database.
    pub(crate) fn standing(&self) -> Standing {
        self.standing.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lease_ms(&self) -> i64 {
        self.config.lease.as_millis() as i64
    }

    /// The time between beats.
    fn beat(&self) -> Duration {
        self.config.lease / 3
    }

    /// Runs the lease loop until `stop` says so; then stops this node's monitors (their last
    /// windows stored) and hands every lease back.
    pub(crate) async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let wake = self.monitors.cluster_wake().cloned().unwrap_or_default();
        // When the last successful renewal was asked for: its leases last at least a lease
        // time from then (the database's clock starts them later, never earlier).
        let mut renewed: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            let asked = Instant::now();
            match self.beat_once().await {
                Ok(()) => {
                    renewed = Some(asked);
                    self.standing.lock().unwrap_or_else(|e| e.into_inner()).error = None;
                }
                Err(e) => {
                    let message = format!("the database does not answer: {e}");
                    let first = self.standing.lock().unwrap_or_else(|e| e.into_inner()).error.replace(message.clone());
                    if first.is_none() {
                        tracing::warn!(error = %e, "a lease beat failed");
                    }
                    // Stop everything a beat before the leases could run out.
                    let running_out = renewed.is_none_or(|r| r.elapsed() + self.beat() >= self.config.lease);
                    if running_out && !self.monitors.running().is_empty() {
                        tracing::error!(
                            "cannot renew the leases: stopping this node's monitors until the database answers"
                        );
                        self.stop_all("this node lost the database; the monitor resumes when it answers", false).await;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.beat()) => {}
                _ = wake.notified() => {}
                _ = stop.changed() => {}
            }
        }
        self.stop_all("this node is shutting down; another node takes the monitor over", true).await;
        if let Err(e) = self.store.leave().await {
            tracing::warn!(error = %e, "cannot hand the leases back; they run out by themselves");
        }
    }

    /// Stops every monitor here; `flush`: their last windows stored first (not when the
    /// database is away: that would only wait).
    async fn stop_all(&self, why: &str, flush: bool) {
        for (id, _) in self.monitors.running() {
            self.monitors.stop_here(&id, why, flush).await;
            if let Some(f) = self.store.fences() {
                f.drop_lease(&id);
            }
        }
    }

    /// One beat: heartbeat, renew, follow the leases, claim and give back.
    async fn beat_once(&self) -> Result<(), StoreError> {
        let lease_ms = self.lease_ms();
        self.within(self.store.heartbeat(&self.config.address, self.config.max_monitors)).await?;
        let held = self.within(self.store.renew(lease_ms)).await?;
        let held: HashMap<String, i64> = held.into_iter().map(|l| (l.monitor, l.generation)).collect();
        let rows: HashMap<String, crate::store::MonitorRow> =
            self.within(self.store.monitors()).await?.into_iter().map(|m| (m.id.clone(), m)).collect();
        // Lost leases first: those monitors stop here at once (a deleted monitor's lease went
        // with it: its viewers are told it was deleted).
        for (id, _) in self.monitors.running() {
            if held.contains_key(&id) {
                continue;
            }
            if rows.contains_key(&id) {
                tracing::warn!(monitor = %id, "lease lost; stopping the monitor here");
                self.monitors.stop_here(&id, "this node lost the monitor's lease; another node runs it", false).await;
            } else {
                self.monitors.end_deleted(&id).await;
            }
        }
        let mut mine = 0u64;
        for id in held.keys() {
            match rows.get(id) {
                Some(row) if row.enabled => {
                    mine += 1;
                    self.monitors.run_here(row.clone());
                    self.monitors.refresh(row.clone());
                }
                // Paused: it needs no node.
                Some(_) => {
                    self.monitors.stop_here(id, "the monitor was paused", true).await;
                    self.within(self.store.release(id)).await?;
                }
                // Deleted through another node (its lease went with it).
                None => self.monitors.end_deleted(id).await,
            }
        }
        let enabled = rows.values().filter(|m| m.enabled).count() as u64;
        let nodes = self.within(self.store.nodes(lease_ms)).await?;
        let total: u64 = nodes.iter().map(|n| u64::from(n.capacity)).sum();
        let target = share(enabled, self.config.max_monitors, total);
        if mine < target {
            for lease in self.within(self.store.claim((target - mine) as u32, lease_ms)).await? {
                if let Some(row) = rows.get(&lease.monitor) {
                    tracing::info!(monitor = %lease.monitor, generation = lease.generation, "lease claimed");
                    self.monitors.run_here(row.clone());
                }
            }
        } else if mine > target {
            // Give back only when another node would take it: one below its share.
            let wanting = nodes
                .iter()
                .any(|n| n.id != self.config.node_id && (n.monitors.len() as u64) < share(enabled, n.capacity, total));
            if wanting {
                let mut ids: Vec<&String> = held.keys().filter(|id| rows.get(*id).is_some_and(|r| r.enabled)).collect();
                ids.sort();
                for id in ids.into_iter().rev().take((mine - target) as usize) {
                    tracing::info!(monitor = %id, "handing the monitor to a less loaded node");
                    self.monitors.stop_here(id, "the monitor moved to a less loaded node", true).await;
                    self.within(self.store.release(id)).await?;
                }
            }
        }
        let states: Vec<(String, String, Option<String>)> = self
            .monitors
            .running()
            .into_iter()
            .map(|(id, status)| {
                let (state, reason) = status.state();
                (id, state_name(state), reason)
            })
            .collect();
        self.within(self.store.report(&states)).await?;
        Ok(())
    }

    /// A database call of the beat, given at most a beat's time: a database that does not
    /// answer is noticed while the leases still hold (the pool itself would wait 5 s).
    async fn within<T>(&self, call: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        tokio::time::timeout(self.beat(), call).await.unwrap_or(Err(StoreError::Database(sqlx::Error::PoolTimedOut)))
    }
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_split_by_capacity_and_never_exceed_it() {
        // Six monitors over three equal nodes: two each; over two: three each.
        assert_eq!(share(6, 10, 30), 2);
        assert_eq!(share(6, 10, 20), 3);
        // Seven: rounded up, so the shares cover every monitor.
        assert_eq!(share(7, 10, 30), 3);
        // A node of capacity 1 beside one of 9 takes one of ten.
        assert_eq!(share(10, 1, 10), 1);
        assert_eq!(share(10, 9, 10), 9);
        // Never more than the capacity, and nothing without nodes.
        assert_eq!(share(100, 4, 8), 4);
        assert_eq!(share(5, 4, 0), 0);
    }
}
