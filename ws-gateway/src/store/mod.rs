//! The store: monitors and their history (events, thumbnails), behind one narrow interface.
//!
//! One node keeps an embedded SQLite database, `lookout.db` under the data directory, in WAL
//! mode with `synchronous = NORMAL`: a committed event survives a `kill -9` of the server (only a
//! power loss can take the last transactions), and a crash never corrupts the file. The
//! database is created on first start; versioned migrations (`migrations/sqlite/`, embedded in
//! the binary) bring an older one up to date. Queries use `$N` parameters and portable SQL so
//! that the same ones run on PostgreSQL; full-text search (SQLite FTS5) is the one
//! dialect-specific query, kept in [`Store::events`].
//!
//! Thumbnails are JPEG files under `thumbnails/<monitor>/`, written (to a temporary name, then
//! renamed) before their event row, and deleted with it: a crash between the two leaves at most
//! an orphan file, which the next start removes.
//!
//! sqlx was chosen over rusqlite: it is async (no blocking calls on the runtime, no writer
//! thread of our own), and the same API, pool and migrator serve SQLite now and PostgreSQL for
//! several nodes.
//!
//! Every query is read to its end (`fetch_all`, never `fetch_one` or `fetch_optional`): those
//! leave SQLite's cached statement un-reset, which keeps its transaction open until the
//! statement is next used, so an insert was not yet committed and no checkpoint could pass it
//! (the write-ahead log grew without bound). The retention pass also truncates the log.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use futures_util::future::BoxFuture;
use protocol::{AlertRule, GenerationSettings, Retention, Source, Timings, Usage, WindowSettings};
use sqlx::Row;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A monitor with this name exists.
    #[error("a monitor named {0:?} exists already; choose another name")]
    NameTaken(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The database could not be brought up to date.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A file of the history could not be written or removed.
    #[error("history files: {0}")]
    Io(#[from] std::io::Error),
    /// A stored value does not parse.
    #[error("a stored value is invalid: {0}")]
    Corrupt(String),
}

/// A monitor as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorRow {
    /// Id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Source (with its credentials: never returned as is).
    pub source: Source,
    /// Standing prompt.
    pub prompt: String,
    /// Window settings as given.
    pub window: WindowSettings,
    /// Generation settings as given.
    pub generation: GenerationSettings,
    /// Whether it runs.
    pub enabled: bool,
    /// History limits as given.
    pub retention: Retention,
    /// The alert rule (with its secrets).
    pub alert: Option<AlertRule>,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// Last changed, ms since the epoch.
    pub updated_ms: i64,
}

/// An event to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The monitor.
    pub monitor: String,
    /// Window id within its watch.
    pub window: u64,
    /// Stream time of the first frame.
    pub start_s: f64,
    /// Stream time of the last frame.
    pub end_s: f64,
    /// Wall-clock time of the first frame, ms since the epoch.
    pub started_ms: i64,
    /// The prompt used.
    pub prompt: String,
    /// The answer.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Id (increasing: newer events have larger ids).
    pub id: i64,
    /// What was stored.
    pub event: NewEvent,
    /// The thumbnail's file name, if one was kept.
    pub thumbnail: Option<String>,
}

/// A history query: newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventQuery {
    /// The monitor.
    pub monitor: String,
    /// Events whose first frame is at or after this (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Events whose first frame is before this.
    pub until_ms: Option<i64>,
    /// Events older than this id (the paging cursor).
    pub before_id: Option<i64>,
    /// Words that must all appear in the text.
    pub text: Option<String>,
    /// At most this many.
    pub limit: u32,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Events.
    pub events: u64,
    /// Thumbnail files.
    pub thumbnails: u64,
}

/// The migrations, embedded in the binary.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "monitors and history", include_str!("migrations/sqlite/0001_monitors_and_history.sql")),
    (2, "alerts", include_str!("migrations/sqlite/0002_alerts.sql")),
];

