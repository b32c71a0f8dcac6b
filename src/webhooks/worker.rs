//! The webhook worker: one task per node. Each round it moves every active endpoint's
//! cursor over the event log, queuing a send per matching event in the same
//! transaction as the cursor's move (`Webhooks::fan_out`, which refuses a cursor
//! another node moved first, so each event is queued once per endpoint), then claims
//! due sends under a lease and sends them (up to `IN_FLIGHT` at a time), recording
//! each attempt.
//!
//! A send is delivered at least once: a node that dies with one in flight leaves its
//! lease to run out, and another node sends it again with the same `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::deliver::Deliverer;
use super::model::{AttemptResult, Webhook, WebhookSend, WebhookState, rfc3339};
use super::sign::Secret;
use crate::domain::now_ms;
use crate::events::EventFilter;
use crate::store::{Store, StoreError};

/// Sends in flight at once on this node.
const IN_FLIGHT: usize = 32;

/// Events read per endpoint and store call, and calls per endpoint and round.
const FAN_OUT_BATCH: usize = 256;
const FAN_OUT_CALLS: usize = 8;

/// The longest the worker sleeps without looking again (sends other nodes queued,
/// retries falling due), and the least time between two rounds woken by new events, so
/// a busy log costs at most 20 rounds a second.
const POLL: Duration = Duration::from_millis(500);
const SPACING: Duration = Duration::from_millis(50);

/// What a node's worker works with.
#[derive(Clone)]
pub struct Worker {
    pub store: Store,
    pub deliverer: Arc<Deliverer>,
    /// Notified when an endpoint is made, changed or sent a test (no event says so).
    pub wake: Arc<Notify>,
    /// This node, and how long its claim on a send lasts.
    pub node: String,
    pub lease: Duration,
    /// The delays before each attempt after the first (`DEFAULT_RETRY_DELAYS`).
    pub delays_ms: Arc<Vec<u64>>,
}

impl Worker {
    /// Works until `stop`; sends in flight then are dropped, and go again once their
    /// lease runs out.
    pub async fn run(&self, stop: CancellationToken) {
        let mut head = self.store.event_head();
        let mut running: JoinSet<()> = JoinSet::new();
        loop {
            if stop.is_cancelled() {
                break;
            }
            let webhooks = match self.store.webhooks().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the webhooks failed; trying again");
                    Vec::new()
                }
            };
            let mut next_due = None;
            if !webhooks.is_empty() {
                for webhook in webhooks.iter().filter(|w| w.state == WebhookState::Active) {
                    if let Err(e) = self.fan_out(webhook).await {
                        tracing::warn!(webhook = webhook.id, error = %e, "queuing a webhook's events failed; trying again");
                    }
                }
                // Claims come in batches (half the room at least): one claim per send
                // finished would be a store write per send.
                let room = IN_FLIGHT - running.len();
                if room >= IN_FLIGHT / 2 {
                    let now = now_ms();
                    let until = now + self.lease.as_millis() as u64;
                    match self.store.claim_webhook_sends(&self.node, now, until, room).await {
                        Ok(claimed) => {
                            let full = claimed.len() == room;
                            for (send, webhook) in claimed {
                                running.spawn(send_one(
                                    self.store.clone(),
                                    self.deliverer.clone(),
                                    self.node.clone(),
                                    send,
                                    webhook,
                                    self.delays_ms.clone(),
                                ));
                            }
                            if full {
                                running.join_next().await;
                                continue;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "claiming webhook sends failed; trying again"),
                    }
                }
                next_due = self.store.next_webhook_due().await.ok().flatten();
            }
            let wait = next_due
                .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                .unwrap_or(POLL)
                .clamp(SPACING, POLL);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = head.changed() => tokio::time::sleep(SPACING).await,
                _ = self.wake.notified() => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        running.shutdown().await;
    }

