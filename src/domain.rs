//! The domain types every layer exchanges: newsletters, subscribers, letters, plugins,
//! jobs and per-recipient deliveries. Plain data with serde; no I/O and no knowledge of
//! redb, axum, wasmtime or lettre. The store persists these as JSON values.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Seconds since the Unix epoch, the one clock format kept in the store.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Newsletter {
    pub id: u64,
    pub name: String,
    /// The From address of every letter of this newsletter (`Name <addr>` or `addr`).
    pub from: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriberStatus {
    Active,
    Unsubscribed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subscriber {
    pub id: u64,
    pub newsletter_id: u64,
    pub email: String,
    pub name: Option<String>,
    pub attributes: Map<String, Value>,
    pub status: SubscriberStatus,
    pub created_at: u64,
}

/// A subscriber as submitted over the API, validated by the HTTP layer before it reaches
/// the store.
#[derive(Debug, Clone)]
pub struct NewSubscriber {
    pub email: String,
    pub name: Option<String>,
    pub attributes: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    pub inserted: u64,
    pub updated: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub params: Map<String, Value>,
    pub created_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    Filter,
    Template,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Filter => "filter",
            PluginKind::Template => "template",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored policy version. Its identity is the sha256 of the component bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plugin {
    pub id: String,
    pub name: String,
    pub kind: PluginKind,
    pub size: u64,
    pub created_at: u64,
}

/// One upload in a plugin name's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginVersion {
    /// 1 for the first upload under this name, then 2, 3, ...
    pub version: u64,
    pub id: String,
    pub size: u64,
    pub uploaded_at: u64,
}

/// A plugin name with its latest version, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct PluginSummary {
    pub name: String,
    pub kind: PluginKind,
    pub latest: PluginVersion,
    pub versions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, recipients not yet (all) recorded.
    Queued,
    Running,
    /// Stopped until someone resumes it; `pause_reason` says why (e.g. its policy kept
    /// failing). Not resumed automatically at start-up.
    Paused,
    Completed,
    /// Stopped for good with `error` set (e.g. its policy no longer compiles).
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }

    /// Whether a job in this state must be picked up again after a restart.
    pub fn is_unfinished(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }

    /// Whether the job is over for good (nothing will ever run it again).
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed)
    }
}

/// How many of a job's recipients are in each state. Kept in the job record and changed
/// in the same transaction as the deliveries, so it is always exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pending: u64,
    pub sending: u64,
    pub delivered: u64,
    pub skipped: u64,
    pub failed: u64,
}

impl Counts {
    pub fn slot(&mut self, state: &DeliveryState) -> &mut u64 {
        match state {
            DeliveryState::Pending => &mut self.pending,
            DeliveryState::Sending { .. } => &mut self.sending,
            DeliveryState::Delivered { .. } => &mut self.delivered,
            DeliveryState::Skipped { .. } => &mut self.skipped,
            DeliveryState::Failed { .. } => &mut self.failed,
        }
    }

    pub fn total(&self) -> u64 {
        self.pending + self.sending + self.delivered + self.skipped + self.failed
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    Failed {
        at: u64,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub job_id: u64,
    pub subscriber_id: u64,
    pub email: String,
    pub attempts: u32,
    #[serde(flatten)]
    pub state: DeliveryState,
}

/// The final outcome of one delivery attempt, as the runner records it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Delivered { reply: String },
    Skipped { reason: String },
    Failed { reason: String },
}

impl Outcome {
    pub fn into_state(self, at: u64) -> DeliveryState {
        match self {
            Outcome::Delivered { reply } => DeliveryState::Delivered { at, reply },
            Outcome::Skipped { reason } => DeliveryState::Skipped { reason },
            Outcome::Failed { reason } => DeliveryState::Failed { at, reason },
        }
    }
}
