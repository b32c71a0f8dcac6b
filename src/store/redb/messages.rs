//! One-off messages in redb: the records, the queued ones indexed by due time, their
//! idempotency keys, and an index by subscriber for erasures. A claim and an outcome
//! are each one closure of the writer's transaction.

use redb::{ReadableTable, WriteTransaction};

use super::lists::next_id;
use super::tables::*;
use super::{RedbStore, decode, encode, events};
use crate::domain::{Outcome, now_ms};
use crate::messages::{Message, MessageState, NewMessage};
use crate::store::{IdempotencyKey, Messages, NewMessageOutcome, StoreError};

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct KeyRecord {
    pub(super) request_hash: String,
    pub(super) message_id: u64,
}

pub(super) fn message_in(txn: &WriteTransaction, id: u64) -> Result<Message, StoreError> {
    let table = txn.open_table(MESSAGES)?;
    let row = table
        .get(id)?
        .ok_or_else(|| StoreError::not_found("message", id))?;
    decode(row.value())
}

/// Writes a message with its due index entry (queued ones only); `old` is what it was.
pub(super) fn put_message(
    txn: &WriteTransaction,
    m: &Message,
    old: Option<&Message>,
) -> Result<(), StoreError> {
    let mut due = txn.open_table(MESSAGES_DUE)?;
    if let Some(old) = old.filter(|o| o.state == MessageState::Queued) {
        due.remove((old.next_attempt_ms, old.id))?;
    }
    if m.state == MessageState::Queued {
        due.insert((m.next_attempt_ms, m.id), ())?;
    }
    txn.open_table(MESSAGES)?.insert(m.id, encode(m).as_slice())?;
    txn.open_table(MESSAGES_BY_SUBSCRIBER)?
        .insert((m.subscriber_id, m.id), ())?;
    Ok(())
}

/// Removes the messages of a subscriber being erased: they hold the address and
/// whatever data the message carried. Their keys go with them.
pub(super) fn forget_subscriber(txn: &WriteTransaction, subscriber_id: u64) -> Result<(), StoreError> {
    let ids: Vec<u64> = {
        let index = txn.open_table(MESSAGES_BY_SUBSCRIBER)?;
        let mut out = Vec::new();
        for row in index.range((subscriber_id, 0)..=(subscriber_id, u64::MAX))? {
            out.push(row?.0.value().1);
        }
        out
    };
    let mut keys = txn.open_table(MESSAGE_KEYS)?;
    let mut theirs = Vec::new();
    for row in keys.iter()? {
        let (key, value) = row?;
        let record: KeyRecord = decode(value.value())?;
        if ids.contains(&record.message_id) {
            theirs.push(key.value().to_string());
        }
    }
    for key in theirs {
        keys.remove(key.as_str())?;
    }
    let mut messages = txn.open_table(MESSAGES)?;
    let mut due = txn.open_table(MESSAGES_DUE)?;
    let mut index = txn.open_table(MESSAGES_BY_SUBSCRIBER)?;
    for id in ids {
        let old: Option<Message> = messages.remove(id)?.map(|row| decode(row.value())).transpose()?;
        if let Some(old) = old {
            due.remove((old.next_attempt_ms, id))?;
        }
        index.remove((subscriber_id, id))?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Messages for RedbStore {
    async fn create_message(
        &self,
        new: NewMessage,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<NewMessageOutcome, StoreError> {
        self.write(move |txn| {
            if let Some(key) = &idempotency
                && let Some(row) = txn.open_table(MESSAGE_KEYS)?.get(key.key.as_str())?
            {
                let earlier: KeyRecord = decode(row.value())?;
                if earlier.request_hash != key.request_hash {
                    return Ok(NewMessageOutcome::KeyReused);
                }
                return Ok(NewMessageOutcome::Existing(message_in(txn, earlier.message_id)?));
            }
            let message = Message::new(next_id(txn, "message")?, new, now_ms());
            put_message(txn, &message, None)?;
            if let Some(key) = idempotency {
                let record = KeyRecord {
                    request_hash: key.request_hash,
                    message_id: message.id,
                };
                txn.open_table(MESSAGE_KEYS)?
                    .insert(key.key.as_str(), encode(&record).as_slice())?;
            }
            events::append(txn, [message.event(crate::events::types::MESSAGE_QUEUED)])?;
            Ok(NewMessageOutcome::Created(message))
        })
        .await
    }

    async fn message(&self, id: u64) -> Result<Message, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(MESSAGES)?;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::not_found("message", id))?;
            decode(row.value())
        })
        .await
    }

    async fn claim_messages(
        &self,
        node: &str,
        now_ms: u64,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let node = node.to_string();
        self.write(move |txn| {
            let due: Vec<u64> = {
                let index = txn.open_table(MESSAGES_DUE)?;
                let mut out = Vec::new();
                for row in index.range((0, 0)..=(now_ms, u64::MAX))? {
                    out.push(row?.0.value().1);
                }
                out
            };
            let mut claimed = Vec::new();
            for id in due {
                if claimed.len() >= limit {
                    break;
                }
                let mut message = message_in(txn, id)?;
                if !message.claimable(now_ms) {
                    continue;
                }
                let old = message.clone();
                message.claim(&node, until_ms);
                put_message(txn, &message, Some(&old))?;
                claimed.push(message);
            }
            Ok(claimed)
        })
        .await
    }

    async fn record_message(&self, id: u64, node: &str, outcome: Outcome) -> Result<Message, StoreError> {
        let node = node.to_string();
        self.write(move |txn| {
            let mut message = message_in(txn, id)?;
            if message.state != MessageState::Queued || message.lease_node.as_deref() != Some(node.as_str()) {
                return Err(StoreError::TakenOver(format!(
                    "message {id} is no longer this node's to record"
                )));
            }
            let old = message.clone();
            let ended = message.record(&outcome, now_ms());
            put_message(txn, &message, Some(&old))?;
            if let Some(kind) = ended {
                events::append(txn, [message.event(kind)])?;
            }
            Ok(message)
        })
        .await
    }

    async fn next_message_due(&self) -> Result<Option<u64>, StoreError> {
        self.read(move |txn| {
            let index = txn.open_table(MESSAGES_DUE)?;
            Ok(index.first()?.map(|(key, _)| key.value().0))
        })
        .await
    }
}
