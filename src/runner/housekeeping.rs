//! Housekeeping: what the store keeps only for a while, pruned in the background in
//! small batches, so that a prune never holds the store (redb's single writer, a
//! PostgreSQL row lock) long enough to stall a send: idempotency keys older than
//! `--idempotency-ttl`, events (and webhook attempts) older than `--event-retention`,
//! subscribers of the public form who did not confirm within `--confirm-within`
//! (erased), and the console's ended sessions.
//!
//! Every node prunes (there is no leader); the deletes are idempotent, and on
//! PostgreSQL they skip rows another node is deleting. A failing store is tried again
//! at the next round.

use std::time::Duration;

use super::Runner;

/// Rows removed per store operation.
const BATCH: usize = 500;

impl Runner {
    /// Runs the rounds until the node stops.
    pub(super) async fn housekeeping(&self) {
        let stop = self.inner.fleet_stop.clone();
        loop {
            self.prune_idempotency_keys().await;
            self.prune_events().await;
            self.expire_unconfirmed().await;
            let store = &self.inner.store;
            let now = crate::domain::now();
            drain("console sessions", None, || store.prune_sessions(now, BATCH)).await;
            tokio::select! {
                _ = tokio::time::sleep(self.inner.config.housekeeping_every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn prune_idempotency_keys(&self) {
        let ttl = self.inner.config.idempotency_ttl.as_secs();
        let before = crate::domain::now().saturating_sub(ttl);
        let store = &self.inner.store;
        // Let what waits for the store go first between batches.
        let pruned = drain("idempotency keys", None, || {
            store.prune_idempotency_keys(before, BATCH)
        })
        .await;
        if pruned > 0 {
            tracing::info!(pruned, "forgot idempotency keys older than the TTL");
        }
    }

    /// Erases unconfirmed subscribers whose link has expired, a while after it did (a
    /// tenth of its life, at most a minute), so that a confirmation that began just
    /// before cannot race the erasure.
    async fn expire_unconfirmed(&self) {
        let store = &self.inner.store;
        let within = self.inner.config.confirm_within.as_secs();
        let before = crate::domain::now().saturating_sub(within + (within / 10).min(60));
        let mut erased = 0;
        loop {
            let ids = match store.unconfirmed_before(before, BATCH).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "finding expired unconfirmed subscribers failed; trying again later");
                    break;
                }
            };
            let full = ids.len() == BATCH;
            for id in ids {
                match store.delete_subscriber(id).await {
                    Ok(()) | Err(crate::store::StoreError::NotFound { .. }) => erased += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, "erasing an expired unconfirmed subscriber failed; trying again later");
                        return;
                    }
                }
            }
            if !full {
                break;
            }
        }
        if erased > 0 {
            tracing::info!(erased, "erased subscribers who did not confirm in time");
        }
    }

    async fn prune_events(&self) {
        let retention = u64::try_from(self.inner.config.event_retention.as_millis()).unwrap_or(u64::MAX);
        let before = crate::domain::now_ms().saturating_sub(retention);
        let store = &self.inner.store;
        // A backlog (a shorter retention, a long stop) drains at up to ~10k events/s,
        // between the sends' commits, not instead of them.
        let pause = Some(Duration::from_millis(50));
        let pruned = drain("events", pause, || store.prune_events(before, BATCH)).await;
        if pruned > 0 {
            tracing::info!(pruned, "pruned events older than the retention");
        }
        // The webhooks' log of attempts, and their finished sends, last as long.
        let pruned = drain("webhook attempts", pause, || {
            store.prune_webhook_log(before, BATCH)
        })
        .await;
        if pruned > 0 {
            tracing::info!(pruned, "pruned webhook attempts older than the retention");
        }
    }
}

/// Calls `prune` (one batch of at most `BATCH`) until a batch comes back short or the
/// store fails (tried again next round), pausing between batches (`None`: a yield).
/// Returns how many rows went.
async fn drain<F, Fut>(what: &str, pause: Option<Duration>, mut prune: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, crate::store::StoreError>>,
{
    let mut pruned = 0;
    loop {
        match prune().await {
            Ok(n) => {
                pruned += n;
                if n < BATCH {
                    return pruned;
                }
                match pause {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => tokio::task::yield_now().await,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "{what} not pruned; next round");
                return pruned;
            }
        }
    }
}
