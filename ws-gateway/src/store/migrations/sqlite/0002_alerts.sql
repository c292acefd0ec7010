-- Alerts: each monitor's rule, its incidents, and the notification outbox (a delivery is a row
-- before anything is sent, so a restart loses none; it is retried until delivered or failed).
ALTER TABLE monitors ADD COLUMN alert TEXT;

CREATE TABLE incidents (
    id          TEXT PRIMARY KEY,
    monitor_id  TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    opened_ms   BIGINT NOT NULL,
    closed_ms   BIGINT,
    -- The evidence clip's file under incidents/, once written.
    clip        TEXT,
    -- The windows that make it up, oldest first: JSON [{window, start_s, end_s, decided_ms, text, frame}].
    windows     TEXT NOT NULL
);
CREATE INDEX incidents_by_monitor ON incidents (monitor_id, opened_ms);
CREATE INDEX incidents_by_time ON incidents (opened_ms);

CREATE TABLE deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    incident_id      TEXT NOT NULL,
    monitor_id       TEXT NOT NULL,
    event            TEXT NOT NULL,
    -- 'webhook' (url, secret) or 'mqtt' (url is the topic).
    kind             TEXT NOT NULL,
    url              TEXT NOT NULL,
    secret           TEXT,
    body             TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    last_error       TEXT,
    created_ms       BIGINT NOT NULL,
    next_attempt_ms  BIGINT NOT NULL,
    delivered_ms     BIGINT
);
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_ms);
CREATE INDEX deliveries_by_incident ON deliveries (incident_id, seq);
