//! The event log's vocabulary: what an event is, which types there are, and which
//! event each change of a subscriber or a job makes. Every backend appends these in the
//! same transaction as the change they record (`store::Events`), so the log never
//! shows a change that did not happen nor misses one that did.
//!
//! This module decides *what* an event says; the store decides how it is kept and
//! numbered, and `http/events.rs` how it is read (pages, and the SSE stream). It knows
//! no database and no HTTP.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::domain::{Job, JobState, Subscriber, SubscriberStatus};

/// One entry of the log. Ids increase in commit order, with no gaps but those left by
/// pruning, so `id` is the cursor readers resume from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub id: u64,
    /// When it was recorded (unix milliseconds).
    pub at_ms: u64,
    /// `subscriber.created`, `job.completed`, `custom.purchase`, ...
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newsletter_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub letter_id: Option<u64>,
    /// What the type says about it; `{}` once the subscriber was erased.
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
}

/// An event before the store numbers and times it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: String,
    pub newsletter_id: Option<u64>,
    pub subscriber_id: Option<u64>,
    pub job_id: Option<u64>,
    pub letter_id: Option<u64>,
    pub data: Map<String, Value>,
}

impl NewEvent {
    pub fn new(kind: impl Into<String>) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            newsletter_id: None,
            subscriber_id: None,
            job_id: None,
            letter_id: None,
            data: Map::new(),
        }
    }

    pub fn into_event(self, id: u64, at_ms: u64) -> Event {
        Event {
            id,
            at_ms,
            kind: self.kind,
            newsletter_id: self.newsletter_id,
            subscriber_id: self.subscriber_id,
            job_id: self.job_id,
            letter_id: self.letter_id,
            data: self.data,
        }
    }

    fn with_data(mut self, data: Value) -> NewEvent {
        if let Value::Object(map) = data {
            self.data = map;
        }
        self
    }
}

/// The longest event type.
pub const MAX_TYPE_LEN: usize = 100;

/// Whether `name` is made of the characters an event type may hold.
pub fn well_formed(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TYPE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
}

/// Whether `kind` is a type a user may record: `custom.` and a well-formed name.
pub fn is_custom(kind: &str) -> bool {
    kind.strip_prefix(types::CUSTOM_PREFIX)
        .is_some_and(|name| well_formed(name) && well_formed(kind))
}

/// The types letterbox itself writes. Users add their own under `custom.`.
pub mod types {
    pub const SUBSCRIBER_CREATED: &str = "subscriber.created";
    pub const SUBSCRIBER_UPDATED: &str = "subscriber.updated";
    pub const SUBSCRIBER_UNSUBSCRIBED: &str = "subscriber.unsubscribed";
    pub const SUBSCRIBER_BOUNCED: &str = "subscriber.bounced";
    pub const SUBSCRIBER_COMPLAINED: &str = "subscriber.complained";
    pub const SUBSCRIBER_REINSTATED: &str = "subscriber.reinstated";
    pub const SUBSCRIBER_ERASED: &str = "subscriber.erased";
    /// Confirmed their subscription by the link the public form mailed them.
    pub const SUBSCRIBER_CONFIRMED: &str = "subscriber.confirmed";
    pub const DELIVERY_FAILED: &str = "delivery.failed";
    /// A hard or soft bounce came back (`data.kind`, `data.status`, `data.decision`).
    pub const DELIVERY_BOUNCED: &str = "delivery.bounced";
    /// The recipient reported a letter as spam.
    pub const DELIVERY_COMPLAINED: &str = "delivery.complained";
    /// The receiver refused the sender (5.7.x): the address is not blamed.
    pub const DELIVERY_BLOCKED: &str = "delivery.blocked";
    pub const JOB_CREATED: &str = "job.created";
    pub const JOB_STARTED: &str = "job.started";
    pub const JOB_PAUSED: &str = "job.paused";
    pub const JOB_RESUMED: &str = "job.resumed";
    pub const JOB_COMPLETED: &str = "job.completed";
    pub const JOB_CANCELLED: &str = "job.cancelled";
    pub const JOB_FAILED: &str = "job.failed";
    /// A one-off message was asked for (`data.message` is its id).
    pub const MESSAGE_QUEUED: &str = "message.queued";
    pub const MESSAGE_SENT: &str = "message.sent";
    pub const MESSAGE_SKIPPED: &str = "message.skipped";
    pub const MESSAGE_FAILED: &str = "message.failed";
    /// The prefix of every type a user's application posts.
    pub const CUSTOM_PREFIX: &str = "custom.";

