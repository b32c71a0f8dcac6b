//! Webhooks out in redb: endpoints, their sends (pending ones indexed by due time, held
//! ones at `HELD`), an index of sends by endpoint, and the attempts' log by endpoint.
//! Each operation is one closure of the writer's transaction.

use redb::{ReadableTable, WriteTransaction};

use super::lists::next_id;
use super::tables::*;
use super::{RedbStore, decode, encode};
use crate::domain::now_ms;
use crate::store::{StoreError, Webhooks};
use crate::webhooks::{
    AttemptResult, HELD, NewWebhook, SendState, Webhook, WebhookAttempt, WebhookPatch, WebhookSend,
    WebhookState,
};

fn webhook_in(txn: &WriteTransaction, id: u64) -> Result<Webhook, StoreError> {
    let table = txn.open_table(WEBHOOKS)?;
    let row = table
        .get(id)?
        .ok_or_else(|| StoreError::not_found("webhook", id))?;
    decode(row.value())
}

pub(super) fn put_webhook(txn: &WriteTransaction, w: &Webhook) -> Result<(), StoreError> {
    txn.open_table(WEBHOOKS)?.insert(w.id, encode(w).as_slice())?;
    Ok(())
}

fn send_in(txn: &WriteTransaction, id: u64) -> Result<WebhookSend, StoreError> {
    let table = txn.open_table(WEBHOOK_SENDS)?;
    let row = table
        .get(id)?
        .ok_or_else(|| StoreError::not_found("webhook send", id))?;
    decode(row.value())
}

/// Writes a send with its due index entry (pending ones only); `old` is what it was.
pub(super) fn put_send(
    txn: &WriteTransaction,
    s: &WebhookSend,
    old: Option<&WebhookSend>,
) -> Result<(), StoreError> {
    let mut due = txn.open_table(WEBHOOK_SENDS_DUE)?;
    if let Some(old) = old.filter(|o| o.state == SendState::Pending) {
        due.remove((old.next_attempt_ms, old.id))?;
    }
    if s.state == SendState::Pending {
        due.insert((s.next_attempt_ms, s.id), ())?;
    }
    txn.open_table(WEBHOOK_SENDS)?
        .insert(s.id, encode(s).as_slice())?;
    txn.open_table(WEBHOOK_SENDS_BY_HOOK)?
        .insert((s.webhook_id, s.id), ())?;
    Ok(())
}

fn sends_of(txn: &WriteTransaction, webhook_id: u64) -> Result<Vec<u64>, StoreError> {
    let index = txn.open_table(WEBHOOK_SENDS_BY_HOOK)?;
    let mut out = Vec::new();
    for row in index.range((webhook_id, 0)..=(webhook_id, u64::MAX))? {
        out.push(row?.0.value().1);
    }
    Ok(out)
}

