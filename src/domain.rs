//! The domain types every layer exchanges: newsletters, subscribers, letters, plugins,
//! jobs and per-recipient deliveries. Plain data with serde; no I/O and no knowledge of
//! redb, axum, wasmtime or lettre. The store persists these as JSON values. The
//! `ToSchema` derives only describe that JSON for the API's OpenAPI document.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Seconds since the Unix epoch: the clock format of every timestamp shown to users.
pub fn now() -> u64 {
    now_ms() / 1000
}

/// Milliseconds since the Unix epoch: retry times, which need finer steps than seconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Newsletter {
    pub id: u64,
    pub name: String,
    /// The From address of every letter of this newsletter (`Name <addr>` or `addr`).
    pub from: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriberStatus {
    Active,
    /// Asked not to receive letters (the unsubscribe link or the API).
    Unsubscribed,
    /// The address does not accept mail (set by the operator or a bounce processor).
    Bounced,
    /// The recipient reported a letter as spam.
    Complained,
    /// Asked to subscribe through the public form and has not confirmed by the link
    /// mailed to them yet: sent nothing but that message, and erased once the link
    /// expires.
    Unconfirmed,
}

impl SubscriberStatus {
    pub const ALL: [SubscriberStatus; 5] = [
        SubscriberStatus::Active,
        SubscriberStatus::Unsubscribed,
        SubscriberStatus::Bounced,
        SubscriberStatus::Complained,
        SubscriberStatus::Unconfirmed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberStatus::Active => "active",
            SubscriberStatus::Unsubscribed => "unsubscribed",
            SubscriberStatus::Bounced => "bounced",
            SubscriberStatus::Complained => "complained",
            SubscriberStatus::Unconfirmed => "unconfirmed",
        }
    }

    /// The status `as_str` names.
    pub fn parse(text: &str) -> Option<SubscriberStatus> {
        SubscriberStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A change to one subscriber; absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct SubscriberPatch {
    /// Already validated.
    pub email: Option<String>,
    /// `Some(None)` clears the name.
    pub name: Option<Option<String>>,
    /// Merged into the attributes as a JSON merge patch (RFC 7396): a `null` removes
    /// the key.
    pub attributes: Option<Map<String, Value>>,
    pub status: Option<SubscriberStatus>,
    /// The change is a double opt-in confirmation: its event is `subscriber.confirmed`.
    pub confirming: bool,
}

impl SubscriberPatch {
    /// The change applied to `subscriber` (the store checks the email first).
    pub fn apply(self, subscriber: &mut Subscriber) {
        if let Some(email) = self.email {
            subscriber.email = email;
        }
        if let Some(name) = self.name {
            subscriber.name = name;
        }
        for (key, value) in self.attributes.unwrap_or_default() {
            if value.is_null() {
                subscriber.attributes.remove(&key);
            } else {
                subscriber.attributes.insert(key, value);
            }
        }
        if let Some(status) = self.status {
            subscriber.status = status;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subscriber {
    pub id: u64,
    pub newsletter_id: u64,
    pub email: String,
    pub name: Option<String>,
    #[schema(value_type = Object)]
    pub attributes: Map<String, Value>,
    pub status: SubscriberStatus,
    pub created_at: u64,
}

/// Which subscribers a search wants: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriberFilter {
    /// Part of the email or the name, any case (kept lower-cased).
    pub text: Option<String>,
    pub status: Option<SubscriberStatus>,
    /// An attribute and its value: a string attribute as it is, any other as its JSON.
    pub attribute: Option<(String, String)>,
}

impl SubscriberFilter {
    pub fn is_empty(&self) -> bool {
        self.text.is_none() && self.status.is_none() && self.attribute.is_none()
    }

    /// Whether `s` is one the filter wants. (The PostgreSQL backend says the same in SQL;
    /// the conformance suite holds the two to the same answers.)
    pub fn matches(&self, s: &Subscriber) -> bool {
        if self.status.is_some_and(|status| status != s.status) {
            return false;
        }
        if let Some(text) = &self.text {
            let name = s.name.as_deref().unwrap_or("");
            if !s.email.to_lowercase().contains(text.as_str()) && !name.to_lowercase().contains(text.as_str())
            {
                return false;
            }
        }
        if let Some((key, value)) = &self.attribute {
            let found = match s.attributes.get(key) {
                Some(Value::String(v)) => v == value,
                Some(other) => &other.to_string() == value,
                None => false,
            };
            if !found {
                return false;
            }
        }
        true
    }
}

/// One look through a newsletter's subscribers (`Lists::search_subscribers`).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberSearch {
    pub items: Vec<Subscriber>,
    /// Where the next look starts (the id it stopped after); `None` once it reached the
    /// last subscriber.
    pub next: Option<u64>,
}

/// A subscriber as submitted over the API, validated by the HTTP layer before it reaches
/// the store.
#[derive(Debug, Clone)]
pub struct NewSubscriber {
    pub email: String,
    pub name: Option<String>,
    pub attributes: Map<String, Value>,
}

/// Jobs per state and the recipients still to deliver (see `Store::job_overview`).
#[derive(Debug, Clone, Default)]
pub struct JobOverview {
    pub by_state: std::collections::HashMap<JobState, u64>,
    pub open_recipients: u64,
}

/// What an import did: rows added, rows that updated a subscriber with the same email,
/// rows refused (with the first `errors`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ImportSummary {
    pub inserted: u64,
    pub updated: u64,
    pub rejected: u64,
    /// Imported rows whose name held a line break or another control character, each
    /// folded to a space (a name is one header line).
    pub names_folded: u64,
    pub errors: Vec<RowError>,
}

/// Why one row of an import was refused. `row` counts data rows from 1 (a CSV header is
/// not a data row); `line` is where the row starts in a CSV file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RowError {
    pub row: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Letter {
    pub id: u64,
    pub newsletter_id: u64,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    /// Name of the filter policy, resolved to a version when a job starts.
    pub filter: String,
    /// Name of the template policy, resolved to a version when a job starts.
    pub template: String,
    #[schema(value_type = Object)]
    pub params: Map<String, Value>,
    pub created_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    Filter,
    Template,
    /// Reacts to events and timers (WIT 0.3's `automation` world).
    Automation,
}

impl PluginKind {
    pub const ALL: [PluginKind; 3] = [PluginKind::Filter, PluginKind::Template, PluginKind::Automation];

    /// The kind `as_str` names.
    pub fn parse(text: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Filter => "filter",
            PluginKind::Template => "template",
            PluginKind::Automation => "automation",
        }
    }
}