    /// Every built-in type, for documentation and for checking a filter.
    pub const BUILT_IN: [&str; 23] = [
        SUBSCRIBER_CREATED,
        SUBSCRIBER_CONFIRMED,
        SUBSCRIBER_UPDATED,
        SUBSCRIBER_UNSUBSCRIBED,
        SUBSCRIBER_BOUNCED,
        SUBSCRIBER_COMPLAINED,
        SUBSCRIBER_REINSTATED,
        SUBSCRIBER_ERASED,
        DELIVERY_FAILED,
        DELIVERY_BOUNCED,
        DELIVERY_COMPLAINED,
        DELIVERY_BLOCKED,
        JOB_CREATED,
        JOB_STARTED,
        JOB_PAUSED,
        JOB_RESUMED,
        JOB_COMPLETED,
        JOB_CANCELLED,
        JOB_FAILED,
        MESSAGE_QUEUED,
        MESSAGE_SENT,
        MESSAGE_SKIPPED,
        MESSAGE_FAILED,
    ];
}

/// `subscriber_changed` for a double opt-in confirmation: `subscriber.confirmed`, whatever
/// the status was before (a reader who unsubscribed once and subscribed again).
pub fn subscriber_confirmed(before: &Subscriber, after: &Subscriber) -> Option<NewEvent> {
    let mut event = subscriber_changed(Some(before), after)?;
    event.kind = types::SUBSCRIBER_CONFIRMED.into();
    Some(event)
}

/// The event a change of a subscriber makes (`before` is `None` for a new one), if
/// anything an outsider can see changed. A status change is named by its new status;
/// any other change is `subscriber.updated`, naming the fields that changed.
pub fn subscriber_changed(before: Option<&Subscriber>, after: &Subscriber) -> Option<NewEvent> {
    let kind = match before {
        None => types::SUBSCRIBER_CREATED,
        Some(before) if before.status != after.status => match after.status {
            SubscriberStatus::Active if before.status == SubscriberStatus::Unconfirmed => {
                types::SUBSCRIBER_CONFIRMED
            }
            SubscriberStatus::Active => types::SUBSCRIBER_REINSTATED,
            // Only the public form makes a subscriber unconfirmed; an operator who sets
            // it changes a field like any other.
            SubscriberStatus::Unconfirmed => types::SUBSCRIBER_UPDATED,
            SubscriberStatus::Unsubscribed => types::SUBSCRIBER_UNSUBSCRIBED,
            SubscriberStatus::Bounced => types::SUBSCRIBER_BOUNCED,
            SubscriberStatus::Complained => types::SUBSCRIBER_COMPLAINED,
        },
        Some(before) if before == after => return None,
        Some(_) => types::SUBSCRIBER_UPDATED,
    };
    let mut data = json!({ "email": after.email, "status": after.status });
    if let Some(before) = before {
        if before.status != after.status {
            data["previous_status"] = json!(before.status);
        }
        let changed: Vec<&str> = [
            ("email", before.email != after.email),
            ("name", before.name != after.name),
            ("attributes", before.attributes != after.attributes),
        ]
        .into_iter()
        .filter_map(|(field, differs)| differs.then_some(field))
        .collect();
        if !changed.is_empty() {
            data["changed"] = json!(changed);
        }
    }
    let mut event = NewEvent::new(kind).with_data(data);
    event.newsletter_id = Some(after.newsletter_id);
    event.subscriber_id = Some(after.id);
    Some(event)
}

