//! One recipient's attempt: slots, filter, template, rate limit, send, record; and the
//! rules a one-off message shares with it (who may be sent to, what a rejection means,
//! when to retry). Expected failures become the recipient's state; only a store failure
//! is returned to the supervisor.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::sync::CancellationToken;

use super::batches::Evaluated;
use super::limits::DomainPermit;
use super::supervisor::{Claimed, JobContext, Report};
use super::{Runner, message_id, outgoing};
use crate::bounces::{BounceKind, NewBounce, Status, Suppression};
use crate::domain::*;
use crate::mail::{MailError, Outgoing, Transport};
use crate::policy::{PolicyError, Verdict};
use crate::store::StoreError;

impl Runner {
    /// Waits for a slot for the recipient's domain, then the job's, then the server's;
    /// `None` if the job stops first.
    async fn slots(
        &self,
        ctx: &JobContext,
        email: &str,
        stop: &CancellationToken,
    ) -> Option<(Option<DomainPermit>, OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let domain = email
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        // Domain first, so recipients of a capped domain wait without holding the job's
        // slots that other domains could use.
        let domain_permit = tokio::select! {
            p = self.inner.domains.acquire(&domain) => p,
            _ = stop.cancelled() => return None,
        };
        let job_permit = tokio::select! {
            p = ctx.slots.clone().acquire_owned() => p.ok()?,
            _ = stop.cancelled() => return None,
        };
        let server_permit = tokio::select! {
            p = self.inner.delivery_slots.clone().acquire_owned() => p.ok()?,
            _ = stop.cancelled() => return None,
        };
        Some((domain_permit, job_permit, server_permit))
    }

    /// One recipient: slots → filter → template → rate limit → send → record. Expected
    /// failures become the recipient's state; only a store failure is returned.
    pub(super) async fn deliver(
        &self,
        ctx: &Arc<JobContext>,
        claimed: Claimed,
    ) -> Result<Report, StoreError> {
        let delivery = claimed.delivery.clone();
        let node = claimed.node.clone();
        let outcome = match self.slots(ctx, &delivery.email, &ctx.stop).await {
            None => Outcome::Released,
            Some(permits) => {
                let outcome = self.attempt(ctx, claimed).await;
                drop(permits);
                outcome
            }
        };
        let mut report = Report {
            finished: false,
            retry_at_ms: None,
        };
        match &outcome {
            Outcome::Delivered { .. } => tracing::debug!("delivered"),
            Outcome::Skipped { reason } => tracing::debug!(reason, "skipped"),
            Outcome::Retry { at_ms, error } => {
                tracing::info!(error, attempts = delivery.attempts, "delivery will be retried");
                report.retry_at_ms = Some(*at_ms);
            }
            Outcome::Deferred { at_ms, reason } => {
                tracing::debug!(reason, "deferred: its domain is paused");
                report.retry_at_ms = Some(*at_ms);
            }
            Outcome::Failed { reason } => tracing::warn!(reason, "delivery failed"),
            Outcome::Released => tracing::debug!("released: the job stopped before sending"),
        }
        let label = match &outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Skipped { .. } => "skipped",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failed",
            Outcome::Released => "released",
            Outcome::Deferred { .. } => "deferred",
        };
        metrics::counter!("letterbox_deliveries_total", "outcome" => label).increment(1);
        report.finished = matches!(
            outcome,
            Outcome::Delivered { .. } | Outcome::Skipped { .. } | Outcome::Failed { .. }
        );
        let (tx, rx) = oneshot::channel();
        ctx.recorder
            .send((delivery.subscriber_id, outcome, node, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)??;
        Ok(report)
    }

