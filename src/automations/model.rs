//! What an automation is and what its turns record, in the terms every backend keeps.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::{Subscriber, SubscriberStatus};
use crate::events::NewEvent;
use crate::messages::{MessageContent, NewMessage, one_off_message_id};
use crate::policy::{Action, Reaction};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutomationState {
    Active,
    Paused,
}

/// What a user says an automation is: created with it, and changed by a new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AutomationSpec {
    pub name: String,
    /// The automation policy: a plugin name (its latest version) or `name@sha256`.
    pub policy: String,
    /// Event types it is called for: exact (`subscriber.confirmed`) or a prefix
    /// (`custom.*`).
    pub events: Vec<String>,
    /// Only events of this newsletter, when set.
    pub newsletter_id: Option<u64>,
    #[schema(value_type = Object)]
    pub config: Map<String, Value>,
}

impl AutomationSpec {
    /// Whether an event of `kind` about `newsletter` is one this automation is called for.
    pub fn listens_to(&self, kind: &str, newsletter: Option<u64>) -> bool {
        if self.newsletter_id.is_some() && newsletter != self.newsletter_id {
            return false;
        }
        self.events.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => kind.starts_with(prefix),
            None => pattern == kind,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Automation {
    pub id: u64,
    #[serde(flatten)]
    pub spec: AutomationSpec,
    pub state: AutomationState,
    /// Why it is paused, when it paused itself (too many failures in a row).
    pub pause_reason: Option<String>,
    /// 1 when created, one more with each change of its spec.
    pub version: u32,
    /// The last event of the log it has looked at: events after it are still to come.
    pub cursor: u64,
    /// Turns committed: the compare-and-set that makes each turn's effects happen once.
    pub turns: u64,
    /// Events and timers handled, and those that failed.
    pub handled: u64,
    pub failed: u64,
    pub failures_in_a_row: u32,
    pub created_at: u64,
    pub updated_at: u64,
}

impl Automation {
    /// A new automation (active, version 1) that reads the log after `cursor`.
    pub fn new(id: u64, spec: AutomationSpec, cursor: u64, at: u64) -> Automation {
        Automation {
            id,
            spec,
            state: AutomationState::Active,
            pause_reason: None,
            version: 1,
            cursor,
            turns: 0,
            handled: 0,
            failed: 0,
            failures_in_a_row: 0,
            created_at: at,
            updated_at: at,
        }
    }

    /// Pauses (with the reason) or resumes; resuming forgets the failures in a row.
    pub fn set_state(&mut self, state: AutomationState, reason: Option<String>, at: u64) {
        self.state = state;
        self.pause_reason = match state {
            AutomationState::Paused => reason,
            AutomationState::Active => None,
        };
        if state == AutomationState::Active {
            self.failures_in_a_row = 0;
        }
        self.updated_at = at;
    }

    /// Counts one event or timer handled.
    pub fn count_handled(&mut self) {
        self.handled += 1;
        self.failures_in_a_row = 0;
    }

    /// Counts one failure; `pause_after` in a row pause the automation with `reason`.
    pub fn count_failure(&mut self, reason: &str, pause_after: u32) {
        self.failed += 1;
        self.failures_in_a_row += 1;
        if self.failures_in_a_row >= pause_after && self.state == AutomationState::Active {
            self.state = AutomationState::Paused;
            self.pause_reason = Some(format!(
                "{} events or timers failed in a row; the last: {reason}",
                self.failures_in_a_row
            ));
        }
    }
}

/// What `action` changes in its subscriber (an attribute, the status); whether it is
/// such an action. Timers, sends and events are the store's to write.
pub fn change_subscriber(action: &Action, subscriber: &mut Subscriber) -> bool {
    match action {
        Action::SetAttribute { name, value } => {
            subscriber.attributes.insert(name.clone(), value.clone());
        }
        Action::RemoveAttribute { name } => {
            subscriber.attributes.remove(name);
        }
        Action::Unsubscribe => subscriber.status = SubscriberStatus::Unsubscribed,
        _ => return false,
    }
    true
}

/// The event an `emit` action records, about `subscriber` if there is one.
pub fn emitted(action: &Action, subscriber: Option<&Subscriber>) -> Option<NewEvent> {
    let Action::Emit { kind, data } = action else {
        return None;
    };
    Some(NewEvent {
        kind: kind.clone(),
        newsletter_id: subscriber.map(|s| s.newsletter_id),
        subscriber_id: subscriber.map(|s| s.id),
        job_id: None,
        letter_id: None,
        data: data.clone(),
    })
}

/// One version of an automation's spec, as it was from `created_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AutomationVersion {
    pub version: u32,
    #[serde(flatten)]
    pub spec: AutomationSpec,
    pub created_at: u64,
}

/// A durable timer of one automation for one subscriber (or for none, `subscriber_id`
/// 0). Starting one of the same name replaces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timer {
    /// Unique across timers, new with every start: tells a replaced timer from the one
    /// that replaced it.
    pub id: u64,
    pub automation_id: u64,
    pub subscriber_id: u64,
    pub name: String,
    pub due_ms: u64,
    pub data: Value,
}

