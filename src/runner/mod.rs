//! Send jobs: the only module that drives deliveries.
//!
//! A job is one tokio task, its supervisor (`supervisor.rs`), which claims recipients
//! in durable batches (pending or due-for-retry → sending) and runs each delivery as its
//! own task: wait for a slot for the recipient's domain, the job and the whole server,
//! then filter → template → rate limit → send, and record the outcome (delivered,
//! skipped, retrying with a backoff, or failed). A delivery that had not started sending
//! when the job stopped (pause, cancel, shutdown) goes back to pending.
//!
//! **Re-send bound.** A supervisor never has more than `concurrency + 2 × CLAIM_BATCH`
//! recipients claimed and not yet recorded, and only those can be in `sending` in the
//! store; after a crash (of this node) they are the only recipients sent again.
//!
//! Control (pause, resume, cancel, retry-failed) writes the new job state durably, then
//! tells the job's supervisor, if it has one. The map of live supervisors is locked
//! across both steps and across a supervisor's decision to exit, so a job is never left
//! running without a supervisor here, nor given two. On a shared store the other nodes
//! learn of it through their watcher (`fleet.rs`).
//!
//! On start-up the node registers (`fleet.rs`): recipients a dead node (with redb, the
//! previous process) left in `sending` go back to pending (counted in
//! `resent_after_crash`); then every unfinished job gets a supervisor and unfinished
//! cancellations finish. A panic in one delivery fails that recipient only; a policy trap or error
//! likewise, and when a job's policies fail too often (restart intensity,
//! `FailureLimit`) the job pauses until someone resumes it.

mod automations;
mod batches;
mod compile;
mod deliver;
mod fleet;
mod health;
mod housekeeping;
mod letters;
mod limits;
mod messages;
mod supervisor;

pub(crate) use health::restart_on_panic;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::domain::*;
use crate::mail::{self, Outgoing, Transports};
use crate::policy::builtin::DEFAULT_TEMPLATE_NAME;
use crate::policy::{self, LetterInput, Policy, PolicyError, PolicyHost, Rendered, Verdict};
use crate::store::{IdempotencyKey, NewJob, Store, StoreError};
use crate::tokens::UnsubscribeKey;

pub use compile::PolicyStatus;
pub use health::Stall;
pub use letters::{Preview, PreviewTarget};
use limits::{DomainLimiter, RateMeter};
pub use limits::{DomainLimits, DomainPause, FailureLimit};

pub const MAX_CONCURRENCY: u32 = 1000;
/// Recipients claimed per store transaction (see the re-send bound above).
pub const CLAIM_BATCH: usize = 128;
/// Recipients moved per transaction when cancelling or retrying the failed.
const BULK_BATCH: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The request cannot be carried out as asked (names what is wrong).
    #[error("{0}")]
    Invalid(String),
    /// Fields of the request that are wrong: (field, why).
    #[error("{}", .0.iter().map(|(field, message)| format!("{field}: {message}")).collect::<Vec<_>>().join("; "))]
    InvalidFields(Vec<(String, String)>),
    /// The request conflicts with the job's state or a request in progress.
    #[error("{0}")]
    Conflict(String),
    #[error("the runner is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub default_concurrency: u32,
    /// Deliveries in flight across all jobs.
    pub max_deliveries: u32,
    /// Jobs sending at once; the others wait in `queued`.
    pub max_running_jobs: u32,
    pub domain_limits: DomainLimits,
    pub retry: RetryPolicy,
    /// Restart intensity for policy failures.
    pub policy_failures: FailureLimit,
    /// Base URL under which `/u/{token}` is reachable, for unsubscribe links; also the
    /// address this node shows in the list of nodes.
    pub public_url: String,
    /// How long a node's claims stay its own without a heartbeat (a shared store).
    pub lease: Duration,
    /// How long a send's idempotency key is kept (see `housekeeping`).
    pub idempotency_ttl: Duration,
    /// How long a confirmation link lasts; unconfirmed subscribers are erased after it.
    pub confirm_within: Duration,
    /// How often housekeeping runs.
    pub housekeeping_every: Duration,
    /// How long the event log keeps an event.
    pub event_retention: Duration,
    /// What bounces and complaints do, and when refusals pause a domain.
    pub bounces: crate::bounces::BounceSettings,
    /// The domain of VERP return paths, if messages get them.
    pub bounce_domain: Option<String>,
    /// Panics a test injects (see `crate::faults`).
    pub faults: crate::faults::Faults,
}

