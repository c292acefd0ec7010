//! Nodes and leases (PostgreSQL only): the queries behind [`crate::cluster`].
//!
//! A lease is a row per monitor: the node holding it, a generation that every claim raises, and
//! an expiry on the database's clock. A node renews its leases with each heartbeat; one that
//! stops heartbeating lets them run out, and any other node may then claim them. Claims lock
//! the monitors' rows with `FOR NO KEY UPDATE SKIP LOCKED` (two nodes claiming at once take
//! different monitors, and neither waits), and the upsert re-checks the expiry, so a live
//! lease is never taken.

use sqlx::Row;
use sqlx::postgres::PgPool;

use super::{Db, Fences, Store, StoreError};

/// A node as the database knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    /// Id.
    pub id: String,
    /// Where other nodes reach its API.
    pub address: String,
    /// Most monitors it runs.
    pub capacity: u32,
    /// When it (last) started, ms since the epoch.
    pub started_ms: i64,
    /// Its last heartbeat.
    pub heartbeat_ms: i64,
    /// The monitors whose leases it holds.
    pub monitors: Vec<String>,
}

/// A lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The monitor.
    pub monitor: String,
    /// Its generation (raised by every claim).
    pub generation: i64,
}

/// Who runs a monitor, and how it goes there.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseState {
    /// The node.
    pub node: String,
    /// Its state (`running`, ...), once reported.
    pub state: Option<String>,
    /// Why, when it is not running.
    pub reason: Option<String>,
}