/// What an automation was called for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TriggerKey {
    Event { event_id: u64 },
    Timer { timer: Timer },
}

/// One event or timer handled in a turn, and what the policy answered.
#[derive(Debug, Clone)]
pub struct Handled {
    pub trigger: TriggerKey,
    pub subscriber_id: Option<u64>,
    /// The reaction, or why there is none (a trap, an `err`, a bad reaction, a
    /// subscriber that is gone).
    pub outcome: Result<Reaction, String>,
}

/// What one turn of an automation commits, all in one transaction: the reactions'
/// effects and states, the failures, and the cursor. Nothing is applied unless the
/// automation is still at `turns` (another turn of it did not commit meanwhile).
#[derive(Debug, Clone)]
pub struct Turn {
    pub automation_id: u64,
    /// The automation's `turns` when this turn read its work.
    pub turns: u64,
    /// The automation's new cursor (its old one when the turn handled timers only).
    pub cursor: u64,
    pub handled: Vec<Handled>,
    pub now_ms: u64,
    /// Failures in a row after which the automation pauses itself.
    pub pause_after: u32,
}

/// A failed event or timer, kept to be seen and retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Failure {
    pub id: u64,
    pub automation_id: u64,
    pub trigger: TriggerKey,
    pub subscriber_id: Option<u64>,
    pub reason: String,
    pub at_ms: u64,
}

/// The name of the timer a retried event becomes: when it fires, the policy's `on-event`
/// is called for that event again. Policies cannot start or cancel `letterbox.` timers.
pub const RETRY_EVENT_PREFIX: &str = "letterbox.retry-event.";

impl Failure {
    /// The timer that retries it, due at `now_ms`: a failed timer as itself (with a new
    /// id), a failed event as a `letterbox.retry-event.{event id}` timer.
    pub fn retry_timer(&self, id: u64, now_ms: u64) -> Timer {
        match &self.trigger {
            TriggerKey::Timer { timer } => Timer {
                id,
                due_ms: now_ms,
                ..timer.clone()
            },
            TriggerKey::Event { event_id } => Timer {
                id,
                automation_id: self.automation_id,
                subscriber_id: self.subscriber_id.unwrap_or(0),
                name: format!("{RETRY_EVENT_PREFIX}{event_id}"),
                due_ms: now_ms,
                data: Value::Null,
            },
        }
    }
}

impl Timer {
    /// The event it retries, if it is a retried event's timer.
    pub fn retried_event(&self) -> Option<u64> {
        self.name.strip_prefix(RETRY_EVENT_PREFIX)?.parse().ok()
    }
}

/// What `Automations::retry_failures` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Retried {
    /// Failures turned back into work (due now).
    pub retried: u64,
    /// Failed timers left as they were: the policy has started a timer of that name for
    /// that subscriber again since, and it stands.
    pub kept: Vec<u64>,
}

/// A send a reaction asked for, recorded with it and turned into a job's delivery
/// (`Automations::dispatch_sends`) before anything is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedSend {
    pub id: u64,
    pub automation_id: u64,
    pub subscriber_id: u64,
    pub letter_id: u64,
    pub at_ms: u64,
}

/// What an automation's next turn has to work on.
#[derive(Debug, Clone)]
pub struct Work {
    pub automation: Automation,
    /// Due timers, earliest first.
    pub timers: Vec<Timer>,
}

/// The one-off message a `send-message` action asks for, to `subscriber` of a newsletter
/// that sends from `from`; `None` for any other action.
pub fn message_of(action: &Action, subscriber: &Subscriber, from: &str) -> Option<NewMessage> {
    let Action::SendMessage {
        template,
        subject,
        text,
        html,
        params,
    } = action
    else {
        return None;
    };
    Some(NewMessage {
        newsletter_id: subscriber.newsletter_id,
        subscriber_id: subscriber.id,
        email: subscriber.email.clone(),
        content: MessageContent {
            letter_id: None,
            template: Some(template.clone()),
            subject: Some(subject.clone()),
            text: Some(text.clone()),
            html: html.clone(),
            data: params.clone(),
        },
        transport: None,
        message_id: one_off_message_id(from),
        confirmation: false,
    })
}