    /// `try_attempt`, with a policy failure as the recipient's reason. (The evaluator
    /// task counted it towards the job's restart intensity already.)
    async fn attempt(&self, ctx: &Arc<JobContext>, claimed: Claimed) -> Outcome {
        match self.try_attempt(ctx, claimed).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed {
                reason: e.to_string(),
            },
        }
    }

    /// The attempt proper; policy failures come back as errors so they can be counted.
    async fn try_attempt(&self, ctx: &Arc<JobContext>, claimed: Claimed) -> Result<Outcome, PolicyError> {
        let inner = &self.inner;
        let stop = &ctx.stop;
        if stop.is_cancelled() {
            return Ok(Outcome::Released);
        }
        let delivery = &claimed.delivery;
        let claimed_node = claimed.node.clone();
        if let Some(deferred) = self.domain_paused(&delivery.email) {
            return Ok(deferred);
        }
        // The claim read the subscriber; read again only if a status changed since.
        let mut epoch = claimed.epoch;
        let recipient = match claimed.suppression {
            Some(suppression) if inner.store.status_epoch() == epoch => (claimed.subscriber, suppression),
            _ => {
                epoch = inner.store.status_epoch();
                match self.reread(&attempt_of(ctx, delivery)).await {
                    Ok(recipient) => recipient,
                    Err(outcome) => return Ok(outcome),
                }
            }
        };
        // Re-checked at send time: an unsubscribe wins over a snapshot taken earlier.
        let subscriber = match sendable(recipient) {
            Ok(subscriber) => subscriber,
            Err(skipped) => return Ok(skipped),
        };
        let unsubscribe_url = self.unsubscribe_url(ctx.newsletter.id, subscriber.id);
        let (tx, rx) = oneshot::channel();
        let sent = ctx.evaluations.send((subscriber, unsubscribe_url.clone(), tx));
        let evaluated = match sent {
            Ok(()) => rx.await.unwrap_or(Evaluated::Stopped),
            Err(_) => Evaluated::Stopped,
        };
        let (subscriber, verdict) = match evaluated {
            Evaluated::Done(subscriber, verdict) => (subscriber, verdict),
            Evaluated::Failed(e) => return Err(e),
            Evaluated::Stopped => return Ok(Outcome::Released),
        };
        let rendered = match verdict {
            Verdict::Send(rendered) => rendered,
            Verdict::Skip(reason) => return Ok(Outcome::Skipped { reason }),
        };

        let message_id = message_id(
            ctx.job_id,
            ctx.message_id_nonce.as_deref(),
            delivery.subscriber_id,
            &ctx.message_domain,
        );
        let mut outgoing = outgoing(&ctx.newsletter, subscriber, rendered, message_id, unsubscribe_url);
        outgoing.return_path = self.return_path(ctx.job_id, delivery.subscriber_id);
        let to = attempt_of(ctx, delivery);
        let holds = || inner.node.holds(&claimed_node);
        Ok(self
            .send_checked(&to, &outgoing, &ctx.transport, epoch, stop, &holds)
            .await)
    }

    /// The last steps of any attempt, a job's delivery or a one-off message: wait for
    /// the transport's rate, look again at what may have changed meanwhile (a status,
    /// the recipient's domain, the claim: `holds`), send, and classify the answer.
    /// `epoch` is the status epoch the recipient was last read at.
    pub(super) async fn send_checked(
        &self,
        to: &Attempt<'_>,
        outgoing: &Outgoing,
        transport: &Transport,
        epoch: u64,
        stop: &CancellationToken,
        holds: &(dyn Fn() -> bool + Sync),
    ) -> Outcome {
        let inner = &self.inner;
        tokio::select! {
            _ = async {
                self.fleet_rate_token(transport).await;
                transport.ready().await;
            } => {}
            _ = stop.cancelled() => return Outcome::Released,
        }
        // The wait for the rate can be long (a provider's 14/s shared by a whole
        // window of recipients): a status that changed meanwhile still wins.
        if inner.store.status_epoch() != epoch {
            match self.reread(to).await {
                Ok(recipient) => {
                    if let Err(skipped) = admitted(to, recipient) {
                        return skipped;
                    }
                }
                Err(outcome) => return outcome,
            }
        }
        if let Some(deferred) = self.domain_paused(to.email) {
            return deferred;
        }
        // Fencing: nothing goes out under a claim this node may no longer hold.
        if stop.is_cancelled() || !holds() {
            return Outcome::Released;
        }
        // Asked again inside the transport, once it has a connection: the wait for one
        // can outlast the lease.
        let go = || !stop.is_cancelled() && holds();
        match transport.send(outgoing, &go).await {
            Ok(reply) => Outcome::Delivered { reply },
            Err(MailError::Withheld) => Outcome::Released,
            Err(e) if e.is_transient() => match self.retry_or_fail(to, e.to_string()) {
                // A full mailbox (4.2.2) that outlasted every attempt is a soft bounce.
                Outcome::Failed { reason } => self.rejected(to, &e.to_string(), reason).await,
                retry => retry,
            },
            Err(e) => self.rejected(to, &e.to_string(), e.to_string()).await,
        }
    }

    /// The recipient's subscriber as stored now (`None` once erased) and its address's
    /// suppression, or the outcome when they cannot be read.
    pub(super) async fn reread(&self, to: &Attempt<'_>) -> Result<Recipient, Outcome> {
        let store = &self.inner.store;
        let subscriber = match store.subscriber(to.newsletter_id, to.subscriber_id).await {
            Ok(s) => Some(s),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(self.retry_or_fail(to, e.to_string())),
        };
        match store.suppressed(vec![to.email.to_string()]).await {
            Ok(mut list) => Ok((subscriber, list.pop())),
            Err(e) => Err(self.retry_or_fail(to, e.to_string())),
        }
    }

    /// The outcome for a recipient whose domain this node holds back, if it does.
    pub(super) fn domain_paused(&self, email: &str) -> Option<Outcome> {
        let domain = crate::bounces::domain_of(email);
        let pause = self.inner.blocks.paused(&domain)?;
        let until = std::time::UNIX_EPOCH + std::time::Duration::from_millis(pause.until_ms);
        Some(Outcome::Deferred {
            at_ms: pause.until_ms,
            reason: format!(
                "recipient domain {domain} paused until {}: {}",
                humantime::format_rfc3339_seconds(until),
                pause.reason
            ),
        })
    }

    /// A refusal the delivery ends on (`reason`): if the server's reply classifies as a
    /// bounce or a block (`bounces::Status`), it is recorded as one, with the rules
    /// applied, before the failure is: a crash between the two re-sends to a
    /// subscriber who is then skipped. A report that cannot be recorded now is tried
    /// again with the delivery, if it has attempts left.
    async fn rejected(&self, to: &Attempt<'_>, reply: &str, reason: String) -> Outcome {
        let classified = Status::in_reply(reply).and_then(|status| Some((status, status.bounce_kind()?)));
        let Some((status, kind)) = classified else {
            return Outcome::Failed { reason };
        };
        metrics::counter!("letterbox_rejections_total", "kind" => kind.as_str()).increment(1);
        if kind == BounceKind::Blocked {
            let domain = crate::bounces::domain_of(to.email);
            metrics::counter!("letterbox_sender_blocks_total", "domain" => domain.clone()).increment(1);
            if let Some(pause) = self.inner.blocks.note(&domain, reply) {
                metrics::counter!("letterbox_domain_pauses_total", "domain" => domain.clone()).increment(1);
                tracing::warn!(
                    domain,
                    reason = pause.reason,
                    "recipient domain paused on this node"
                );
            }
        }
        let report = NewBounce {
            kind,
            source: crate::bounces::sources::SMTP.into(),
            email: to.email.to_string(),
            newsletter_id: Some(to.newsletter_id),
            subscriber_id: Some(to.subscriber_id),
            job_id: to.job_id,
            letter_id: to.letter_id,
            status: Some(status.to_string()),
            diagnostic: Some(reply.to_string()),
            raw: None,
        };
        let rules = self.inner.config.bounces.rules;
        match self.inner.store.record_bounce(report, rules).await {
            Ok(records) => {
                let decision = records.first().map(|r| r.decision.as_str()).unwrap_or_default();
                Outcome::Failed {
                    reason: format!("{reason} [{decision}]"),
                }
            }
            Err(e) if e.is_unavailable() && to.attempts < to.retry.max_attempts => {
                tracing::warn!(error = %e, "a bounce could not be recorded: the delivery will be retried");
                self.retry_or_fail(to, format!("{reason} (its bounce could not be recorded: {e})"))
            }
            Err(e) => {
                tracing::warn!(error = %e, "a bounce could not be recorded");
                Outcome::Failed {
                    reason: format!("{reason} (its bounce could not be recorded: {e})"),
                }
            }
        }
    }

    /// A transient failure: retry later if the job's policy allows another attempt.
    pub(super) fn retry_or_fail(&self, to: &Attempt<'_>, error: String) -> Outcome {
        if to.attempts < to.retry.max_attempts {
            let unit = getrandom::u64().unwrap_or(0) as f64 / u64::MAX as f64;
            let at_ms = now_ms() + to.retry.delay_ms(to.attempts, unit);
            Outcome::Retry { at_ms, error }
        } else {
            Outcome::Failed {
                reason: format!("gave up after {} attempts: {error}", to.attempts),
            }
        }
    }
}

