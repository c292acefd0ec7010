//! Incidents and the notification outbox. An incident's change and the deliveries it causes are
//! written in one transaction, so a crash never leaves an incident without its notifications
//! (or notifications of an incident that was never stored).

use sqlx::Row;

use super::{Store, StoreError, parse};

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

const DELIVERY_COLUMNS: &str = "seq, id, incident_id, monitor_id, event, kind, url, secret, body, state, attempts, \
     last_error, created_ms, next_attempt_ms, delivered_ms";

impl Store {
    fn incident_row(r: &sqlx::sqlite::SqliteRow) -> Result<IncidentRow, StoreError> {
        Ok(IncidentRow {
            id: r.try_get("id")?,
            monitor: r.try_get("monitor_id")?,
            opened_ms: r.try_get("opened_ms")?,
            closed_ms: r.try_get("closed_ms")?,
            windows: parse(&r.try_get::<String, _>("windows")?, "incident windows")?,
            clip: r.try_get("clip")?,
        })
    }

    fn delivery_row(r: &sqlx::sqlite::SqliteRow) -> Result<DeliveryRow, StoreError> {
        Ok(DeliveryRow {
            seq: r.try_get("seq")?,
            delivery: NewDelivery {
                id: r.try_get("id")?,
                incident: r.try_get("incident_id")?,
                monitor: r.try_get("monitor_id")?,
                event: r.try_get("event")?,
                kind: r.try_get("kind")?,
                url: r.try_get("url")?,
                secret: r.try_get("secret")?,
                body: r.try_get("body")?,
            },
            state: r.try_get("state")?,
            attempts: r.try_get::<i64, _>("attempts")? as u32,
            last_error: r.try_get("last_error")?,
            created_ms: r.try_get("created_ms")?,
            next_attempt_ms: r.try_get("next_attempt_ms")?,
            delivered_ms: r.try_get("delivered_ms")?,
        })
    }

    /// Stores an incident (new or changed) and queues its notifications, in one transaction.
    pub async fn save_incident(&self, i: &IncidentRow, deliveries: &[NewDelivery]) -> Result<(), StoreError> {
        let now = super::now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO incidents (id, monitor_id, opened_ms, closed_ms, windows, clip) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET closed_ms = excluded.closed_ms, windows = excluded.windows, \
             clip = excluded.clip",
        )
        .bind(&i.id)
        .bind(&i.monitor)
        .bind(i.opened_ms)
        .bind(i.closed_ms)
        .bind(super::json(&i.windows))
        .bind(&i.clip)
        .execute(&mut *tx)
        .await?;
        for d in deliveries {
            sqlx::query(
                "INSERT INTO deliveries (id, incident_id, monitor_id, event, kind, url, secret, body, state, created_ms, \
                 next_attempt_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $9)",
            )
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
        Ok(())
    }

    /// One incident.
    pub async fn incident(&self, id: &str) -> Result<Option<IncidentRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM incidents WHERE id = $1").bind(id).fetch_all(&self.pool).await?.pop();
        row.as_ref().map(Self::incident_row).transpose()
    }

    /// A monitor's open incident, if it has one.
    pub async fn open_incident(&self, monitor: &str) -> Result<Option<IncidentRow>, StoreError> {
        let row = sqlx::query(
            "SELECT * FROM incidents WHERE monitor_id = $1 AND closed_ms IS NULL ORDER BY opened_ms DESC LIMIT 1",
        )
        .bind(monitor)
        .fetch_all(&self.pool)
        .await?
        .pop();
        row.as_ref().map(Self::incident_row).transpose()
    }

    /// Incidents, newest first.
    pub async fn incidents(&self, q: &IncidentQuery) -> Result<Vec<IncidentRow>, StoreError> {
        let mut sql = sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT * FROM incidents WHERE 1 = 1");
        match q.open {
            Some(true) => {
                sql.push(" AND closed_ms IS NULL");
            }
            Some(false) => {
                sql.push(" AND closed_ms IS NOT NULL");
            }
            None => {}
        }
        if let Some(m) = &q.monitor {
            sql.push(" AND monitor_id = ").push_bind(m);
        }
        sql.push(" ORDER BY opened_ms DESC, id DESC LIMIT ").push_bind(i64::from(q.limit));
        let rows = sql.build().fetch_all(&self.pool).await?;
        rows.iter().map(Self::incident_row).collect()
    }

    /// Deliveries, newest first; one incident's when given.
    pub async fn deliveries(&self, incident: Option<&str>, limit: u32) -> Result<Vec<DeliveryRow>, StoreError> {
        let mut sql = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!("SELECT {DELIVERY_COLUMNS} FROM deliveries"));
        if let Some(i) = incident {
            sql.push(" WHERE incident_id = ").push_bind(i);
        }
        sql.push(" ORDER BY seq DESC LIMIT ").push_bind(i64::from(limit));
        let rows = sql.build().fetch_all(&self.pool).await?;
        rows.iter().map(Self::delivery_row).collect()
    }

    /// Pending deliveries due at `now`, oldest first: only the first pending one of each incident
    /// and target, so that receivers get an incident's notifications in order.
    pub async fn due_deliveries(&self, now: i64, limit: u32) -> Result<Vec<DeliveryRow>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.state = 'pending' AND d.next_attempt_ms <= $1 \
             AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.incident_id = d.incident_id AND e.url = d.url \
             AND e.kind = d.kind AND e.state = 'pending' AND e.seq < d.seq) ORDER BY d.seq LIMIT $2"
        );
        let rows = sqlx::query(&sql).bind(now).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(Self::delivery_row).collect()
    }

    /// When the next pending delivery is due.
    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        let v: Vec<Option<i64>> =
            sqlx::query_scalar("SELECT MIN(next_attempt_ms) FROM deliveries WHERE state = 'pending'")
                .fetch_all(&self.pool)
                .await?;
        Ok(v.into_iter().flatten().next())
    }

    /// Records an attempt.
    pub async fn record_attempt(&self, seq: i64, attempt: &Attempt) -> Result<(), StoreError> {
        let now = super::now_ms();
        let (state, error, next, delivered) = match attempt {
            Attempt::Delivered => ("delivered", None, now, Some(now)),
            Attempt::Retry(e, at) => ("pending", Some(e.as_str()), *at, None),
            Attempt::Failed(e) => ("failed", Some(e.as_str()), now, None),
        };
        sqlx::query(
            "UPDATE deliveries SET state = $2, attempts = attempts + 1, last_error = $3, next_attempt_ms = $4, \
             delivered_ms = $5 WHERE seq = $1",
        )
        .bind(seq)
        .bind(state)
        .bind(error)
        .bind(next)
        .bind(delivered)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Where an incident's key frame is.
    pub fn incident_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("incidents").join(name)
    }
}