impl PluginKind {
    /// "a filter", "a template", "an automation".
    pub fn with_article(self) -> &'static str {
        match self {
            PluginKind::Filter => "a filter",
            PluginKind::Template => "a template",
            PluginKind::Automation => "an automation",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored policy version. Its identity is the sha256 of the component bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Plugin {
    pub id: String,
    pub name: String,
    pub kind: PluginKind,
    pub size: u64,
    pub created_at: u64,
}

/// One upload in a plugin name's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginVersion {
    /// 1 for the first upload under this name, then 2, 3, ...
    pub version: u64,
    pub id: String,
    pub size: u64,
    pub uploaded_at: u64,
}

/// A plugin name with its latest version, for listings.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PluginSummary {
    pub name: String,
    pub kind: PluginKind,
    pub latest: PluginVersion,
    pub versions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waits for its `send_at` time; nothing is claimed before.
    Scheduled,
    /// Accepted; waiting for a free job slot or for its recipient snapshot.
    Queued,
    Running,
    /// Stopped until someone resumes it; `pause_reason` says why (requested, or its
    /// policy kept failing). Not resumed automatically at start-up.
    Paused,
    Completed,
    /// Stopped on request: recipients not yet sent were marked cancelled.
    Cancelled,
    /// Stopped for good with `error` set (e.g. its policy no longer compiles).
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Queued,
        JobState::Running,
        JobState::Paused,
        JobState::Completed,
        JobState::Cancelled,
        JobState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether a job in this state must be picked up again after a restart.
    pub fn is_unfinished(self) -> bool {
        matches!(self, JobState::Scheduled | JobState::Queued | JobState::Running)
    }

