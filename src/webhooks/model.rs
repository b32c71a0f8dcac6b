//! What an endpoint, a send and an attempt are, in the terms every backend keeps (each
//! stores these records whole), and how an attempt's result changes them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::events::EventFilter;

/// The delays before the second, third, ... attempt of a send: 5 s, 5 min, 30 min, 2 h,
/// 5 h, 10 h, 14 h, 20 h and 24 h, so ten attempts over about 3 days and 4 hours.
pub const DEFAULT_RETRY_DELAYS: [Duration; 9] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(14 * 3600),
    Duration::from_secs(20 * 3600),
    Duration::from_secs(24 * 3600),
];

/// The due time of a send held while its endpoint is disabled: after every real time,
/// and still a PostgreSQL `bigint`.
pub const HELD: u64 = i64::MAX as u64;

/// The most of an endpoint's response body an attempt keeps.
pub const RESPONSE_CAP: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookState {
    /// Sent what it subscribed to.
    Active,
    /// Sent nothing: by the user, or by letterbox after every attempt failed for the
    /// whole retry schedule. Its cursor and pending sends wait; enabling it goes on.
    Disabled,
}

/// A new endpoint, as the API checked it.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: String,
    pub events: Vec<String>,
    pub description: Option<String>,
    pub secret: String,
    /// The newest event when it was made: it is sent what comes after.
    pub cursor: u64,
}

/// A subscribed endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: u64,
    pub url: String,
    /// Event types, each exact (`job.completed`) or a prefix (`subscriber.*`).
    pub events: Vec<String>,
    pub description: Option<String>,
    /// `whsec_` and the base64 of the key; never shown after it is made.
    pub secret: String,
    pub state: WebhookState,
    pub disabled_reason: Option<String>,
    /// The last event id it has queued sends for (or passed over).
    pub cursor: u64,
    /// Since when every attempt has failed; `None` after a success.
    pub failing_since_ms: Option<u64>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A change of an endpoint (`PATCH /v1/webhooks/{id}`).
#[derive(Debug, Clone, Default)]
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub description: Option<Option<String>>,
    pub secret: Option<String>,
    pub state: Option<WebhookState>,
}

impl Webhook {
    pub fn new(id: u64, new: NewWebhook, now_ms: u64) -> Webhook {
        Webhook {
            id,
            url: new.url,
            events: new.events,
            description: new.description,
            secret: new.secret,
            state: WebhookState::Active,
            disabled_reason: None,
            cursor: new.cursor,
            failing_since_ms: None,
            created_ms: now_ms,
            updated_ms: now_ms,
        }
    }

    /// The events it wants.
    pub fn filter(&self) -> EventFilter {
        EventFilter {
            types: self.events.clone(),
            subscriber_id: None,
        }
    }

    /// Applies `patch`; the new state if it changed (the store then holds or releases
    /// the endpoint's pending sends).
    pub fn apply(&mut self, patch: WebhookPatch, now_ms: u64) -> Option<WebhookState> {
        if let Some(url) = patch.url {
            self.url = url;
        }
        if let Some(events) = patch.events {
            self.events = events;
        }
        if let Some(description) = patch.description {
            self.description = description;
        }
        if let Some(secret) = patch.secret {
            self.secret = secret;
        }
        self.updated_ms = now_ms;
        let state = patch.state.filter(|s| *s != self.state)?;
        self.state = state;
        match state {
            WebhookState::Active => {
                self.disabled_reason = None;
                self.failing_since_ms = None;
            }
            WebhookState::Disabled => self.disabled_reason = Some("disabled through the API".into()),
        }
        Some(state)
    }

