//! Housekeeping: what the store keeps only for a while, pruned in the background in
//! small batches, so that a prune never holds the store (redb's single writer, a
//! PostgreSQL row lock) long enough to stall a send: idempotency keys older than
//! `--idempotency-ttl`, events older than `--event-retention`.
//!
//! Every node prunes (there is no leader); the deletes are idempotent, and on
//! PostgreSQL they skip rows another node is deleting. A failing store is tried again
//! at the next round.

use std::time::Duration;

use super::Runner;

/// How often the rounds run.
const EVERY: Duration = Duration::from_secs(60);

/// Rows removed per store operation.
const BATCH: usize = 500;

impl Runner {
    /// Runs the rounds until the node stops.
    pub(super) async fn housekeeping(&self) {
        let stop = self.inner.fleet_stop.clone();
        loop {
            self.prune_idempotency_keys().await;
            self.prune_events().await;
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn prune_idempotency_keys(&self) {
        let ttl = self.inner.config.idempotency_ttl.as_secs();
        let before = crate::domain::now().saturating_sub(ttl);
        let mut pruned = 0;
        loop {
            match self.inner.store.prune_idempotency_keys(before, BATCH).await {
                Ok(n) => {
                    pruned += n;
                    if n < BATCH {
                        break;
                    }
                    // Let what waits for the store go first.
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "idempotency keys not pruned; next round");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "forgot idempotency keys older than the TTL");
        }
    }

    async fn prune_events(&self) {
        let retention = u64::try_from(self.inner.config.event_retention.as_millis()).unwrap_or(u64::MAX);
        let before = crate::domain::now_ms().saturating_sub(retention);
        let mut pruned = 0;
        loop {
            match self.inner.store.prune_events(before, BATCH).await {
                Ok(n) => {
                    pruned += n;
                    if n < BATCH {
                        break;
                    }
                    // A backlog (a shorter retention, a long stop) drains at up to
                    // ~10k events/s, between the sends' commits, not instead of them.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "events not pruned; next round");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "pruned events older than the retention");
        }
    }
}
