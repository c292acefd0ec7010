//! The store on a real SQLite file in a temporary directory, and the same tests on a real
//! PostgreSQL server (with the leases only several nodes have).

use protocol::{GenerationSettings, Retention, Source, Timings, Usage, WindowSettings};

use super::*;

#[path = "../../tests/common/postgres.rs"]
mod postgres;

/// Where a test's store lives: a directory, and a PostgreSQL database when given.
struct Place {
    dir: PathBuf,
    url: Option<String>,
}

impl Place {
    fn sqlite() -> Place {
        Place { dir: dir(), url: None }
    }

    fn postgres() -> Place {
        Place { dir: dir(), url: Some(postgres::shared().database()) }
    }

    /// Opens the store (as node `test` on PostgreSQL).
    async fn open(&self) -> Store {
        self.open_as("test").await
    }

    async fn open_as(&self, node: &str) -> Store {
        match &self.url {
            None => Store::open(&self.dir).await.unwrap(),
            Some(url) => {
                let s = Store::open_postgres(url, &self.dir, node).await.unwrap();
                s.heartbeat("http://127.0.0.1:1", 100).await.unwrap();
                s
            }
        }
    }
}

/// Takes the lease of every enabled monitor when several nodes could share the store (writes
/// need one there).
async fn lease_all(s: &Store) {
    if s.is_shared() {
        s.claim(100, 60_000).await.unwrap();
    }
}

/// A test on SQLite and on PostgreSQL.
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Place::sqlite()).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::Place::postgres()).await
            }
        }
    };
}

on_both!(monitors_round_trip_and_names_are_unique);
on_both!(history_pages_newest_first_filters_by_time_and_searches_words);
on_both!(retention_prunes_by_age_and_count_with_the_thumbnails);

fn dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lookout-store-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn monitor(id: &str, name: &str) -> MonitorRow {
    MonitorRow {
        id: id.into(),
        name: name.into(),
        source: Source::Rtsp { url: "rtsp://u:p@cam/x".into(), transport: None },
        prompt: "Is anyone at the door?".into(),
        window: WindowSettings { seconds: Some(2.0), ..Default::default() },
        generation: GenerationSettings { max_tokens: Some(8), ..Default::default() },
        enabled: true,
        retention: Retention::default(),
        alert: None,
        created_ms: now_ms(),
        updated_ms: now_ms(),
    }
}

fn event(monitor: &str, window: u64, started_ms: i64, text: &str) -> NewEvent {
    NewEvent {
        monitor: monitor.into(),
        window,
        start_s: window as f64,
        end_s: window as f64 + 1.5,
        started_ms,
        prompt: "p".into(),
        text: text.into(),
        finish_reason: "stop".into(),
        usage: Usage { prompt_tokens: 100, completion_tokens: 3, total_tokens: 103 },
        timings: Timings { ttft_ms: 12.5, ..Default::default() },
    }
}

fn q(monitor: &str) -> EventQuery {
    EventQuery { monitor: monitor.into(), limit: 100, ..Default::default() }
}

