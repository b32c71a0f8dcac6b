//! What a one-off message is, in the terms every backend keeps.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Waiting to be sent (again, after a transient failure, at `next_attempt_ms`).
    Queued,
    Sent,
    /// Not sent, and it will not be: the subscriber is unsubscribed, bounced, erased or
    /// suppressed.
    Skipped,
    Failed,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Sent => "sent",
            MessageState::Skipped => "skipped",
            MessageState::Failed => "failed",
        }
    }
}

/// What a message says: a stored letter's subject and body, or its own rendered by a
/// template policy. `data` is merged over the letter's params (the template sees it
/// as `params`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageContent {
    /// The letter it sends, if it sends one.
    pub letter_id: Option<u64>,
    /// The template policy (a name, or `name@sha256`) of a message with its own body.
    pub template: Option<String>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
}

/// A message as it is asked for, checked (`http/messages.rs` does) before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub newsletter_id: u64,
    pub subscriber_id: u64,
    pub email: String,
    pub content: MessageContent,
    pub transport: Option<String>,
    /// The Message-ID it will carry on every attempt.
    pub message_id: String,
    /// A double opt-in confirmation: it goes to a subscriber who is not active yet.
    pub confirmation: bool,
}

/// A new one-off message's Message-ID (without angle brackets), in the domain of the
/// newsletter's From: random, and never one of a job's (`letterbox.JOB.SUBSCRIBER...`),
/// so a reply or a bounce quoting it is not taken for a job's.
pub fn one_off_message_id(from: &str) -> String {
    let random = || {
        getrandom::u64().unwrap_or_else(|_| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ u64::from(std::process::id()).rotate_left(48)
        })
    };
    format!(
        "letterbox.message.{:016x}{:016x}@{}",
        random(),
        random(),
        crate::mail::mailbox_domain(from)
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    pub id: u64,
    pub newsletter_id: u64,
    pub subscriber_id: u64,
    /// The address it goes to (as it was when the message was asked for).
    pub email: String,
    #[serde(flatten)]
    pub content: MessageContent,
    /// The transport it is sent through; `None` is the default one.
    pub transport: Option<String>,
    pub state: MessageState,
    /// Attempts made so far (a crash re-send counts as one more).
    pub attempts: u32,
    /// When a queued message is due (milliseconds since the epoch).
    pub next_attempt_ms: u64,
    /// Why it was skipped or failed, or the last transient error of a queued one.
    pub reason: Option<String>,
    /// The SMTP server's reply to a sent message.
    pub reply: Option<String>,
    /// Its Message-ID header (without angle brackets), the same on every attempt.
    pub message_id: String,
    /// A double opt-in confirmation, sent to a subscriber who is unconfirmed (or
    /// unsubscribed and asked again); every other message goes to active ones only.
    #[serde(default)]
    pub confirmation: bool,
    /// The node sending it now and until when (milliseconds): another node takes it
    /// only once that has passed.
    pub lease_node: Option<String>,
    pub lease_until_ms: u64,
    pub created_at: u64,
    pub updated_at: u64,
}

impl Message {
    pub fn new(id: u64, new: NewMessage, now_ms: u64) -> Message {
        Message {
            id,
            newsletter_id: new.newsletter_id,
            subscriber_id: new.subscriber_id,
            email: new.email,
            content: new.content,
            transport: new.transport,
            state: MessageState::Queued,
            attempts: 0,
            next_attempt_ms: now_ms,
            reason: None,
            reply: None,
            message_id: new.message_id,
            confirmation: new.confirmation,
            lease_node: None,
            lease_until_ms: 0,
            created_at: now_ms / 1000,
            updated_at: now_ms / 1000,
        }
    }

    /// Whether it may be taken at `now_ms`: queued, due, and under no lease (not even
    /// the taker's own: a message in flight is not claimed twice).
    pub fn claimable(&self, now_ms: u64) -> bool {
        self.state == MessageState::Queued
            && self.next_attempt_ms <= now_ms
            && (self.lease_node.is_none() || self.lease_until_ms < now_ms)
    }

    /// Takes it for `node` until `until_ms`: one more attempt.
    pub fn claim(&mut self, node: &str, until_ms: u64) {
        self.lease_node = Some(node.to_string());
        self.lease_until_ms = until_ms;
        self.attempts += 1;
    }

