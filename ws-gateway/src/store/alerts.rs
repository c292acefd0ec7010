//! Incidents and the notification outbox. An incident's change and the deliveries it causes are
//! written in one transaction, so a crash never leaves an incident without its notifications
//! (or notifications of an incident that was never stored).

use super::{Db, Param, Read, Store, StoreError, bind_all, parse};

/// One window of an incident, as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IncidentWindowRow {
    /// Window id within its watch.
    pub window: u64,
    /// Stream time of its first frame.
    pub start_s: f64,
    /// Stream time of its last frame.
    pub end_s: f64,
    /// When the rule decided it, ms since the epoch.
    pub decided_ms: i64,
    /// The answer (so far, until the window ends).
    pub text: String,
    /// Its key frame's file under `incidents/`, when one was kept.
    #[serde(default)]
    pub frame: Option<String>,
}

/// An incident as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentRow {
    /// Id.
    pub id: String,
    /// The monitor.
    pub monitor: String,
    /// Opened, ms since the epoch.
    pub opened_ms: i64,
    /// Closed, when it is.
    pub closed_ms: Option<i64>,
    /// Its windows, oldest first.
    pub windows: Vec<IncidentWindowRow>,
    /// The evidence clip's file under `incidents/`, once written.
    pub clip: Option<String>,
}

/// A notification to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// Id (sent to receivers for idempotency).
    pub id: String,
    /// The incident.
    pub incident: String,
    /// The monitor.
    pub monitor: String,
    /// `incident.opened`, `incident.updated`, `incident.resolved`.
    pub event: String,
    /// `webhook` or `mqtt`.
    pub kind: String,
    /// The webhook URL, or the MQTT topic.
    pub url: String,
    /// The webhook's HMAC key.
    pub secret: Option<String>,
    /// The JSON body, fixed when queued (its signature and id never change across retries).
    pub body: String,
}

/// A queued notification and how its delivery goes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    /// Order of queueing.
    pub seq: i64,
    /// What was queued.
    pub delivery: NewDelivery,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Queued, ms since the epoch.
    pub created_ms: i64,
    /// Next attempt due.
    pub next_attempt_ms: i64,
    /// Accepted by the receiver.
    pub delivered_ms: Option<i64>,
}

/// How an attempt went.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Accepted.
    Delivered,
    /// Failed; try again at this time.
    Retry(String, i64),
    /// Failed for good.
    Failed(String),
}

/// Which incidents to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IncidentQuery {
    /// Open (true) or closed (false) only.
    pub open: Option<bool>,
    /// One monitor's only.
    pub monitor: Option<String>,
    /// At most this many (newest first).
    pub limit: u32,
}

/// How long a node's claim of a delivery lasts (longer than any attempt: a webhook's timeout is
/// at most a minute).
pub(crate) const CLAIM_MS: i64 = 120_000;

const DELIVERY_COLUMNS: &str = "seq, id, incident_id, monitor_id, event, kind, url, secret, body, state, attempts, \
     last_error, created_ms, next_attempt_ms, delivered_ms";

impl Store {
    fn incident_row(r: &impl Read) -> Result<IncidentRow, StoreError> {
        Ok(IncidentRow {
            id: r.text("id")?,
            monitor: r.text("monitor_id")?,
            opened_ms: r.int("opened_ms")?,
            closed_ms: r.int_opt("closed_ms")?,
            windows: parse(&r.text("windows")?, "incident windows")?,
            clip: r.text_opt("clip")?,
        })
    }

    fn delivery_row(r: &impl Read) -> Result<DeliveryRow, StoreError> {
        Ok(DeliveryRow {
            seq: r.int("seq")?,
            delivery: NewDelivery {
                id: r.text("id")?,
                incident: r.text("incident_id")?,
                monitor: r.text("monitor_id")?,
                event: r.text("event")?,
                kind: r.text("kind")?,
                url: r.text("url")?,
                secret: r.text_opt("secret")?,
                body: r.text("body")?,
            },
            state: r.text("state")?,
            attempts: r.int("attempts")? as u32,
            last_error: r.text_opt("last_error")?,
            created_ms: r.int("created_ms")?,
            next_attempt_ms: r.int("next_attempt_ms")?,
            delivered_ms: r.int_opt("delivered_ms")?,
        })
    }