/// Per-job choices of a send request; `None` means the server's default.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    pub concurrency: Option<u32>,
    pub transport: Option<String>,
    pub retry: RetryOverride,
    /// Start at this time (unix seconds) instead of now.
    pub send_at: Option<u64>,
    pub idempotency: Option<IdempotencyKey>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    /// Attempts in all, the first included.
    #[schema(minimum = 1, maximum = 100)]
    #[serde(default, deserialize_with = "crate::domain::whole_number")]
    pub max_attempts: Option<u32>,
    /// The first retry's delay (doubling, with jitter).
    #[schema(minimum = 1, maximum = 604_800_000)]
    #[serde(default, deserialize_with = "crate::domain::whole_number")]
    pub base_ms: Option<u64>,
    /// The longest delay; one below `base_ms` counts as `base_ms`.
    #[schema(minimum = 0, maximum = 604_800_000)]
    #[serde(default, deserialize_with = "crate::domain::whole_number")]
    pub cap_ms: Option<u64>,
}

/// A policy version and its compiled form.
type Resolved = (PolicyVersion, Arc<Policy>);

/// What a job's supervisor is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Cancel,
}

impl Control {
    /// What a supervisor for a job to work on (`Store::jobs_to_work`) is told: finish a
    /// cancellation, or run.
    fn for_job(job: &Job) -> Control {
        if job.state == JobState::Cancelled {
            Control::Cancel
        } else {
            Control::Run
        }
    }
}

/// A job with a live supervisor.
struct ActiveJob {
    control: watch::Sender<Control>,
    meter: Arc<std::sync::Mutex<RateMeter>>,
}

/// Live figures of a running job, not kept in the store.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Progress {
    /// Recipients finished per second, recently.
    pub rate_per_second: f64,
    /// Seconds until the open recipients are done at that rate.
    pub eta_seconds: Option<u64>,
}

/// Handle on the job runner. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    policies: PolicyHost,
    transports: Transports,
    config: RunnerConfig,
    unsubscribe: UnsubscribeKey,
    /// Signs each message's return path (with `config.bounce_domain`).
    verp: crate::tokens::VerpKey,
    /// Tells job supervisors to stop claiming and drain.
    shutdown: CancellationToken,
    /// Tells them to stop waiting for in-flight deliveries (the drain timed out).
    abandon: CancellationToken,
    /// Every job supervisor, so shutdown can wait for all of them.
    tracker: TaskTracker,
    /// Jobs with a live supervisor. Locked across a control's store write and its
    /// message to the supervisor, and across a supervisor's decision to exit.
    active: tokio::sync::Mutex<HashMap<u64, ActiveJob>>,
    /// Idempotency keys whose job is being created right now.
    creating: std::sync::Mutex<HashSet<String>>,
    /// Woken when a local job ends, so queued jobs ask for its slot at once.
    slot_freed: tokio::sync::Notify,
    /// This node's identity and lease.
    node: fleet::Node,
    /// Stops the heartbeat and the watcher, after the drain.
    fleet_stop: CancellationToken,
    /// The heartbeat, the watcher and housekeeping: `leave` waits for them to end
    /// before it deregisters, so none renews or re-registers the node afterwards.
    fleet_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Fleet-wide rate tokens taken and not yet spent.
    rate_pools: fleet::RatePools,
    delivery_slots: Arc<Semaphore>,
    domains: DomainLimiter,
    /// Recipient domains whose receivers refuse the sender, and those paused for it.
    blocks: limits::DomainBlocks,
    /// Jobs stalled on a failing store here (see `health`).
    stalls: health::Stalls,
    /// Policy compilations on this node (see `compile`).
    compiles: compile::Compiles,
    /// Woken when a one-off message is queued here, so the message worker sends it at
    /// once (other nodes' are found by polling).
    message_queued: tokio::sync::Notify,
}