async fn monitors_round_trip_and_names_are_unique(p: Place) {
    let s = p.open().await;
    let a = monitor("m1", "front door");
    s.create_monitor(&a).await.unwrap();
    assert!(
        matches!(s.create_monitor(&monitor("m2", "front door")).await, Err(StoreError::NameTaken(n)) if n == "front door")
    );
    s.create_monitor(&monitor("m2", "yard")).await.unwrap();
    assert_eq!(s.monitor("m1").await.unwrap().unwrap(), a);
    let mut b = a.clone();
    b.prompt = "Count the cars.".into();
    b.enabled = false;
    assert!(s.update_monitor(&b).await.unwrap());
    b.name = "yard".into();
    assert!(matches!(s.update_monitor(&b).await, Err(StoreError::NameTaken(_))));
    assert!(!s.update_monitor(&monitor("nope", "x")).await.unwrap());
    drop(s);
    // Reopened (the migration is not applied twice): everything is still there.
    let s = p.open().await;
    let all = s.monitors().await.unwrap();
    assert_eq!(all.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m1", "m2"]);
    assert_eq!(all[0].prompt, "Count the cars.");
    assert!(!all[0].enabled);
}

async fn history_pages_newest_first_filters_by_time_and_searches_words(p: Place) {
    let s = p.open().await;
    s.create_monitor(&monitor("m1", "door")).await.unwrap();
    s.create_monitor(&monitor("m2", "yard")).await.unwrap();
    lease_all(&s).await;
    let texts =
        ["a red car stops", "nobody is there", "a person in a red coat", "the car leaves", "\"quoted\" OR NEAR("];
    for (i, t) in texts.iter().enumerate() {
        s.insert_event(&event("m1", i as u64, 1_000 * i as i64, t), Some(b"jpeg")).await.unwrap();
    }
    s.insert_event(&event("m2", 0, 0, "a red car"), None).await.unwrap();
    let all = s.events(&q("m1")).await.unwrap();
    assert_eq!(all.iter().map(|e| e.event.window).collect::<Vec<_>>(), [4, 3, 2, 1, 0]);
    assert_eq!(all[4].event, event("m1", 0, 0, texts[0]));
    // Paging: two at a time with the cursor.
    let mut page = EventQuery { limit: 2, ..q("m1") };
    let first = s.events(&page).await.unwrap();
    page.before_id = Some(first[1].id);
    let second = s.events(&page).await.unwrap();
    assert_eq!(second.iter().map(|e| e.event.window).collect::<Vec<_>>(), [2, 1]);
    // Time range [1000, 3000).
    let ranged = s.events(&EventQuery { since_ms: Some(1_000), until_ms: Some(3_000), ..q("m1") }).await.unwrap();
    assert_eq!(ranged.iter().map(|e| e.event.window).collect::<Vec<_>>(), [2, 1]);
    // Words, all of them, in this monitor only; operators in the input are plain words.
    let red = s.events(&EventQuery { text: Some("red".into()), ..q("m1") }).await.unwrap();
    assert_eq!(red.iter().map(|e| e.event.window).collect::<Vec<_>>(), [2, 0]);
    let red_car = s.events(&EventQuery { text: Some("car red".into()), ..q("m1") }).await.unwrap();
    assert_eq!(red_car.len(), 1);
    let odd = s.events(&EventQuery { text: Some("\"quoted\" OR NEAR(".into()), ..q("m1") }).await.unwrap();
    assert_eq!(odd.len(), 1);
    let none = s.events(&EventQuery { text: Some("zebra".into()), ..q("m1") }).await.unwrap();
    assert!(none.is_empty());
    assert_eq!(s.count_events("m1").await.unwrap(), 5);
    assert_eq!(s.count_events("m2").await.unwrap(), 1);
}

async fn retention_prunes_by_age_and_count_with_the_thumbnails(p: Place) {
    let (s, d) = (p.open().await, &p.dir);
    s.create_monitor(&monitor("m1", "door")).await.unwrap();
    lease_all(&s).await;
    for i in 0..10 {
        s.insert_event(&event("m1", i, 1_000 * i as i64, "x"), Some(&[0xff, 0xd8, i as u8])).await.unwrap();
    }
    let files = |d: &Path| std::fs::read_dir(d.join("thumbnails/m1")).map_or(0, |r| r.count());
    assert_eq!(files(d), 10);
    let bytes = s.disk_bytes().await.unwrap();
    assert!(bytes > 30, "{bytes}");
    // Older than 3 s: windows 0, 1, 2 go.
    let p = s.prune("m1", Some(3_000), None).await.unwrap();
    assert_eq!(p, Pruned { events: 3, thumbnails: 3 });
    // Keep the newest 4 of the 7 left.
    let p = s.prune("m1", None, Some(4)).await.unwrap();
    assert_eq!(p, Pruned { events: 3, thumbnails: 3 });
    let left = s.events(&q("m1")).await.unwrap();
    assert_eq!(left.iter().map(|e| e.event.window).collect::<Vec<_>>(), [9, 8, 7, 6]);
    assert_eq!(files(d), 4);
    assert_eq!(s.prune("m1", None, Some(10)).await.unwrap(), Pruned::default());
    // Deleting the monitor takes its history and files.
    assert!(s.delete_monitor("m1").await.unwrap());
    assert!(s.events(&q("m1")).await.unwrap().is_empty());
    assert_eq!(files(d), 0);
    assert!(!s.delete_monitor("m1").await.unwrap());
}

#[tokio::test]
async fn thumbnails_without_an_event_are_removed_at_the_next_start() {
    let d = dir();
    let s = Store::open(&d).await.unwrap();
    s.create_monitor(&monitor("m1", "door")).await.unwrap();
    let id = s.insert_event(&event("m1", 0, 0, "kept"), Some(b"jpeg")).await.unwrap();
    let kept = s.event(id).await.unwrap().unwrap().thumbnail.unwrap();
    drop(s);
    // A crash after the file was written, before its row.
    std::fs::write(d.join("thumbnails/m1/orphan.jpg"), b"x").unwrap();
    let s = Store::open(&d).await.unwrap();
    assert!(!d.join("thumbnails/m1/orphan.jpg").exists());
    assert!(s.thumbnail_file(&kept).exists());
}

#[tokio::test]
async fn a_checkpoint_moves_the_log_into_the_database_and_truncates_it() {
    let d = dir();
    let s = Store::open(&d).await.unwrap();
    s.create_monitor(&monitor("m1", "door")).await.unwrap();
    for i in 0..500 {
        s.insert_event(&event("m1", i, 1_000 + i as i64, "a person waves at the camera"), None).await.unwrap();
    }
    let wal = || std::fs::metadata(d.join("lookout.db-wal")).map_or(0, |m| m.len());
    assert!(wal() > 0, "the inserts went to the write-ahead log");
    assert!(!s.checkpoint().await.unwrap(), "no reader holds the log");
    assert_eq!(wal(), 0, "a truncating checkpoint empties the log file");
    assert!(std::fs::metadata(d.join("lookout.db")).unwrap().len() > 100_000, "the rows are in the database");
    // The history reads the same afterwards, through both query shapes.
    assert_eq!(s.count_events("m1").await.unwrap(), 500);
    let found = s.events(&EventQuery { text: Some("waves".into()), limit: 3, ..q("m1") }).await.unwrap();
    assert_eq!(found.iter().map(|e| e.event.window).collect::<Vec<_>>(), vec![499, 498, 497]);
    let hour = s.events(&EventQuery { since_ms: Some(1_100), until_ms: Some(1_103), ..q("m1") }).await.unwrap();
    assert_eq!(hour.iter().map(|e| e.event.window).collect::<Vec<_>>(), vec![102, 101, 100]);
}

#[tokio::test]
async fn an_insert_is_committed_at_once_and_automatic_checkpoints_bound_the_log() {
    let d = dir();
    let s = Store::open(&d).await.unwrap();
    s.create_monitor(&monitor("m1", "door")).await.unwrap();
    s.insert_event(&event("m1", 0, 1_000, "first"), None).await.unwrap();
    // Another connection sees the row at once: the insert's transaction is closed.
    let other = sqlx::SqlitePool::connect(&format!("sqlite://{}", d.join("lookout.db").display())).await.unwrap();
    let n: Vec<i64> = sqlx::query_scalar("SELECT COUNT(*) FROM events").fetch_all(&other).await.unwrap();
    assert_eq!(n, vec![1]);
    other.close().await;
    // 3000 more: SQLite's own checkpoints keep the log near 1000 pages (4 MiB).
    for i in 1..3000 {
        s.insert_event(&event("m1", i, 1_000 + i as i64, "a person waves at the camera"), None).await.unwrap();
    }
    let wal = std::fs::metadata(d.join("lookout.db-wal")).map_or(0, |m| m.len());
    let db = std::fs::metadata(d.join("lookout.db")).unwrap().len();
    assert!(wal < 8 << 20, "the log grew to {wal} bytes");
    assert!(db > 500_000, "checkpoints moved the rows into the database ({db} bytes)");
}

#[tokio::test]
async fn a_node_writes_only_while_it_holds_the_lease_and_claims_never_overlap() {
    let p = Place::postgres();
    let a = p.open_as("a").await;
    let b = p.open_as("b").await;
    for i in 0..6 {
        a.create_monitor(&monitor(&format!("m{i}"), &format!("camera {i}"))).await.unwrap();
    }
    // Without a lease nothing is stored.
    assert!(
        matches!(a.insert_event(&event("m0", 0, 0, "x"), Some(b"jpeg")).await, Err(StoreError::Fenced(m)) if m == "m0")
    );
    assert_eq!(a.count_events("m0").await.unwrap(), 0);
    assert!(std::fs::read_dir(p.dir.join("thumbnails/m0")).map_or(0, |r| r.count()) == 0, "the thumbnail went too");
    // Two nodes claiming at once take different monitors, and all of them between them.
    let (ga, gb) = tokio::join!(a.claim(3, 60_000), b.claim(3, 60_000));
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    let mut all: Vec<&str> = ga.iter().chain(&gb).map(|l| l.monitor.as_str()).collect();
    all.sort();
    assert_eq!(all, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    assert!(b.claim(10, 60_000).await.unwrap().is_empty(), "live leases are never taken");
    let mine = &ga[0].monitor;
    a.insert_event(&event(mine, 0, 0, "kept"), None).await.unwrap();
    assert!(matches!(b.insert_event(&event(mine, 1, 1, "not mine"), None).await, Err(StoreError::Fenced(_))));
    let nodes = a.nodes(60_000).await.unwrap();
    assert_eq!(
        nodes.iter().map(|n| (n.id.as_str(), n.monitors.len())).collect::<Vec<_>>(),
        [("a", ga.len()), ("b", gb.len())]
    );
    assert_eq!(a.holder(mine).await.unwrap().unwrap().0, "a");

    // a stops renewing (its leases are cut short here, as if its heartbeats stopped): b takes
    // them over with a new generation, and a's late writes are refused.
    let pg = postgres::shared();
    let db = p.url.as_deref().unwrap().rsplit('/').next().unwrap();
    pg.psql(db, "UPDATE leases SET expires_ms = lookout_now_ms() - 1 WHERE node_id = 'a'");
    let taken = b.claim(10, 60_000).await.unwrap();
    assert_eq!(taken.len(), ga.len());
    let before = ga.iter().find(|l| &l.monitor == mine).unwrap().generation;
    assert_eq!(taken.iter().find(|l| &l.monitor == mine).unwrap().generation, before + 1);
    assert!(matches!(a.insert_event(&event(mine, 2, 2, "too late"), None).await, Err(StoreError::Fenced(_))));
    assert!(a.renew(60_000).await.unwrap().is_empty(), "a's leases are lost");
    b.insert_event(&event(mine, 3, 3, "the new holder"), None).await.unwrap();
    let texts: Vec<String> = b.events(&q(mine)).await.unwrap().into_iter().map(|e| e.event.text).collect();
    assert_eq!(texts, ["the new holder", "kept"]);

    // A release hands the monitor over at once; leaving gives back everything.
    b.release(mine).await.unwrap();
    assert_eq!(
        a.claim(10, 60_000).await.unwrap().iter().map(|l| l.monitor.as_str()).collect::<Vec<_>>(),
        [mine.as_str()]
    );
    b.leave().await.unwrap();
    assert_eq!(a.nodes(60_000).await.unwrap().len(), 1);
    assert_eq!(a.claim(10, 60_000).await.unwrap().len(), 5);
    assert_eq!(a.renew(60_000).await.unwrap().len(), 6);
}

/// Claims racing on the same free monitors. Each claim's snapshot of the leases is taken when it
/// starts; with 20,000 monitors to sort, a claim often starts before another commits and locks
/// the rows after it: it sees leases free that were just taken. Such a round looks again, so
/// every node gets all it asked for, and no monitor is taken twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_get_what_they_ask_and_never_overlap() {
    let p = Place::postgres();
    let nodes = [p.open_as("a").await, p.open_as("b").await, p.open_as("c").await];
    nodes[0].create_monitor(&monitor("m", "camera")).await.unwrap();
    let db = p.url.as_deref().unwrap().rsplit('/').next().unwrap();
    postgres::shared().psql(
        db,
        "INSERT INTO monitors SELECT 'm' || i, 'camera ' || i, source, prompt, \"window\", generation, enabled, \
         retention, created_ms + i, updated_ms FROM monitors, generate_series(1, 20000) i WHERE id = 'm'",
    );
    for round in 0..10 {
        let [a, b, c] = &nodes;
        let (ga, gb, gc) = tokio::join!(a.claim(10, 60_000), b.claim(10, 60_000), c.claim(10, 60_000));
        let got = [ga.unwrap(), gb.unwrap(), gc.unwrap()];
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 10], "round {round}");
        let mut all: Vec<&str> = got.iter().flatten().map(|l| l.monitor.as_str()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 30, "round {round}: a monitor was taken twice");
        for n in &nodes {
            n.leave().await.unwrap();
            n.heartbeat("http://127.0.0.1:1", 100).await.unwrap();
        }
    }
}

