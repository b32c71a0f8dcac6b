//! The storage interface of webhooks out (`crate::webhooks`), kept apart from
//! `store/mod.rs`'s other traits only for length.

use async_trait::async_trait;

use super::StoreError;
use crate::webhooks::{AttemptResult, NewWebhook, Webhook, WebhookAttempt, WebhookPatch, WebhookSend};

/// Endpoints, their outbox of sends, and the log of attempts.
#[async_trait]
pub trait Webhooks: Send + Sync {
    async fn create_webhook(&self, new: NewWebhook) -> Result<Webhook, StoreError>;

    async fn webhook(&self, id: u64) -> Result<Webhook, StoreError>;

    /// Every endpoint, by id.
    async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError>;

    /// Changes an endpoint. Disabling it holds its pending sends (due never); enabling
    /// it makes them due now, and its cursor goes on from where it stopped.
    async fn update_webhook(&self, id: u64, patch: WebhookPatch) -> Result<Webhook, StoreError>;

    /// Deletes an endpoint with its sends and its log.
    async fn delete_webhook(&self, id: u64) -> Result<(), StoreError>;

    /// Moves an active endpoint's cursor from `from` to `to` and queues a send for each
    /// of `events` (id, type), in one transaction. `false`, changing nothing, when the
    /// cursor is no longer `from` (another node moved it) or the endpoint is not active.
    async fn fan_out(
        &self,
        id: u64,
        from: u64,
        to: u64,
        events: Vec<(u64, String)>,
    ) -> Result<bool, StoreError>;

    /// Queues a test send (`webhook.test`) to an endpoint, due now if it is active.
    async fn queue_webhook_test(&self, id: u64) -> Result<WebhookSend, StoreError>;

    /// Takes up to `limit` due pending sends whose lease (if any) ran out, for `node`
    /// until `until_ms`, earliest due first, each with its endpoint.
    async fn claim_webhook_sends(
        &self,
        node: &str,
        now_ms: u64,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<(WebhookSend, Webhook)>, StoreError>;

    /// Records an attempt of a send `node` holds (`TakenOver` if it no longer does):
    /// the send's next due time from `delays_ms` (or its end), the endpoint's failing
    /// clock (and its disabling, which holds its other pending sends), and the log's
    /// entry, in one transaction.
    async fn record_webhook_attempt(
        &self,
        send_id: u64,
        node: &str,
        result: AttemptResult,
        delays_ms: Vec<u64>,
    ) -> Result<WebhookAttempt, StoreError>;

    /// Up to `limit` of an endpoint's attempts with ids below `before` (0: the newest),
    /// newest first.
    async fn webhook_attempts(
        &self,
        id: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<WebhookAttempt>, StoreError>;

    /// When the earliest pending send is due (held ones aside), lease or not.
    async fn next_webhook_due(&self) -> Result<Option<u64>, StoreError>;

    /// Forgets at most `limit` attempts, and finished sends, older than `before_ms`;
    /// returns how many.
    async fn prune_webhook_log(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError>;
}
