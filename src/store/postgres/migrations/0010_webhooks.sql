-- Webhooks out: endpoints, their outbox of sends (one per event and endpoint), and
-- the log of attempts. Records are kept whole in `doc`; the columns are what queries
-- select and order by.
CREATE TABLE webhooks (
    id BIGSERIAL PRIMARY KEY,
    doc JSONB NOT NULL
);
CREATE TABLE webhook_sends (
    id BIGSERIAL PRIMARY KEY,
    webhook_id BIGINT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    lease_node TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL,
    doc JSONB NOT NULL
);
CREATE INDEX webhook_sends_due ON webhook_sends (next_attempt_ms, id) WHERE state = 'pending';
CREATE INDEX webhook_sends_by_webhook ON webhook_sends (webhook_id, id);
CREATE TABLE webhook_attempts (
    id BIGSERIAL PRIMARY KEY,
    webhook_id BIGINT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    at_ms BIGINT NOT NULL,
    doc JSONB NOT NULL
);
CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook_id, id);