#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        let migrations = self
            .0
            .iter()
            .map(|(v, d, sql)| Migration::new(*v, Cow::Borrowed(*d), MigrationType::Simple, Cow::Borrowed(*sql), false))
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The store of one node.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    dir: PathBuf,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    // Protocol types always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

fn parse<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The FTS5 query for "all of these words": each word quoted as a phrase, so that no input is a
/// syntax error and operators in the input are plain words.
fn fts_query(text: &str) -> Option<String> {
    let words: Vec<String> =
        text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(|w| format!("\"{w}\"")).collect();
    (!words.is_empty()).then(|| words.join(" "))
}

const EVENT_COLUMNS: &str = "id, monitor_id, window_id, start_s, end_s, started_ms, prompt, text, finish_reason, \
     prompt_tokens, completion_tokens, timings, thumbnail";

impl Store {
    /// Opens (creating and migrating when needed) the store under `data_dir`.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let thumbnails = data_dir.join("thumbnails");
        tokio::fs::create_dir_all(&thumbnails).await?;
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(data_dir.join("lookout.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // Checkpoint every 1000 pages, and keep the log file at most 64 MiB after one.
            .pragma("wal_autocheckpoint", "1000")
            .pragma("journal_size_limit", "67108864");
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        Migrator::new(Embedded(SQLITE_MIGRATIONS)).await?.run(&pool).await?;
        let store = Store { pool, dir: data_dir.to_owned() };
        let orphans = store.remove_orphan_thumbnails().await?;
        if orphans > 0 {
            tracing::info!(orphans, "removed thumbnails whose events were never stored");
        }
        Ok(store)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    fn thumbnail_path(&self, name: &str) -> PathBuf {
        self.dir.join("thumbnails").join(name)
    }

    /// Stores a new monitor.
    pub async fn create_monitor(&self, m: &MonitorRow) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO monitors (id, name, source, prompt, window, generation, enabled, retention, created_ms, updated_ms, \
             alert) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&m.id)
        .bind(&m.name)
        .bind(json(&m.source))
        .bind(&m.prompt)
        .bind(json(&m.window))
        .bind(json(&m.generation))
        .bind(m.enabled)
        .bind(json(&m.retention))
        .bind(m.created_ms)
        .bind(m.updated_ms)
        .bind(m.alert.as_ref().map(json))
        .execute(&self.pool)
        .await;
        Self::name_taken(r, &m.name).map(drop)
    }