/// `subscriber.erased`: says only that the subscriber is gone; their earlier events
/// keep their type and ids but lose their data.
pub fn subscriber_erased(newsletter_id: u64, subscriber_id: u64) -> NewEvent {
    let mut event = NewEvent::new(types::SUBSCRIBER_ERASED);
    event.newsletter_id = Some(newsletter_id);
    event.subscriber_id = Some(subscriber_id);
    event
}

/// The event a change of a job's state makes (`before` is `None` for a new job), if
/// its state changed.
pub fn job_changed(before: Option<&Job>, after: &Job) -> Option<NewEvent> {
    let (kind, data) = match before {
        None => (types::JOB_CREATED, json!({ "state": after.state })),
        Some(before) if before.state == after.state => return None,
        Some(before) => match after.state {
            JobState::Running | JobState::Queued
                if matches!(before.state, JobState::Paused | JobState::Completed) =>
            {
                (types::JOB_RESUMED, json!({ "previous_state": before.state }))
            }
            JobState::Running => (types::JOB_STARTED, json!({})),
            JobState::Paused => (types::JOB_PAUSED, json!({ "reason": after.pause_reason })),
            JobState::Completed => (types::JOB_COMPLETED, json!({ "counts": after.counts })),
            JobState::Cancelled => (types::JOB_CANCELLED, json!({ "counts": after.counts })),
            JobState::Failed => (types::JOB_FAILED, json!({ "error": after.error })),
            JobState::Scheduled | JobState::Queued => return None,
        },
    };
    let mut event = NewEvent::new(kind).with_data(data);
    event.newsletter_id = Some(after.newsletter_id);
    event.job_id = Some(after.id);
    event.letter_id = Some(after.letter_id);
    Some(event)
}

/// `delivery.failed`: a recipient of a job will not get the letter (no retry left, or
/// a permanent refusal).
pub fn delivery_failed(job: &Job, subscriber_id: u64, email: &str, reason: &str, attempts: u32) -> NewEvent {
    let mut event = NewEvent::new(types::DELIVERY_FAILED).with_data(json!({
        "email": email,
        "reason": reason,
        "attempts": attempts,
    }));
    event.newsletter_id = Some(job.newsletter_id);
    event.subscriber_id = Some(subscriber_id);
    event.job_id = Some(job.id);
    event.letter_id = Some(job.letter_id);
    event
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    /// Types, each exact (`job.completed`) or a prefix ending in `.*` (`subscriber.*`);
    /// empty for every type.
    pub types: Vec<String>,
    /// Only this subscriber's events.
    pub subscriber_id: Option<u64>,
}

impl EventFilter {
    pub fn matches(&self, event: &Event) -> bool {
        self.subscriber_id
            .is_none_or(|id| event.subscriber_id == Some(id))
            && (self.types.is_empty() || self.types.iter().any(|t| type_matches(t, &event.kind)))
    }
}

fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// One read of the log.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventPage {
    /// The matching events, oldest first.
    pub events: Vec<Event>,
    /// The cursor to read on from (`after`): nothing matching at or before it was left
    /// out. It can move past events that did not match even when `events` is empty.
    pub next: u64,
    /// Whether the log holds events past `next` (which may or may not match).
    pub more: bool,
    /// The newest event's id as the read saw it.
    pub head: u64,
}

impl EventPage {
    /// The page a read after `after` makes of the events it found (at most `limit`):
    /// a full page goes on from its last event; a short one from `examined`, the last
    /// id the read looked at. `head` is the newest id in the reader's snapshot.
    pub fn new(events: Vec<Event>, limit: usize, after: u64, examined: u64, head: u64) -> EventPage {
        let next = match events.last() {
            Some(last) if events.len() >= limit => last.id,
            _ => examined.min(head).max(after),
        };
        EventPage {
            events,
            next,
            more: next < head,
            head,
        }
    }
}

