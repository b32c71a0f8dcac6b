//! Send jobs: the only module that drives deliveries.
//!
//! A job is one tokio task (its supervisor) that keeps at most `concurrency` deliveries
//! in flight. It *claims* recipients (pending → sending, durable) only as slots free up,
//! runs each delivery as its own task (filter → template → send), and each delivery
//! records its outcome (sending → delivered | skipped | failed, durable) before its slot
//! is reused. Hence, at any moment, at most `concurrency` recipients of a job are in
//! `sending`, and those are the only ones that can receive a second copy after a crash.
//!
//! On start-up every unfinished job is resumed: its in-flight recipients go back to
//! pending (counted in `resent_after_crash`) and the job carries on. A panic in one
//! delivery fails that recipient only; a policy trap or error likewise, and when a job's
//! policies fail too often (restart intensity, `FailureLimit`) the job pauses until
//! someone resumes it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::domain::*;
use crate::mail::{self, Mailer, Outgoing};
use crate::policy::{Evaluator, LetterInput, Policy, PolicyError, PolicyHost, Rendered, Verdict};
use crate::store::{Store, StoreError};
use crate::tokens::UnsubscribeKey;

/// Subscribers read from the store per page when a job snapshots its list.
const SNAPSHOT_PAGE: usize = 1000;
pub const MAX_CONCURRENCY: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The request cannot be carried out as asked (names what is wrong).
    #[error("{0}")]
    Invalid(String),
    #[error("the runner is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub default_concurrency: u32,
    /// Restart intensity, as OTP supervisors have it: more than `max` policy failures
    /// within `window` pause the job instead of failing the rest of the list.
    pub policy_failures: FailureLimit,
    /// Base URL under which `/u/{token}` is reachable, for unsubscribe links.
    pub public_url: String,
}

#[derive(Debug, Clone, Copy)]
pub struct FailureLimit {
    pub max: u32,
    pub window: std::time::Duration,
}

impl Default for FailureLimit {
    fn default() -> Self {
        FailureLimit {
            max: 20,
            window: std::time::Duration::from_secs(10),
        }
    }
}

/// Failure times within the sliding window.
struct FailureWindow {
    limit: FailureLimit,
    times: std::collections::VecDeque<std::time::Instant>,
}

impl FailureWindow {
    fn new(limit: FailureLimit) -> Self {
        FailureWindow {
            limit,
            times: Default::default(),
        }
    }

    /// Notes one failure; true when the limit is exceeded.
    fn record(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.times.push_back(now);
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.limit.window)
        {
            self.times.pop_front();
        }
        self.times.len() > self.limit.max as usize
    }
}

#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    pub concurrency: Option<u32>,
}

/// Handle on the job runner. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    policies: PolicyHost,
    mailer: Mailer,
    config: RunnerConfig,
    unsubscribe: UnsubscribeKey,
    /// Tells job supervisors to stop claiming and drain.
    shutdown: CancellationToken,
    /// Every job supervisor, so shutdown can wait for all of them.
    tracker: TaskTracker,
}

/// What a job needs for every delivery, resolved once when it starts.
struct JobContext {
    job_id: u64,
    newsletter: Newsletter,
    evaluator: Arc<Evaluator>,
    message_domain: String,
}

enum JobEnd {
    Completed,
    /// Too many policy failures: the job waits for a resume.
    Paused(String),
    /// Shutdown interrupted the job; it resumes at the next start.
    Interrupted,
}