    /// Stores an incident (new or changed) and queues its notifications, in one transaction
    /// (with several nodes, only while this node holds the monitor's lease).
    pub async fn save_incident(&self, i: &IncidentRow, deliveries: &[NewDelivery]) -> Result<(), StoreError> {
        let now = super::now_ms();
        let fence = self.fence(&i.monitor)?;
        let check = format!("SELECT 1 WHERE {}", super::lease_check(1, 2, 3));
        let upsert = "INSERT INTO incidents (id, monitor_id, opened_ms, closed_ms, windows, clip) \
                      VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET closed_ms = excluded.closed_ms, \
                      windows = excluded.windows, clip = excluded.clip";
        let queue = "INSERT INTO deliveries (id, incident_id, monitor_id, event, kind, url, secret, body, state, \
                     created_ms, next_attempt_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $9)";
        on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            if let Some((node, generation)) = fence {
                let held = sqlx::query(&check).bind(&i.monitor).bind(node).bind(generation).fetch_all(&mut *tx).await?;
                if held.is_empty() {
                    return Err(StoreError::Fenced(i.monitor.clone()));
                }
            }
            sqlx::query(upsert)
                .bind(&i.id)
                .bind(&i.monitor)
                .bind(i.opened_ms)
                .bind(i.closed_ms)
                .bind(super::json(&i.windows))
                .bind(&i.clip)
                .execute(&mut *tx)
                .await?;
            for d in deliveries {
                sqlx::query(queue)
                    .bind(&d.id)
                    .bind(&d.incident)
                    .bind(&d.monitor)
                    .bind(&d.event)
                    .bind(&d.kind)
                    .bind(&d.url)
                    .bind(&d.secret)
                    .bind(&d.body)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// One incident.
    pub async fn incident(&self, id: &str) -> Result<Option<IncidentRow>, StoreError> {
        let sql = "SELECT * FROM incidents WHERE id = $1";
        on_db!(&self.db, pool => sqlx::query(sql).bind(id).fetch_all(pool).await?.first().map(Self::incident_row).transpose())
    }

    /// A monitor's open incident, if it has one.
    pub async fn open_incident(&self, monitor: &str) -> Result<Option<IncidentRow>, StoreError> {
        let sql = "SELECT * FROM incidents WHERE monitor_id = $1 AND closed_ms IS NULL ORDER BY opened_ms DESC LIMIT 1";
        on_db!(&self.db, pool => sqlx::query(sql)
            .bind(monitor)
            .fetch_all(pool)
            .await?
            .first()
            .map(Self::incident_row)
            .transpose())
    }

    /// Incidents, newest first.
    pub async fn incidents(&self, q: &IncidentQuery) -> Result<Vec<IncidentRow>, StoreError> {
        let mut sql = "SELECT * FROM incidents WHERE 1 = 1".to_owned();
        let mut params = Vec::new();
        match q.open {
            Some(true) => sql += " AND closed_ms IS NULL",
            Some(false) => sql += " AND closed_ms IS NOT NULL",
            None => {}
        }
        if let Some(m) = &q.monitor {
            params.push(Param::Text(m.clone()));
            sql += " AND monitor_id = $1";
        }
        params.push(Param::Int(i64::from(q.limit)));
        sql += &format!(" ORDER BY opened_ms DESC, id DESC LIMIT ${}", params.len());
        on_db!(&self.db, pool => bind_all(sqlx::query(&sql), &params)
            .fetch_all(pool)
            .await?
            .iter()
            .map(Self::incident_row)
            .collect())
    }

    /// Deliveries, newest first; one incident's when given.
    pub async fn deliveries(&self, incident: Option<&str>, limit: u32) -> Result<Vec<DeliveryRow>, StoreError> {
        let mut sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries");
        let mut params = Vec::new();
        if let Some(i) = incident {
            params.push(Param::Text(i.to_owned()));
            sql += " WHERE incident_id = $1";
        }
        params.push(Param::Int(i64::from(limit)));
        sql += &format!(" ORDER BY seq DESC LIMIT ${}", params.len());
        on_db!(&self.db, pool => bind_all(sqlx::query(&sql), &params)
            .fetch_all(pool)
            .await?
            .iter()
            .map(Self::delivery_row)
            .collect())
    }

    /// Pending deliveries due at `now`, oldest first: only the first pending one of each incident
    /// and target, so that receivers get an incident's notifications in order.
    ///
    /// With several nodes the rows are claimed for this node (locked with `FOR UPDATE SKIP
    /// LOCKED`, then marked for [`CLAIM_MS`]), so that each is sent by one node; a node that dies
    /// holding a claim leaves the row to another once the claim runs out.
    pub async fn due_deliveries(&self, now: i64, limit: u32) -> Result<Vec<DeliveryRow>, StoreError> {
        let due = "d.state = 'pending' AND d.next_attempt_ms <= $1 \
             AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.incident_id = d.incident_id AND e.url = d.url \
             AND e.kind = d.kind AND e.state = 'pending' AND e.seq < d.seq)";
        match (&self.db, &self.fences) {
            (Db::Postgres(pool), Some(f)) => {
                let sql = format!(
                    "UPDATE deliveries SET claimed_by = $3, claimed_until_ms = lookout_now_ms() + {CLAIM_MS} \
                     WHERE seq IN (SELECT d.seq FROM deliveries d WHERE {due} AND (d.claimed_until_ms IS NULL \
                     OR d.claimed_until_ms < lookout_now_ms()) ORDER BY d.seq LIMIT $2 FOR UPDATE SKIP LOCKED) \
                     RETURNING {DELIVERY_COLUMNS}"
                );
                let rows = sqlx::query(&sql).bind(now).bind(i64::from(limit)).bind(f.node()).fetch_all(pool).await?;
                let mut out = rows.iter().map(Self::delivery_row).collect::<Result<Vec<_>, _>>()?;
                out.sort_by_key(|d| d.seq);
                Ok(out)
            }
            _ => {
                let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE {due} ORDER BY d.seq LIMIT $2");
                on_db!(&self.db, pool => sqlx::query(&sql)
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(Self::delivery_row)
                    .collect())
            }
        }
    }

    /// When the next pending delivery is due (with several nodes: not before another node's
    /// claim of it runs out).
    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        let sql = match self.db {
            Db::Sqlite(_) => "SELECT MIN(next_attempt_ms) FROM deliveries WHERE state = 'pending'",
            Db::Postgres(_) => {
                "SELECT MIN(GREATEST(next_attempt_ms, COALESCE(claimed_until_ms, 0))) FROM deliveries \
                 WHERE state = 'pending'"
            }
        };
        let v: Vec<Option<i64>> = on_db!(&self.db, pool => sqlx::query_scalar(sql).fetch_all(pool).await?);
        Ok(v.into_iter().flatten().next())
    }

    /// Records an attempt (and gives up the claim of it).
    pub async fn record_attempt(&self, seq: i64, attempt: &Attempt) -> Result<(), StoreError> {
        let now = super::now_ms();
        let (state, error, next, delivered) = match attempt {
            Attempt::Delivered => ("delivered", None, now, Some(now)),
            Attempt::Retry(e, at) => ("pending", Some(e.as_str()), *at, None),
            Attempt::Failed(e) => ("failed", Some(e.as_str()), now, None),
        };
        let release = if matches!(self.db, Db::Postgres(_)) { ", claimed_until_ms = NULL" } else { "" };
        let sql = format!(
            "UPDATE deliveries SET state = $2, attempts = attempts + 1, last_error = $3, next_attempt_ms = $4, \
             delivered_ms = $5{release} WHERE seq = $1"
        );
        on_db!(&self.db, pool => sqlx::query(&sql)
            .bind(seq)
            .bind(state)
            .bind(error)
            .bind(next)
            .bind(delivered)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Where an incident's key frame is.
    pub fn incident_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("incidents").join(name)
    }
}