    /// Whether the job is over for good (only `retry-failed` can run it again).
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Cancelled | JobState::Failed)
    }
}

/// How many of a job's recipients are in each state. Kept in the job record and changed
/// in the same transaction as the deliveries, so it is always exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counts {
    pub pending: u64,
    pub sending: u64,
    pub delivered: u64,
    pub skipped: u64,
    #[serde(default)]
    pub retrying: u64,
    pub failed: u64,
    #[serde(default)]
    pub cancelled: u64,
}

impl Counts {
    pub fn slot(&mut self, state: &DeliveryState) -> &mut u64 {
        match state {
            DeliveryState::Pending => &mut self.pending,
            DeliveryState::Sending { .. } => &mut self.sending,
            DeliveryState::Delivered { .. } => &mut self.delivered,
            DeliveryState::Skipped { .. } => &mut self.skipped,
            DeliveryState::Retrying { .. } => &mut self.retrying,
            DeliveryState::Failed { .. } => &mut self.failed,
            DeliveryState::Cancelled { .. } => &mut self.cancelled,
        }
    }

    pub fn total(&self) -> u64 {
        self.pending
            + self.sending
            + self.delivered
            + self.skipped
            + self.retrying
            + self.failed
            + self.cancelled
    }

    /// Recipients that still need work: pending, in flight or waiting to retry.
    pub fn open(&self) -> u64 {
        self.pending + self.sending + self.retrying
    }

    /// Recipients whose delivery is over.
    pub fn done(&self) -> u64 {
        self.total() - self.open()
    }
}

/// How a job retries transient failures (SMTP 4xx, network trouble, timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; 1 means never retry.
    pub max_attempts: u32,
    /// Delay before the first retry; it doubles for each later one (with jitter).
    pub base_ms: u64,
    /// Longest delay between two attempts.
    pub cap_ms: u64,
}

impl Default for RetryPolicy {
    /// Five attempts spread over about half an hour: 1, 2, 4 and 8 minutes apart (each
    /// between half and all of that, for jitter). Long enough to outlast a greylisting
    /// or a provider's short outage.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_ms: 60_000,
            cap_ms: 3_600_000,
        }
    }
}