/// Removes an idempotency key from `creating` however `submit` ends.
struct CreatingGuard<'a> {
    set: &'a std::sync::Mutex<HashSet<String>>,
    key: String,
}

impl Drop for CreatingGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

impl Runner {
    pub fn new(
        store: Store,
        policies: PolicyHost,
        transports: Transports,
        config: RunnerConfig,
        unsubscribe: UnsubscribeKey,
        verp: crate::tokens::VerpKey,
    ) -> Runner {
        Runner {
            inner: Arc::new(Inner {
                node: fleet::Node::new(config.lease, store.is_shared(), config.public_url.clone()),
                fleet_stop: CancellationToken::new(),
                fleet_tasks: Default::default(),
                rate_pools: Default::default(),
                slot_freed: tokio::sync::Notify::new(),
                store,
                policies,
                transports,
                delivery_slots: Arc::new(Semaphore::new(config.max_deliveries.max(1) as usize)),
                domains: DomainLimiter::new(config.domain_limits.clone()),
                blocks: limits::DomainBlocks::new(config.bounces.blocks),
                config,
                unsubscribe,
                verp,
                shutdown: CancellationToken::new(),
                abandon: CancellationToken::new(),
                tracker: TaskTracker::new(),
                active: Default::default(),
                creating: Default::default(),
                stalls: Default::default(),
                compiles: Default::default(),
                message_queued: tokio::sync::Notify::new(),
            }),
        }
    }

    pub fn policy_limits(&self) -> &crate::policy::PolicyLimits {
        self.inner.policies.limits()
    }

    pub fn unsubscribe_key(&self) -> &UnsubscribeKey {
        &self.inner.unsubscribe
    }

    /// The base URL links in messages point to (`--public-url`), without a trailing `/`.
    pub fn public_url(&self) -> &str {
        self.inner.config.public_url.trim_end_matches('/')
    }

    /// How long a double opt-in confirmation link lasts, and with it an unconfirmed
    /// subscriber (`--confirm-within`).
    pub fn confirm_within(&self) -> Duration {
        self.inner.config.confirm_within
    }

