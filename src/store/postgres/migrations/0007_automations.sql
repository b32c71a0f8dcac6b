-- Automations (store::Automations). The whole record is `doc`; the columns are what
-- is looked up. `turns` is the compare-and-set a turn's commit checks; the lease says
-- which node runs its turns (until when), so one node at a time does.
CREATE TABLE automations (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    turns BIGINT NOT NULL DEFAULT 0,
    lease_node TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    doc JSONB NOT NULL
);

CREATE TABLE automation_versions (
    automation_id BIGINT NOT NULL REFERENCES automations (id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    doc JSONB NOT NULL,
    PRIMARY KEY (automation_id, version)
);

-- The state each reaction leaves, per automation and subscriber (0: none).
CREATE TABLE automation_states (
    automation_id BIGINT NOT NULL REFERENCES automations (id) ON DELETE CASCADE,
    subscriber_id BIGINT NOT NULL,
    state JSONB NOT NULL,
    PRIMARY KEY (automation_id, subscriber_id)
);
-- What an erasure removes.
CREATE INDEX automation_states_by_subscriber ON automation_states (subscriber_id);

-- Durable timers: one per (automation, subscriber, name); an automation's due ones are
-- a prefix of the index by due time, so 1,000,000 waiting cost nothing until then.
CREATE TABLE timers (
    automation_id BIGINT NOT NULL REFERENCES automations (id) ON DELETE CASCADE,
    subscriber_id BIGINT NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    id BIGINT NOT NULL,
    due_ms BIGINT NOT NULL,
    data JSONB NOT NULL,
    PRIMARY KEY (automation_id, subscriber_id, name)
);
CREATE INDEX timers_due ON timers (automation_id, due_ms, id);
CREATE INDEX timers_by_subscriber ON timers (subscriber_id);
CREATE SEQUENCE timer_ids;

CREATE TABLE automation_failures (
    automation_id BIGINT NOT NULL REFERENCES automations (id) ON DELETE CASCADE,
    id BIGSERIAL,
    doc JSONB NOT NULL,
    PRIMARY KEY (automation_id, id)
);

-- Sends reactions asked for, until they become deliveries of a job.
CREATE TABLE queued_sends (
    id BIGSERIAL PRIMARY KEY,
    automation_id BIGINT NOT NULL REFERENCES automations (id) ON DELETE CASCADE,
    subscriber_id BIGINT NOT NULL,
    letter_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
