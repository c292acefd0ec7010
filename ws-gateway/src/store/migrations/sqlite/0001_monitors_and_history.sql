-- Monitors and their history. Times are milliseconds since the Unix epoch (UTC); settings are
-- the protocol's JSON as given.
CREATE TABLE monitors (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    window      TEXT NOT NULL,
    generation  TEXT NOT NULL,
    enabled     BOOLEAN NOT NULL,
    retention   TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL
);

CREATE TABLE events (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    monitor_id         TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    window_id          BIGINT NOT NULL,
    start_s            DOUBLE PRECISION NOT NULL,
    end_s              DOUBLE PRECISION NOT NULL,
    started_ms         BIGINT NOT NULL,
    prompt             TEXT NOT NULL,
    text               TEXT NOT NULL,
    finish_reason      TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    timings            TEXT NOT NULL,
    thumbnail          TEXT,
    thumbnail_bytes    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX events_by_monitor ON events (monitor_id, id);
CREATE INDEX events_by_time ON events (monitor_id, started_ms);

-- Full-text search over the answers, kept in step by triggers (an external-content FTS5 table:
-- the text is stored once, in events).
CREATE VIRTUAL TABLE events_fts USING fts5 (text, content = 'events', content_rowid = 'id');
CREATE TRIGGER events_fts_insert AFTER INSERT ON events BEGIN
    INSERT INTO events_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER events_fts_delete AFTER DELETE ON events BEGIN
    INSERT INTO events_fts (events_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