    fn check_running(&self) -> Result<(), RunnerError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(RunnerError::ShuttingDown);
        }
        Ok(())
    }

    /// Registers this node, which puts what dead nodes (or, with redb, the previous
    /// process) had in flight back to pending, and starts a supervisor for every job
    /// to work on (see the module docs). Returns how many jobs got a supervisor.
    pub async fn recover(&self) -> Result<usize, RunnerError> {
        self.join().await?;
        let store = &self.inner.store;
        let mut started = 0;
        for job in store.jobs_to_work().await? {
            let mut active = self.inner.active.lock().await;
            if !active.contains_key(&job.id) {
                self.spawn(&mut active, job.id, Control::for_job(&job));
                started += 1;
            }
        }
        Ok(started)
    }

    /// Creates a send job for a letter and starts it (or schedules it).
    pub async fn submit(&self, letter_id: u64, options: SendOptions) -> Result<(Job, bool), RunnerError> {
        self.check_running()?;
        let _guard = match &options.idempotency {
            Some(key) => {
                let mut creating = self.inner.creating.lock().unwrap_or_else(|e| e.into_inner());
                if !creating.insert(key.key.clone()) {
                    return Err(RunnerError::Conflict(
                        "a request with this Idempotency-Key is still being processed".into(),
                    ));
                }
                Some(CreatingGuard {
                    set: &self.inner.creating,
                    key: key.key.clone(),
                })
            }
            None => None,
        };
        let config = &self.inner.config;
        let concurrency = options.concurrency.unwrap_or(config.default_concurrency);
        if concurrency == 0 || concurrency > MAX_CONCURRENCY {
            return Err(RunnerError::Invalid(format!(
                "concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}"
            )));
        }
        let base_ms = options.retry.base_ms.unwrap_or(config.retry.base_ms);
        let retry = RetryPolicy {
            max_attempts: options.retry.max_attempts.unwrap_or(config.retry.max_attempts),
            base_ms,
            // A cap below the first delay would make every delay the cap; read it as
            // "no longer than the first delay" instead of refusing the send.
            cap_ms: options.retry.cap_ms.unwrap_or(config.retry.cap_ms).max(base_ms),
        };
        retry.validate().map_err(RunnerError::Invalid)?;
        self.inner
            .transports
            .get(options.transport.as_deref())
            .map_err(|e| RunnerError::Invalid(e.to_string()))?;
        let store = &self.inner.store;
        let letter = store.letter(letter_id).await?;
        let ((filter, _), (template, _)) = self.resolve_letter(&letter).await?;
        let scheduled = options.send_at.filter(|at| *at > now());
        let created = store
            .create_job(
                Job {
                    id: 0,
                    letter_id,
                    newsletter_id: letter.newsletter_id,
                    state: if scheduled.is_some() {
                        JobState::Scheduled
                    } else {
                        JobState::Queued
                    },
                    filter,
                    template,
                    concurrency,
                    retry,
                    transport: options.transport,
                    send_at: scheduled,
                    counts: Counts::default(),
                    prepared: false,
                    resent_after_crash: 0,
                    error: None,
                    pause_reason: None,
                    message_id_nonce: Some(message_id_nonce()),
                    created_at: now(),
                    started_at: None,
                    finished_at: None,
                },
                options.idempotency,
            )
            .await?;
        match created {
            NewJob::Created(job) => {
                let mut active = self.inner.active.lock().await;
                self.spawn(&mut active, job.id, Control::Run);
                Ok((job, true))
            }
            NewJob::Existing(job) => Ok((job, false)),
            NewJob::KeyReused => Err(RunnerError::Invalid(
                "this Idempotency-Key was used before with a different request".into(),
            )),
        }
    }

    /// Pauses a job: it stops claiming at once; deliveries already sending finish and
    /// are recorded, the others go back to pending. Resuming never re-sends a
    /// delivered recipient.
    pub async fn pause(&self, job_id: u64) -> Result<Job, RunnerError> {
        let active = self.inner.active.lock().await;
        let job = self
            .inner
            .store
            .update_job_from(
                job_id,
                &[JobState::Scheduled, JobState::Queued, JobState::Running],
                |job| {
                    job.state = JobState::Paused;
                    job.pause_reason = Some("paused on request".into());
                },
            )
            .await?;
        if let Some(entry) = active.get(&job_id) {
            let _ = entry.control.send(Control::Pause);
        }
        drop(active);
        tracing::info!(job = job_id, "job paused on request");
        Ok(job)
    }

    /// Resumes a paused job. Its policies are resolved again from the letter (a name
    /// means its latest version, so uploading a fixed version and resuming works; a
    /// pinned version stays pinned).
    pub async fn resume(&self, job_id: u64) -> Result<Job, RunnerError> {
        self.check_running()?;
        let store = &self.inner.store;
        let job = store.job(job_id).await?;
        let letter = store.letter(job.letter_id).await?;
        let ((filter, _), (template, _)) = self.resolve_letter(&letter).await?;
        let mut active = self.inner.active.lock().await;
        let job = store
            .update_job_from(job_id, &[JobState::Paused], move |job| {
                // It asks for a job slot again (`Store::start_job`).
                job.state = if job.send_at.is_some_and(|at| at > now()) {
                    JobState::Scheduled
                } else {
                    JobState::Queued
                };
                job.pause_reason = None;
                job.filter = filter;
                job.template = template;
            })
            .await?;
        match active.get(&job_id) {
            // Still draining from the pause: tell it to carry on.
            Some(entry) => {
                let _ = entry.control.send(Control::Run);
            }
            None => self.spawn(&mut active, job_id, Control::Run),
        }
        tracing::info!(job = job_id, "job resumed");
        Ok(job)
    }

    /// Cancels a job: nothing more is sent; deliveries already sending finish, every
    /// recipient still pending or waiting to retry is marked cancelled.
    pub async fn cancel(&self, job_id: u64) -> Result<Job, RunnerError> {
        let mut active = self.inner.active.lock().await;
        let job = self
            .inner
            .store
            .update_job_from(
                job_id,
                &[
                    JobState::Scheduled,
                    JobState::Queued,
                    JobState::Running,
                    JobState::Paused,
                ],
                |job| {
                    job.state = JobState::Cancelled;
                    job.pause_reason = None;
                },
            )
            .await?;
        match active.get(&job_id) {
            Some(entry) => {
                let _ = entry.control.send(Control::Cancel);
            }
            // A paused job has no supervisor: start one to mark the recipients.
            None => self.spawn(&mut active, job_id, Control::Cancel),
        }
        tracing::info!(job = job_id, "job cancelled on request");
        Ok(job)
    }

    /// Puts the failed recipients of a job back in the queue with a fresh attempt
    /// budget, and runs the job again if it had completed. Returns the job and how many
    /// recipients were requeued.
    pub async fn retry_failed(&self, job_id: u64) -> Result<(Job, u64), RunnerError> {
        self.check_running()?;
        let store = &self.inner.store;
        let mut active = self.inner.active.lock().await;
        let job = store.job(job_id).await?;
        if !matches!(
            job.state,
            JobState::Running | JobState::Paused | JobState::Completed
        ) {
            return Err(RunnerError::Conflict(format!(
                "job {job_id} is {}; only a running, paused or completed job can retry its failed recipients",
                job.state.as_str()
            )));
        }
        let mut requeued = 0;
        loop {
            let n = store.requeue_failed(job_id, BULK_BATCH).await?;
            requeued += n;
            if n == 0 {
                break;
            }
        }
        let job = store.job(job_id).await?;
        if job.state == JobState::Running {
            match active.get(&job_id) {
                // Wake it: its queue was dry.
                Some(entry) => {
                    let _ = entry.control.send(Control::Run);
                }
                None => self.spawn(&mut active, job_id, Control::Run),
            }
        }
        tracing::info!(job = job_id, requeued, "failed recipients requeued");
        Ok((job, requeued))
    }

    /// Live rate and ETA of a job with a supervisor.
    pub async fn progress(&self, job: &Job) -> Option<Progress> {
        let meter = {
            let active = self.inner.active.lock().await;
            active.get(&job.id)?.meter.clone()
        };
        let rate = meter.lock().unwrap_or_else(|e| e.into_inner()).per_second();
        let open = job.counts.open();
        let eta_seconds = if open == 0 {
            Some(0)
        } else if rate > 0.0 {
            Some((open as f64 / rate).ceil() as u64)
        } else {
            None
        };
        Some(Progress {
            rate_per_second: (rate * 10.0).round() / 10.0,
            eta_seconds,
        })
    }

    /// Starts a supervisor for `job_id`. The caller holds the `active` lock.
    fn spawn(&self, active: &mut HashMap<u64, ActiveJob>, job_id: u64, control: Control) {
        let (tx, rx) = watch::channel(control);
        let meter = Arc::new(std::sync::Mutex::new(RateMeter::new()));
        active.insert(
            job_id,
            ActiveJob {
                control: tx,
                meter: meter.clone(),
            },
        );
        let runner = self.clone();
        let span = tracing::info_span!("job", id = job_id);
        self.inner.tracker.spawn(
            async move {
                runner.supervise(job_id, rx, meter).await;
            }
            .instrument(span),
        );
    }

    /// The names of the configured transports.
    pub fn transport_names(&self) -> Vec<String> {
        self.inner
            .transports
            .iter()
            .map(|t| t.name().to_string())
            .collect()
    }

    fn unsubscribe_url(&self, newsletter_id: u64, subscriber_id: u64) -> String {
        let token = self.inner.unsubscribe.token(newsletter_id, subscriber_id);
        format!("{}/u/{token}", self.inner.config.public_url.trim_end_matches('/'))
    }

    /// Why a job is stalled on a failing store on this node, if it is.
    pub fn stalled(&self, job_id: u64) -> Option<Stall> {
        self.inner.stalls.get(job_id)
    }

    /// The VERP return path of a job's message to a subscriber, if messages get one.
    fn return_path(&self, job_id: u64, subscriber_id: u64) -> Option<String> {
        let domain = self.inner.config.bounce_domain.as_deref()?;
        Some(self.inner.verp.address(job_id, subscriber_id, domain))
    }

    /// What bounce and complaint reports do (the `[bounces]` settings).
    pub fn bounce_rules(&self) -> crate::bounces::Rules {
        self.inner.config.bounces.rules
    }

    /// The recipient domains this node holds back because their receivers refuse
    /// the sender (see `bounces::BlockLimit`).
    pub fn paused_domains(&self) -> Vec<DomainPause> {
        self.inner.blocks.all()
    }

    /// Every job stalled on a failing store on this node, by id.
    pub fn stalls(&self) -> Vec<(u64, Stall)> {
        self.inner.stalls.all()
    }

    /// Why this node's heartbeat fails, while it does (a shared store that cannot be
    /// written: down, unreachable, read-only, out of disk).
    pub fn heartbeat_error(&self) -> Option<String> {
        self.inner.node.heartbeat_error()
    }

    /// Whether shutdown has begun (jobs are draining; nothing new starts).
    pub fn is_stopping(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Stops claiming in every job and waits until in-flight deliveries are recorded, or
    /// `drain` has passed; what is still in flight then stays `sending` and is sent again
    /// at the next start.
    pub async fn shutdown(&self, drain: Duration) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(drain, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?drain,
                "deliveries still in flight after the drain timeout; they will be sent again at the next start"
            );
            self.inner.abandon.cancel();
            self.inner.tracker.wait().await;
        }
        self.leave().await;
    }
}

