-- Several nodes: who is alive, and which node runs which monitor. Lease times are read from the
-- database's clock (lookout_now_ms), never from the nodes' own, so clock skew between nodes
-- cannot make two of them think they hold the same lease.
CREATE FUNCTION lookout_now_ms() RETURNS BIGINT LANGUAGE SQL VOLATILE
    AS $$ SELECT CAST(floor(extract(epoch FROM clock_timestamp()) * 1000) AS BIGINT) $$;

CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    -- Where other nodes reach its API (WebSocket subscriptions are proxied there).
    address       TEXT NOT NULL,
    -- --max-monitors.
    capacity      BIGINT NOT NULL,
    started_ms    BIGINT NOT NULL,
    heartbeat_ms  BIGINT NOT NULL
);

-- One row per monitor that was ever run: the generation only grows (every claim adds one), so a
-- write fenced with an old generation is refused even after the lease went round the nodes.
-- A lease is held while expires_ms is in the future; giving it up sets expires_ms to 0.
CREATE TABLE leases (
    monitor_id  TEXT PRIMARY KEY REFERENCES monitors(id) ON DELETE CASCADE,
    node_id     TEXT NOT NULL,
    generation  BIGINT NOT NULL,
    claimed_ms  BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    -- The monitor's live state as its node last reported it (what any node's API shows).
    state       TEXT,
    reason      TEXT
);
CREATE INDEX leases_by_node ON leases (node_id);

-- Outbox rows are claimed by the node that sends them.
ALTER TABLE deliveries ADD COLUMN claimed_by TEXT;
ALTER TABLE deliveries ADD COLUMN claimed_until_ms BIGINT;