impl RetryPolicy {
    pub const MAX_ATTEMPTS: u32 = 100;

    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 || self.max_attempts > Self::MAX_ATTEMPTS {
            return Err(format!(
                "retry.max_attempts must be between 1 and {}, got {}",
                Self::MAX_ATTEMPTS,
                self.max_attempts
            ));
        }
        if self.base_ms == 0 || self.cap_ms < self.base_ms {
            return Err(format!(
                "retry needs 0 < base_ms <= cap_ms, got base_ms {} and cap_ms {}",
                self.base_ms, self.cap_ms
            ));
        }
        if self.cap_ms > 7 * 24 * 3_600_000 {
            return Err("retry.cap_ms must be at most one week".into());
        }
        Ok(())
    }

    /// The delay before attempt `attempts + 1`, given `attempts` made so far (≥ 1):
    /// `min(cap, base × 2^(attempts-1))`, of which a random part in [0, ½) is dropped
    /// ("equal jitter"), so recipients that failed together do not retry together.
    /// `unit` is a random number in [0, 1).
    pub fn delay_ms(&self, attempts: u32, unit: f64) -> u64 {
        let exp = attempts.saturating_sub(1).min(40);
        let full = self.base_ms.saturating_mul(1u64 << exp).min(self.cap_ms);
        let half = full / 2;
        full - (half as f64 * unit.clamp(0.0, 1.0)) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: u64,
    pub letter_id: u64,
    pub newsletter_id: u64,
    pub state: JobState,
    /// Filter and template versions (sha256) fixed when the job was created, so a job
    /// never changes policy under its feet.
    pub filter: PolicyVersion,
    pub template: PolicyVersion,
    pub concurrency: u32,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Name of the transport the job sends through; `None` is the default one.
    #[serde(default)]
    pub transport: Option<String>,
    /// When a scheduled job starts (unix seconds).
    #[serde(default)]
    pub send_at: Option<u64>,
    pub counts: Counts,
    /// Whether every recipient has been recorded as a delivery (the job's snapshot of the
    /// list is complete).
    pub prepared: bool,
    /// Recipients that were in flight when the process died and were sent again after
    /// a restart (some of them may have received the letter twice).
    pub resent_after_crash: u64,
    pub error: Option<String>,
    /// Why the job is paused, while it is.
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// Random, made once when the job is created and kept with it: the part of every
    /// Message-ID (`<letterbox.JOB.SUBSCRIBER.NONCE@domain>`) that makes it unique
    /// across installations, whose job and subscriber ids start again at 1. Kept so a
    /// message sent again after a crash has the first copy's ID. Jobs created before
    /// it existed have none and keep their old IDs (`<letterbox.JOB.SUBSCRIBER@domain>`).
    #[serde(default)]
    pub message_id_nonce: Option<String>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyVersion {
    pub name: String,
    pub id: String,
}

/// One recipient's progress through one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    /// Claimed by a running job; the message may be on the wire.
    Sending {
        since: u64,
    },
    Delivered {
        at: u64,
        reply: String,
    },
    Skipped {
        reason: String,
    },
    /// A transient failure; the next attempt is due at `next_attempt_at_ms`.
    Retrying {
        next_attempt_at_ms: u64,
        last_error: String,
    },
    Failed {
        at: u64,
        reason: String,
    },
    /// The job was cancelled before this recipient was sent.
    Cancelled {
        at: u64,
    },
}

/// The state of a delivery without its details, e.g. to filter a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    Pending,
    Sending,
    Delivered,
    Skipped,
    Retrying,
    Failed,
    Cancelled,
}

impl StateKind {
    pub const ALL: [StateKind; 7] = [
        StateKind::Pending,
        StateKind::Sending,
        StateKind::Delivered,
        StateKind::Skipped,
        StateKind::Retrying,
        StateKind::Failed,
        StateKind::Cancelled,
    ];

    /// A stable number for the store's state index.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Pending => "pending",
            StateKind::Sending => "sending",
            StateKind::Delivered => "delivered",
            StateKind::Skipped => "skipped",
            StateKind::Retrying => "retrying",
            StateKind::Failed => "failed",
            StateKind::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<StateKind> {
        StateKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl DeliveryState {
    pub fn kind(&self) -> StateKind {
        match self {
            DeliveryState::Pending => StateKind::Pending,
            DeliveryState::Sending { .. } => StateKind::Sending,
            DeliveryState::Delivered { .. } => StateKind::Delivered,
            DeliveryState::Skipped { .. } => StateKind::Skipped,
            DeliveryState::Retrying { .. } => StateKind::Retrying,
            DeliveryState::Failed { .. } => StateKind::Failed,
            DeliveryState::Cancelled { .. } => StateKind::Cancelled,
        }
    }
}

/// Documented in the API as `http::jobs::DeliveryRow`, a shape client generators model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub job_id: u64,
    pub subscriber_id: u64,
    pub email: String,
    /// Attempts made so far (a crash re-send counts as one more).
    pub attempts: u32,
    #[serde(flatten)]
    pub state: DeliveryState,
}

/// The outcome of one delivery attempt, as the runner records it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Delivered {
        reply: String,
    },
    Skipped {
        reason: String,
    },
    /// Try again at `at_ms`.
    Retry {
        at_ms: u64,
        error: String,
    },
    Failed {
        reason: String,
    },
    /// Claimed, but the job stopped before the message was sent: back to pending, and
    /// the claim does not count as an attempt.
    Released,
    /// Not tried: its recipient domain is paused (the receiver refuses the sender). Tried
    /// again at `at_ms`, and the claim does not count as an attempt.
    Deferred {
        at_ms: u64,
        reason: String,
    },
}

