//! Webhooks out in PostgreSQL (migrations/0010_webhooks.sql). A cursor moves only if it
//! is still where the mover read it (the row is locked first), so two nodes never queue
//! one event twice for an endpoint; sends are claimed with `FOR UPDATE SKIP LOCKED` and
//! an attempt is recorded only by the node whose lease the row names.

use deadpool_postgres::GenericClient;

use super::{PgStore, commit, domain_int, execute, query, query_opt, sql_int, sql_limit};
use crate::domain::now_ms;
use crate::store::{StoreError, Webhooks};
use crate::webhooks::{
    AttemptResult, HELD, NewWebhook, SendState, Webhook, WebhookAttempt, WebhookPatch, WebhookSend,
    WebhookState,
};

async fn webhook_in(tx: &impl GenericClient, id: u64, lock: bool) -> Result<Webhook, StoreError> {
    let sql = if lock {
        "SELECT doc FROM webhooks WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT doc FROM webhooks WHERE id = $1"
    };
    let row = query_opt(tx, sql, &[&sql_int(id)])
        .await?
        .ok_or_else(|| StoreError::not_found("webhook", id))?;
    Ok(serde_json::from_value(row.get(0))?)
}

async fn put_webhook(tx: &impl GenericClient, w: &Webhook) -> Result<(), StoreError> {
    execute(
        tx,
        "UPDATE webhooks SET doc = $2 WHERE id = $1",
        &[&sql_int(w.id), &serde_json::to_value(w)?],
    )
    .await?;
    Ok(())
}

async fn next_id(tx: &impl GenericClient, table: &str) -> Result<u64, StoreError> {
    let rows = query(
        tx,
        &format!("SELECT nextval(pg_get_serial_sequence('{table}', 'id'))"),
        &[],
    )
    .await?;
    Ok(domain_int(rows[0].get(0)))
}

async fn insert_send(tx: &impl GenericClient, s: &WebhookSend) -> Result<(), StoreError> {
    execute(
        tx,
        "INSERT INTO webhook_sends (id, webhook_id, state, next_attempt_ms, lease_node, lease_until_ms, created_ms, doc)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &sql_int(s.id),
            &sql_int(s.webhook_id),
            &state_str(s.state),
            &sql_int(s.next_attempt_ms),
            &s.lease_node,
            &sql_int(s.lease_until_ms),
            &sql_int(s.created_ms),
            &serde_json::to_value(s)?,
        ],
    )
    .await?;
    Ok(())
}

/// Writes an endpoint as a migration brings it (ids kept).
pub(super) async fn import_webhook(tx: &impl GenericClient, w: &Webhook) -> Result<(), StoreError> {
    execute(
        tx,
        "INSERT INTO webhooks (id, doc) VALUES ($1, $2)",
        &[&sql_int(w.id), &serde_json::to_value(w)?],
    )
    .await?;
    Ok(())
}

/// Writes a send as a migration brings it (ids kept).
pub(super) async fn import_send(tx: &impl GenericClient, s: &WebhookSend) -> Result<(), StoreError> {
    insert_send(tx, s).await
}

async fn put_send(tx: &impl GenericClient, s: &WebhookSend) -> Result<(), StoreError> {
    execute(
        tx,
        "UPDATE webhook_sends SET state = $2, next_attempt_ms = $3, lease_node = $4, lease_until_ms = $5, doc = $6
         WHERE id = $1",
        &[
            &sql_int(s.id),
            &state_str(s.state),
            &sql_int(s.next_attempt_ms),
            &s.lease_node,
            &sql_int(s.lease_until_ms),
            &serde_json::to_value(s)?,
        ],
    )
    .await?;
    Ok(())
}

fn state_str(state: SendState) -> &'static str {
    match state {
        SendState::Pending => "pending",
        SendState::Delivered => "delivered",
        SendState::Failed => "failed",
    }
}

