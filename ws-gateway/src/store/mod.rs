//! The store: monitors and their history (events, thumbnails), incidents and the notification
//! outbox, behind one narrow interface, on SQLite (one node) or PostgreSQL (several nodes).
//!
//! One node keeps an embedded SQLite database, `lookout.db` under the data directory, in WAL
//! mode with `synchronous = NORMAL`: a committed event survives a `kill -9` of the server (only a
//! power loss can take the last transactions), and a crash never corrupts the file. The
//! database is created on first start; versioned migrations (`migrations/sqlite/`, embedded in
//! the binary) bring an older one up to date.
//!
//! Several nodes share one PostgreSQL database (`--database postgres://…`, migrations in
//! `migrations/postgres/`), which also holds the nodes and the leases that decide which node runs
//! each monitor ([`cluster`]). Queries use `$N` parameters and portable SQL, written once and run
//! on either pool (`on_db!`); the dialect-specific ones are full-text search (FTS5 or a
//! tsvector, in [`Store::events`]), the write-ahead-log checkpoint, the database's size, and what
//! only several nodes need: leases, the lease check on every write (a node whose lease was taken
//! over can store nothing more for that monitor: fencing), and claiming outbox rows.
//!
//! Thumbnails are JPEG files under `thumbnails/<monitor>/`, written (to a temporary name, then
//! renamed) before their event row, and deleted with it: a crash between the two leaves at most
//! an orphan file, which the next start removes. With several nodes the data directory is one
//! shared directory (uploads, thumbnails, incident frames and clips: media stays out of the
//! database, as in an NVR, so that its backups and replication carry only the index).
//!
//! sqlx was chosen over rusqlite: it is async (no blocking calls on the runtime, no writer
//! thread of our own), and the same API, pool and migrator serve SQLite and PostgreSQL.
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
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};

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
    /// This node no longer holds the monitor's lease (another node runs it now): nothing of it
    /// is stored from here.
    #[error("this node no longer holds the lease of monitor {0:?}")]
    Fenced(String),
    /// What only several nodes (PostgreSQL) do was asked of a one-node store.
    #[error("{0} needs --database postgres://…")]
    NotClustered(&'static str),
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

/// The same schema on PostgreSQL, and what only several nodes need.
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "monitors and history", include_str!("migrations/postgres/0001_monitors_and_history.sql")),
    (2, "alerts", include_str!("migrations/postgres/0002_alerts.sql")),
    (3, "nodes and leases", include_str!("migrations/postgres/0003_nodes_and_leases.sql")),
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

/// The database: embedded, or shared by several nodes.
#[derive(Debug, Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store has: the same query text and
/// binds, each arm typed for its database.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// Reading a column of either database's rows.
trait Read {
    fn text(&self, c: &str) -> Result<String, sqlx::Error>;
    fn text_opt(&self, c: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, c: &str) -> Result<i64, sqlx::Error>;
    fn int_opt(&self, c: &str) -> Result<Option<i64>, sqlx::Error>;
    fn float(&self, c: &str) -> Result<f64, sqlx::Error>;
    fn flag(&self, c: &str) -> Result<bool, sqlx::Error>;
}

macro_rules! impl_read {
    ($row:ty) => {
        impl Read for $row {
            fn text(&self, c: &str) -> Result<String, sqlx::Error> {
                self.try_get(c)
            }
            fn text_opt(&self, c: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(c)
            }
            fn int(&self, c: &str) -> Result<i64, sqlx::Error> {
                self.try_get(c)
            }
            fn int_opt(&self, c: &str) -> Result<Option<i64>, sqlx::Error> {
                self.try_get(c)
            }
            fn float(&self, c: &str) -> Result<f64, sqlx::Error> {
                self.try_get(c)
            }
            fn flag(&self, c: &str) -> Result<bool, sqlx::Error> {
                self.try_get(c)
            }
        }
    };
}
impl_read!(SqliteRow);
impl_read!(PgRow);