impl Outcome {
    /// The state this outcome leaves. Its texts quote remote servers and policies,
    /// which may send anything: they are made storable (see `storable`).
    pub fn into_state(self, at: u64) -> DeliveryState {
        match self {
            Outcome::Delivered { reply } => DeliveryState::Delivered {
                at,
                reply: storable(reply),
            },
            Outcome::Skipped { reason } => DeliveryState::Skipped {
                reason: storable(reason),
            },
            Outcome::Retry { at_ms, error } => DeliveryState::Retrying {
                next_attempt_at_ms: at_ms,
                last_error: storable(error),
            },
            Outcome::Failed { reason } => DeliveryState::Failed {
                at,
                reason: storable(reason),
            },
            Outcome::Released => DeliveryState::Pending,
            Outcome::Deferred { at_ms, reason } => DeliveryState::Retrying {
                next_attempt_at_ms: at_ms,
                last_error: storable(reason),
            },
        }
    }

    /// Whether the claim that led to this outcome counts as an attempt (a message was
    /// tried, or decided on).
    pub fn is_attempt(&self) -> bool {
        !matches!(self, Outcome::Released | Outcome::Deferred { .. })
    }
}

/// Text from outside (a remote server's reply, a report as received) as every backend
/// can keep it: a NUL character, which mail may not carry (RFC 5322) but junk does and
/// PostgreSQL's text and JSONB cannot hold, shown as U+FFFD.
pub fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    }
}

/// Where in `value` a string or key holds a NUL (which `storable` text may not, and
/// PostgreSQL cannot keep): `email`, `[3].name`, `data.note` below `path`.
pub fn nul_at(value: &serde_json::Value, path: String) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(text) => text.contains('\0').then_some(path),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_at(item, format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            if key.contains('\0') {
                Some(here)
            } else {
                nul_at(item, here)
            }
        }),
        _ => None,
    }
}

/// A JSON number as a whole number ≥ 0, written `5` or `5.0`: JSON Schema counts both
/// as integers, so generated clients may send either.
pub fn whole(number: &serde_json::Number) -> Option<u64> {
    number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    })
}

/// Deserializes an optional [`whole`] number.
pub fn whole_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(value) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole =
        whole(&value).ok_or_else(|| D::Error::custom(format!("expected a whole number ≥ 0, got {value}")))?;
    T::try_from(whole)
        .map(Some)
        .map_err(|_| D::Error::custom(format!("{whole} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_equal_jitter() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_ms: 1000,
            cap_ms: 5000,
        };
        assert_eq!(policy.delay_ms(1, 0.0), 1000);
        assert_eq!(policy.delay_ms(2, 0.0), 2000);
        assert_eq!(policy.delay_ms(3, 0.0), 4000);
        assert_eq!(policy.delay_ms(4, 0.0), 5000, "capped");
        assert_eq!(policy.delay_ms(60, 0.0), 5000, "no overflow");
        assert_eq!(policy.delay_ms(2, 0.999_999), 1001, "jitter drops at most half");
        assert!(policy.validate().is_ok());
        assert!(
            RetryPolicy {
                max_attempts: 0,
                ..policy
            }
            .validate()
            .is_err()
        );
        assert!(RetryPolicy { cap_ms: 10, ..policy }.validate().is_err());
    }

    #[test]
    fn state_codes_round_trip() {
        for kind in StateKind::ALL {
            assert_eq!(StateKind::parse(kind.as_str()), Some(kind));
            assert_eq!(StateKind::ALL[kind.code() as usize], kind);
        }
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
        }
    }
}
