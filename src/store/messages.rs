//! The storage interface of one-off messages (`crate::messages`), kept apart from
//! `store/mod.rs`'s other traits only for length.

use async_trait::async_trait;

use super::{IdempotencyKey, StoreError};
use crate::domain::Outcome;
use crate::messages::{Message, NewMessage};

/// What `create_message` did.
#[derive(Debug)]
pub enum NewMessageOutcome {
    Created(Message),
    /// The idempotency key was used before for the same request: this is its message.
    Existing(Message),
    /// The idempotency key was used before for a different request.
    KeyReused,
}

/// One-off messages: recorded before they are sent, claimed by one node at a time (a
/// lease per message), and their outcomes recorded, each with its event.
#[async_trait]
pub trait Messages: Send + Sync {
    /// Stores a queued message (due now) and appends `message.queued`, in one
    /// transaction; with an idempotency key, a request seen before gets its message.
    async fn create_message(
        &self,
        message: NewMessage,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<NewMessageOutcome, StoreError>;

    async fn message(&self, id: u64) -> Result<Message, StoreError>;

    /// Takes up to `limit` due queued messages whose lease (if any) ran out, for `node`
    /// until `until_ms`, earliest due first; each claim counts as an attempt.
    async fn claim_messages(
        &self,
        node: &str,
        now_ms: u64,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// Records an attempt's outcome for a message `node` holds (`TakenOver` if it no
    /// longer does), with the event of its end if it ended.
    async fn record_message(&self, id: u64, node: &str, outcome: Outcome) -> Result<Message, StoreError>;

    /// When the earliest queued message is due, lease or not.
    async fn next_message_due(&self) -> Result<Option<u64>, StoreError>;
}