/// A recipient as last read: its subscriber (`None` once erased) and its address's
/// suppression.
pub(super) type Recipient = (Option<Subscriber>, Option<Suppression>);

/// Whom an attempt is for, as the retry and bounce rules see it: a job's delivery or a
/// one-off message (no job, and maybe no letter).
pub(super) struct Attempt<'a> {
    pub email: &'a str,
    pub newsletter_id: u64,
    pub subscriber_id: u64,
    pub job_id: Option<u64>,
    pub letter_id: Option<u64>,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    pub retry: &'a RetryPolicy,
    /// A double opt-in confirmation (see `confirmable`).
    pub confirmation: bool,
}

fn attempt_of<'a>(ctx: &'a JobContext, delivery: &'a Delivery) -> Attempt<'a> {
    Attempt {
        email: &delivery.email,
        newsletter_id: ctx.newsletter.id,
        subscriber_id: delivery.subscriber_id,
        job_id: Some(ctx.job_id),
        letter_id: Some(ctx.letter_id),
        attempts: delivery.attempts,
        retry: &ctx.retry,
        confirmation: false,
    }
}

/// `sendable`, or `confirmable` for a confirmation.
pub(super) fn admitted(to: &Attempt<'_>, recipient: Recipient) -> Result<Subscriber, Outcome> {
    match to.confirmation {
        true => confirmable(recipient),
        false => sendable(recipient),
    }
}