    fn name_taken<T>(r: Result<T, sqlx::Error>, name: &str) -> Result<T, StoreError> {
        match r {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::NameTaken(name.to_owned())),
            other => Ok(other?),
        }
    }

    /// Replaces a monitor's settings; false if there is no such monitor.
    pub async fn update_monitor(&self, m: &MonitorRow) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE monitors SET name = $2, source = $3, prompt = $4, window = $5, generation = $6, enabled = $7, \
             retention = $8, updated_ms = $9, alert = $10 WHERE id = $1",
        )
        .bind(&m.id)
        .bind(&m.name)
        .bind(json(&m.source))
        .bind(&m.prompt)
        .bind(json(&m.window))
        .bind(json(&m.generation))
        .bind(m.enabled)
        .bind(json(&m.retention))
        .bind(m.updated_ms)
        .bind(m.alert.as_ref().map(json))
        .execute(&self.pool)
        .await;
        Ok(Self::name_taken(r, &m.name)?.rows_affected() == 1)
    }

    /// Deletes a monitor, its events and their thumbnails; false if there is no such monitor.
    pub async fn delete_monitor(&self, id: &str) -> Result<bool, StoreError> {
        let files: Vec<String> =
            sqlx::query_scalar("SELECT thumbnail FROM events WHERE monitor_id = $1 AND thumbnail IS NOT NULL")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        let incidents: Vec<String> =
            sqlx::query_scalar("SELECT id FROM incidents WHERE monitor_id = $1").bind(id).fetch_all(&self.pool).await?;
        let deleted = sqlx::query("DELETE FROM monitors WHERE id = $1").bind(id).execute(&self.pool).await?;
        for f in files {
            self.remove_file(&f).await;
        }
        for i in incidents {
            let _ = tokio::fs::remove_dir_all(self.incident_file(&i)).await;
        }
        let _ = tokio::fs::remove_dir(self.dir.join("thumbnails").join(id)).await;
        Ok(deleted.rows_affected() == 1)
    }

    async fn remove_file(&self, name: &str) {
        if let Err(e) = tokio::fs::remove_file(self.thumbnail_path(name)).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, file = name, "cannot remove a thumbnail");
        }
    }

    fn monitor_row(r: &sqlx::sqlite::SqliteRow) -> Result<MonitorRow, StoreError> {
        Ok(MonitorRow {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            source: parse(&r.try_get::<String, _>("source")?, "source")?,
            prompt: r.try_get("prompt")?,
            window: parse(&r.try_get::<String, _>("window")?, "window")?,
            generation: parse(&r.try_get::<String, _>("generation")?, "generation")?,
            enabled: r.try_get("enabled")?,
            retention: parse(&r.try_get::<String, _>("retention")?, "retention")?,
            alert: r.try_get::<Option<String>, _>("alert")?.map(|a| parse(&a, "alert")).transpose()?,
            created_ms: r.try_get("created_ms")?,
            updated_ms: r.try_get("updated_ms")?,
        })
    }

    /// Every monitor, oldest first.
    pub async fn monitors(&self) -> Result<Vec<MonitorRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM monitors ORDER BY created_ms, id").fetch_all(&self.pool).await?;
        rows.iter().map(Self::monitor_row).collect()
    }

    /// One monitor.
    pub async fn monitor(&self, id: &str) -> Result<Option<MonitorRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM monitors WHERE id = $1").bind(id).fetch_all(&self.pool).await?.pop();
        row.as_ref().map(Self::monitor_row).transpose()
    }

    /// Stores an event, and its thumbnail first when there is one. Returns its id.
    pub async fn insert_event(&self, e: &NewEvent, thumbnail: Option<&[u8]>) -> Result<i64, StoreError> {
        let mut file = None;
        if let Some(jpeg) = thumbnail {
            let dir = self.dir.join("thumbnails").join(&e.monitor);
            tokio::fs::create_dir_all(&dir).await?;
            let name = format!("{}/{}-{}.jpg", e.monitor, e.started_ms, crate::server::new_id());
            let tmp = self.thumbnail_path(&format!("{name}.part"));
            tokio::fs::write(&tmp, jpeg).await?;
            tokio::fs::rename(&tmp, self.thumbnail_path(&name)).await?;
            file = Some((name, jpeg.len() as i64));
        }
        // `fetch_all`, not `fetch_one`: the statement runs to its end, so that SQLite commits
        // (and checkpoints) now rather than when the cached statement is next reset.
        let ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO events (monitor_id, window_id, start_s, end_s, started_ms, prompt, text, finish_reason, \
             prompt_tokens, completion_tokens, timings, thumbnail, thumbnail_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id",
        )
        .bind(&e.monitor)
        .bind(e.window as i64)
        .bind(e.start_s)
        .bind(e.end_s)
        .bind(e.started_ms)
        .bind(&e.prompt)
        .bind(&e.text)
        .bind(&e.finish_reason)
        .bind(e.usage.prompt_tokens as i64)
        .bind(e.usage.completion_tokens as i64)
        .bind(json(&e.timings))
        .bind(file.as_ref().map(|f| f.0.clone()))
        .bind(file.as_ref().map_or(0, |f| f.1))
        .fetch_all(&self.pool)
        .await
        .inspect_err(|_| {
            if let Some((name, _)) = &file {
                let _ = std::fs::remove_file(self.thumbnail_path(name));
            }
        })?;
        ids.first().copied().ok_or(StoreError::Corrupt("an insert returned no id".into()))
    }

    fn event_row(r: &sqlx::sqlite::SqliteRow) -> Result<EventRow, StoreError> {
        let prompt_tokens: i64 = r.try_get("prompt_tokens")?;
        let completion_tokens: i64 = r.try_get("completion_tokens")?;
        Ok(EventRow {
            id: r.try_get("id")?,
            event: NewEvent {
                monitor: r.try_get("monitor_id")?,
                window: r.try_get::<i64, _>("window_id")? as u64,
                start_s: r.try_get("start_s")?,
                end_s: r.try_get("end_s")?,
                started_ms: r.try_get("started_ms")?,
                prompt: r.try_get("prompt")?,
                text: r.try_get("text")?,
                finish_reason: r.try_get("finish_reason")?,
                usage: Usage {
                    prompt_tokens: prompt_tokens as usize,
                    completion_tokens: completion_tokens as usize,
                    total_tokens: (prompt_tokens + completion_tokens) as usize,
                },
                timings: parse(&r.try_get::<String, _>("timings")?, "timings")?,
            },
            thumbnail: r.try_get("thumbnail")?,
        })
    }

    /// A page of a monitor's history, newest first.
    ///
    /// Only the filters given become conditions: a `($n IS NULL OR ...)` form would keep SQLite
    /// from using the time index. A text search drives the query from the full-text index (the
    /// rare word is found first, then its events), which is the one dialect-specific part: FTS5's
    /// MATCH here, a tsvector in PostgreSQL.
    pub async fn events(&self, q: &EventQuery) -> Result<Vec<EventRow>, StoreError> {
        let columns = EVENT_COLUMNS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ");
        let mut sql = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!("SELECT {columns} FROM "));
        let search = q.text.as_deref().and_then(fts_query);
        // Ordered by the index that drives the query, so that the planner walks it.
        let order = if search.is_some() { "f.rowid" } else { "e.id" };
        match search {
            Some(search) => {
                sql.push("events_fts f JOIN events e ON e.id = f.rowid WHERE events_fts MATCH ");
                sql.push_bind(search);
                sql.push(" AND e.monitor_id = ");
            }
            None => {
                sql.push("events e WHERE e.monitor_id = ");
            }
        }
        sql.push_bind(&q.monitor);
        if let Some(since) = q.since_ms {
            sql.push(" AND e.started_ms >= ").push_bind(since);
        }
        if let Some(until) = q.until_ms {
            sql.push(" AND e.started_ms < ").push_bind(until);
        }
        if let Some(before) = q.before_id {
            sql.push(format!(" AND {order} < ")).push_bind(before);
        }
        sql.push(format!(" ORDER BY {order} DESC LIMIT ")).push_bind(i64::from(q.limit));
        let rows = sql.build().fetch_all(&self.pool).await?;
        rows.iter().map(Self::event_row).collect()
    }

    /// One event.
    pub async fn event(&self, id: i64) -> Result<Option<EventRow>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1");
        let row = sqlx::query(&sql).bind(id).fetch_all(&self.pool).await?.pop();
        row.as_ref().map(Self::event_row).transpose()
    }

    /// Where an event's thumbnail file is.
    pub fn thumbnail_file(&self, name: &str) -> PathBuf {
        self.thumbnail_path(name)
    }

    /// How many events a monitor has.
    pub async fn count_events(&self, monitor: &str) -> Result<u64, StoreError> {
        let n: Option<i64> = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE monitor_id = $1")
            .bind(monitor)
            .fetch_all(&self.pool)
            .await?
            .pop();
        Ok(n.unwrap_or(0) as u64)
    }

    /// Enforces a monitor's retention: events that started before `older_than_ms`, and all but
    /// the newest `keep`, go with their thumbnails.
    pub async fn prune(
        &self,
        monitor: &str,
        older_than_ms: Option<i64>,
        keep: Option<u64>,
    ) -> Result<Pruned, StoreError> {
        // The newest event that may be dropped for the count limit (all older ones go too).
        let cut_id: Option<i64> = match keep {
            Some(k) => {
                sqlx::query_scalar("SELECT id FROM events WHERE monitor_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2")
                    .bind(monitor)
                    .bind(k as i64)
                    .fetch_all(&self.pool)
                    .await?
                    .pop()
            }
            None => None,
        };
        if older_than_ms.is_none() && cut_id.is_none() {
            return Ok(Pruned::default());
        }
        let condition = "monitor_id = $1 AND (($2 IS NOT NULL AND started_ms < $2) OR ($3 IS NOT NULL AND id <= $3))";
        let files: Vec<Option<String>> = sqlx::query_scalar(&format!("SELECT thumbnail FROM events WHERE {condition}"))
            .bind(monitor)
            .bind(older_than_ms)
            .bind(cut_id)
            .fetch_all(&self.pool)
            .await?;
        let deleted = sqlx::query(&format!("DELETE FROM events WHERE {condition}"))
            .bind(monitor)
            .bind(older_than_ms)
            .bind(cut_id)
            .execute(&self.pool)
            .await?;
        let mut thumbnails = 0;
        for f in files.into_iter().flatten() {
            self.remove_file(&f).await;
            thumbnails += 1;
        }
        Ok(Pruned { events: deleted.rows_affected(), thumbnails })
    }

    /// Copies the write-ahead log into the database and truncates it (SQLite's own automatic
    /// checkpoints never shrink the file, and a reader at the wrong moment starves them). Returns
    /// whether a reader kept it from completing.
    pub async fn checkpoint(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").fetch_all(&self.pool).await?;
        let row = row.first().ok_or_else(|| StoreError::Corrupt("a checkpoint returned nothing".into()))?;
        let busy: i64 = row.try_get(0)?;
        Ok(busy != 0)
    }

    /// Bytes the history takes on disk: the database (with its write-ahead log) and thumbnails.
    pub async fn disk_bytes(&self) -> Result<u64, StoreError> {
        let thumbs: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(thumbnail_bytes), 0) FROM events")
            .fetch_all(&self.pool)
            .await?
            .pop()
            .unwrap_or(0);
        let mut db = 0;
        for f in ["lookout.db", "lookout.db-wal"] {
            db += tokio::fs::metadata(self.dir.join(f)).await.map_or(0, |m| m.len());
        }
        Ok(db + thumbs as u64)
    }

    /// Removes thumbnail files no event refers to (a crash between the file and its row).
    async fn remove_orphan_thumbnails(&self) -> Result<u64, StoreError> {
        let root = self.dir.join("thumbnails");
        let mut removed = 0;
        let Ok(mut monitors) = tokio::fs::read_dir(&root).await else { return Ok(0) };
        while let Some(m) = monitors.next_entry().await? {
            if !m.file_type().await?.is_dir() {
                continue;
            }
            let monitor = m.file_name().to_string_lossy().into_owned();
            let known: std::collections::HashSet<String> =
                sqlx::query_scalar("SELECT thumbnail FROM events WHERE monitor_id = $1 AND thumbnail IS NOT NULL")
                    .bind(&monitor)
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .collect();
            let mut files = tokio::fs::read_dir(m.path()).await?;
            while let Some(f) = files.next_entry().await? {
                let name = format!("{monitor}/{}", f.file_name().to_string_lossy());
                if !known.contains(&name) {
                    let _ = tokio::fs::remove_file(f.path()).await;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// The effective retention of a monitor: its own limits, else the server's.
    pub fn effective(given: Retention, default: Retention) -> Retention {
        Retention { days: given.days.or(default.days), max_events: given.max_events.or(default.max_events) }
    }
}

mod alerts;
#[cfg(test)]
mod tests;

pub use alerts::{Attempt, DeliveryRow, IncidentQuery, IncidentRow, IncidentWindowRow, NewDelivery};