/// A bind value of a query built at run time.
#[derive(Debug, Clone)]
enum Param {
    Int(i64),
    Text(String),
}

/// Binds `params` in order.
fn bind_all<'q, DB: sqlx::Database>(
    mut q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    params: &'q [Param],
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for p in params {
        q = match p {
            Param::Int(i) => q.bind(*i),
            Param::Text(t) => q.bind(t.as_str()),
        };
    }
    q
}

/// The node this store writes for, when several share the database: its id, and the lease
/// generation of each monitor it holds (every write of a monitor's events and incidents
/// checks it).
#[derive(Debug, Default)]
pub(crate) struct Fences {
    node: String,
    held: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

impl Fences {
    fn generation(&self, monitor: &str) -> Option<i64> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).get(monitor).copied()
    }

    /// The node's id.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Records a lease taken or renewed.
    pub(crate) fn hold(&self, monitor: &str, generation: i64) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(monitor.to_owned(), generation);
    }

    /// Forgets a lease given up or lost: nothing more of that monitor is stored from here.
    pub(crate) fn drop_lease(&self, monitor: &str) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(monitor);
    }

    /// Forgets every lease.
    pub(crate) fn drop_all(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Holds exactly these leases.
    pub(crate) fn replace(&self, leases: &[cluster::Lease]) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) =
            leases.iter().map(|l| (l.monitor.clone(), l.generation)).collect();
    }
}

/// The store of a node.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    dir: PathBuf,
    /// Set when several nodes share a PostgreSQL database.
    fences: Option<std::sync::Arc<Fences>>,
}

/// The lease check appended to a fenced write's `WHERE` (parameters `$monitor`, `$node`,
/// `$generation` by number). It share-locks the lease row, so a takeover (which updates the
/// row) waits for the write's transaction to end: no write of the old holder lands after it.
fn lease_check(monitor: usize, node: usize, generation: usize) -> String {
    format!(
        "EXISTS (SELECT 1 FROM leases WHERE monitor_id = ${monitor} AND node_id = ${node} AND generation = \
         ${generation} AND expires_ms > lookout_now_ms() FOR SHARE)"
    )
}