#[tokio::test]
async fn each_outbox_row_is_claimed_by_one_node() {
    let p = Place::postgres();
    let a = p.open_as("a").await;
    let b = p.open_as("b").await;
    a.create_monitor(&monitor("m1", "door")).await.unwrap();
    a.claim(1, 60_000).await.unwrap();
    let incident = IncidentRow {
        id: "i1".into(),
        monitor: "m1".into(),
        opened_ms: 1,
        closed_ms: None,
        windows: vec![],
        clip: None,
    };
    let delivery = |n: u32| NewDelivery {
        id: format!("d{n}"),
        incident: "i1".into(),
        monitor: "m1".into(),
        event: "incident.opened".into(),
        kind: "webhook".into(),
        url: format!("http://hook/{n}"),
        secret: None,
        body: "{}".into(),
    };
    a.save_incident(&incident, &[delivery(1), delivery(2), delivery(3)]).await.unwrap();
    // b holds no lease of m1: its incident writes are refused.
    assert!(matches!(b.save_incident(&incident, &[delivery(4)]).await, Err(StoreError::Fenced(_))));
    let now = now_ms() + 1;
    let (da, db) = tokio::join!(a.due_deliveries(now, 2), b.due_deliveries(now, 10));
    let (da, db) = (da.unwrap(), db.unwrap());
    let mut seqs: Vec<i64> = da.iter().chain(&db).map(|d| d.seq).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 3, "{da:?} {db:?}");
    assert_eq!(da.len() + db.len(), 3, "each row went to one node");
    assert!(a.due_deliveries(now, 10).await.unwrap().is_empty(), "claimed rows are not due again");
    // A claimed row is due again (for every node) only when its claim runs out.
    let next = a.next_due().await.unwrap().unwrap();
    assert!(next >= now_ms() + alerts::CLAIM_MS - 5_000, "{next}");
    // An attempt gives the claim up: a retry is due for whichever node comes first.
    let first = da.first().or(db.first()).unwrap();
    a.record_attempt(first.seq, &Attempt::Retry("503".into(), 0)).await.unwrap();
    let again = b.due_deliveries(now, 10).await.unwrap();
    assert_eq!(again.iter().map(|d| d.seq).collect::<Vec<_>>(), [first.seq]);
}
