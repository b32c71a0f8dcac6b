//! Durable state: the storage interface, and one backend per database.
//!
//! The runner, the HTTP layer and the importer see only `Store`, a cheap handle on a
//! `Backend`: operations in domain terms (claim a batch of recipients, record their
//! outcomes, list deliveries by state, ...) with domain types in and out. Each backend
//! lives in its own folder and is the only code that knows its database:
//! `store/redb` (the embedded default, one process) and `store/postgres` (a fleet of
//! nodes on one PostgreSQL). The conformance suite (`store/tests.rs`) runs the same
//! tests against every backend.
//!
//! Invariants every backend keeps:
//! - an operation that returns `Ok` is durable;
//! - an operation that returns a logical error (`NotFound`, `Conflict`) changed
//!   nothing;
//! - a delivery's state, the index by state, the retry schedule and the job's counts
//!   change together, in one transaction;
//! - recipients are moved to `sending` durably before any of their messages is sent
//!   (`claim`), and only a recipient in `sending` can have an outcome recorded;
//! - a change the event log records (`crate::events`: a subscriber's, a job's state, a
//!   failed delivery) appends its event in the same transaction, and event ids increase
//!   in commit order with no gaps (but those pruning leaves), so a reader that resumes
//!   after the last id it saw misses nothing.

mod messages;
pub mod postgres;
mod redb;
mod sessions;
mod webhooks;

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::automations::{
    Automation, AutomationSpec, AutomationState, AutomationVersion, Failure, QueuedSend, Retried, Timer, Turn,
};
use crate::bounces::{Bounce, BounceFilter, NewBounce, NewSuppression, Rules, Suppression};
use crate::domain::*;
use crate::events::{Event, EventFilter, EventPage, NewEvent};
use crate::faults::Faults;

pub use self::messages::{Messages, NewMessageOutcome};
pub use self::postgres::PgStore;
pub use self::redb::RedbStore;
pub use self::sessions::Sessions;
pub use self::webhooks::Webhooks;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    /// The database refused the operation for a reason trying again will not change.
    #[error("database error: {0}")]
    Db(String),
    /// A value the database cannot hold (PostgreSQL's text cannot hold NUL): the
    /// caller's input, refused as it is, nothing changed.
    #[error("{0}")]
    Unstorable(String),
    /// The database could not carry the operation out: it cannot be reached, its disk
    /// is full, an I/O error. Nothing was changed; trying again later may succeed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// The tables disagree with each other (an index names a missing row).
    #[error("inconsistent store: {0}")]
    Inconsistent(String),
    #[error("commit failed: {0}")]
    BatchFailed(String),
    #[error("the store is closed")]
    Closed,
    /// This node's lease expired and its claims went to other nodes: it must not record
    /// or send them (fencing).
    #[error("{0}")]
    TakenOver(String),
}

impl StoreError {
    /// Whether the store failed to carry the operation out (it could not be reached,
    /// the disk is full, an I/O error), as opposed to refusing it: trying again later
    /// may succeed, and nothing was changed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::BatchFailed(_) | StoreError::Closed
        )
    }

    pub(crate) fn not_found(kind: &'static str, id: impl ToString) -> Self {
        StoreError::NotFound {
            kind,
            id: id.to_string(),
        }
    }
}

/// The form an email takes in the upsert index: the domain is case-insensitive
/// (RFC 5321 §2.4); the local part is kept as written.
pub fn normalise_email(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => email.to_string(),
    }
}

/// A client's `Idempotency-Key` and a hash of the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    pub request_hash: String,
}

/// What `create_job` did.
#[derive(Debug)]
pub enum NewJob {
    Created(Job),
    /// The idempotency key was used before for the same request: this is its job.
    Existing(Job),
    /// The idempotency key was used before for a different request.
    KeyReused,
}

/// A change to a job, applied inside the backend's transaction.
pub type JobChange = Box<dyn FnOnce(&mut Job) + Send>;

/// A recipient as `claim` hands it out: its delivery (now `sending`) and its subscriber
/// as of the claim (`None` if the subscriber was deleted).
pub type ClaimedRecipient = (Delivery, Option<Subscriber>);

/// Newsletters, their subscribers and letters.
#[async_trait]
pub trait Lists: Send + Sync {
    async fn create_newsletter(&self, name: String, from: String) -> Result<Newsletter, StoreError>;

    async fn newsletter(&self, id: u64) -> Result<Newsletter, StoreError>;

    /// Up to `limit` newsletters with ids greater than `after`, in id order.
    async fn newsletters_after(&self, after: u64, limit: usize) -> Result<Vec<Newsletter>, StoreError>;