    /// Applies an attempt's outcome; the lease ends. The event it makes, if any.
    pub fn record(&mut self, outcome: &Outcome, now_ms: u64) -> Option<&'static str> {
        self.lease_node = None;
        self.lease_until_ms = 0;
        self.updated_at = now_ms / 1000;
        match outcome {
            Outcome::Delivered { reply } => {
                self.state = MessageState::Sent;
                self.reply = Some(reply.clone());
                self.reason = None;
            }
            Outcome::Skipped { reason } => {
                self.state = MessageState::Skipped;
                self.reason = Some(reason.clone());
            }
            Outcome::Failed { reason } => {
                self.state = MessageState::Failed;
                self.reason = Some(reason.clone());
            }
            Outcome::Retry { at_ms, error } => {
                self.next_attempt_ms = *at_ms;
                self.reason = Some(error.clone());
                return None;
            }
            // Not tried: it does not count as an attempt.
            Outcome::Released => {
                self.attempts = self.attempts.saturating_sub(1);
                return None;
            }
            Outcome::Deferred { at_ms, reason } => {
                self.attempts = self.attempts.saturating_sub(1);
                self.next_attempt_ms = *at_ms;
                self.reason = Some(reason.clone());
                return None;
            }
        }
        Some(match self.state {
            MessageState::Sent => crate::events::types::MESSAGE_SENT,
            MessageState::Skipped => crate::events::types::MESSAGE_SKIPPED,
            _ => crate::events::types::MESSAGE_FAILED,
        })
    }

    /// The event of its creation or of its end (`kind`).
    pub fn event(&self, kind: &str) -> crate::events::NewEvent {
        let mut event = crate::events::NewEvent::new(kind);
        event.newsletter_id = Some(self.newsletter_id);
        event.subscriber_id = Some(self.subscriber_id);
        event.letter_id = self.content.letter_id;
        event.data.insert("message".into(), self.id.into());
        event.data.insert("email".into(), self.email.clone().into());
        if let Some(reason) = &self.reason {
            event.data.insert("reason".into(), reason.clone().into());
        }
        if let Some(reply) = &self.reply {
            event.data.insert("reply".into(), reply.clone().into());
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        let content = MessageContent {
            letter_id: Some(3),
            template: None,
            subject: None,
            text: None,
            html: None,
            data: Map::new(),
        };
        let new = NewMessage {
            newsletter_id: 1,
            subscriber_id: 2,
            email: "ann@example.org".into(),
            content,
            transport: None,
            message_id: "m@example.com".into(),
            confirmation: false,
        };
        Message::new(7, new, 10_000)
    }

    #[test]
    fn a_lease_keeps_others_out_until_it_runs_out() {
        let mut m = message();
        assert!(m.claimable(10_000));
        m.claim("a", 20_000);
        assert_eq!(m.attempts, 1);
        assert!(!m.claimable(15_000), "in flight, even for its own node");
        assert!(m.claimable(20_001));
    }

    #[test]
    fn an_outcome_ends_the_lease_and_names_its_event() {
        let mut m = message();
        m.claim("a", 20_000);
        let retry = Outcome::Retry {
            at_ms: 30_000,
            error: "451 later".into(),
        };
        assert_eq!(m.record(&retry, 11_000), None);
        assert_eq!(
            (m.state, m.next_attempt_ms, m.attempts),
            (MessageState::Queued, 30_000, 1)
        );
        assert!(!m.claimable(29_999), "not due yet");
        m.claim("b", 40_000);
        assert_eq!(m.record(&Outcome::Released, 31_000), None);
        assert_eq!(m.attempts, 1, "a release is not an attempt");
        m.claim("b", 40_000);
        let sent = Outcome::Delivered {
            reply: "250 ok".into(),
        };
        assert_eq!(m.record(&sent, 32_000), Some(crate::events::types::MESSAGE_SENT));
        assert_eq!(
            (m.state, m.attempts, m.lease_node.as_deref()),
            (MessageState::Sent, 2, None)
        );
        assert!(!m.claimable(50_000));
        assert_eq!(m.event("message.sent").data["reply"], "250 ok");
    }
}
