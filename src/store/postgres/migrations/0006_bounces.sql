-- Bounce and complaint reports (store::Bounces): one row per report and subscriber,
-- or one with no subscriber (unattributed). The whole record is `doc`; the columns are
-- what the listings and the soft-bounce count look up.
CREATE TABLE bounces (
    id BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    subscriber_id BIGINT,
    doc JSONB NOT NULL
);
CREATE INDEX bounces_by_subscriber ON bounces (subscriber_id, id) WHERE subscriber_id IS NOT NULL;
CREATE INDEX unattributed_bounces ON bounces (id) WHERE subscriber_id IS NULL;

-- The addresses no newsletter sends to, by normalised email. Byte order ("C"), so a
-- listing pages in the same order as on redb and walks the primary key.
CREATE TABLE suppressions (
    email_key TEXT COLLATE "C" PRIMARY KEY,
    doc JSONB NOT NULL
);