    /// Renames a newsletter or changes its From (what is `Some`).
    async fn update_newsletter(
        &self,
        id: u64,
        name: Option<String>,
        from: Option<String>,
    ) -> Result<Newsletter, StoreError>;

    /// Removes a newsletter and its letters. Refused (`Conflict`) while it has
    /// subscribers (erasing them is a deliberate act of its own, with its events) or a
    /// job that is not finished. Finished jobs stay, as the record of what was sent.
    async fn delete_newsletter(&self, id: u64) -> Result<(), StoreError>;

    /// Inserts new subscribers and updates existing ones (matched by `normalise_email`),
    /// all in one transaction. An update merges attributes and keeps the old name when
    /// none is given.
    async fn upsert_subscribers(
        &self,
        newsletter_id: u64,
        subscribers: Vec<NewSubscriber>,
    ) -> Result<ImportSummary, StoreError>;

    /// Said after a bulk import that added `inserted` subscribers, so a backend whose
    /// query planner keeps statistics refreshes them now rather than when its own
    /// schedule gets there: searches over a list that just grew tenfold stay fast.
    /// Never fails an import: a backend that cannot refresh says so in the log.
    async fn imported(&self, _inserted: u64) {}

    /// The public form's subscribe: a new subscriber, `unconfirmed` (with its
    /// `subscriber.created`), unless the newsletter has one with this email, which is
    /// returned untouched (a stranger's form changes nothing of a subscriber). Whether
    /// it was new.
    async fn subscribe_unconfirmed(
        &self,
        newsletter_id: u64,
        subscriber: NewSubscriber,
    ) -> Result<(Subscriber, bool), StoreError>;

    /// Up to `limit` unconfirmed subscribers created before `created_before` (unix
    /// seconds), of any newsletter: those whose confirmation link has expired.
    async fn unconfirmed_before(&self, created_before: u64, limit: usize) -> Result<Vec<u64>, StoreError>;

