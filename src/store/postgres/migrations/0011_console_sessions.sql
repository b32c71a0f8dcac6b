-- The web console's sign-in sessions (store/sessions.rs): the SHA-256 of the cookie's
-- secret, and when the session ends (unix seconds).
CREATE TABLE console_sessions (
    id TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);
