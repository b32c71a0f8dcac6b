-- Fleet: the nodes sharing this database, and which node holds each claimed recipient.

-- One row per live node (a process start). Leases use the database's clock, so the
-- nodes' clocks need not agree.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until TIMESTAMPTZ NOT NULL
);

-- The node a `sending` recipient was claimed by: its fencing token. A record from any
-- other node is refused.
ALTER TABLE deliveries ADD COLUMN claimed_by TEXT;
CREATE INDEX deliveries_claims ON deliveries (claimed_by) WHERE state = 1;