/// How many ids past the cursor one read of a type-filtered log examines at most, so a
/// filter that matches rarely costs a bounded scan per page, not the whole log.
pub const SCAN_WINDOW: u64 = 10_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Counts;

    fn subscriber() -> Subscriber {
        Subscriber {
            id: 7,
            newsletter_id: 1,
            email: "ann@example.com".into(),
            name: None,
            attributes: Map::new(),
            status: SubscriberStatus::Active,
            created_at: 0,
        }
    }

    #[test]
    fn a_subscriber_change_is_named_by_what_changed() {
        let before = subscriber();
        assert_eq!(
            subscriber_changed(None, &before).unwrap().kind,
            types::SUBSCRIBER_CREATED
        );
        assert_eq!(
            subscriber_changed(Some(&before), &before),
            None,
            "nothing changed"
        );
        let mut renamed = before.clone();
        renamed.name = Some("Ann".into());
        let event = subscriber_changed(Some(&before), &renamed).unwrap();
        assert_eq!(event.kind, types::SUBSCRIBER_UPDATED);
        assert_eq!(event.data["changed"], json!(["name"]));
        let mut gone = before.clone();
        gone.status = SubscriberStatus::Unsubscribed;
        let event = subscriber_changed(Some(&before), &gone).unwrap();
        assert_eq!(event.kind, types::SUBSCRIBER_UNSUBSCRIBED);
        assert_eq!(event.data["previous_status"], json!("active"));
        assert_eq!(
            subscriber_changed(Some(&gone), &before).unwrap().kind,
            types::SUBSCRIBER_REINSTATED
        );
    }

    #[test]
    fn a_job_event_follows_its_state() {
        let job: Job = serde_json::from_value(json!({
            "id": 3, "letter_id": 2, "newsletter_id": 1, "state": "queued",
            "filter": {"name": "f", "id": "1"}, "template": {"name": "t", "id": "2"},
            "concurrency": 1, "counts": Counts::default(), "prepared": false,
            "resent_after_crash": 0, "error": null, "created_at": 0,
            "started_at": null, "finished_at": null
        }))
        .unwrap();
        let kind = |from: JobState, to: JobState| {
            let (mut a, mut b) = (job.clone(), job.clone());
            a.state = from;
            b.state = to;
            job_changed(Some(&a), &b).map(|e| e.kind)
        };
        assert_eq!(job_changed(None, &job).unwrap().kind, types::JOB_CREATED);
        assert_eq!(
            kind(JobState::Queued, JobState::Running).as_deref(),
            Some(types::JOB_STARTED)
        );
        assert_eq!(
            kind(JobState::Running, JobState::Paused).as_deref(),
            Some(types::JOB_PAUSED)
        );
        assert_eq!(
            kind(JobState::Paused, JobState::Queued).as_deref(),
            Some(types::JOB_RESUMED)
        );
        assert_eq!(
            kind(JobState::Completed, JobState::Running).as_deref(),
            Some(types::JOB_RESUMED)
        );
        assert_eq!(
            kind(JobState::Running, JobState::Completed).as_deref(),
            Some(types::JOB_COMPLETED)
        );
        assert_eq!(kind(JobState::Scheduled, JobState::Queued), None);
        assert_eq!(kind(JobState::Running, JobState::Running), None);
    }

    #[test]
    fn a_filter_takes_exact_types_and_prefixes() {
        let event = NewEvent::new("subscriber.created").into_event(1, 0);
        let filter = |types: &[&str]| EventFilter {
            types: types.iter().map(|t| t.to_string()).collect(),
            subscriber_id: None,
        };
        assert!(filter(&[]).matches(&event));
        assert!(filter(&["subscriber.*"]).matches(&event));
        assert!(filter(&["job.completed", "subscriber.created"]).matches(&event));
        assert!(!filter(&["subscriber.updated"]).matches(&event));
        assert!(!filter(&["job.*"]).matches(&event));
        let mine = EventFilter {
            subscriber_id: Some(7),
            ..EventFilter::default()
        };
        assert!(!mine.matches(&event));
    }
}
