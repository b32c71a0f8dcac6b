-- Fleet-wide send rates: one token bucket per transport, refilled by the database's
-- clock. Nodes take tokens in small batches (store::Fleet::take_tokens).
CREATE TABLE rate_buckets (
    name TEXT PRIMARY KEY,
    tokens FLOAT8 NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
