-- The event log (store::Events). Ids are not a sequence's: a sequence hands out
-- numbers in the order transactions ask, not the order they commit, and a reader that
-- resumes after id N would skip an id below N committed later. Every transaction that
-- appends takes its ids from the `event_id` counter (fleet_counters) as its last
-- statement, so the row lock orders appends by commit and leaves no gaps.
CREATE TABLE events (
    id BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    type TEXT NOT NULL,
    newsletter_id BIGINT,
    subscriber_id BIGINT,
    job_id BIGINT,
    letter_id BIGINT,
    data JSONB NOT NULL
);
CREATE INDEX events_by_subscriber ON events (subscriber_id, id) WHERE subscriber_id IS NOT NULL;
CREATE INDEX events_by_time ON events (at_ms);
INSERT INTO fleet_counters (name, value) VALUES ('event_id', 0);

-- A subscriber by email across newsletters (an event posted for an address).
CREATE INDEX subscribers_by_email ON subscribers (email_key);
