//! Housekeeping: what the store keeps only for a while, pruned in the background in
//! small batches, so that a prune never holds the store (redb's single writer, a
//! PostgreSQL row lock) long enough to stall a send. Today: idempotency keys older than
//! `--idempotency-ttl`.
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
}
