//! One-off messages in PostgreSQL (migrations/0008_messages.sql). Nodes claim due
//! messages with `FOR UPDATE SKIP LOCKED`, so two never take the same one; an outcome
//! is recorded only by the node whose lease the row names.

use deadpool_postgres::GenericClient;

use super::{PgStore, commit, domain_int, events, execute, query, query_opt, sql_int, sql_limit};
use crate::domain::{Outcome, now_ms};
use crate::messages::{Message, MessageState, NewMessage};
use crate::store::{IdempotencyKey, Messages, NewMessageOutcome, StoreError};

/// Writes every column from the record (the row exists).
async fn put_message(tx: &impl GenericClient, m: &Message) -> Result<(), StoreError> {
    execute(
        tx,
        "UPDATE messages SET state = $2, next_attempt_ms = $3, lease_node = $4, lease_until_ms = $5, doc = $6
         WHERE id = $1",
        &[
            &sql_int(m.id),
            &m.state.as_str(),
            &sql_int(m.next_attempt_ms),
            &m.lease_node,
            &sql_int(m.lease_until_ms),
            &serde_json::to_value(m)?,
        ],
    )
    .await?;
    Ok(())
}

async fn message_in(tx: &impl GenericClient, id: u64, lock: bool) -> Result<Message, StoreError> {
    let sql = if lock {
        "SELECT doc FROM messages WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT doc FROM messages WHERE id = $1"
    };
    let row = query_opt(tx, sql, &[&sql_int(id)])
        .await?
        .ok_or_else(|| StoreError::not_found("message", id))?;
    Ok(serde_json::from_value(row.get(0))?)
}

/// Stores a new queued message (due now) in `tx`, with its idempotency key if any.
pub(super) async fn insert_message(
    tx: &impl GenericClient,
    new: NewMessage,
    idempotency: Option<&IdempotencyKey>,
) -> Result<Message, StoreError> {
    let id = query(
        tx,
        "SELECT nextval(pg_get_serial_sequence('messages', 'id'))",
        &[],
    )
    .await?;
    let message = Message::new(domain_int(id[0].get(0)), new, now_ms());
    let (key, hash) = match idempotency {
        Some(k) => (Some(k.key.as_str()), Some(k.request_hash.as_str())),
        None => (None, None),
    };
    execute(
        tx,
        "INSERT INTO messages (id, subscriber_id, state, next_attempt_ms, idempotency_key, request_hash, doc)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &sql_int(message.id),
            &sql_int(message.subscriber_id),
            &message.state.as_str(),
            &sql_int(message.next_attempt_ms),
            &key,
            &hash,
            &serde_json::to_value(&message)?,
        ],
    )
    .await?;
    Ok(message)
}

/// Removes the messages of a subscriber being erased, with their keys.
pub(super) async fn forget_subscriber(tx: &impl GenericClient, subscriber_id: u64) -> Result<(), StoreError> {
    execute(
        tx,
        "DELETE FROM messages WHERE subscriber_id = $1",
        &[&sql_int(subscriber_id)],
    )
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Messages for PgStore {
    async fn create_message(
        &self,
        new: NewMessage,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<NewMessageOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(key) = &idempotency {
            // Two nodes given the same key at once: the second waits here, then finds
            // the first one's message.
            execute(
                &tx,
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 1))",
                &[&key.key],
            )
            .await?;
            let earlier = query_opt(
                &tx,
                "SELECT request_hash, doc FROM messages WHERE idempotency_key = $1",
                &[&key.key],
            )
            .await?;
            if let Some(earlier) = earlier {
                if earlier.get::<_, Option<&str>>(0) != Some(key.request_hash.as_str()) {
                    return Ok(NewMessageOutcome::KeyReused);
                }
                return Ok(NewMessageOutcome::Existing(serde_json::from_value(
                    earlier.get(1),
                )?));
            }
        }
        let message = insert_message(&tx, new, idempotency.as_ref()).await?;
        let appended = events::append(&tx, [message.event(crate::events::types::MESSAGE_QUEUED)]).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok(NewMessageOutcome::Created(message))
    }

    async fn message(&self, id: u64) -> Result<Message, StoreError> {
        let client = self.client().await?;
        message_in(&client, id, false).await
    }

    async fn claim_messages(
        &self,
        node: &str,
        now_ms: u64,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = query(
            &tx,
            "SELECT doc FROM messages
             WHERE state = 'queued' AND next_attempt_ms <= $1
               AND (lease_node IS NULL OR lease_until_ms < $1)
             ORDER BY next_attempt_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&sql_int(now_ms), &sql_limit(limit)],
        )
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let mut message: Message = serde_json::from_value(row.get(0))?;
            message.claim(node, until_ms);
            claimed.push(message);
        }
        if !claimed.is_empty() {
            let ids: Vec<i64> = claimed.iter().map(|m| sql_int(m.id)).collect();
            let docs: Vec<serde_json::Value> = claimed
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            execute(
                &tx,
                "UPDATE messages SET lease_node = $1, lease_until_ms = $2, doc = c.doc
                 FROM unnest($3::bigint[], $4::jsonb[]) AS c (id, doc) WHERE messages.id = c.id",
                &[&node, &sql_int(until_ms), &ids, &docs],
            )
            .await?;
        }
        commit(tx).await?;
        Ok(claimed)
    }

    async fn record_message(&self, id: u64, node: &str, outcome: Outcome) -> Result<Message, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut message = message_in(&tx, id, true).await?;
        if message.state != MessageState::Queued || message.lease_node.as_deref() != Some(node) {
            return Err(StoreError::TakenOver(format!(
                "message {id} is no longer this node's to record"
            )));
        }
        let ended = message.record(&outcome, now_ms());
        put_message(&tx, &message).await?;
        let appended = match ended {
            Some(kind) => events::append(&tx, [message.event(kind)]).await?,
            None => Vec::new(),
        };
        commit(tx).await?;
        self.published(&appended);
        Ok(message)
    }

    async fn next_message_due(&self) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT next_attempt_ms FROM messages WHERE state = 'queued' ORDER BY next_attempt_ms, id LIMIT 1",
            &[],
        )
        .await?;
        Ok(row.map(|r| domain_int(r.get(0))))
    }
}