fn leases(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<Lease>, StoreError> {
    rows.iter().map(|r| Ok(Lease { monitor: r.try_get("monitor_id")?, generation: r.try_get("generation")? })).collect()
}

impl Store {
    fn cluster(&self, what: &'static str) -> Result<(&PgPool, &Fences), StoreError> {
        match (&self.db, &self.fences) {
            (Db::Postgres(pool), Some(f)) => Ok((pool, f)),
            _ => Err(StoreError::NotClustered(what)),
        }
    }

    /// Registers this node (or records its heartbeat): its address and capacity.
    pub async fn heartbeat(&self, address: &str, capacity: u32) -> Result<(), StoreError> {
        let (pool, f) = self.cluster("a heartbeat")?;
        sqlx::query(
            "INSERT INTO nodes (id, address, capacity, started_ms, heartbeat_ms) \
             VALUES ($1, $2, $3, lookout_now_ms(), lookout_now_ms()) ON CONFLICT (id) DO UPDATE SET \
             address = excluded.address, capacity = excluded.capacity, heartbeat_ms = excluded.heartbeat_ms",
        )
        .bind(f.node())
        .bind(address)
        .bind(i64::from(capacity))
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Starts this node afresh: gives up any lease an earlier run under the same id still holds
    /// (what it ran is claimed again, with a new generation), and registers it.
    pub async fn join(&self, address: &str, capacity: u32) -> Result<(), StoreError> {
        self.leave().await?;
        self.heartbeat(address, capacity).await
    }

    /// Renews this node's live leases for `lease_ms`; returns them (the fences now hold exactly
    /// these: a lease that ran out is lost).
    pub async fn renew(&self, lease_ms: i64) -> Result<Vec<Lease>, StoreError> {
        let (pool, f) = self.cluster("renewing leases")?;
        let rows = sqlx::query(
            "UPDATE leases SET expires_ms = lookout_now_ms() + $2 WHERE node_id = $1 \
             AND expires_ms > lookout_now_ms() RETURNING monitor_id, generation",
        )
        .bind(f.node())
        .bind(lease_ms)
        .fetch_all(pool)
        .await?;
        let held = leases(&rows)?;
        f.replace(&held);
        Ok(held)
    }

    /// Claims up to `n` enabled monitors that no node holds, for `lease_ms`.
    pub async fn claim(&self, n: u32, lease_ms: i64) -> Result<Vec<Lease>, StoreError> {
        let (pool, f) = self.cluster("claiming monitors")?;
        if n == 0 {
            return Ok(Vec::new());
        }
        // One statement locks free monitors (skipping those another node is claiming) and
        // takes their leases. Its snapshot of the leases is from its start, so a monitor that
        // another node claimed and committed meanwhile is locked here but its lease is live:
        // the upsert's condition refuses it. Such a round took fewer than it found, and the
        // next round, with a fresh snapshot, looks again (bounded: each lost race means another
        // node took a monitor).
        let mut got = Vec::new();
        for _ in 0..8 {
            let want = n as usize - got.len();
            let rows = sqlx::query(
                "WITH free AS (SELECT m.id FROM monitors m LEFT JOIN leases l ON l.monitor_id = m.id \
                 WHERE m.enabled AND (l.monitor_id IS NULL OR l.expires_ms <= lookout_now_ms()) \
                 ORDER BY m.created_ms, m.id LIMIT $2 FOR NO KEY UPDATE OF m SKIP LOCKED), \
                 took AS (INSERT INTO leases (monitor_id, node_id, generation, claimed_ms, expires_ms) \
                 SELECT id, $1, 1, lookout_now_ms(), lookout_now_ms() + $3 FROM free \
                 ON CONFLICT (monitor_id) DO UPDATE SET node_id = excluded.node_id, \
                 generation = leases.generation + 1, claimed_ms = excluded.claimed_ms, \
                 expires_ms = excluded.expires_ms WHERE leases.expires_ms <= lookout_now_ms() \
                 RETURNING monitor_id, generation) \
                 SELECT t.monitor_id, t.generation, (SELECT count(*) FROM free) AS found \
                 FROM (SELECT 1) one LEFT JOIN took t ON true",
            )
            .bind(f.node())
            .bind(want as i64)
            .bind(lease_ms)
            .fetch_all(pool)
            .await?;
            let mut found = 0;
            let mut took = 0;
            for r in &rows {
                found = r.try_get::<i64, _>("found")?;
                if let Some(monitor) = r.try_get::<Option<String>, _>("monitor_id")? {
                    took += 1;
                    got.push(Lease { monitor, generation: r.try_get("generation")? });
                }
            }
            if took >= found || got.len() >= n as usize {
                break;
            }
        }
        for l in &got {
            f.hold(&l.monitor, l.generation);
        }
        Ok(got)
    }

    /// Gives up this node's lease of `monitor` (its task has stopped): another node may claim
    /// it at once.
    pub async fn release(&self, monitor: &str) -> Result<(), StoreError> {
        let (pool, f) = self.cluster("releasing a lease")?;
        f.drop_lease(monitor);
        sqlx::query("UPDATE leases SET expires_ms = 0 WHERE monitor_id = $1 AND node_id = $2")
            .bind(monitor)
            .bind(f.node())
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Leaves the cluster (a graceful shutdown, after the monitors stopped): every lease given
    /// back, the node unregistered.
    pub async fn leave(&self) -> Result<(), StoreError> {
        let (pool, f) = self.cluster("leaving")?;
        f.drop_all();
        sqlx::query("UPDATE leases SET expires_ms = 0 WHERE node_id = $1").bind(f.node()).execute(pool).await?;
        sqlx::query("DELETE FROM nodes WHERE id = $1").bind(f.node()).execute(pool).await?;
        Ok(())
    }

    /// The nodes that heartbeated within `alive_ms`, with the monitors they hold.
    pub async fn nodes(&self, alive_ms: i64) -> Result<Vec<NodeRow>, StoreError> {
        let (pool, _) = self.cluster("listing nodes")?;
        let rows = sqlx::query(
            "SELECT n.id, n.address, n.capacity, n.started_ms, n.heartbeat_ms, \
             COALESCE(array_agg(l.monitor_id ORDER BY l.monitor_id) FILTER (WHERE l.monitor_id IS NOT NULL), \
             '{}') AS monitors FROM nodes n LEFT JOIN leases l ON l.node_id = n.id \
             AND l.expires_ms > lookout_now_ms() WHERE n.heartbeat_ms > lookout_now_ms() - $1 \
             GROUP BY n.id ORDER BY n.id",
        )
        .bind(alive_ms)
        .fetch_all(pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeRow {
                    id: r.try_get("id")?,
                    address: r.try_get("address")?,
                    capacity: r.try_get::<i64, _>("capacity")?.clamp(0, i64::from(u32::MAX)) as u32,
                    started_ms: r.try_get("started_ms")?,
                    heartbeat_ms: r.try_get("heartbeat_ms")?,
                    monitors: r.try_get("monitors")?,
                })
            })
            .collect()
    }

    /// The node holding `monitor`'s live lease: its id and address.
    pub async fn holder(&self, monitor: &str) -> Result<Option<(String, String)>, StoreError> {
        let (pool, _) = self.cluster("finding a monitor's node")?;
        let rows = sqlx::query(
            "SELECT n.id, n.address FROM leases l JOIN nodes n ON n.id = l.node_id \
             WHERE l.monitor_id = $1 AND l.expires_ms > lookout_now_ms()",
        )
        .bind(monitor)
        .fetch_all(pool)
        .await?;
        rows.first().map(|r| Ok((r.try_get("id")?, r.try_get("address")?))).transpose()
    }

    /// Records the live state of the monitors this node runs (`(monitor, state, reason)`).
    pub async fn report(&self, states: &[(String, String, Option<String>)]) -> Result<(), StoreError> {
        let (pool, f) = self.cluster("reporting states")?;
        if states.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = states.iter().map(|s| s.0.as_str()).collect();
        let state: Vec<&str> = states.iter().map(|s| s.1.as_str()).collect();
        let reason: Vec<Option<&str>> = states.iter().map(|s| s.2.as_deref()).collect();
        sqlx::query(
            "UPDATE leases l SET state = v.state, reason = v.reason FROM \
             unnest($2::text[], $3::text[], $4::text[]) AS v(id, state, reason) \
             WHERE l.monitor_id = v.id AND l.node_id = $1",
        )
        .bind(f.node())
        .bind(ids)
        .bind(state)
        .bind(reason)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// A monitor's live lease: the node running it, and the state it last reported.
    pub async fn lease_state(&self, monitor: &str) -> Result<Option<LeaseState>, StoreError> {
        let (pool, _) = self.cluster("reading a lease")?;
        let rows = sqlx::query(
            "SELECT node_id, state, reason FROM leases WHERE monitor_id = $1 AND expires_ms > lookout_now_ms()",
        )
        .bind(monitor)
        .fetch_all(pool)
        .await?;
        rows.first()
            .map(|r| {
                Ok(LeaseState { node: r.try_get("node_id")?, state: r.try_get("state")?, reason: r.try_get("reason")? })
            })
            .transpose()
    }

    /// How many monitors are enabled (what the nodes share out).
    pub async fn enabled_monitors(&self) -> Result<u64, StoreError> {
        let (pool, _) = self.cluster("counting monitors")?;
        let n: Vec<i64> = sqlx::query_scalar("SELECT COUNT(*) FROM monitors WHERE enabled").fetch_all(pool).await?;
        Ok(n.first().copied().unwrap_or(0) as u64)
    }
}