fn json<T: serde::Serialize>(v: &T) -> String {
    // Protocol types always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

fn parse<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The words of a history search (none: no search).
fn search_words(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect()
}

/// The FTS5 query for "all of these words": each word quoted as a phrase, so that no input is a
/// syntax error and operators in the input are plain words.
fn fts_query(words: &[&str]) -> String {
    words.iter().map(|w| format!("\"{w}\"")).collect::<Vec<_>>().join(" ")
}

const EVENT_COLUMNS: &str = "id, monitor_id, window_id, start_s, end_s, started_ms, prompt, text, finish_reason, \
     prompt_tokens, completion_tokens, timings, thumbnail";

impl Store {
    /// Opens (creating and migrating when needed) the one-node store under `data_dir`.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        tokio::fs::create_dir_all(data_dir.join("thumbnails")).await?;
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
        let store = Store { db: Db::Sqlite(pool), dir: data_dir.to_owned(), fences: None };
        store.sweep_orphans(Duration::ZERO).await?;
        Ok(store)
    }

    /// Opens (migrating when needed) a PostgreSQL database that several nodes share, as node
    /// `node`; `data_dir` is the directory every node shares for media.
    pub async fn open_postgres(url: &str, data_dir: &Path, node: &str) -> Result<Store, StoreError> {
        tokio::fs::create_dir_all(data_dir.join("thumbnails")).await?;
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        // The migrator holds an advisory lock, so nodes starting together migrate once.
        Migrator::new(Embedded(POSTGRES_MIGRATIONS)).await?.run(&pool).await?;
        let fences = std::sync::Arc::new(Fences { node: node.to_owned(), ..Default::default() });
        let store = Store { db: Db::Postgres(pool), dir: data_dir.to_owned(), fences: Some(fences) };
        // Another node may be between writing a thumbnail and its row: only old orphans go.
        store.sweep_orphans(Duration::from_secs(600)).await?;
        Ok(store)
    }

    async fn sweep_orphans(&self, older_than: Duration) -> Result<(), StoreError> {
        let orphans = self.remove_orphan_thumbnails(older_than).await?;
        if orphans > 0 {
            tracing::info!(orphans, "removed thumbnails whose events were never stored");
        }
        Ok(())
    }

    /// The leases this node holds, when several nodes share the database.
    pub(crate) fn fences(&self) -> Option<&std::sync::Arc<Fences>> {
        self.fences.as_ref()
    }

    /// This node's id, when several nodes share this store.
    pub fn node_id(&self) -> Option<&str> {
        self.fences.as_ref().map(|f| f.node())
    }

    /// Whether several nodes share this store.
    pub fn is_shared(&self) -> bool {
        self.fences.is_some()
    }

    /// The lease generation this node must hold to write for `monitor`: `None` on one node;
    /// an error when several share the database and this node holds no lease of it.
    fn fence(&self, monitor: &str) -> Result<Option<(&str, i64)>, StoreError> {
        match &self.fences {
            None => Ok(None),
            Some(f) => match f.generation(monitor) {
                Some(g) => Ok(Some((f.node(), g))),
                None => Err(StoreError::Fenced(monitor.to_owned())),
            },
        }
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
        let sql = "INSERT INTO monitors (id, name, source, prompt, \"window\", generation, enabled, retention, created_ms, \
                   updated_ms, alert) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
        let r = on_db!(&self.db, pool => sqlx::query(sql)
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
            .execute(pool)
            .await
            .map(|r| r.rows_affected()));
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
        let sql = "UPDATE monitors SET name = $2, source = $3, prompt = $4, \"window\" = $5, generation = $6, \
                   enabled = $7, retention = $8, updated_ms = $9, alert = $10 WHERE id = $1";
        let r = on_db!(&self.db, pool => sqlx::query(sql)
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
            .execute(pool)
            .await
            .map(|r| r.rows_affected()));
        Ok(Self::name_taken(r, &m.name)? == 1)
    }

    /// Deletes a monitor, its events and their thumbnails; false if there is no such monitor.
    pub async fn delete_monitor(&self, id: &str) -> Result<bool, StoreError> {
        let files = self.thumbnails_of(id).await?;
        let incidents: Vec<String> = on_db!(&self.db, pool => sqlx::query_scalar("SELECT id FROM incidents WHERE monitor_id = $1")
            .bind(id)
            .fetch_all(pool)
            .await?);
        let deleted = on_db!(&self.db, pool => sqlx::query("DELETE FROM monitors WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected());
        for f in files {
            self.remove_file(&f).await;
        }
        for i in incidents {
            let _ = tokio::fs::remove_dir_all(self.incident_file(&i)).await;
        }
        let _ = tokio::fs::remove_dir(self.dir.join("thumbnails").join(id)).await;
        Ok(deleted == 1)
    }

    /// The thumbnail files of a monitor's events.
    async fn thumbnails_of(&self, monitor: &str) -> Result<Vec<String>, StoreError> {
        let sql = "SELECT thumbnail FROM events WHERE monitor_id = $1 AND thumbnail IS NOT NULL";
        Ok(on_db!(&self.db, pool => sqlx::query_scalar(sql).bind(monitor).fetch_all(pool).await?))
    }

    async fn remove_file(&self, name: &str) {
        if let Err(e) = tokio::fs::remove_file(self.thumbnail_path(name)).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, file = name, "cannot remove a thumbnail");
        }
    }

    fn monitor_row(r: &impl Read) -> Result<MonitorRow, StoreError> {
        Ok(MonitorRow {
            id: r.text("id")?,
            name: r.text("name")?,
            source: parse(&r.text("source")?, "source")?,
            prompt: r.text("prompt")?,
            window: parse(&r.text("window")?, "window")?,
            generation: parse(&r.text("generation")?, "generation")?,
            enabled: r.flag("enabled")?,
            retention: parse(&r.text("retention")?, "retention")?,
            alert: r.text_opt("alert")?.map(|a| parse(&a, "alert")).transpose()?,
            created_ms: r.int("created_ms")?,
            updated_ms: r.int("updated_ms")?,
        })
    }

    /// Every monitor, oldest first.
    pub async fn monitors(&self) -> Result<Vec<MonitorRow>, StoreError> {
        let sql = "SELECT * FROM monitors ORDER BY created_ms, id";
        on_db!(&self.db, pool => sqlx::query(sql).fetch_all(pool).await?.iter().map(Self::monitor_row).collect())
    }

    /// One monitor.
    pub async fn monitor(&self, id: &str) -> Result<Option<MonitorRow>, StoreError> {
        let sql = "SELECT * FROM monitors WHERE id = $1";
        on_db!(&self.db, pool => sqlx::query(sql).bind(id).fetch_all(pool).await?.first().map(Self::monitor_row).transpose())
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
        // (and checkpoints) now rather than when the cached statement is next reset. With
        // several nodes the row goes in only while this node holds the monitor's lease.
        let (fence, node, generation) = match self.fence(&e.monitor) {
            Ok(Some((node, g))) => (format!(" WHERE {}", lease_check(1, 14, 15)), node.to_owned(), g),
            Ok(None) => (String::new(), String::new(), 0),
            Err(err) => {
                self.remove_unstored(file.as_ref());
                return Err(err);
            }
        };
        let sql = format!(
            "INSERT INTO events (monitor_id, window_id, start_s, end_s, started_ms, prompt, text, finish_reason, \
             prompt_tokens, completion_tokens, timings, thumbnail, thumbnail_bytes) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13{fence} RETURNING id"
        );
        let ids: Result<Vec<i64>, sqlx::Error> = on_db!(&self.db, pool => {
            let q = sqlx::query_scalar(&sql)
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
                .bind(file.as_ref().map_or(0, |f| f.1));
            let q = if fence.is_empty() { q } else { q.bind(&node).bind(generation) };
            q.fetch_all(pool).await
        });
        let ids = ids.inspect_err(|_| self.remove_unstored(file.as_ref()))?;
        if ids.is_empty() && !fence.is_empty() {
            self.remove_unstored(file.as_ref());
            return Err(StoreError::Fenced(e.monitor.clone()));
        }
        ids.first().copied().ok_or(StoreError::Corrupt("an insert returned no id".into()))
    }

    /// Removes the thumbnail of an event that was not stored.
    fn remove_unstored(&self, file: Option<&(String, i64)>) {
        if let Some((name, _)) = file {
            let _ = std::fs::remove_file(self.thumbnail_path(name));
        }
    }

    fn event_row(r: &impl Read) -> Result<EventRow, StoreError> {
        let prompt_tokens = r.int("prompt_tokens")?;
        let completion_tokens = r.int("completion_tokens")?;
        Ok(EventRow {
            id: r.int("id")?,
            event: NewEvent {
                monitor: r.text("monitor_id")?,
                window: r.int("window_id")? as u64,
                start_s: r.float("start_s")?,
                end_s: r.float("end_s")?,
                started_ms: r.int("started_ms")?,
                prompt: r.text("prompt")?,
                text: r.text("text")?,
                finish_reason: r.text("finish_reason")?,
                usage: Usage {
                    prompt_tokens: prompt_tokens as usize,
                    completion_tokens: completion_tokens as usize,
                    total_tokens: (prompt_tokens + completion_tokens) as usize,
                },
                timings: parse(&r.text("timings")?, "timings")?,
            },
            thumbnail: r.text_opt("thumbnail")?,
        })
    }

    /// A page of a monitor's history, newest first.
    ///
    /// Only the filters given become conditions: a `($n IS NULL OR ...)` form would keep SQLite
    /// from using the time index. A text search is the one dialect-specific part: on SQLite it
    /// drives the query from the FTS5 index (the rare word is found first, then its events); on
    /// PostgreSQL a GIN index of a tsvector of the text (`simple` configuration: words as
    /// written, lower-cased, no stemming, like FTS5's default tokenizer).
    pub async fn events(&self, q: &EventQuery) -> Result<Vec<EventRow>, StoreError> {
        let columns = EVENT_COLUMNS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ");
        let mut params = Vec::new();
        let mut arg = |p: Param| {
            params.push(p);
            format!("${}", params.len())
        };
        let words = q.text.as_deref().map(search_words).filter(|w| !w.is_empty());
        // Ordered by the index that drives the query, so that the planner walks it.
        let (from, order) = match (&self.db, words) {
            (Db::Sqlite(_), Some(words)) => (
                format!(
                    "events_fts f JOIN events e ON e.id = f.rowid WHERE events_fts MATCH {} AND",
                    arg(Param::Text(fts_query(&words)))
                ),
                "f.rowid",
            ),
            (Db::Postgres(_), Some(words)) => (
                // plainto_tsquery takes any text and ANDs its words.
                format!(
                    "events e WHERE e.search @@ plainto_tsquery('simple', {}) AND",
                    arg(Param::Text(words.join(" ")))
                ),
                "e.id",
            ),
            (_, None) => ("events e WHERE".to_owned(), "e.id"),
        };
        let mut sql = format!("SELECT {columns} FROM {from} e.monitor_id = {}", arg(Param::Text(q.monitor.clone())));
        if let Some(since) = q.since_ms {
            sql += &format!(" AND e.started_ms >= {}", arg(Param::Int(since)));
        }
        if let Some(until) = q.until_ms {
            sql += &format!(" AND e.started_ms < {}", arg(Param::Int(until)));
        }
        if let Some(before) = q.before_id {
            sql += &format!(" AND {order} < {}", arg(Param::Int(before)));
        }
        // PostgreSQL would walk the id index backwards past every newer event to find a rare
        // word or an old time range (400 ms at a million events); ordering by an expression
        // makes it find them by their own index first, then sort what it found.
        let filtered = q.text.is_some() || q.since_ms.is_some() || q.until_ms.is_some();
        let sort =
            if matches!(self.db, Db::Postgres(_)) && filtered { format!("({order} + 0)") } else { order.to_owned() };
        sql += &format!(" ORDER BY {sort} DESC LIMIT {}", arg(Param::Int(i64::from(q.limit))));
        on_db!(&self.db, pool => bind_all(sqlx::query(&sql), &params)
            .fetch_all(pool)
            .await?
            .iter()
            .map(Self::event_row)
            .collect())
    }

    /// One event.
    pub async fn event(&self, id: i64) -> Result<Option<EventRow>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1");
        on_db!(&self.db, pool => sqlx::query(&sql).bind(id).fetch_all(pool).await?.first().map(Self::event_row).transpose())
    }

    /// Where an event's thumbnail file is.
    pub fn thumbnail_file(&self, name: &str) -> PathBuf {
        self.thumbnail_path(name)
    }

    /// How many events a monitor has.
    pub async fn count_events(&self, monitor: &str) -> Result<u64, StoreError> {
        let sql = "SELECT COUNT(*) FROM events WHERE monitor_id = $1";
        let n: Option<i64> =
            on_db!(&self.db, pool => sqlx::query_scalar(sql).bind(monitor).fetch_all(pool).await?.pop());
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
                let sql = "SELECT id FROM events WHERE monitor_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2";
                on_db!(&self.db, pool => sqlx::query_scalar(sql).bind(monitor).bind(k as i64).fetch_all(pool).await?.pop())
            }
            None => None,
        };
        if older_than_ms.is_none() && cut_id.is_none() {
            return Ok(Pruned::default());
        }
        let condition = "monitor_id = $1 AND (($2 IS NOT NULL AND started_ms < $2) OR ($3 IS NOT NULL AND id <= $3))";
        let select = format!("SELECT thumbnail FROM events WHERE {condition}");
        let delete = format!("DELETE FROM events WHERE {condition}");
        let (files, deleted): (Vec<Option<String>>, u64) = on_db!(&self.db, pool => {
            let files = sqlx::query_scalar(&select).bind(monitor).bind(older_than_ms).bind(cut_id).fetch_all(pool).await?;
            let deleted =
                sqlx::query(&delete).bind(monitor).bind(older_than_ms).bind(cut_id).execute(pool).await?.rows_affected();
            (files, deleted)
        });
        let mut thumbnails = 0;
        for f in files.into_iter().flatten() {
            self.remove_file(&f).await;
            thumbnails += 1;
        }
        Ok(Pruned { events: deleted, thumbnails })
    }

    /// Copies the write-ahead log into the database and truncates it (SQLite's own automatic
    /// checkpoints never shrink the file, and a reader at the wrong moment starves them). Returns
    /// whether a reader kept it from completing.
    /// PostgreSQL keeps its own log: nothing to do there.
    pub async fn checkpoint(&self) -> Result<bool, StoreError> {
        let Db::Sqlite(pool) = &self.db else { return Ok(false) };
        let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").fetch_all(pool).await?;
        let row = row.first().ok_or_else(|| StoreError::Corrupt("a checkpoint returned nothing".into()))?;
        let busy: i64 = row.try_get(0)?;
        Ok(busy != 0)
    }

    /// Bytes the history takes on disk: the database (with its write-ahead log, or PostgreSQL's
    /// database size) and thumbnails.
    pub async fn disk_bytes(&self) -> Result<u64, StoreError> {
        let sql = "SELECT CAST(COALESCE(SUM(thumbnail_bytes), 0) AS BIGINT) FROM events";
        let thumbs: i64 = on_db!(&self.db, pool => sqlx::query_scalar(sql).fetch_all(pool).await?.pop().unwrap_or(0));
        let db = match &self.db {
            Db::Sqlite(_) => {
                let mut db = 0;
                for f in ["lookout.db", "lookout.db-wal"] {
                    db += tokio::fs::metadata(self.dir.join(f)).await.map_or(0, |m| m.len());
                }
                db
            }
            Db::Postgres(pool) => {
                let sql = "SELECT pg_database_size(current_database())";
                let n: Option<i64> = sqlx::query_scalar(sql).fetch_all(pool).await?.pop();
                n.unwrap_or(0) as u64
            }
        };
        Ok(db + thumbs as u64)
    }

    /// Removes thumbnail files no event refers to (a crash between the file and its row), of
    /// those last changed at least `older_than` ago.
    async fn remove_orphan_thumbnails(&self, older_than: Duration) -> Result<u64, StoreError> {
        let root = self.dir.join("thumbnails");
        let mut removed = 0;
        let Ok(mut monitors) = tokio::fs::read_dir(&root).await else { return Ok(0) };
        while let Some(m) = monitors.next_entry().await? {
            if !m.file_type().await?.is_dir() {
                continue;
            }
            let monitor = m.file_name().to_string_lossy().into_owned();
            let known: std::collections::HashSet<String> = self.thumbnails_of(&monitor).await?.into_iter().collect();
            let mut files = tokio::fs::read_dir(m.path()).await?;
            while let Some(f) = files.next_entry().await? {
                let name = format!("{monitor}/{}", f.file_name().to_string_lossy());
                let age = f.metadata().await.ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                if !known.contains(&name) && age.is_none_or(|a| a >= older_than) {
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
mod cluster;
#[cfg(test)]
mod tests;

pub use alerts::{Attempt, DeliveryRow, IncidentQuery, IncidentRow, IncidentWindowRow, NewDelivery};
pub use cluster::{Lease, LeaseState, NodeRow};
