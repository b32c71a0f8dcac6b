-- One-off messages (store::Messages). The whole record is `doc`; the columns are what
-- is looked up: the queued ones by due time (a partial index, so sent ones cost the
-- claim nothing), the lease, the idempotency key (kept as long as its message), and
-- the subscriber (for an erasure).
CREATE TABLE messages (
    id BIGSERIAL PRIMARY KEY,
    subscriber_id BIGINT NOT NULL,
    state TEXT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    lease_node TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    doc JSONB NOT NULL
);
CREATE INDEX messages_due ON messages (next_attempt_ms, id) WHERE state = 'queued';
CREATE INDEX messages_by_subscriber ON messages (subscriber_id);