/// Holds an endpoint's pending sends (disabled) or makes them due now (enabled).
fn hold_or_release(
    txn: &WriteTransaction,
    webhook_id: u64,
    state: WebhookState,
    now: u64,
) -> Result<(), StoreError> {
    for id in sends_of(txn, webhook_id)? {
        let mut send = send_in(txn, id)?;
        if send.state != SendState::Pending {
            continue;
        }
        let old = send.clone();
        send.next_attempt_ms = match state {
            WebhookState::Disabled => HELD,
            WebhookState::Active if send.held() => now,
            WebhookState::Active => continue,
        };
        put_send(txn, &send, Some(&old))?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Webhooks for RedbStore {
    async fn create_webhook(&self, new: NewWebhook) -> Result<Webhook, StoreError> {
        self.write(move |txn| {
            let webhook = Webhook::new(next_id(txn, "webhook")?, new, now_ms());
            put_webhook(txn, &webhook)?;
            Ok(webhook)
        })
        .await
    }

    async fn webhook(&self, id: u64) -> Result<Webhook, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(WEBHOOKS)?;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::not_found("webhook", id))?;
            decode(row.value())
        })
        .await
    }

    async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(WEBHOOKS)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                out.push(decode(row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_webhook(&self, id: u64, patch: WebhookPatch) -> Result<Webhook, StoreError> {
        self.write(move |txn| {
            let mut webhook = webhook_in(txn, id)?;
            let now = now_ms();
            if let Some(state) = webhook.apply(patch, now) {
                hold_or_release(txn, id, state, now)?;
            }
            put_webhook(txn, &webhook)?;
            Ok(webhook)
        })
        .await
    }

    async fn delete_webhook(&self, id: u64) -> Result<(), StoreError> {
        self.write(move |txn| {
            webhook_in(txn, id)?;
            let ids = sends_of(txn, id)?;
            let mut sends = txn.open_table(WEBHOOK_SENDS)?;
            let mut due = txn.open_table(WEBHOOK_SENDS_DUE)?;
            let mut by_hook = txn.open_table(WEBHOOK_SENDS_BY_HOOK)?;
            for send_id in ids {
                let old: Option<WebhookSend> = sends
                    .remove(send_id)?
                    .map(|row| decode(row.value()))
                    .transpose()?;
                if let Some(old) = old.filter(|o| o.state == SendState::Pending) {
                    due.remove((old.next_attempt_ms, send_id))?;
                }
                by_hook.remove((id, send_id))?;
            }
            let mut attempts = txn.open_table(WEBHOOK_ATTEMPTS)?;
            let mut times = txn.open_table(WEBHOOK_ATTEMPT_IDS)?;
            let ids: Vec<u64> = {
                let mut out = Vec::new();
                for row in attempts.range((id, 0)..=(id, u64::MAX))? {
                    out.push(row?.0.value().1);
                }
                out
            };
            for attempt in ids {
                attempts.remove((id, attempt))?;
                times.remove(attempt)?;
            }
            txn.open_table(WEBHOOKS)?.remove(id)?;
            Ok(())
        })
        .await
    }

    async fn fan_out(
        &self,
        id: u64,
        from: u64,
        to: u64,
        events: Vec<(u64, String)>,
    ) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let mut webhook = webhook_in(txn, id)?;
            if webhook.cursor != from || webhook.state != WebhookState::Active {
                return Ok(false);
            }
            let now = now_ms();
            for event in events {
                let send = WebhookSend::new(next_id(txn, "webhook_send")?, &webhook, Some(event), now);
                put_send(txn, &send, None)?;
            }
            webhook.cursor = to;
            put_webhook(txn, &webhook)?;
            Ok(true)
        })
        .await
    }

    async fn queue_webhook_test(&self, id: u64) -> Result<WebhookSend, StoreError> {
        self.write(move |txn| {
            let webhook = webhook_in(txn, id)?;
            let send = WebhookSend::new(next_id(txn, "webhook_send")?, &webhook, None, now_ms());
            put_send(txn, &send, None)?;
            Ok(send)
        })
        .await
    }

    async fn claim_webhook_sends(
        &self,
        node: &str,
        now_ms: u64,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<(WebhookSend, Webhook)>, StoreError> {
        let node = node.to_string();
        self.write(move |txn| {
            let due: Vec<u64> = {
                let index = txn.open_table(WEBHOOK_SENDS_DUE)?;
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
                let mut send = send_in(txn, id)?;
                if !send.claimable(now_ms) {
                    continue;
                }
                let webhook = webhook_in(txn, send.webhook_id)?;
                let old = send.clone();
                send.claim(&node, until_ms);
                put_send(txn, &send, Some(&old))?;
                claimed.push((send, webhook));
            }
            Ok(claimed)
        })
        .await
    }

    async fn record_webhook_attempt(
        &self,
        send_id: u64,
        node: &str,
        result: AttemptResult,
        delays_ms: Vec<u64>,
    ) -> Result<WebhookAttempt, StoreError> {
        let node = node.to_string();
        self.write(move |txn| {
            let mut send = send_in(txn, send_id)?;
            if send.state != SendState::Pending || send.lease_node.as_deref() != Some(node.as_str()) {
                return Err(StoreError::TakenOver(format!(
                    "webhook send {send_id} is no longer this node's to record"
                )));
            }
            let mut webhook = webhook_in(txn, send.webhook_id)?;
            let old = send.clone();
            send.record(&result, &delays_ms);
            if webhook.after_attempt(&send, &result) {
                hold_or_release(txn, webhook.id, WebhookState::Disabled, result.at_ms)?;
                tracing::warn!(webhook = webhook.id, reason = ?webhook.disabled_reason, "a webhook endpoint was disabled");
            }
            if webhook.state == WebhookState::Disabled && send.state == SendState::Pending {
                send.next_attempt_ms = HELD;
            }
            put_send(txn, &send, Some(&old))?;
            put_webhook(txn, &webhook)?;
            let attempt = WebhookAttempt::new(next_id(txn, "webhook_attempt")?, &send, result);
            txn.open_table(WEBHOOK_ATTEMPTS)?
                .insert((webhook.id, attempt.id), encode(&attempt).as_slice())?;
            txn.open_table(WEBHOOK_ATTEMPT_IDS)?
                .insert(attempt.id, webhook.id)?;
            Ok(attempt)
        })
        .await
    }

    async fn webhook_attempts(
        &self,
        id: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<WebhookAttempt>, StoreError> {
        self.read(move |txn| {
            if txn.open_table(WEBHOOKS)?.get(id)?.is_none() {
                return Err(StoreError::not_found("webhook", id));
            }
            let table = txn.open_table(WEBHOOK_ATTEMPTS)?;
            let below = if before == 0 { u64::MAX } else { before - 1 };
            let mut out = Vec::new();
            for row in table.range((id, 0)..=(id, below))?.rev() {
                out.push(decode(row?.1.value())?);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn next_webhook_due(&self) -> Result<Option<u64>, StoreError> {
        self.read(move |txn| {
            let index = txn.open_table(WEBHOOK_SENDS_DUE)?;
            Ok(index
                .first()?
                .map(|(key, _)| key.value().0)
                .filter(|due| *due != HELD))
        })
        .await
    }

    async fn prune_webhook_log(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut removed = 0;
            // Attempts: their ids grow with time, so the oldest come first.
            let oldest: Vec<(u64, u64)> = {
                let ids = txn.open_table(WEBHOOK_ATTEMPT_IDS)?;
                let mut out = Vec::new();
                for row in ids.iter()?.take(limit) {
                    let (id, webhook) = row?;
                    out.push((id.value(), webhook.value()));
                }
                out
            };
            let mut attempts = txn.open_table(WEBHOOK_ATTEMPTS)?;
            let mut ids = txn.open_table(WEBHOOK_ATTEMPT_IDS)?;
            for (id, webhook) in oldest {
                let old = match attempts.get((webhook, id))? {
                    Some(row) => decode::<WebhookAttempt>(row.value())?.at_ms < before_ms,
                    None => true,
                };
                if !old {
                    break;
                }
                attempts.remove((webhook, id))?;
                ids.remove(id)?;
                removed += 1;
            }
            // Finished sends, oldest first; a pending one is passed over.
            let candidates: Vec<WebhookSend> = {
                let sends = txn.open_table(WEBHOOK_SENDS)?;
                let mut out = Vec::new();
                for row in sends.iter()?.take(limit) {
                    let send: WebhookSend = decode(row?.1.value())?;
                    if send.created_ms >= before_ms {
                        break;
                    }
                    out.push(send);
                }
                out
            };
            let mut sends = txn.open_table(WEBHOOK_SENDS)?;
            let mut by_hook = txn.open_table(WEBHOOK_SENDS_BY_HOOK)?;
            for send in candidates.into_iter().filter(|s| s.state != SendState::Pending) {
                sends.remove(send.id)?;
                by_hook.remove((send.webhook_id, send.id))?;
                removed += 1;
            }
            Ok(removed)
        })
        .await
    }
}