    /// Takes an attempt's result for `send` (already recorded on it). True if the
    /// endpoint is disabled by it: a send that failed for good after failing throughout
    /// its schedule, with no success from the endpoint meanwhile.
    pub fn after_attempt(&mut self, send: &WebhookSend, result: &AttemptResult) -> bool {
        if result.ok {
            self.failing_since_ms = None;
            return false;
        }
        let since = *self.failing_since_ms.get_or_insert(result.at_ms);
        let throughout = send.first_attempt_ms.is_some_and(|first| since <= first);
        if send.state != SendState::Failed || !throughout || self.state != WebhookState::Active {
            return false;
        }
        self.state = WebhookState::Disabled;
        self.updated_ms = result.at_ms;
        self.disabled_reason = Some(format!(
            "every attempt has failed since {} ({} attempts of one event over {}); the last: {}",
            rfc3339(since),
            send.attempts,
            humantime::format_duration(Duration::from_secs(
                result
                    .at_ms
                    .saturating_sub(send.first_attempt_ms.unwrap_or(result.at_ms))
                    / 1000
            )),
            result.describe()
        ));
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SendState {
    /// Not delivered yet: due at `next_attempt_ms` (held while the endpoint is disabled).
    Pending,
    Delivered,
    /// Every attempt of the schedule failed.
    Failed,
}

/// One event for one endpoint: the outbox row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookSend {
    pub id: u64,
    pub webhook_id: u64,
    /// The event it carries; `None` for a test (`POST /v1/webhooks/{id}/test`).
    pub event_id: Option<u64>,
    /// The event's type (`webhook.test` for a test).
    pub kind: String,
    pub state: SendState,
    /// Attempts recorded so far.
    pub attempts: u32,
    pub next_attempt_ms: u64,
    /// The node sending it now, until `lease_until_ms`.
    pub lease_node: Option<String>,
    pub lease_until_ms: u64,
    pub created_ms: u64,
    pub first_attempt_ms: Option<u64>,
}

/// The type of a test send's event.
pub const TEST_EVENT: &str = "webhook.test";

impl WebhookSend {
    pub fn new(id: u64, webhook: &Webhook, event: Option<(u64, String)>, now_ms: u64) -> WebhookSend {
        let (event_id, kind) = match event {
            Some((id, kind)) => (Some(id), kind),
            None => (None, TEST_EVENT.to_string()),
        };
        WebhookSend {
            id,
            webhook_id: webhook.id,
            event_id,
            kind,
            state: SendState::Pending,
            attempts: 0,
            next_attempt_ms: if webhook.state == WebhookState::Active {
                now_ms
            } else {
                HELD
            },
            lease_node: None,
            lease_until_ms: 0,
            created_ms: now_ms,
            first_attempt_ms: None,
        }
    }

    /// The `webhook-id` header: the same on every attempt, and for an event the same
    /// on every endpoint, so a receiver can tell a retry from a new message.
    pub fn message_id(&self) -> String {
        match self.event_id {
            Some(event) => format!("evt_{event}"),
            None => format!("test_{}", self.id),
        }
    }

    pub fn claimable(&self, now_ms: u64) -> bool {
        self.state == SendState::Pending
            && self.next_attempt_ms <= now_ms
            && (self.lease_node.is_none() || self.lease_until_ms < now_ms)
    }

    pub fn claim(&mut self, node: &str, until_ms: u64) {
        self.lease_node = Some(node.to_string());
        self.lease_until_ms = until_ms;
    }

    /// Records an attempt: delivered, due again after the schedule's next delay, or
    /// failed for good once `delays_ms` is used up. The lease ends either way.
    pub fn record(&mut self, result: &AttemptResult, delays_ms: &[u64]) {
        self.attempts += 1;
        self.first_attempt_ms.get_or_insert(result.at_ms);
        self.lease_node = None;
        self.lease_until_ms = 0;
        if result.ok {
            self.state = SendState::Delivered;
            return;
        }
        match delays_ms.get(self.attempts as usize - 1) {
            Some(delay) => self.next_attempt_ms = result.at_ms + delay,
            None => self.state = SendState::Failed,
        }
    }

    /// Whether it waits for its endpoint to be enabled.
    pub fn held(&self) -> bool {
        self.state == SendState::Pending && self.next_attempt_ms == HELD
    }
}

/// What one attempt got.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    pub at_ms: u64,
    /// A 2xx answer.
    pub ok: bool,
    /// The HTTP status, if the endpoint answered.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// The first `RESPONSE_CAP` bytes of the answer's body.
    pub response: Option<String>,
    /// Why there was no answer, or why it was not sent (a refused address).
    pub error: Option<String>,
}

impl AttemptResult {
    fn describe(&self) -> String {
        match (&self.error, self.status) {
            (Some(error), _) => error.clone(),
            (None, Some(status)) => format!("HTTP {status}"),
            (None, None) => "no answer".into(),
        }
    }
}