impl Runner {
    pub fn new(
        store: Store,
        policies: PolicyHost,
        mailer: Mailer,
        config: RunnerConfig,
        unsubscribe: UnsubscribeKey,
    ) -> Runner {
        Runner {
            inner: Arc::new(Inner {
                store,
                policies,
                mailer,
                config,
                unsubscribe,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    pub fn policy_limits(&self) -> &crate::policy::PolicyLimits {
        self.inner.policies.limits()
    }

    pub fn unsubscribe_key(&self) -> &UnsubscribeKey {
        &self.inner.unsubscribe
    }

    /// Resumes every job left queued or running by the previous process.
    pub async fn resume_unfinished(&self) -> Result<usize, RunnerError> {
        let jobs = self.inner.store.unfinished_jobs().await?;
        for job in &jobs {
            let requeued = self.inner.store.requeue_inflight(job.id).await?;
            tracing::info!(job = job.id, requeued, "resuming job");
            self.spawn(job.id);
        }
        Ok(jobs.len())
    }

    /// Creates a send job for a letter and starts it.
    pub async fn submit(&self, letter_id: u64, options: SendOptions) -> Result<Job, RunnerError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(RunnerError::ShuttingDown);
        }
        let concurrency = options
            .concurrency
            .unwrap_or(self.inner.config.default_concurrency);
        if concurrency == 0 || concurrency > MAX_CONCURRENCY {
            return Err(RunnerError::Invalid(format!(
                "concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}"
            )));
        }
        let store = &self.inner.store;
        let letter = store.letter(letter_id).await?;
        // Compiled now, so a broken policy is refused before a job exists.
        let (filter, _) = self.resolve_loaded(&letter.filter, PluginKind::Filter).await?;
        let (template, _) = self
            .resolve_loaded(&letter.template, PluginKind::Template)
            .await?;
        let job = store
            .create_job(Job {
                id: 0,
                letter_id,
                newsletter_id: letter.newsletter_id,
                state: JobState::Queued,
                filter,
                template,
                concurrency,
                counts: Counts::default(),
                prepared: false,
                resent_after_crash: 0,
                error: None,
                pause_reason: None,
                created_at: now(),
                started_at: None,
                finished_at: None,
            })
            .await?;
        self.spawn(job.id);
        Ok(job)
    }

    /// Compiles (or finds compiled) the policy version a job uses. Compilation runs on
    /// the blocking pool.
    pub async fn load_policy(
        &self,
        version: &PolicyVersion,
        kind: PluginKind,
    ) -> Result<Arc<Policy>, RunnerError> {
        if let Some(policy) = self.inner.policies.cached(&version.id) {
            return Ok(policy);
        }
        let bytes = self.inner.store.plugin_bytes(version.id.clone()).await?;
        let host = self.inner.policies.clone();
        let version = version.clone();
        let policy =
            tokio::task::spawn_blocking(move || host.prepare(&version.id, &version.name, kind, &bytes))
                .await
                .map_err(|e| RunnerError::Invalid(format!("policy compilation task failed: {e}")))??;
        Ok(policy)
    }

    /// Checks a component compiles and implements `kind`'s world, then stores it as the
    /// latest version of `name`. Returns the plugin and whether these bytes were new.
    pub async fn install_plugin(
        &self,
        name: String,
        kind: PluginKind,
        bytes: Vec<u8>,
    ) -> Result<(Plugin, bool), RunnerError> {
        use sha2::Digest;
        let id = hex::encode(sha2::Sha256::digest(&bytes));
        let host = self.inner.policies.clone();
        let (check_id, check_name) = (id.clone(), name.clone());
        let bytes = tokio::task::spawn_blocking(move || {
            host.prepare(&check_id, &check_name, kind, &bytes).map(|_| bytes)
        })
        .await
        .map_err(|e| RunnerError::Invalid(format!("policy compilation task failed: {e}")))??;
        let plugin = Plugin {
            id,
            name,
            kind,
            size: bytes.len() as u64,
            created_at: now(),
        };
        Ok(self.inner.store.put_plugin(plugin, bytes).await?)
    }

    /// The policy version a letter's reference names: `NAME` is the latest version of
    /// NAME (at the moment this is called), `NAME@ID` pins version ID of NAME. It must be
    /// of `kind`.
    pub async fn resolve(&self, reference: &str, kind: PluginKind) -> Result<PolicyVersion, RunnerError> {
        let store = &self.inner.store;
        let plugin = match reference.split_once('@') {
            Some((name, id)) => store
                .plugin_version(name.to_string(), id.to_string())
                .await?
                .ok_or_else(|| {
                    RunnerError::Invalid(format!("the {kind} policy {name:?} has no version {id:?}"))
                })?,
            None => store
                .plugin_by_name(reference.to_string())
                .await?
                .ok_or_else(|| {
                    RunnerError::Invalid(format!(
                        "the {kind} policy {reference:?} is not an uploaded plugin"
                    ))
                })?,
        };
        if plugin.kind != kind {
            return Err(RunnerError::Invalid(format!(
                "{reference:?} is a {} policy, not a {kind} policy",
                plugin.kind
            )));
        }
        Ok(PolicyVersion {
            name: plugin.name,
            id: plugin.id,
        })
    }

    /// `resolve`, then compile (or find compiled) the version it names.
    async fn resolve_loaded(
        &self,
        reference: &str,
        kind: PluginKind,
    ) -> Result<(PolicyVersion, Arc<Policy>), RunnerError> {
        let version = self.resolve(reference, kind).await?;
        let policy = self.load_policy(&version, kind).await?;
        Ok((version, policy))
    }

    fn spawn(&self, job_id: u64) {
        let runner = self.clone();
        let span = tracing::info_span!("job", id = job_id);
        self.inner.tracker.spawn(
            async move {
                match runner.drive(job_id).await {
                    Ok(JobEnd::Completed) => {
                        let result = runner
                            .inner
                            .store
                            .update_job(job_id, |job| {
                                job.state = JobState::Completed;
                                job.finished_at = Some(now());
                            })
                            .await;
                        match result {
                            Ok(job) => tracing::info!(counts = ?job.counts, "job completed"),
                            Err(e) => tracing::error!(error = %e, "cannot record job completion"),
                        }
                    }
                    Ok(JobEnd::Paused(reason)) => {
                        tracing::warn!(reason, "job paused");
                        let result = runner
                            .inner
                            .store
                            .update_job(job_id, move |job| {
                                job.state = JobState::Paused;
                                job.pause_reason = Some(reason);
                            })
                            .await;
                        if let Err(e) = result {
                            tracing::error!(error = %e, "cannot record job pause");
                        }
                    }
                    Ok(JobEnd::Interrupted) => {
                        tracing::info!("job interrupted by shutdown; it resumes at next start")
                    }
                    Err(e) => runner.fail_job(job_id, e).await,
                }
            }
            .instrument(span),
        );
    }

    async fn fail_job(&self, job_id: u64, error: RunnerError) {
        tracing::error!(error = %error, "job stopped");
        let message = error.to_string();
        // A store failure leaves recipients pending: keep the job resumable (a restart
        // picks it up) and only note the error. Anything else ends the job.
        let resumable = matches!(error, RunnerError::Store(_));
        let result = self
            .inner
            .store
            .update_job(job_id, move |job| {
                job.error = Some(message);
                if !resumable {
                    job.state = JobState::Failed;
                    job.finished_at = Some(now());
                }
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record job failure");
        }
    }

    /// The job supervisor: snapshot the list if not done yet, then keep up to
    /// `concurrency` deliveries in flight until the queue is empty.
    async fn drive(&self, job_id: u64) -> Result<JobEnd, RunnerError> {
        let inner = &self.inner;
        let store = &inner.store;
        let job = store.job(job_id).await?;
        let letter = store.letter(job.letter_id).await?;
        let newsletter = store.newsletter(job.newsletter_id).await?;
        let evaluator = inner.policies.evaluator(
            self.load_policy(&job.filter, PluginKind::Filter).await?,
            self.load_policy(&job.template, PluginKind::Template).await?,
            LetterInput::new(&letter, &newsletter),
        )?;
        let ctx = Arc::new(JobContext {
            job_id,
            evaluator: Arc::new(evaluator),
            message_domain: mail::mailbox_domain(&newsletter.from),
            newsletter,
        });

        if !job.prepared {
            let mut after = 0;
            loop {
                if inner.shutdown.is_cancelled() {
                    return Ok(JobEnd::Interrupted);
                }
                let page = store
                    .subscribers_after(job.newsletter_id, after, SNAPSHOT_PAGE)
                    .await?;
                let Some(last) = page.last() else { break };
                after = last.id;
                let recipients = page
                    .into_iter()
                    .filter(|s| s.status == SubscriberStatus::Active)
                    .map(|s| (s.id, s.email))
                    .collect();
                store.add_recipients(job_id, recipients).await?;
            }
            let job = store
                .update_job(job_id, |job| {
                    job.prepared = true;
                    job.state = JobState::Running;
                    job.started_at = Some(now());
                })
                .await?;
            tracing::info!(recipients = job.counts.total(), "job started");
        }

        let concurrency = job.concurrency as usize;
        let mut running = JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, u64> = HashMap::new();
        // Only this task adds to the queue after the snapshot, so once a claim comes
        // back short the queue is empty for good.
        let mut queue_empty = false;
        let mut failures = FailureWindow::new(inner.config.policy_failures);
        let mut pausing: Option<String> = None;
        loop {
            let stopping = inner.shutdown.is_cancelled();
            if !stopping && pausing.is_none() && !queue_empty && running.len() < concurrency {
                let free = concurrency - running.len();
                let claimed = store.claim(job_id, free).await?;
                queue_empty = claimed.len() < free;
                for delivery in claimed {
                    let subscriber_id = delivery.subscriber_id;
                    let runner = self.clone();
                    let ctx = ctx.clone();
                    let span = tracing::info_span!("delivery", subscriber = subscriber_id);
                    let handle =
                        running.spawn(async move { runner.deliver(&ctx, delivery).await }.instrument(span));
                    in_flight.insert(handle.id(), subscriber_id);
                }
            }
            if running.is_empty() {
                return Ok(match pausing {
                    Some(reason) => JobEnd::Paused(reason),
                    None if stopping => JobEnd::Interrupted,
                    None => JobEnd::Completed,
                });
            }
            let joined = tokio::select! {
                joined = running.join_next_with_id() => joined,
                // Wake up to stop claiming; in-flight deliveries still finish.
                _ = inner.shutdown.cancelled(), if !stopping => continue,
            };
            match joined {
                Some(Ok((id, result))) => {
                    in_flight.remove(&id);
                    if let Some(policy_failure) = result?
                        && failures.record()
                        && pausing.is_none()
                    {
                        // Stop claiming; what is in flight finishes, then the job pauses.
                        pausing = Some(policy_failure);
                    }
                }
                Some(Err(join_error)) => {
                    let Some(subscriber_id) = in_flight.remove(&join_error.id()) else {
                        continue;
                    };
                    tracing::error!(subscriber = subscriber_id, error = %join_error, "delivery task panicked");
                    let reason = "internal error: the delivery task panicked".to_string();
                    store
                        .record(job_id, subscriber_id, Outcome::Failed { reason })
                        .await?;
                }
                None => {}
            }
        }
    }

    /// One recipient: filter → template → send → record. Expected failures become the
    /// recipient's `failed` state; only a store failure is returned. When a policy
    /// failed, returns the reason the job would pause with.
    async fn deliver(&self, ctx: &Arc<JobContext>, delivery: Delivery) -> Result<Option<String>, StoreError> {
        let (outcome, policy_failure) = self.attempt(ctx, &delivery).await;
        match &outcome {
            Outcome::Delivered { .. } => tracing::debug!("delivered"),
            Outcome::Skipped { reason } => tracing::debug!(reason, "skipped"),
            Outcome::Failed { reason } => tracing::warn!(reason, "delivery failed"),
        }
        self.inner
            .store
            .record(ctx.job_id, delivery.subscriber_id, outcome)
            .await?;
        Ok(policy_failure)
    }

    async fn attempt(&self, ctx: &Arc<JobContext>, delivery: &Delivery) -> (Outcome, Option<String>) {
        match self.try_attempt(ctx, delivery).await {
            Ok(outcome) => (outcome, None),
            Err(e) => {
                let policy_failure = e
                    .failed_policy()
                    .map(|policy| format!("policy {policy} failing: {e}"));
                (
                    Outcome::Failed {
                        reason: e.to_string(),
                    },
                    policy_failure,
                )
            }
        }
    }

    /// The attempt proper; policy failures come back as errors so they can be counted.
    async fn try_attempt(&self, ctx: &Arc<JobContext>, delivery: &Delivery) -> Result<Outcome, PolicyError> {
        let inner = &self.inner;
        let subscriber = match inner
            .store
            .subscriber(ctx.newsletter.id, delivery.subscriber_id)
            .await
        {
            Ok(s) => s,
            Err(StoreError::NotFound { .. }) => {
                let reason = "subscriber was deleted".into();
                return Ok(Outcome::Skipped { reason });
            }
            Err(e) => {
                return Ok(Outcome::Failed {
                    reason: e.to_string(),
                });
            }
        };
        // Re-checked at send time: an unsubscribe wins over a snapshot taken earlier.
        if subscriber.status != SubscriberStatus::Active {
            let reason = "subscriber is no longer active".into();
            return Ok(Outcome::Skipped { reason });
        }
        let unsubscribe_url = self.unsubscribe_url(ctx.newsletter.id, subscriber.id);
        let (subscriber, verdict) = ctx
            .evaluator
            .evaluate_async(subscriber, unsubscribe_url.clone())
            .await?;
        let rendered = match verdict {
            Verdict::Send(rendered) => rendered,
            Verdict::Skip(reason) => return Ok(Outcome::Skipped { reason }),
        };

        let message_id = format!(
            "letterbox.{}.{}@{}",
            ctx.job_id, delivery.subscriber_id, ctx.message_domain
        );
        let outgoing = outgoing(&ctx.newsletter, subscriber, rendered, message_id, unsubscribe_url);
        Ok(match inner.mailer.send(&outgoing).await {
            Ok(reply) => Outcome::Delivered { reply },
            Err(e) => Outcome::Failed {
                reason: e.to_string(),
            },
        })
    }

    /// Resumes a paused job. Its policies are resolved again from the letter (a name
    /// means its latest version, so uploading a fixed version and resuming works; a
    /// pinned version stays pinned).
    pub async fn resume(&self, job_id: u64) -> Result<Job, RunnerError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(RunnerError::ShuttingDown);
        }
        let store = &self.inner.store;
        let job = store.job(job_id).await?;
        let letter = store.letter(job.letter_id).await?;
        let (filter, _) = self.resolve_loaded(&letter.filter, PluginKind::Filter).await?;
        let (template, _) = self
            .resolve_loaded(&letter.template, PluginKind::Template)
            .await?;
        let job = store
            .update_job_from(job_id, JobState::Paused, move |job| {
                job.state = JobState::Running;
                job.pause_reason = None;
                job.filter = filter;
                job.template = template;
            })
            .await?;
        tracing::info!(job = job_id, "job resumed");
        self.spawn(job_id);
        Ok(job)
    }

    fn unsubscribe_url(&self, newsletter_id: u64, subscriber_id: u64) -> String {
        let token = self.inner.unsubscribe.token(newsletter_id, subscriber_id);
        format!("{}/u/{token}", self.inner.config.public_url.trim_end_matches('/'))
    }

    /// Runs a letter's filter and template (the versions a send would use now) for one
    /// recipient, stored or given inline, and builds the message. Sends nothing.
    pub async fn preview(&self, letter_id: u64, target: PreviewTarget) -> Result<Preview, RunnerError> {
        let store = &self.inner.store;
        let letter = store.letter(letter_id).await?;
        let newsletter = store.newsletter(letter.newsletter_id).await?;
        let (filter, filter_policy) = self.resolve_loaded(&letter.filter, PluginKind::Filter).await?;
        let (template, template_policy) = self
            .resolve_loaded(&letter.template, PluginKind::Template)
            .await?;
        let evaluator = Arc::new(self.inner.policies.evaluator(
            filter_policy,
            template_policy,
            LetterInput::new(&letter, &newsletter),
        )?);
        let subscriber = match target {
            PreviewTarget::Subscriber(id) => store.subscriber(newsletter.id, id).await?,
            PreviewTarget::Inline(new) => Subscriber {
                id: 0,
                newsletter_id: newsletter.id,
                email: new.email,
                name: new.name,
                attributes: new.attributes,
                status: SubscriberStatus::Active,
                created_at: now(),
            },
        };
        let url = self.unsubscribe_url(newsletter.id, subscriber.id);
        let (subscriber, verdict) = evaluator.evaluate_async(subscriber, url.clone()).await?;
        let message = match &verdict {
            Verdict::Skip(_) => None,
            Verdict::Send(rendered) => {
                let message_id = format!(
                    "letterbox.preview.{}@{}",
                    subscriber.id,
                    mail::mailbox_domain(&newsletter.from)
                );
                let outgoing = outgoing(&newsletter, subscriber, rendered.clone(), message_id, url);
                Some(mail::format(&outgoing).map_err(|e| RunnerError::Invalid(e.to_string()))?)
            }
        };
        Ok(Preview {
            filter,
            template,
            verdict,
            message,
        })
    }

    /// Stops claiming in every job and waits until in-flight deliveries are recorded.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
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
    }
}

/// Whom a preview renders for.
pub enum PreviewTarget {
    Subscriber(u64),
    Inline(NewSubscriber),
}

/// What a send would do for one recipient.
pub struct Preview {
    pub filter: PolicyVersion,
    pub template: PolicyVersion,
    pub verdict: Verdict,
    /// The complete message (RFC 5322) when the filter says send.
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_window_trips_only_past_the_limit() {
        let mut window = FailureWindow::new(FailureLimit {
            max: 2,
            window: std::time::Duration::from_secs(60),
        });
        assert!(!window.record());
        assert!(!window.record());
        assert!(
            window.record(),
            "the third failure within the window exceeds max = 2"
        );

        let mut expired = FailureWindow::new(FailureLimit {
            max: 1,
            window: std::time::Duration::from_millis(1),
        });
        assert!(!expired.record());
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(
            !expired.record(),
            "failures older than the window no longer count"
        );
    }
}