/// Holds an endpoint's pending sends (disabled) or makes the held ones due now.
async fn hold_or_release(
    tx: &impl GenericClient,
    webhook_id: u64,
    state: WebhookState,
    now: u64,
) -> Result<(), StoreError> {
    let (from_held, due) = match state {
        WebhookState::Disabled => (false, HELD),
        WebhookState::Active => (true, now),
    };
    // `doc` keeps the due time too: set both.
    execute(
        tx,
        "UPDATE webhook_sends SET next_attempt_ms = $2,
                doc = jsonb_set(doc, '{next_attempt_ms}', to_jsonb($2::bigint))
         WHERE webhook_id = $1 AND state = 'pending' AND (NOT $3 OR next_attempt_ms = $4)",
        &[&sql_int(webhook_id), &sql_int(due), &from_held, &sql_int(HELD)],
    )
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Webhooks for PgStore {
    async fn create_webhook(&self, new: NewWebhook) -> Result<Webhook, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let webhook = Webhook::new(next_id(&tx, "webhooks").await?, new, now_ms());
        execute(
            &tx,
            "INSERT INTO webhooks (id, doc) VALUES ($1, $2)",
            &[&sql_int(webhook.id), &serde_json::to_value(&webhook)?],
        )
        .await?;
        commit(tx).await?;
        Ok(webhook)
    }

    async fn webhook(&self, id: u64) -> Result<Webhook, StoreError> {
        let client = self.client().await?;
        webhook_in(&client, id, false).await
    }

    async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        let client = self.client().await?;
        query(&client, "SELECT doc FROM webhooks ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| Ok(serde_json::from_value(r.get(0))?))
            .collect()
    }

    async fn update_webhook(&self, id: u64, patch: WebhookPatch) -> Result<Webhook, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut webhook = webhook_in(&tx, id, true).await?;
        let now = now_ms();
        if let Some(state) = webhook.apply(patch, now) {
            hold_or_release(&tx, id, state, now).await?;
        }
        put_webhook(&tx, &webhook).await?;
        commit(tx).await?;
        Ok(webhook)
    }

    async fn delete_webhook(&self, id: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        // The sends and attempts go with it (ON DELETE CASCADE).
        let deleted = execute(&client, "DELETE FROM webhooks WHERE id = $1", &[&sql_int(id)]).await?;
        if deleted == 0 {
            return Err(StoreError::not_found("webhook", id));
        }
        Ok(())
    }

    async fn fan_out(
        &self,
        id: u64,
        from: u64,
        to: u64,
        events: Vec<(u64, String)>,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut webhook = webhook_in(&tx, id, true).await?;
        if webhook.cursor != from || webhook.state != WebhookState::Active {
            return Ok(false);
        }
        let now = now_ms();
        for event in events {
            let send = WebhookSend::new(next_id(&tx, "webhook_sends").await?, &webhook, Some(event), now);
            insert_send(&tx, &send).await?;
        }
        webhook.cursor = to;
        put_webhook(&tx, &webhook).await?;
        commit(tx).await?;
        Ok(true)
    }

    async fn queue_webhook_test(&self, id: u64) -> Result<WebhookSend, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let webhook = webhook_in(&tx, id, false).await?;
        let send = WebhookSend::new(next_id(&tx, "webhook_sends").await?, &webhook, None, now_ms());
        insert_send(&tx, &send).await?;
        commit(tx).await?;
        Ok(send)
    }

    async fn claim_webhook_sends(
        &self,
        node: &str,
        now_ms: u64,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<(WebhookSend, Webhook)>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = query(
            &tx,
            "SELECT s.doc, w.doc FROM webhook_sends s JOIN webhooks w ON w.id = s.webhook_id
             WHERE s.state = 'pending' AND s.next_attempt_ms <= $1
               AND (s.lease_node IS NULL OR s.lease_until_ms < $1)
             ORDER BY s.next_attempt_ms, s.id LIMIT $2 FOR UPDATE OF s SKIP LOCKED",
            &[&sql_int(now_ms), &sql_limit(limit)],
        )
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let mut send: WebhookSend = serde_json::from_value(row.get(0))?;
            let webhook: Webhook = serde_json::from_value(row.get(1))?;
            send.claim(node, until_ms);
            put_send(&tx, &send).await?;
            claimed.push((send, webhook));
        }
        commit(tx).await?;
        Ok(claimed)
    }

    async fn record_webhook_attempt(
        &self,
        send_id: u64,
        node: &str,
        result: AttemptResult,
        delays_ms: Vec<u64>,
    ) -> Result<WebhookAttempt, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = query_opt(
            &tx,
            "SELECT doc FROM webhook_sends WHERE id = $1 FOR UPDATE",
            &[&sql_int(send_id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("webhook send", send_id))?;
        let mut send: WebhookSend = serde_json::from_value(row.get(0))?;
        if send.state != SendState::Pending || send.lease_node.as_deref() != Some(node) {
            return Err(StoreError::TakenOver(format!(
                "webhook send {send_id} is no longer this node's to record"
            )));
        }
        send.record(&result, &delays_ms);
        // The endpoint's row is locked (and written) only when the attempt changes it: a
        // success of a working endpoint, the usual case, leaves it alone, so concurrent
        // records of one endpoint do not queue behind its row.
        let mut webhook = webhook_in(&tx, send.webhook_id, false).await?;
        let mut changed = webhook.clone();
        changed.after_attempt(&send, &result);
        if changed != webhook {
            webhook = webhook_in(&tx, send.webhook_id, true).await?;
            if webhook.after_attempt(&send, &result) {
                hold_or_release(&tx, webhook.id, WebhookState::Disabled, result.at_ms).await?;
                tracing::warn!(webhook = webhook.id, reason = ?webhook.disabled_reason, "a webhook endpoint was disabled");
            }
            put_webhook(&tx, &webhook).await?;
        }
        if webhook.state == WebhookState::Disabled && send.state == SendState::Pending {
            send.next_attempt_ms = HELD;
        }
        put_send(&tx, &send).await?;
        let attempt = WebhookAttempt::new(next_id(&tx, "webhook_attempts").await?, &send, result);
        execute(
            &tx,
            "INSERT INTO webhook_attempts (id, webhook_id, at_ms, doc) VALUES ($1, $2, $3, $4)",
            &[
                &sql_int(attempt.id),
                &sql_int(webhook.id),
                &sql_int(attempt.at_ms),
                &serde_json::to_value(&attempt)?,
            ],
        )
        .await?;
        commit(tx).await?;
        Ok(attempt)
    }

    async fn webhook_attempts(
        &self,
        id: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<WebhookAttempt>, StoreError> {
        let client = self.client().await?;
        webhook_in(&client, id, false).await?;
        let before = if before == 0 { i64::MAX } else { sql_int(before) };
        query(
            &client,
            "SELECT doc FROM webhook_attempts WHERE webhook_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            &[&sql_int(id), &before, &sql_limit(limit)],
        )
        .await?
        .iter()
        .map(|r| Ok(serde_json::from_value(r.get(0))?))
        .collect()
    }

    async fn next_webhook_due(&self) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT next_attempt_ms FROM webhook_sends WHERE state = 'pending' AND next_attempt_ms < $1
             ORDER BY next_attempt_ms, id LIMIT 1",
            &[&sql_int(HELD)],
        )
        .await?;
        Ok(row.map(|r| domain_int(r.get(0))))
    }

    async fn prune_webhook_log(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let attempts = execute(
            &client,
            "DELETE FROM webhook_attempts WHERE id IN (
                 SELECT id FROM webhook_attempts WHERE at_ms < $1 ORDER BY id LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
            &[&sql_int(before_ms), &sql_limit(limit)],
        )
        .await?;
        let sends = execute(
            &client,
            "DELETE FROM webhook_sends WHERE id IN (
                 SELECT id FROM webhook_sends WHERE state <> 'pending' AND created_ms < $1 ORDER BY id LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
            &[&sql_int(before_ms), &sql_limit(limit)],
        )
        .await?;
        Ok((attempts + sends) as usize)
    }
}