    /// Up to `limit` subscribers of a newsletter with ids greater than `after`, in id order.
    async fn subscribers_after(
        &self,
        newsletter_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Subscriber>, StoreError>;

    /// Up to `limit` subscribers of a newsletter with ids greater than `after` that
    /// `filter` wants, in id order, looking at no more than `scan` subscribers: a search
    /// for something rare in a big list answers in bounded time, and says where to go on
    /// (`next`: the last match when `limit` were found, else the last subscriber looked
    /// at when `scan` were, else `None`).
    async fn search_subscribers(
        &self,
        newsletter_id: u64,
        filter: SubscriberFilter,
        after: u64,
        limit: usize,
        scan: usize,
    ) -> Result<SubscriberSearch, StoreError>;

    async fn subscriber(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError>;

    /// A subscriber by id alone (ids are unique across newsletters).
    async fn subscriber_by_id(&self, id: u64) -> Result<Subscriber, StoreError>;

    /// The subscriber of a newsletter with this email (domain case-insensitive), if any.
    async fn subscriber_by_email(
        &self,
        newsletter_id: u64,
        email: String,
    ) -> Result<Option<Subscriber>, StoreError>;

    /// Every subscriber with this email (domain case-insensitive), in any newsletter,
    /// by id.
    async fn subscribers_with_email(&self, email: String) -> Result<Vec<Subscriber>, StoreError>;

    /// Marks a subscriber unsubscribed. Idempotent.
    async fn unsubscribe(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError>;

    /// Applies a change to a subscriber. A new email must not belong to another
    /// subscriber of the newsletter (`Conflict`).
    async fn update_subscriber(&self, id: u64, patch: SubscriberPatch) -> Result<Subscriber, StoreError>;

    /// Erases a subscriber: their row goes, and their email is blanked in the delivery
    /// records of every job of the newsletter (and in recorded replies and reasons that
    /// quote it), so no personal data is left.
    async fn delete_subscriber(&self, id: u64) -> Result<(), StoreError>;

    /// Stores a letter, giving it an id. The newsletter must exist.
    async fn create_letter(&self, letter: Letter) -> Result<Letter, StoreError>;

    async fn letter(&self, id: u64) -> Result<Letter, StoreError>;

    /// Up to `limit` letters of a newsletter with ids greater than `after`, in id order.
    async fn letters_after(
        &self,
        newsletter_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Letter>, StoreError>;

    /// Replaces a letter's content and policies (its id, newsletter and creation time
    /// stay). Refused (`Conflict`) while a job of it is not finished: a job reads its
    /// letter as it sends, and must not send two versions.
    async fn update_letter(&self, letter: Letter) -> Result<Letter, StoreError>;

    /// Removes a letter. Refused (`Conflict`) while a job of it is not finished;
    /// finished jobs stay, as the record of what was sent.
    async fn delete_letter(&self, id: u64) -> Result<(), StoreError>;
}

/// Send jobs and their per-recipient deliveries.
#[async_trait]
pub trait Jobs: Send + Sync {
    /// Stores a new job, giving it an id. With an idempotency key, the key is recorded
    /// in the same transaction; if it was recorded before, nothing is created and the
    /// earlier job is returned (same request) or the reuse refused (different request).
    async fn create_job(&self, job: Job, idempotency: Option<IdempotencyKey>) -> Result<NewJob, StoreError>;

    /// Forgets at most `limit` idempotency keys recorded before `created_before` (unix
    /// seconds); returns how many. A later request with such a key makes a new job.
    async fn prune_idempotency_keys(&self, created_before: u64, limit: usize) -> Result<usize, StoreError>;

    async fn job(&self, id: u64) -> Result<Job, StoreError>;

    /// Jobs a node must work on: unfinished ones, and cancelled ones whose cancellation
    /// has not finished marking recipients.
    async fn jobs_to_work(&self) -> Result<Vec<Job>, StoreError>;

    /// Jobs newest first, optionally only those in `state`, with ids below `before`.
    async fn list_jobs(
        &self,
        state: Option<JobState>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError>;

    /// How many jobs are in each state, and how many recipients the unfinished ones still
    /// have to deliver (pending, sending or waiting for a retry).
    async fn job_overview(&self) -> Result<JobOverview, StoreError>;

    /// Changes a job with `change`, if it is in one of the states `from` (any state when
    /// `None`); a `Conflict` naming the states otherwise.
    async fn change_job(
        &self,
        id: u64,
        from: Option<&'static [JobState]>,
        change: JobChange,
    ) -> Result<Job, StoreError>;

    /// Completes a running job if none of its recipients needs more work. Returns the
    /// job and whether it is now completed.
    async fn complete_if_done(&self, job_id: u64) -> Result<(Job, bool), StoreError>;

    /// Gives a queued job one of the `max_running` job slots (across every node sharing
    /// the store): it becomes `running` if fewer than `max_running` jobs are running and
    /// no job queued before it is waiting. Returns the job as it now is, and whether it
    /// holds a slot (it is `running`).
    async fn start_job(&self, job_id: u64, max_running: u32) -> Result<(Job, bool), StoreError>;

    /// Records part of a job's recipient snapshot: a pending delivery for each recipient
    /// not recorded yet (so re-running after a crash is harmless). Returns how many were new.
    async fn add_recipients(&self, job_id: u64, recipients: Vec<(u64, String)>) -> Result<u64, StoreError>;

    /// Claims up to `max` recipients of a job for `node`, durably moving them to
    /// `sending` before any of their messages is sent: first the retries due at
    /// `now_ms`, then pending ones in subscriber order. Each claim counts as an attempt.
    /// Concurrent claimers never get the same recipient.
    async fn claim(
        &self,
        node: &str,
        job_id: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<ClaimedRecipient>, StoreError>;

    /// Records the outcomes of deliveries `node` claimed (sending → delivered | skipped
    /// | retrying | failed | pending when released). All of them must be in flight, or
    /// nothing is recorded: `Conflict`, or `TakenOver` when a shared backend gave them
    /// to another node because `node`'s lease had expired (fencing).
    async fn record(&self, node: &str, job_id: u64, outcomes: Vec<(u64, Outcome)>)
    -> Result<Job, StoreError>;

    /// Puts back to pending the recipients of a job that `node` holds in `sending`,
    /// counted in `resent_after_crash` (they may have been sent). A supervisor calls
    /// this when it starts, when it has nothing in flight: any such claim was left by
    /// an earlier supervisor of this node that stopped on an error. With redb (one
    /// process) that is every recipient of the job in `sending`.
    async fn release_claims(&self, node: &str, job_id: u64) -> Result<u64, StoreError>;

    /// When the earliest retry of a job is due (unix ms), if it has any.
    async fn next_retry_at(&self, job_id: u64) -> Result<Option<u64>, StoreError>;

    /// Marks up to `max` of a job's pending or retrying recipients cancelled. Returns
    /// how many it marked; call again until that is 0.
    async fn cancel_open(&self, job_id: u64, max: usize) -> Result<u64, StoreError>;

    /// Puts up to `max` failed recipients of a job back in `pending` with a fresh attempt
    /// budget. A completed job is running again from the first call. Returns how many it
    /// requeued; call again until that is 0.
    async fn requeue_failed(&self, job_id: u64, max: usize) -> Result<u64, StoreError>;

    /// Up to `limit` deliveries of a job with subscriber ids greater than `after`, all of
    /// them or only those in state `kind`, in subscriber id order.
    async fn deliveries(
        &self,
        job_id: u64,
        kind: Option<StateKind>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError>;
}

/// Policy components: bytes by sha256, metadata, and each name's version history.
#[async_trait]
pub trait Plugins: Send + Sync {
    /// Stores a plugin and makes it the latest version of its name. Storing bytes that
    /// are already the name's latest version is idempotent. Returns the plugin and
    /// whether these bytes were new to the store. A name keeps one kind, and bytes keep
    /// the kind they were first stored as (`Conflict`).
    async fn put_plugin(&self, plugin: Plugin, bytes: bytes::Bytes) -> Result<(Plugin, bool), StoreError>;

    /// The latest version of the plugin called `name`, if any.
    async fn plugin_by_name(&self, name: String) -> Result<Option<Plugin>, StoreError>;

    /// Version `id` of the plugin called `name`, if it is one of that name's versions.
    async fn plugin_version(&self, name: String, id: String) -> Result<Option<Plugin>, StoreError>;

    /// Every plugin name with its latest version, by name.
    async fn list_plugins(&self) -> Result<Vec<PluginSummary>, StoreError>;

    /// A plugin name's kind and versions, oldest first; `None` for an unknown name.
    async fn plugin_versions(
        &self,
        name: String,
    ) -> Result<Option<(PluginKind, Vec<PluginVersion>)>, StoreError>;

    /// Deletes a plugin name and all its versions, and the bytes no other name uses.
    /// Refused (`Conflict`) while an unfinished job uses one of its versions.
    async fn delete_plugin(&self, name: String) -> Result<(), StoreError>;

    /// A plugin's component bytes.
    async fn plugin_bytes(&self, id: String) -> Result<Vec<u8>, StoreError>;
}

/// The event log (see `crate::events`). The operations that make a change append its
/// event themselves, in their transaction; this trait reads the log, appends the events
/// a user's application posts, and forgets old ones.
#[async_trait]
pub trait Events: Send + Sync {
    /// Appends events, numbering and timing them; returns them as stored. Every
    /// subscriber they name must exist (`NotFound`), so an event cannot outlive an
    /// erasure that ran at the same time.
    async fn append_events(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError>;

    /// Up to `limit` events matching `filter` with ids greater than `after`, oldest first,
    /// and the cursor to go on from. Without a subscriber, a type filter examines at most
    /// `events::SCAN_WINDOW` ids per call, so a page can be short or empty while `more`
    /// is true.
    async fn events_after(
        &self,
        filter: EventFilter,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, StoreError>;

    /// Forgets at most `limit` of the oldest events recorded before `before_ms` (unix
    /// ms); returns how many.
    async fn prune_events(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError>;

    /// The id of the newest event this process knows to be committed: it moves after
    /// every commit that appends events here, and (on a shared store) when
    /// `Backend::refresh_status_epoch` sees that other nodes appended some. Readers
    /// wait on it instead of polling; they must still read the log to know what is new.
    fn event_head(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Bounce and complaint reports, and the suppression list (see `crate::bounces`).
#[async_trait]
pub trait Bounces: Send + Sync {
    /// Records a report and applies `rules`, in one transaction: one record per
    /// subscriber it is about (the subscriber named; else the one with its email in the
    /// newsletter named; else every subscriber with its email; a complaint is about
    /// every subscriber with the address), their new statuses and their events, and
    /// for a complaint the address on the suppression list. A report about nobody is
    /// kept as one unattributed record. `NotFound` for a newsletter that does not exist.
    async fn record_bounce(&self, report: NewBounce, rules: Rules) -> Result<Vec<Bounce>, StoreError>;

    /// Up to `limit` reports matching `filter` with ids below `before`, newest first.
    async fn bounces(
        &self,
        filter: BounceFilter,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Bounce>, StoreError>;

    /// Makes a bounced or complained subscriber active again: their reports stay but no
    /// longer count towards the soft-bounce rule, and their address leaves the
    /// suppression list. Refused (`Conflict`) for an unsubscribed subscriber, whose
    /// consent only they can give back. Idempotent for an active one.
    async fn reinstate(&self, subscriber_id: u64) -> Result<(Subscriber, Option<Suppression>), StoreError>;

    /// Puts addresses on the suppression list (already listed ones stay as they are).
    /// Returns how many were new.
    async fn add_suppressions(&self, suppressions: Vec<NewSuppression>) -> Result<u64, StoreError>;

    /// Takes an address off the suppression list (`NotFound` if it is not on it).
    async fn remove_suppression(&self, email: String) -> Result<Suppression, StoreError>;

    /// Up to `limit` suppressions in the order of their normalised email, after `after`.
    async fn suppressions(&self, after: Option<String>, limit: usize)
    -> Result<Vec<Suppression>, StoreError>;

    /// The suppressions of those of `emails` that are on the list.
    async fn suppressed(&self, emails: Vec<String>) -> Result<Vec<Suppression>, StoreError>;
}

/// A node working on the store, as `nodes` lists it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// Made afresh at every start of the process (`n-` and 16 hex digits).
    pub id: String,
    /// Where the node serves HTTP.
    pub address: String,
    /// The letterbox version it runs.
    pub version: String,
    /// When it registered (unix seconds).
    pub started_at: u64,
    /// Milliseconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_ms: u64,
    /// Recipients it holds claimed (in flight) right now.
    pub claims: u64,
}

/// What a turn committed.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    pub automation: Automation,
    /// Sends it queued (for `dispatch_sends`).
    pub queued_sends: usize,
    /// One-off messages it queued (for the message worker).
    pub queued_messages: usize,
    /// Whether a reaction changed a subscriber's status (an unsubscribe): running jobs
    /// must look again.
    pub status_changed: bool,
}

/// Automations, their durable timers and per-subscriber states, their failures, and
/// the sends their reactions queue.
#[async_trait]
pub trait Automations: Send + Sync {
    /// Stores a new automation (active, version 1) whose cursor is the log's head: it is
    /// called for events recorded from now on. `Conflict` if the name is taken.
    async fn create_automation(&self, spec: AutomationSpec) -> Result<Automation, StoreError>;

    async fn automation(&self, id: u64) -> Result<Automation, StoreError>;

    /// Every automation, by id.
    async fn list_automations(&self) -> Result<Vec<Automation>, StoreError>;

    /// A new version of an automation's spec. Its cursor, timers and states stay.
    /// `Conflict` if the new name is another automation's.
    async fn update_automation(&self, id: u64, spec: AutomationSpec) -> Result<Automation, StoreError>;

    async fn automation_versions(&self, id: u64) -> Result<Vec<AutomationVersion>, StoreError>;

    /// Pauses (with a reason) or resumes an automation. Resuming forgets the failures in
    /// a row; it goes on from its cursor, so nothing recorded meanwhile is missed.
    async fn set_automation_state(
        &self,
        id: u64,
        state: AutomationState,
        reason: Option<String>,
    ) -> Result<Automation, StoreError>;

    /// Deletes an automation with its timers, states, failures and queued sends.
    async fn delete_automation(&self, id: u64) -> Result<(), StoreError>;

    /// Up to `limit` of an automation's timers due at `now_ms`, earliest first.
    async fn due_timers(
        &self,
        automation_id: u64,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Timer>, StoreError>;

    /// When an automation's earliest timer is due.
    async fn next_timer_due(&self, automation_id: u64) -> Result<Option<u64>, StoreError>;

    /// An automation's timers by subscriber and name, after `after` (a subscriber id
    /// and a name), at most `limit`.
    async fn timers(
        &self,
        automation_id: u64,
        after: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<Timer>, StoreError>;

    /// The states an automation keeps for these subscribers (0 for none), by subscriber.
    async fn automation_states(
        &self,
        automation_id: u64,
        subscribers: Vec<u64>,
    ) -> Result<Vec<(u64, serde_json::Value)>, StoreError>;

    /// Takes or renews the lease on an automation's turns for `node` until `until_ms`:
    /// whether this node may run them now (no other node holds an unexpired lease). One
    /// process holds a redb store, so there it is always yes.
    async fn lease_automation(
        &self,
        id: u64,
        node: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool, StoreError>;

    /// Commits a turn (see `Turn`): `Conflict` and nothing changed if another turn of
    /// the automation committed since this one read its work.
    async fn commit_turn(&self, turn: Turn) -> Result<TurnOutcome, StoreError>;

    /// An automation's failures, oldest first, after id `after`.
    async fn automation_failures(
        &self,
        automation_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Failure>, StoreError>;

    /// Turns failures back into work, in one transaction: each is removed and its
    /// trigger falls due now as a timer (`Failure::retry_timer`), so the next turn calls
    /// the policy for it and commits its effects once, as for any timer. A failed timer
    /// the policy has started again since is left failed (`kept`). `ids` empty: the
    /// oldest `limit`; an id that is not a failure of the automation is `NotFound`.
    async fn retry_failures(
        &self,
        automation_id: u64,
        ids: Vec<u64>,
        limit: usize,
    ) -> Result<Retried, StoreError>;

    /// Up to `limit` sends queued by reactions, oldest first.
    async fn queued_sends(&self, limit: usize) -> Result<Vec<QueuedSend>, StoreError>;

    /// Turns queued sends of one letter into one job, in one transaction: `job` is
    /// stored (prepared, with one pending delivery per send still queued) and the sends
    /// leave the queue. `None` if none of them is queued any more (another node took
    /// them). Sends to a subscriber that is gone are dropped.
    async fn dispatch_sends(&self, job: Job, sends: Vec<u64>) -> Result<Option<Job>, StoreError>;
}

/// The nodes sharing a store, their leases, and the recipients a dead one held.
///
/// A node registers when it starts, with a lease that its heartbeat renews. A node
/// whose lease ran out is dead: whichever node notices first (`rescue`) removes it and
/// puts the recipients it had claimed and not recorded back to pending, counted in
/// their job's `resent_after_crash`. A dead node's later records are refused
/// (`TakenOver`) and its heartbeat fails (`TakenOver`): it must register again, as a
/// new node, before it works again.
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Whether other processes may share this store (PostgreSQL), so jobs, controls
    /// and limits must be coordinated through it.
    fn is_shared(&self) -> bool;

    /// Registers `node` (its id, address and version; the rest is ignored) with a lease
    /// of `lease`, then rescues what dead nodes held. With redb, which one process
    /// holds, every earlier process is dead. Returns the rescue.
    async fn register_node(&self, node: &NodeInfo, lease: std::time::Duration)
    -> Result<Rescued, StoreError>;

    /// Renews `node`'s lease; `TakenOver` if it was declared dead meanwhile.
    async fn heartbeat(&self, node: &str, lease: std::time::Duration) -> Result<(), StoreError>;

    /// Removes the nodes whose lease has expired and returns their claimed recipients
    /// to pending.
    async fn rescue(&self) -> Result<Rescued, StoreError>;

    /// Removes `node` (a graceful stop, after its deliveries were recorded).
    async fn leave(&self, node: &str) -> Result<(), StoreError>;

    /// The registered nodes, by id: the live ones, and any whose lease has just
    /// expired and whose claims are about to be rescued (its heartbeat age shows it).
    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;

    /// Takes up to `want` tokens from the fleet-wide bucket `bucket`, which refills at
    /// `per_second` and holds at most `burst`. Returns how many were granted and, when
    /// none were, how long until the next one. Without other nodes (redb) there is
    /// nothing to share: every token is granted, and the node's own limiter paces.
    async fn take_tokens(
        &self,
        bucket: &str,
        per_second: f64,
        burst: f64,
        want: u32,
    ) -> Result<(u32, std::time::Duration), StoreError>;
}

/// What a rescue did: the dead nodes removed, and per job how many recipients went back
/// to pending.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rescued {
    pub nodes: Vec<String>,
    pub requeued: Vec<(u64, u64)>,
}

/// One record of an installation, as `Transfer` moves it between stores: everything
/// the store holds but the nodes, leases and rate buckets of a fleet (which belong to
/// the processes running on it, not to the installation).
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Secret {
        name: String,
        value: Vec<u8>,
    },
    Newsletter(Newsletter),
    Subscriber(Subscriber),
    Letter(Letter),
    /// A component: its metadata (the name and kind it was first stored as) and bytes.
    Plugin {
        plugin: Plugin,
        bytes: Vec<u8>,
    },
    /// One version in a plugin name's history.
    PluginVersion {
        name: String,
        version: PluginVersion,
    },
    /// A plugin name's latest version.
    PluginLatest {
        name: String,
        id: String,
    },
    Job(Job),
    Delivery(Delivery),
    IdempotencyKey {
        key: String,
        request_hash: String,
        job_id: u64,
        created_at: u64,
    },
    Event(Event),
    Bounce(Bounce),
    Suppression(Suppression),
    /// An automation, its cursor and counters included.
    Automation(Automation),
    AutomationVersion {
        automation_id: u64,
        version: AutomationVersion,
    },
    /// The state an automation keeps for a subscriber (0: none).
    AutomationState {
        automation_id: u64,
        subscriber_id: u64,
        state: serde_json::Value,
    },
    Timer(Timer),
    AutomationFailure(Failure),
    QueuedSend(QueuedSend),
    /// A one-off message, with its `Idempotency-Key` and request hash if it came with one.
    Message {
        message: crate::messages::Message,
        idempotency: Option<(String, String)>,
    },
    /// A webhook endpoint, with its secret and cursor. Its log of attempts is not moved.
    Webhook(crate::webhooks::Webhook),
    /// A webhook send, pending or finished.
    WebhookSend(crate::webhooks::WebhookSend),
}

/// How many records of each kind a store holds: what a migration must find the same on
/// both sides.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Inventory {
    pub secrets: u64,
    pub newsletters: u64,
    pub subscribers: u64,
    pub letters: u64,
    pub plugins: u64,
    pub plugin_versions: u64,
    pub plugin_names: u64,
    pub jobs: u64,
    pub deliveries: u64,
    pub idempotency_keys: u64,
    pub events: u64,
    #[serde(default)]
    pub bounces: u64,
    #[serde(default)]
    pub suppressions: u64,
    #[serde(default)]
    pub automations: u64,
    #[serde(default)]
    pub automation_versions: u64,
    #[serde(default)]
    pub automation_states: u64,
    #[serde(default)]
    pub timers: u64,
    #[serde(default)]
    pub automation_failures: u64,
    #[serde(default)]
    pub queued_sends: u64,
    #[serde(default)]
    pub messages: u64,
    #[serde(default)]
    pub webhooks: u64,
    #[serde(default)]
    pub webhook_sends: u64,
    /// The jobs' counts summed: deliveries per state, as the jobs record them.
    pub counts: Counts,
}

impl Inventory {
    pub fn is_empty(&self) -> bool {
        *self == Inventory::default()
    }

    /// Counts one record.
    pub fn add(&mut self, record: &Record) {
        match record {
            Record::Secret { .. } => self.secrets += 1,
            Record::Newsletter(_) => self.newsletters += 1,
            Record::Subscriber(_) => self.subscribers += 1,
            Record::Letter(_) => self.letters += 1,
            Record::Plugin { .. } => self.plugins += 1,
            Record::PluginVersion { .. } => self.plugin_versions += 1,
            Record::PluginLatest { .. } => self.plugin_names += 1,
            Record::Job(job) => {
                self.jobs += 1;
                let c = &mut self.counts;
                c.pending += job.counts.pending;
                c.sending += job.counts.sending;
                c.delivered += job.counts.delivered;
                c.skipped += job.counts.skipped;
                c.retrying += job.counts.retrying;
                c.failed += job.counts.failed;
                c.cancelled += job.counts.cancelled;
            }
            Record::Delivery(_) => self.deliveries += 1,
            Record::IdempotencyKey { .. } => self.idempotency_keys += 1,
            Record::Event(_) => self.events += 1,
            Record::Bounce(_) => self.bounces += 1,
            Record::Suppression(_) => self.suppressions += 1,
            Record::Automation(_) => self.automations += 1,
            Record::AutomationVersion { .. } => self.automation_versions += 1,
            Record::AutomationState { .. } => self.automation_states += 1,
            Record::Timer(_) => self.timers += 1,
            Record::AutomationFailure(_) => self.automation_failures += 1,
            Record::QueuedSend(_) => self.queued_sends += 1,
            Record::Message { .. } => self.messages += 1,
            Record::Webhook(_) => self.webhooks += 1,
            Record::WebhookSend(_) => self.webhook_sends += 1,
        }
    }
}

/// The refusal `Transfer::import` gives, before writing anything, when a delivery is
/// in flight: it was claimed by a process of the source, which only the source can
/// rescue.
pub(crate) fn refuse_in_flight(records: &[Record]) -> Result<(), StoreError> {
    let in_flight = records.iter().find_map(|r| match r {
        Record::Delivery(d) if d.state.kind() == StateKind::Sending => Some(d),
        _ => None,
    });
    match in_flight {
        Some(d) => Err(StoreError::Conflict(format!(
            "job {} recipient {} is in flight (sending): rescue the source before moving it",
            d.job_id, d.subscriber_id
        ))),
        None => Ok(()),
    }
}

/// Moving a whole installation between stores (`letterbox migrate`), ids and all.
#[async_trait]
pub trait Transfer: Send + Sync {
    /// Sends every record, in chunks, in an order `import` can take (each record after
    /// those it refers to), read from one consistent snapshot. The store should not be
    /// in use meanwhile.
    async fn export(&self, out: tokio::sync::mpsc::Sender<Vec<Record>>) -> Result<(), StoreError>;

    /// Writes records as they are, ids included, into a store that holds nothing of
    /// its own yet, and moves its id sequences past them. A delivery must not be
    /// `sending` (rescue the source first: `register_node`).
    async fn import(&self, records: Vec<Record>) -> Result<(), StoreError>;

    /// How many records of each kind the store holds.
    async fn inventory(&self) -> Result<Inventory, StoreError>;
}

/// A whole database: every operation, plus what the server needs to run on it.
#[async_trait]
pub trait Backend:
    Lists + Jobs + Plugins + Fleet + Transfer + Events + Bounces + Automations + Messages + Webhooks + Sessions
{
    /// "redb" or "postgres", for logs and metrics.
    fn name(&self) -> &'static str;

    /// Whether the database answers a trivial read.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Why writes are failing, and since when (unix seconds), if the backend has seen
    /// its last write fail where reads may still work (redb on a full disk). `None`
    /// when writes succeed or the backend cannot tell; `ping` covers a database that
    /// does not answer at all.
    fn write_failure(&self) -> Option<(String, u64)> {
        None
    }

    /// A number that changes whenever a subscriber's status changes (unsubscribe, ...),
    /// after the change is committed. A caller holding subscriber rows read after it saw
    /// epoch E knows they are still current while the epoch is E: the runner re-reads a
    /// claimed subscriber just before sending only when it moved.
    fn status_epoch(&self) -> u64;

    /// Makes `status_epoch` move for status changes other nodes made since the last
    /// call (and `Events::event_head` for the events they appended). The fleet's
    /// watcher calls it a few times a second; a backend no other process writes to has
    /// nothing to do.
    async fn refresh_status_epoch(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The secret called `name`: the stored one, or else `candidate`, stored now. Returns
    /// the secret and whether `candidate` became it. Secrets every node must agree on
    /// (the unsubscribe signing key, the API token's hash) live here.
    async fn secret(&self, name: &str, candidate: Vec<u8>) -> Result<(Vec<u8>, bool), StoreError>;
}

/// Where the state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location<'a> {
    /// An embedded redb file.
    Redb(&'a Path),
    /// A PostgreSQL database, by URL (`postgres://user:password@host:port/database`).
    Postgres(&'a str),
}

/// A cheap, cloneable handle on the backend. Every operation of `Backend` is callable
/// on it directly.
#[derive(Clone)]
pub struct Store(Arc<dyn Backend>);

impl Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Store {
    /// Opens (or creates) the database at `location`.
    pub async fn open(location: Location<'_>) -> Result<Store, StoreError> {
        Store::open_with_faults(location, Faults::default()).await
    }

    /// `open`, with faults a test may inject (see `crate::faults`).
    pub async fn open_with_faults(location: Location<'_>, faults: Faults) -> Result<Store, StoreError> {
        match location {
            Location::Redb(path) => Ok(Store::from_backend(RedbStore::open_with_faults(path, faults)?)),
            Location::Postgres(url) => Ok(Store::from_backend(PgStore::open(url).await?)),
        }
    }

    pub fn from_backend(backend: impl Backend + 'static) -> Store {
        Store(Arc::new(backend))
    }

    /// Waits, at most `limit`, until this is the last handle on the backend, then drops
    /// it, which closes the database. Returns whether it was the last.
    pub async fn released(self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while Arc::strong_count(&self.0) > 1 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Changes a job with `f` and returns the result.
    pub async fn update_job<F>(&self, id: u64, f: F) -> Result<Job, StoreError>
    where
        F: FnOnce(&mut Job) + Send + 'static,
    {
        self.change_job(id, None, Box::new(f)).await
    }

    /// Changes a job with `f` if it is in one of the states `from`; a conflict otherwise.
    pub async fn update_job_from<F>(
        &self,
        id: u64,
        from: &'static [JobState],
        f: F,
    ) -> Result<Job, StoreError>
    where
        F: FnOnce(&mut Job) + Send + 'static,
    {
        self.change_job(id, Some(from), Box::new(f)).await
    }
}

/// The refusal `change_job` gives when a job is not in one of the states `from`.
pub(crate) fn wrong_state(job: &Job, from: &[JobState]) -> StoreError {
    let expected: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    StoreError::Conflict(format!(
        "job {} is {}, but this needs it to be {}",
        job.id,
        job.state.as_str(),
        expected.join(" or ")
    ))
}

/// `Conflict` naming the job that keeps `what` (a letter, a newsletter) from changing.
pub(crate) fn busy(what: &str, job: &Job) -> StoreError {
    StoreError::Conflict(format!(
        "{what} has job {} that is {}: wait for it to finish, or cancel it, first",
        job.id,
        job.state.as_str()
    ))
}

#[cfg(test)]
mod tests;