    /// Queues sends for the events past `webhook`'s cursor that it wants.
    async fn fan_out(&self, webhook: &Webhook) -> Result<(), StoreError> {
        let filter = webhook.filter();
        let mut cursor = webhook.cursor;
        for _ in 0..FAN_OUT_CALLS {
            let page = self
                .store
                .events_after(filter.clone(), cursor, FAN_OUT_BATCH)
                .await?;
            if page.next <= cursor {
                return Ok(());
            }
            let events = page.events.iter().map(|e| (e.id, e.kind.clone())).collect();
            if !self.store.fan_out(webhook.id, cursor, page.next, events).await? {
                // Another node moved it first (or it was disabled): theirs stands.
                return Ok(());
            }
            cursor = page.next;
            if !page.more {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Sends one claimed send and records the attempt.
async fn send_one(
    store: Store,
    deliverer: Arc<Deliverer>,
    node: String,
    send: WebhookSend,
    webhook: Webhook,
    delays_ms: Arc<Vec<u64>>,
) {
    let body = match body(&store, &send).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            let gone = AttemptResult {
                at_ms: now_ms(),
                ok: false,
                status: None,
                latency_ms: 0,
                response: None,
                error: Some("its event is no longer in the log (pruned by --event-retention)".into()),
            };
            // Nothing to send, ever: it fails now.
            record(&store, &send, &node, gone, &[]).await;
            return;
        }
        Err(e) => {
            tracing::warn!(send = send.id, error = %e, "reading a webhook's event failed; it goes again after its lease");
            return;
        }
    };
    let secret = match Secret::parse(&webhook.secret) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(webhook = webhook.id, error = %e, "a stored webhook secret does not parse");
            return;
        }
    };
    let message_id = send.message_id();
    let timestamp = now_ms() / 1000;
    let signature = secret.sign(&message_id, timestamp, &body);
    let headers = [
        ("webhook-id", message_id),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ];
    let result = deliverer.post(&webhook.url, &headers, body).await;
    metrics::counter!("letterbox_webhook_attempts_total", "outcome" => if result.ok { "ok" } else { "failed" })
        .increment(1);
    record(&store, &send, &node, result, &delays_ms).await;
}

/// The body of a send: `{type, timestamp, data}`, the event as the log holds it now
/// (an erased subscriber's personal data is gone from it). `None` if the event is.
async fn body(store: &Store, send: &WebhookSend) -> Result<Option<Vec<u8>>, StoreError> {
    let value = match send.event_id {
        Some(id) => {
            let page = store
                .events_after(EventFilter::default(), id.saturating_sub(1), 1)
                .await?;
            let Some(event) = page.events.into_iter().find(|e| e.id == id) else {
                return Ok(None);
            };
            json!({ "type": event.kind, "timestamp": rfc3339(event.at_ms), "data": event })
        }
        None => json!({
            "type": send.kind,
            "timestamp": rfc3339(send.created_ms),
            "data": { "webhook_id": send.webhook_id, "message": "a test message from letterbox" },
        }),
    };
    Ok(Some(serde_json::to_vec(&value)?))
}

/// Records an attempt, trying again while the store is away and the send is still this
/// node's: an attempt never recorded is made again once the lease runs out.
async fn record(store: &Store, send: &WebhookSend, node: &str, result: AttemptResult, delays_ms: &[u64]) {
    let mut delay = Duration::from_millis(100);
    loop {
        match store
            .record_webhook_attempt(send.id, node, result.clone(), delays_ms.to_vec())
            .await
        {
            Ok(attempt) => {
                if !attempt.ok {
                    tracing::info!(webhook = send.webhook_id, send = send.id, attempt = attempt.attempt,
                        status = ?attempt.status, error = ?attempt.error, "a webhook attempt failed");
                }
                return;
            }
            Err(e @ (StoreError::TakenOver(_) | StoreError::NotFound { .. })) => {
                // Another node holds it now, or its endpoint was deleted.
                tracing::warn!(send = send.id, error = %e, "a webhook attempt was not recorded");
                return;
            }
            Err(e) => {
                tracing::warn!(send = send.id, error = %e, "recording a webhook attempt failed; trying again");
                if now_ms() >= send.lease_until_ms {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
