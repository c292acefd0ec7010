//! The store on a real SQLite file in a temporary directory.

use protocol::{GenerationSettings, Retention, Source, Timings, Usage, WindowSettings};

use super::*;

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

#[tokio::test]
async fn monitors_round_trip_and_names_are_unique() {
    let d = dir();
    let s = Store::open(&d).await.unwrap();
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
    let s = Store::open(&d).await.unwrap();
    let all = s.monitors().await.unwrap();
    assert_eq!(all.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m1", "m2"]);
    assert_eq!(all[0].prompt, "Count the cars.");
    assert!(!all[0].enabled);
}

#[tokio::test]
async fn history_pages_newest_first_filters_by_time_and_searches_words() {
    let d = dir();
    let s = Store::open(&d).await.unwrap();
    s.create_monitor(&monitor("m1", "door")).await.unwrap();
    s.create_monitor(&monitor("m2", "yard")).await.unwrap();
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

#[tokio::test]
async fn retention_prunes_by_age_and_count_with_the_thumbnails() {
    let d = dir();
    let s = Store::open(&d).await.unwrap();
    s.create_monitor(&monitor("m1", "door")).await.unwrap();
    for i in 0..10 {
        s.insert_event(&event("m1", i, 1_000 * i as i64, "x"), Some(&[0xff, 0xd8, i as u8])).await.unwrap();
    }
    let files = |d: &Path| std::fs::read_dir(d.join("thumbnails/m1")).map_or(0, |r| r.count());
    assert_eq!(files(&d), 10);
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
    assert_eq!(files(&d), 4);
    assert_eq!(s.prune("m1", None, Some(10)).await.unwrap(), Pruned::default());
    // Deleting the monitor takes its history and files.
    assert!(s.delete_monitor("m1").await.unwrap());
    assert!(s.events(&q("m1")).await.unwrap().is_empty());
    assert_eq!(files(&d), 0);
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