/// One attempt in an endpoint's log (`GET /v1/webhooks/{id}/deliveries`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookAttempt {
    pub id: u64,
    pub webhook_id: u64,
    pub send_id: u64,
    /// The `webhook-id` header it carried.
    pub message_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// 1 for the first attempt of its send.
    pub attempt: u32,
    pub at_ms: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// The start of the endpoint's answer (at most 1 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When its send is tried again, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<u64>,
}

impl WebhookAttempt {
    pub fn new(id: u64, send: &WebhookSend, result: AttemptResult) -> WebhookAttempt {
        WebhookAttempt {
            id,
            webhook_id: send.webhook_id,
            send_id: send.id,
            message_id: send.message_id(),
            kind: send.kind.clone(),
            attempt: send.attempts,
            at_ms: result.at_ms,
            ok: result.ok,
            status: result.status,
            latency_ms: result.latency_ms,
            response: result.response,
            error: result.error,
            next_attempt_ms: (send.state == SendState::Pending && !send.held())
                .then_some(send.next_attempt_ms),
        }
    }
}

/// Unix milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> Webhook {
        let new = NewWebhook {
            url: "https://example.com/hook".into(),
            events: vec!["job.*".into()],
            description: None,
            secret: "whsec_x".into(),
            cursor: 7,
        };
        Webhook::new(1, new, 1_000)
    }

    fn failed(at_ms: u64) -> AttemptResult {
        AttemptResult {
            at_ms,
            ok: false,
            status: Some(500),
            latency_ms: 3,
            response: Some("oops".into()),
            error: None,
        }
    }

    #[test]
    fn a_send_follows_the_schedule_and_then_fails() {
        let mut hook = hook();
        let mut send = WebhookSend::new(9, &hook, Some((8, "job.completed".into())), 1_000);
        assert_eq!(
            (send.message_id(), send.next_attempt_ms),
            ("evt_8".to_string(), 1_000)
        );
        let delays = [10, 20];
        send.record(&failed(1_000), &delays);
        assert_eq!((send.state, send.next_attempt_ms), (SendState::Pending, 1_010));
        assert!(!hook.after_attempt(&send, &failed(1_000)));
        send.record(&failed(1_010), &delays);
        assert_eq!((send.state, send.next_attempt_ms), (SendState::Pending, 1_030));
        send.record(&failed(1_030), &delays);
        assert_eq!((send.state, send.attempts), (SendState::Failed, 3));
        // Failing throughout the send's whole schedule disables the endpoint.
        assert!(hook.after_attempt(&send, &failed(1_030)));
        assert_eq!(hook.state, WebhookState::Disabled);
        let reason = hook.disabled_reason.clone().unwrap();
        assert!(
            reason.contains("3 attempts") && reason.contains("HTTP 500"),
            "{reason}"
        );
        // Enabling clears the reason and the clock.
        assert_eq!(
            hook.apply(
                WebhookPatch {
                    state: Some(WebhookState::Active),
                    ..Default::default()
                },
                2_000
            ),
            Some(WebhookState::Active)
        );
        assert_eq!(
            (hook.disabled_reason.as_deref(), hook.failing_since_ms),
            (None, None)
        );
        let test = WebhookSend::new(10, &hook, None, 2_000);
        assert_eq!(
            (test.message_id(), test.kind.as_str()),
            ("test_10".to_string(), TEST_EVENT)
        );
    }

    #[test]
    fn a_success_meanwhile_keeps_the_endpoint() {
        let mut hook = hook();
        let mut send = WebhookSend::new(9, &hook, Some((8, "job.completed".into())), 1_000);
        send.record(&failed(1_000), &[]);
        assert_eq!(send.state, SendState::Failed);
        // Another send succeeded after this one's first attempt: the endpoint works.
        hook.failing_since_ms = Some(1_500);
        assert!(!hook.after_attempt(&send, &failed(1_600)));
        assert_eq!(hook.state, WebhookState::Active);
        let mut ok = failed(1_700);
        ok.ok = true;
        assert!(!hook.after_attempt(&send, &ok));
        assert_eq!(hook.failing_since_ms, None);
    }
}
