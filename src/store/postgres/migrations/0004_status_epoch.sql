-- A fleet-wide count of subscriber status changes (unsubscribe, edit, erasure), bumped
-- in the same transaction as the change. Every node polls it, so a recipient another
-- node already claimed is read again before it is sent (store::Backend::status_epoch).
CREATE TABLE fleet_counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO fleet_counters (name, value) VALUES ('status_epoch', 0);
