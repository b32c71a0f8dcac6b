//! One-off messages as the runner sends them: the same checks, rates, fencing, retry
//! delays and bounce rules as a job's deliveries (`Runner::send_checked`), for one
//! message that is rendered on its own (its data merged into the params).

use std::sync::Arc;

use serde_json::Map;
use tokio_util::sync::CancellationToken;

use super::deliver::{Attempt, admitted};
use super::{RetryPolicy, Runner, RunnerError, outgoing};
use crate::domain::{Letter, Outcome, PluginKind, now, now_ms};
use crate::messages::{Message, MessageContent};
use crate::policy::LetterInput;
use crate::policy::builtin::{DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME};
use crate::store::StoreError;

impl Runner {
    /// The retry policy one-off messages follow: the server's default for jobs.
    pub fn message_retry(&self) -> RetryPolicy {
        let retry = &self.inner.config.retry;
        RetryPolicy {
            max_attempts: retry.max_attempts,
            base_ms: retry.base_ms,
            cap_ms: retry.cap_ms.max(retry.base_ms),
        }
    }

    /// The letter a message renders: its letter's (with the message's data over the
    /// params) or one made of its own subject and body.
    pub async fn message_letter(
        &self,
        newsletter_id: u64,
        content: &MessageContent,
    ) -> Result<Letter, RunnerError> {
        let mut letter = match content.letter_id {
            Some(id) => self.inner.store.letter(id).await?,
            None => Letter {
                id: 0,
                newsletter_id,
                subject: content.subject.clone().unwrap_or_default(),
                text: content.text.clone().unwrap_or_default(),
                html: content.html.clone(),
                filter: DEFAULT_FILTER_NAME.into(),
                template: content
                    .template
                    .clone()
                    .unwrap_or_else(|| DEFAULT_TEMPLATE_NAME.into()),
                params: Map::new(),
                created_at: now(),
            },
        };
        for (key, value) in &content.data {
            letter.params.insert(key.clone(), value.clone());
        }
        Ok(letter)
    }

    /// Whether a message's template policy can be used now (a name that resolves to a
    /// compiled template): what `POST /v1/messages` checks before it accepts one.
    pub async fn check_message_template(&self, template: &str) -> Result<(), RunnerError> {
        self.resolve_loaded(template, PluginKind::Template)
            .await
            .map(|_| ())
    }

    /// Sends one claimed message (`node` holds its lease until `lease_until_ms`) and
    /// returns the outcome to record. The filter does not run: a one-off message names
    /// its recipient.
    pub async fn send_message(
        &self,
        message: &Message,
        node: &str,
        lease_until_ms: u64,
        stop: &CancellationToken,
    ) -> Outcome {
        let retry = self.message_retry();
        let to = Attempt {
            email: &message.email,
            newsletter_id: message.newsletter_id,
            subscriber_id: message.subscriber_id,
            job_id: None,
            letter_id: message.content.letter_id,
            attempts: message.attempts,
            retry: &retry,
            confirmation: message.confirmation,
        };
        if let Some(deferred) = self.domain_paused(&message.email) {
            return deferred;
        }
        let epoch = self.inner.store.status_epoch();
        let subscriber = match self.reread(&to).await.and_then(|r| admitted(&to, r)) {
            Ok(subscriber) => subscriber,
            Err(outcome) => return outcome,
        };
        let rendered = match self.render_message(message, subscriber.clone()).await {
            Ok(rendered) => rendered,
            // The store is away: try again later, like any delivery.
            Err(RunnerError::Store(e)) => return self.retry_or_fail(&to, e.to_string()),
            // The letter or template is gone, or it does not render: that will not heal.
            Err(e) => {
                return Outcome::Failed {
                    reason: e.to_string(),
                };
            }
        };
        let transport = match self.inner.transports.get(message.transport.as_deref()) {
            Ok(t) => t.clone(),
            Err(e) => {
                return Outcome::Failed {
                    reason: e.to_string(),
                };
            }
        };
        let domain = crate::bounces::domain_of(&message.email);
        let _permits = tokio::select! {
            p = async {
                let domain = self.inner.domains.acquire(&domain).await;
                let slot = self.inner.delivery_slots.clone().acquire_owned().await;
                (domain, slot)
            } => p,
            _ = stop.cancelled() => return Outcome::Released,
        };
        let newsletter = match self.inner.store.newsletter(message.newsletter_id).await {
            Ok(n) => n,
            Err(StoreError::NotFound { .. }) => {
                return Outcome::Skipped {
                    reason: "its newsletter was deleted".into(),
                };
            }
            Err(e) => return self.retry_or_fail(&to, e.to_string()),
        };
        let url = self.unsubscribe_url(message.newsletter_id, message.subscriber_id);
        let mut outgoing = outgoing(&newsletter, subscriber, rendered, message.message_id.clone(), url);
        // No job to name: bounces to the VERP address of job 0 are matched by the
        // subscriber alone.
        outgoing.return_path = self.return_path(0, message.subscriber_id);
        let inner = &self.inner;
        let holds = || inner.node.holds(node) && now_ms() < lease_until_ms;
        self.send_checked(&to, &outgoing, &transport, epoch, stop, &holds)
            .await
    }

    async fn render_message(
        &self,
        message: &Message,
        subscriber: crate::domain::Subscriber,
    ) -> Result<crate::policy::Rendered, RunnerError> {
        let store = &self.inner.store;
        let letter = self
            .message_letter(message.newsletter_id, &message.content)
            .await?;
        let newsletter = store.newsletter(message.newsletter_id).await?;
        let (_, template) = self
            .resolve_loaded(&letter.template, PluginKind::Template)
            .await?;
        let (_, filter) = self
            .resolve_loaded(DEFAULT_FILTER_NAME, PluginKind::Filter)
            .await?;
        let evaluator = Arc::new(self.inner.policies.evaluator(
            filter,
            template,
            LetterInput::new(&letter, &newsletter),
        )?);
        let url = self.unsubscribe_url(message.newsletter_id, message.subscriber_id);
        Ok(evaluator.render_async(subscriber, url).await?)
    }
}

impl Runner {
    /// Records a one-off message (queued, due now) and wakes this node's message worker.
    pub async fn queue_message(
        &self,
        message: crate::messages::NewMessage,
        idempotency: Option<crate::store::IdempotencyKey>,
    ) -> Result<crate::store::NewMessageOutcome, RunnerError> {
        let outcome = self.inner.store.create_message(message, idempotency).await?;
        if matches!(outcome, crate::store::NewMessageOutcome::Created(_)) {
            self.wake_message_worker();
        }
        Ok(outcome)
    }

    /// Tells this node's message worker that messages were queued (by an automation's
    /// turn, say).
    pub fn wake_message_worker(&self) {
        self.inner.message_queued.notify_one();
    }

    /// Resolves when a message is queued on this node (or was since the last wait).
    pub async fn message_queued(&self) {
        self.inner.message_queued.notified().await
    }
}