/// 64 random bits in hex: with the job's id, no two installations (or a restored
/// backup and its original) give two messages the same Message-ID.
/// Should the OS have no randomness to give, the clock's nanoseconds serve.
fn message_id_nonce() -> String {
    let random = getrandom::u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ u64::from(std::process::id()).rotate_left(48)
    });
    format!("{random:016x}")
}

/// The Message-ID (without angle brackets) of a job's message to one subscriber: the
/// same for every attempt and every copy, so a re-send is recognisable as a duplicate.
fn message_id(job_id: u64, nonce: Option<&str>, subscriber_id: u64, domain: &str) -> String {
    match nonce {
        Some(nonce) => format!("letterbox.{job_id}.{subscriber_id}.{nonce}@{domain}"),
        None => format!("letterbox.{job_id}.{subscriber_id}@{domain}"),
    }
}

/// The job, subscriber and nonce a `message_id` names (angle brackets allowed), if it
/// is one of ours; the caller checks the nonce against the job's.
pub fn parse_message_id(text: &str) -> Option<(u64, u64, Option<String>)> {
    let text = text.trim().trim_start_matches('<').trim_end_matches('>');
    let (local, _domain) = text.rsplit_once('@')?;
    let mut parts = local.strip_prefix("letterbox.")?.split('.');
    let job = parts.next()?.parse().ok()?;
    let subscriber = parts.next()?.parse().ok()?;
    let nonce = parts.next().map(str::to_string);
    if parts.next().is_some() || nonce.as_deref().is_some_and(|n| n.is_empty()) {
        return None;
    }
    Some((job, subscriber, nonce))
}

fn outgoing(
    newsletter: &Newsletter,
    subscriber: Subscriber,
    rendered: Rendered,
    message_id: String,
    unsubscribe_url: String,
) -> Outgoing {
    Outgoing {
        from: newsletter.from.clone(),
        to: subscriber.email,
        to_name: subscriber.name,
        subject: rendered.subject,
        text: rendered.text,
        html: rendered.html,
        headers: rendered.headers,
        message_id,
        unsubscribe_url: Some(unsubscribe_url),
        return_path: None,
    }
}