/// The subscriber, if a double opt-in confirmation may go to them: one who has not
/// confirmed (or unsubscribed and asked again), whose address is not suppressed.
fn confirmable((subscriber, suppression): Recipient) -> Result<Subscriber, Outcome> {
    let skip = |reason: String| Err(Outcome::Skipped { reason });
    match (subscriber, suppression) {
        (_, Some(suppression)) => skip(suppression.skip_reason()),
        (None, _) => skip("subscriber was deleted".into()),
        (Some(s), None) => match s.status {
            SubscriberStatus::Unconfirmed | SubscriberStatus::Unsubscribed => Ok(s),
            SubscriberStatus::Active => skip("subscriber has confirmed already".into()),
            other => skip(format!("subscriber is {}", other.as_str())),
        },
    }
}

/// The subscriber, if it may still be sent to; else the skip that says why not.
pub(super) fn sendable((subscriber, suppression): Recipient) -> Result<Subscriber, Outcome> {
    if let (Some(s), Some(suppression)) = (&subscriber, suppression)
        && s.status == SubscriberStatus::Active
    {
        return Err(Outcome::Skipped {
            reason: suppression.skip_reason(),
        });
    }
    match subscriber {
        None => Err(Outcome::Skipped {
            reason: "subscriber was deleted".into(),
        }),
        Some(s) if s.status != SubscriberStatus::Active => Err(Outcome::Skipped {
            reason: format!("subscriber is {}", s.status.as_str()),
        }),
        Some(s) => Ok(s),
    }
}
