//! A job's supervisor and its deliveries: see the module docs of `runner` for the
//! invariants. `supervise` owns the job's life (schedule, job slot, snapshot, claiming,
//! exit); `deliver` is one recipient's attempt.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::health::Backoff;
use super::limits::{DomainPermit, FailureWindow, RateMeter};
use super::{BULK_BATCH, CLAIM_BATCH, Control, Runner, RunnerError, message_id, outgoing};
use crate::bounces::{BounceKind, NewBounce, Status, Suppression};
use crate::domain::*;
use crate::mail::{self, MailError, Outgoing, Transport};
use crate::policy::{Evaluator, LetterInput, PolicyError, Verdict};
use crate::store::{StoreError, normalise_email};

/// Restart intensity of a job's supervisor: more crashes (panics in `drive`) than this
/// within the window pause the job instead of driving it again.
const SUPERVISOR_MAX_CRASHES: usize = 3;
const SUPERVISOR_CRASH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Subscribers read from the store per page when a job snapshots its list.
const SNAPSHOT_PAGE: usize = 1000;

/// What a job needs for every delivery, resolved once when it starts running.
struct JobContext {
    job_id: u64,
    letter_id: u64,
    newsletter: Newsletter,
    message_domain: String,
    message_id_nonce: Option<String>,
    transport: Transport,
    retry: RetryPolicy,
    /// The job's own concurrency.
    slots: Arc<Semaphore>,
    /// Cancelled when the job stops: deliveries that have not started sending give their
    /// recipient back instead.
    stop: CancellationToken,
    guard: Arc<FailureGuard>,
    /// Recipients to evaluate go to the job's evaluator task, which runs those waiting
    /// together in one trip to the blocking pool.
    evaluations: mpsc::UnboundedSender<Evaluation>,
    /// Outcomes go to the job's recorder, which writes those that arrive together in one
    /// store operation (one read and write of the job's counts instead of one each).
    recorder: mpsc::UnboundedSender<Recording>,
}

/// Restart intensity, counted as policies fail (not when their outcome is recorded), so
/// a job stops on the failure that crosses the limit.
struct FailureGuard {
    failures: std::sync::Mutex<FailureWindow>,
    /// Set when the failures exceeded the limit: the reason the job pauses with.
    pausing: std::sync::Mutex<Option<String>>,
    stop: CancellationToken,
}

impl FailureGuard {
    /// Notes one evaluation's result; false once the job must stop.
    fn note(&self, result: &Result<Verdict, PolicyError>) -> bool {
        if let Err(e) = result
            && let Some(policy) = e.failed_policy()
        {
            let tripped = self.failures.lock().unwrap_or_else(|e| e.into_inner()).record();
            if tripped {
                self.pause(format!("policy {policy} failing: {e}"));
            }
        }
        !self.stop.is_cancelled()
    }

    /// Stops the job, to pause with `reason` (unless it is pausing already).
    fn pause(&self, reason: String) {
        let mut pausing = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if pausing.is_none() {
            *pausing = Some(reason);
            self.stop.cancel();
        }
    }

    fn pausing(&self) -> Option<String> {
        self.pausing.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the evaluator task answers.
enum Evaluated {
    Done(Subscriber, Verdict),
    Failed(PolicyError),
    /// The job stopped before this recipient was evaluated.
    Stopped,
}

type Evaluation = (Subscriber, String, oneshot::Sender<Evaluated>);

/// Evaluates the recipients waiting together, up to two batches at once (a core each),
/// until every sender is gone.
async fn evaluator(
    evaluator: Arc<Evaluator>,
    guard: Arc<FailureGuard>,
    mut rx: mpsc::UnboundedReceiver<Evaluation>,
) {
    const EVAL_BATCH: usize = 64;
    const BATCHES_IN_FLIGHT: usize = 2;
    let mut in_flight = JoinSet::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        let mut batch = Vec::new();
        tokio::select! {
            n = rx.recv_many(&mut batch, EVAL_BATCH), if open && in_flight.len() < BATCHES_IN_FLIGHT => {
                if n == 0 {
                    open = false;
                    continue;
                }
                let (items, replies): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|(s, url, tx)| ((s, url), tx)).unzip();
                let (evaluator, guard) = (evaluator.clone(), guard.clone());
                in_flight.spawn(async move {
                    let results = evaluator.evaluate_batch(items, move |r| guard.note(r)).await;
                    match results {
                        Ok(results) => {
                            for ((subscriber, result), reply) in results.into_iter().zip(replies) {
                                let _ = reply.send(match result {
                                    Some(Ok(verdict)) => Evaluated::Done(subscriber, verdict),
                                    Some(Err(e)) => Evaluated::Failed(e),
                                    None => Evaluated::Stopped,
                                });
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Evaluated::Failed(PolicyError::Engine(e.to_string())));
                            }
                        }
                    }
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

/// One outcome for the recorder: the recipient, its outcome, the node id it was
/// claimed under, and where to say it is durable.
type Recording = (u64, Outcome, String, Reply);

/// Where a delivery hears that its outcome is durable.
type Reply = oneshot::Sender<Result<(), StoreError>>;

/// Outcomes to record, and whom to answer, per node id.
type ByNode = HashMap<String, (Vec<(u64, Outcome)>, Vec<Reply>)>;

/// Records outcomes in batches until every sender is gone. A batch is sent once it has
/// `RECORD_BATCH` outcomes or its first is `RECORD_LINGER` old, and up to
/// `RECORDS_IN_FLIGHT` batches are with the store at once. Every commit costs the same
/// whatever it holds (an fsync and its pages), so fewer, fuller commits are what keeps
/// the store's CPU per message low; the linger adds a few milliseconds to each record,
/// which only the claim window sees.
///
/// On a shared store, outcomes the store refuses because their claims were taken over
/// (this node's lease had expired) are dropped: the recipients belong to other nodes
/// now, which send and record them. Outcomes the store cannot take now (it is
/// unavailable) are tried again until it can: see `record_for`.
async fn recorder(runner: Runner, job_id: u64, mut rx: mpsc::UnboundedReceiver<Recording>) {
    const RECORD_BATCH: usize = 256;
    const RECORD_LINGER: std::time::Duration = std::time::Duration::from_millis(3);
    const RECORDS_IN_FLIGHT: usize = 2;
    let mut in_flight = JoinSet::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        let mut batch = Vec::new();
        tokio::select! {
            n = rx.recv_many(&mut batch, RECORD_BATCH), if open && in_flight.len() < RECORDS_IN_FLIGHT => {
                if n == 0 {
                    open = false;
                    continue;
                }
                let deadline = tokio::time::Instant::now() + RECORD_LINGER;
                while batch.len() < RECORD_BATCH {
                    let room = RECORD_BATCH - batch.len();
                    match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                        Ok(0) => {
                            open = false;
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                // A batch holds one node id, but for the moment this node registers
                // again under a new one.
                let mut by_node: ByNode = HashMap::new();
                for (sid, outcome, node, tx) in batch.drain(..) {
                    let entry = by_node.entry(node).or_default();
                    entry.0.push((sid, outcome));
                    entry.1.push(tx);
                }
                let runner = runner.clone();
                in_flight.spawn(async move {
                    for (node, (outcomes, replies)) in by_node {
                        record_for(&runner, &node, job_id, outcomes, replies).await;
                    }
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

/// Records one node's outcomes and answers their deliveries. An outcome is never
/// forgotten because the store is down: while it is unavailable the job shows as
/// stalled and the same outcomes are tried again, with a pause that grows to 2 s,
/// until the store takes them or refuses them. Only a drain that timed out at
/// shutdown gives up; those recipients stay `sending` and are sent again later.
async fn record_for(
    runner: &Runner,
    node: &str,
    job_id: u64,
    outcomes: Vec<(u64, Outcome)>,
    replies: Vec<Reply>,
) {
    let inner = &runner.inner;
    let store = &inner.store;
    let n = outcomes.len();
    let mut backoff = Backoff::new();
    let mut stalled = false;
    let result = loop {
        match store.record(node, job_id, outcomes.clone()).await {
            Ok(_) => break Ok(()),
            Err(StoreError::TakenOver(why) | StoreError::Conflict(why)) if store.is_shared() => {
                tracing::warn!(node, recipients = n, %why, "outcomes not recorded: the claims were taken over");
                metrics::counter!("letterbox_outcomes_taken_over_total").increment(n as u64);
                break Ok(());
            }
            Err(e) if e.is_unavailable() && !inner.abandon.is_cancelled() => {
                metrics::counter!("letterbox_record_retries_total").increment(1);
                inner
                    .stalls
                    .stall(job_id, format!("{n} outcomes wait to be recorded: {e}"));
                stalled = true;
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = inner.abandon.cancelled() => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    if stalled && result.is_ok() {
        inner.stalls.clear(job_id);
    }
    for reply in replies {
        let shared = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::BatchFailed(e.to_string())),
        };
        let _ = reply.send(shared);
    }
}

/// Why `drive` returned.
enum JobEnd {
    /// Nothing left that the supervisor could claim or wait for.
    Drained,
    /// Told to stop (pause, cancel) or shutting down; what was in flight is recorded.
    Stopped,
    /// Too many policy failures, or crashes of its supervisor: the job waits for a
    /// resume, with this reason.
    Paused(String),
}

/// A claimed recipient, with its subscriber as read by the claim at status epoch
/// `epoch` and its address's suppression as read after it (`None` when that read
/// failed: the delivery reads both again), and the node id it was claimed under.
struct Claimed {
    delivery: Delivery,
    subscriber: Option<Subscriber>,
    suppression: Option<Option<Suppression>>,
    epoch: u64,
    node: String,
}

/// What a delivery task tells its supervisor.
struct Report {
    /// The recipient's delivery is over (delivered, skipped or failed).
    finished: bool,
    /// When the recipient's next attempt is due, if it will retry.
    retry_at_ms: Option<u64>,
}

impl Runner {
    fn stopping(&self, control: &mut watch::Receiver<Control>) -> bool {
        *control.borrow_and_update() != Control::Run || self.inner.shutdown.is_cancelled()
    }

    /// Awaits `fut` unless the job is told to stop (or the server to shut down) first.
    async fn until_stopped<F: Future>(
        &self,
        control: &mut watch::Receiver<Control>,
        fut: F,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            if self.stopping(control) {
                return None;
            }
            tokio::select! {
                out = &mut fut => return Some(out),
                changed = control.changed() => if changed.is_err() { return None },
                _ = self.inner.shutdown.cancelled() => return None,
            }
        }
    }

    /// The supervisor task: runs the job, then decides under the `active` lock whether
    /// to exit (and records how the job ended) or to run again (resumed while stopping,
    /// or given new work while finishing).
    pub(super) async fn supervise(
        &self,
        job_id: u64,
        mut control: watch::Receiver<Control>,
        meter: Arc<std::sync::Mutex<RateMeter>>,
    ) {
        let mut backoff = Backoff::new();
        let mut crashes: Vec<std::time::Instant> = Vec::new();
        loop {
            // A panic in `drive` is contained here, as OTP's supervisor contains a
            // crashed child: the job is driven again (its stale claims given back
            // first), unless it crashes too often, when it pauses with the reason.
            let driven = AssertUnwindSafe(self.drive(job_id, &mut control, &meter))
                .catch_unwind()
                .await;
            let driven = match driven {
                Ok(end) => end,
                Err(payload) => {
                    let why = crate::logging::panic_message(payload.as_ref());
                    metrics::counter!("letterbox_job_supervisor_restarts_total").increment(1);
                    let now = std::time::Instant::now();
                    crashes.retain(|at| now.duration_since(*at) < SUPERVISOR_CRASH_WINDOW);
                    crashes.push(now);
                    if crashes.len() > SUPERVISOR_MAX_CRASHES {
                        tracing::error!(panic = %why, "the job's supervisor keeps crashing: the job pauses");
                        Ok(JobEnd::Paused(format!(
                            "its supervisor crashed {} times within {} s (last: {why}); resume it to try again",
                            crashes.len(),
                            SUPERVISOR_CRASH_WINDOW.as_secs()
                        )))
                    } else {
                        tracing::error!(panic = %why, "the job's supervisor crashed: it starts again");
                        let wait = tokio::time::sleep(backoff.next());
                        if self.until_stopped(&mut control, wait).await.is_some() {
                            continue;
                        }
                        Ok(JobEnd::Stopped)
                    }
                }
            };
            let end = match driven {
                // A store that cannot be written stalls the job; it does not end it.
                // What was claimed and not sent goes back to the queue when `drive`
                // starts again (`release_claims`).
                Err(RunnerError::Store(e)) if e.is_unavailable() && !self.inner.shutdown.is_cancelled() => {
                    self.inner.stalls.stall(job_id, &e);
                    let wait = tokio::time::sleep(backoff.next());
                    if self.until_stopped(&mut control, wait).await.is_some() {
                        continue;
                    }
                    // Paused, cancelled or shutting down meanwhile.
                    Ok(JobEnd::Stopped)
                }
                end => {
                    backoff.reset();
                    end
                }
            };
            let mut active = self.inner.active.lock().await;
            let now_control = *control.borrow_and_update();
            let shutting_down = self.inner.shutdown.is_cancelled();
            let store = &self.inner.store;
            match end {
                Ok(_) if shutting_down => {
                    tracing::info!("job interrupted by shutdown; it resumes at the next start");
                }
                Ok(_) if now_control == Control::Cancel => {
                    drop(active);
                    self.finish_cancel(job_id).await;
                    active = self.inner.active.lock().await;
                }
                Ok(JobEnd::Drained) => match store.complete_if_done(job_id).await {
                    Ok((job, true)) => {
                        self.inner.stalls.clear(job_id);
                        tracing::info!(counts = ?job.counts, "job completed")
                    }
                    // New work arrived (retry-failed) or the job changed state meanwhile.
                    // The pause bounds the cost should the counts ever disagree with
                    // what can be claimed.
                    Ok((job, false)) if job.state == JobState::Running => {
                        drop(active);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                    Ok((_, false)) => {}
                    Err(e) if e.is_unavailable() => {
                        drop(active);
                        self.inner.stalls.stall(job_id, &e);
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                    Err(e) => self.fail_job(job_id, e.into()).await,
                },
                Ok(JobEnd::Stopped) if now_control == Control::Run => {
                    // Resumed while draining from a pause: run again with the new state.
                    continue;
                }
                Ok(JobEnd::Stopped) => tracing::info!("job stopped"),
                Ok(JobEnd::Paused(reason)) => {
                    tracing::warn!(reason, "job paused");
                    let result = self
                        .persist(job_id, || {
                            let reason = reason.clone();
                            store.update_job_from(job_id, &[JobState::Running], move |job| {
                                job.state = JobState::Paused;
                                job.pause_reason = Some(reason);
                            })
                        })
                        .await;
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "job not paused: its state changed meanwhile");
                    }
                }
                Err(e) => self.fail_job(job_id, e).await,
            }
            active.remove(&job_id);
            // Its job slot may be free: queued jobs ask again.
            self.inner.slot_freed.notify_waiters();
            return;
        }
    }

    /// Runs the store operation `op` until the store carries it out or refuses it; while
    /// the store is unavailable, the job shows as stalled and `op` is tried again after
    /// a pause. Gives up (with the store's error) only when the server shuts down.
    async fn persist<T, F, Fut>(&self, job_id: u64, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Backoff::new();
        loop {
            match op().await {
                Err(e) if e.is_unavailable() && !self.inner.shutdown.is_cancelled() => {
                    self.inner.stalls.stall(job_id, &e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next()) => {}
                        _ = self.inner.shutdown.cancelled() => {}
                    }
                }
                result => {
                    if result.is_ok() {
                        self.inner.stalls.clear(job_id);
                    }
                    return result;
                }
            }
        }
    }

    /// Marks what is still open of a cancelled job cancelled, in bounded transactions.
    async fn finish_cancel(&self, job_id: u64) {
        let store = &self.inner.store;
        let mut cancelled = 0;
        loop {
            match self
                .persist(job_id, || store.cancel_open(job_id, BULK_BATCH))
                .await
            {
                Ok(0) => break,
                Ok(n) => cancelled += n,
                Err(e) => {
                    // Left for the next start, which finishes cancellations.
                    tracing::error!(error = %e, "cannot finish cancelling the job");
                    return;
                }
            }
        }
        let result = self
            .persist(job_id, || {
                store.update_job(job_id, |job| job.finished_at = Some(now()))
            })
            .await;
        match result {
            Ok(job) => tracing::info!(cancelled, counts = ?job.counts, "job cancelled"),
            Err(e) => tracing::error!(error = %e, "cannot record the job's end"),
        }
    }

    async fn fail_job(&self, job_id: u64, error: RunnerError) {
        tracing::error!(error = %error, "job stopped");
        let message = error.to_string();
        // A store failure leaves recipients where they were: keep the job resumable (a
        // restart picks it up) and only note the error. Anything else ends the job.
        let resumable = matches!(error, RunnerError::Store(_));
        let result = self
            .persist(job_id, || {
                let message = message.clone();
                self.inner.store.update_job(job_id, move |job| {
                    job.error = Some(message);
                    if !resumable {
                        job.state = JobState::Failed;
                        job.finished_at = Some(now());
                    }
                })
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record job failure");
        }
    }

    /// Runs the job until it has nothing left to do or is told to stop.
    async fn drive(
        &self,
        job_id: u64,
        control: &mut watch::Receiver<Control>,
        meter: &Arc<std::sync::Mutex<RateMeter>>,
    ) -> Result<JobEnd, RunnerError> {
        let inner = &self.inner;
        let store = &inner.store;
        let mut job = store.job(job_id).await?;
        if self.stopping(control) || !job.state.is_unfinished() {
            return Ok(JobEnd::Stopped);
        }
        // Nothing of this job is in flight here now: a claim this node still holds was
        // left by a supervisor that stopped on a store error. Give it back.
        if job.counts.sending > 0 {
            let released = store.release_claims(&inner.node.id(), job_id).await?;
            if released > 0 {
                tracing::warn!(
                    released,
                    "recipients claimed by an earlier run of this job here go back to the queue"
                );
            }
        }

        if job.state == JobState::Scheduled {
            let at_ms = job.send_at.unwrap_or(0).saturating_mul(1000);
            let wait = std::time::Duration::from_millis(at_ms.saturating_sub(now_ms()));
            tracing::info!(?wait, "job scheduled");
            if self
                .until_stopped(control, tokio::time::sleep(wait))
                .await
                .is_none()
            {
                return Ok(JobEnd::Stopped);
            }
            // A name means the latest version at the moment the job starts.
            let letter = store.letter(job.letter_id).await?;
            let ((filter, _), (template, _)) = self.resolve_letter(&letter).await?;
            job = match store
                .update_job_from(job_id, &[JobState::Scheduled], move |job| {
                    job.state = JobState::Queued;
                    job.filter = filter;
                    job.template = template;
                })
                .await
            {
                Ok(job) => job,
                // Another node started it, or someone paused or cancelled it.
                Err(StoreError::Conflict(_)) => {
                    let job = store.job(job_id).await?;
                    if !matches!(job.state, JobState::Queued | JobState::Running) {
                        return Ok(JobEnd::Stopped);
                    }
                    job
                }
                Err(e) => return Err(e.into()),
            };
        }

        // A job slot, counted across every node of the store: the job is `running`
        // while it holds one, until its end is recorded.
        while job.state == JobState::Queued {
            let (now, started) = store.start_job(job_id, inner.config.max_running_jobs).await?;
            job = now;
            if started || job.state != JobState::Queued {
                break;
            }
            // A local job ending wakes this at once; a job ending on another node is
            // seen by polling.
            let freed =
                tokio::time::timeout(std::time::Duration::from_millis(500), inner.slot_freed.notified());
            if self.until_stopped(control, freed).await.is_none() {
                return Ok(JobEnd::Stopped);
            }
        }
        if job.state != JobState::Running {
            return Ok(JobEnd::Stopped);
        }

        let letter = store.letter(job.letter_id).await?;
        let newsletter = store.newsletter(job.newsletter_id).await?;
        let transport = inner
            .transports
            .get(job.transport.as_deref())
            .map_err(|e| RunnerError::Invalid(e.to_string()))?
            .clone();
        let job_evaluator = inner.policies.evaluator(
            self.job_policy(job_id, &job.filter, PluginKind::Filter).await?,
            self.job_policy(job_id, &job.template, PluginKind::Template)
                .await?,
            LetterInput::new(&letter, &newsletter),
        )?;
        let (record_tx, record_rx) = mpsc::unbounded_channel();
        // Tracked, so shutdown waits until the last outcome is written (and the store,
        // which the recorder holds, can close).
        inner
            .tracker
            .spawn(recorder(self.clone(), job_id, record_rx).in_current_span());
        let stop = CancellationToken::new();
        let guard = Arc::new(FailureGuard {
            failures: std::sync::Mutex::new(FailureWindow::new(inner.config.policy_failures)),
            pausing: std::sync::Mutex::new(None),
            stop: stop.clone(),
        });
        let job_evaluator = Arc::new(job_evaluator);
        let (eval_tx, eval_rx) = mpsc::unbounded_channel();
        // Without its evaluator the job could only release every recipient it claims:
        // a panic there pauses the job with the reason (a resume starts a new one).
        let evaluating = evaluator(job_evaluator.clone(), guard.clone(), eval_rx);
        let pause_on_panic = guard.clone();
        inner.tracker.spawn(
            async move {
                if let Err(payload) = AssertUnwindSafe(evaluating).catch_unwind().await {
                    let why = crate::logging::panic_message(payload.as_ref());
                    tracing::error!(panic = %why, "the job's policy evaluator crashed: the job pauses");
                    pause_on_panic.pause(format!("its policy evaluator crashed: {why}"));
                }
            }
            .in_current_span(),
        );
        let ctx = Arc::new(JobContext {
            job_id,
            letter_id: job.letter_id,
            recorder: record_tx,
            evaluations: eval_tx,
            guard,
            message_domain: mail::mailbox_domain(&newsletter.from),
            message_id_nonce: job.message_id_nonce.clone(),
            newsletter,
            transport,
            retry: job.retry,
            slots: Arc::new(Semaphore::new(job.concurrency as usize)),
            stop,
        });

        if !job.prepared {
            let mut after = 0;
            loop {
                if self.stopping(control) {
                    return Ok(JobEnd::Stopped);
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
            job = store.update_job(job_id, |job| job.prepared = true).await?;
            tracing::info!(recipients = job.counts.total(), "job started");
        }
        if job.state != JobState::Running {
            return Ok(JobEnd::Stopped);
        }

        let concurrency = job.concurrency as usize;
        // Recipients claimed and not yet recorded: at most `concurrency + 2 × CLAIM_BATCH`,
        // refilled a batch at a time. Behind a rate limit, at most two seconds' worth
        // (and never less than the concurrency): claiming further ahead would only
        // hold recipients other nodes could send, and add to what a crash re-sends.
        let mut window = concurrency + 2 * CLAIM_BATCH;
        if let Some(rate) = ctx.transport.rate() {
            let two_seconds = 2.0 * f64::from(rate.messages) / rate.per.as_secs_f64();
            window = window.min(concurrency.max(two_seconds.ceil() as usize));
        }
        let batch = CLAIM_BATCH.min(window / 2).max(1);
        let mut running: JoinSet<Result<Report, StoreError>> = JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, (u64, String)> = HashMap::new();
        // The last claim came back short: nothing is pending until a retry falls due or
        // someone requeues recipients.
        let mut dry = false;
        let mut next_retry: Option<u64> = None;
        // The store failed a claim: claim again after a pause, meanwhile letting what
        // is in flight finish and be recorded.
        let mut store_backoff = Backoff::new();
        let mut claim_after: Option<tokio::time::Instant> = None;
        loop {
            let pausing = ctx.guard.pausing();
            let stopping = self.stopping(control) || pausing.is_some();
            if stopping {
                ctx.stop.cancel();
            }
            // Claims are made only under a fresh lease (see `fleet`).
            let node = inner.node.id();
            let leased = inner.node.holds(&node);
            let store_waits = claim_after.is_some_and(|at| tokio::time::Instant::now() < at);
            if !stopping && !dry && leased && !store_waits && running.len() + batch <= window {
                let want = window - running.len();
                // Read before the claim reads the subscribers: see `Store::status_epoch`.
                let epoch = store.status_epoch();
                let claimed = match store.claim(&node, job_id, want, now_ms()).await {
                    Ok(claimed) => claimed,
                    Err(e) if e.is_unavailable() => {
                        inner.stalls.stall(job_id, &e);
                        claim_after = Some(tokio::time::Instant::now() + store_backoff.next());
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if claim_after.take().is_some() {
                    store_backoff.reset();
                    inner.stalls.clear(job_id);
                }
                if claimed.len() < want {
                    dry = true;
                    next_retry = match store.next_retry_at(job_id).await {
                        Ok(at) => at,
                        // Look again soon: the claim's own errors stall the job.
                        Err(e) if e.is_unavailable() => Some(now_ms() + 1000),
                        Err(e) => return Err(e.into()),
                    };
                }
                // One read for the batch; a failed read leaves each delivery to read its own.
                let emails = claimed.iter().map(|(d, _)| d.email.clone()).collect();
                let suppressed: Option<HashMap<String, Suppression>> = match store.suppressed(emails).await {
                    Ok(list) => Some(list.into_iter().map(|s| (normalise_email(&s.email), s)).collect()),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the suppression list for a claim");
                        None
                    }
                };
                for (delivery, subscriber) in claimed {
                    let subscriber_id = delivery.subscriber_id;
                    let runner = self.clone();
                    let ctx = ctx.clone();
                    let suppression = suppressed
                        .as_ref()
                        .map(|list| list.get(&normalise_email(&delivery.email)).cloned());
                    let claimed = Claimed {
                        delivery,
                        subscriber,
                        suppression,
                        epoch,
                        node: node.clone(),
                    };
                    let span = tracing::info_span!("delivery", subscriber = subscriber_id);
                    let handle =
                        running.spawn(async move { runner.deliver(&ctx, claimed).await }.instrument(span));
                    in_flight.insert(handle.id(), (subscriber_id, node.clone()));
                }
                // A test's injected crash, with deliveries in flight: the worst moment.
                inner.config.faults.check(crate::faults::Point::JobSupervisor);
                continue;
            }
            if (!leased || store_waits) && !stopping {
                // No fresh lease (the database is slow or unreachable, or this node was
                // just taken over): claim again once the heartbeat has renewed it. Or
                // the store failed the last claim: claim again after a pause.
                if !leased && let Some(why) = inner.node.heartbeat_error() {
                    inner
                        .stalls
                        .stall(job_id, format!("this node's lease is not renewed: {why}"));
                    // So that the next claim that succeeds clears the stall.
                    claim_after.get_or_insert_with(tokio::time::Instant::now);
                }
                let wait = match claim_after {
                    Some(at) if store_waits => at.saturating_duration_since(tokio::time::Instant::now()),
                    _ => std::time::Duration::from_millis(100),
                };
                tokio::select! {
                    Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                        self.joined(joined, &mut in_flight, meter, &mut next_retry, job_id).await?;
                    }
                    _ = tokio::time::sleep(wait) => {}
                    _ = control.changed() => {}
                    _ = inner.shutdown.cancelled(), if !inner.shutdown.is_cancelled() => {}
                }
                continue;
            }
            if running.is_empty() {
                if stopping {
                    return Ok(match pausing {
                        Some(reason) => JobEnd::Paused(reason),
                        None => JobEnd::Stopped,
                    });
                }
                let Some(at) = next_retry else {
                    return Ok(JobEnd::Drained);
                };
                let wait = std::time::Duration::from_millis(at.saturating_sub(now_ms()));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = control.changed() => {}
                    _ = inner.shutdown.cancelled() => {}
                }
                dry = false;
                continue;
            }
            let retry_wait = match next_retry {
                Some(at) if dry => std::time::Duration::from_millis(at.saturating_sub(now_ms())),
                _ => std::time::Duration::MAX,
            };
            let joined = tokio::select! {
                joined = running.join_next_with_id() => joined,
                // A stop or a nudge (recipients were requeued).
                _ = control.changed() => { dry = false; continue }
                _ = inner.shutdown.cancelled(), if !inner.shutdown.is_cancelled() => continue,
                // Drain timed out: dropping `running` aborts what is left, which stays
                // `sending` and is sent again at the next start.
                _ = inner.abandon.cancelled() => return Ok(JobEnd::Stopped),
                _ = tokio::time::sleep(retry_wait), if retry_wait != std::time::Duration::MAX => { dry = false; continue }
            };
            if let Some(joined) = joined {
                self.joined(joined, &mut in_flight, meter, &mut next_retry, job_id)
                    .await?;
            }
        }
    }

    /// Takes in a finished delivery task.
    async fn joined(
        &self,
        joined: Result<(tokio::task::Id, Result<Report, StoreError>), tokio::task::JoinError>,
        in_flight: &mut HashMap<tokio::task::Id, (u64, String)>,
        meter: &Arc<std::sync::Mutex<RateMeter>>,
        next_retry: &mut Option<u64>,
        job_id: u64,
    ) -> Result<(), RunnerError> {
        match joined {
            Ok((id, report)) => {
                in_flight.remove(&id);
                let report = report?;
                if report.finished {
                    meter.lock().unwrap_or_else(|e| e.into_inner()).add(1);
                }
                if let Some(at) = report.retry_at_ms {
                    *next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
                }
            }
            Err(join_error) => {
                let Some((subscriber_id, node)) = in_flight.remove(&join_error.id()) else {
                    return Ok(());
                };
                tracing::error!(subscriber = subscriber_id, error = %join_error, "delivery task panicked");
                let reason = "internal error: the delivery task panicked".to_string();
                let outcome = vec![(subscriber_id, Outcome::Failed { reason })];
                match self.inner.store.record(&node, job_id, outcome).await {
                    Ok(_) => {}
                    Err(StoreError::TakenOver(_) | StoreError::Conflict(_))
                        if self.inner.store.is_shared() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Waits for a slot for the recipient's domain, then the job's, then the server's;
    /// `None` if the job stops first.
    async fn slots(
        &self,
        ctx: &JobContext,
        email: &str,
        stop: &CancellationToken,
    ) -> Option<(Option<DomainPermit>, OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let domain = email
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        // Domain first, so recipients of a capped domain wait without holding the job's
        // slots that other domains could use.
        let domain_permit = tokio::select! {
            p = self.inner.domains.acquire(&domain) => p,
            _ = stop.cancelled() => return None,
        };
        let job_permit = tokio::select! {
            p = ctx.slots.clone().acquire_owned() => p.ok()?,
            _ = stop.cancelled() => return None,
        };
        let server_permit = tokio::select! {
            p = self.inner.delivery_slots.clone().acquire_owned() => p.ok()?,
            _ = stop.cancelled() => return None,
        };
        Some((domain_permit, job_permit, server_permit))
    }

    /// One recipient: slots → filter → template → rate limit → send → record. Expected
    /// failures become the recipient's state; only a store failure is returned.
    async fn deliver(&self, ctx: &Arc<JobContext>, claimed: Claimed) -> Result<Report, StoreError> {
        let delivery = claimed.delivery.clone();
        let node = claimed.node.clone();
        let outcome = match self.slots(ctx, &delivery.email, &ctx.stop).await {
            None => Outcome::Released,
            Some(permits) => {
                let outcome = self.attempt(ctx, claimed).await;
                drop(permits);
                outcome
            }
        };
        let mut report = Report {
            finished: false,
            retry_at_ms: None,
        };
        match &outcome {
            Outcome::Delivered { .. } => tracing::debug!("delivered"),
            Outcome::Skipped { reason } => tracing::debug!(reason, "skipped"),
            Outcome::Retry { at_ms, error } => {
                tracing::info!(error, attempts = delivery.attempts, "delivery will be retried");
                report.retry_at_ms = Some(*at_ms);
            }
            Outcome::Deferred { at_ms, reason } => {
                tracing::debug!(reason, "deferred: its domain is paused");
                report.retry_at_ms = Some(*at_ms);
            }
            Outcome::Failed { reason } => tracing::warn!(reason, "delivery failed"),
            Outcome::Released => tracing::debug!("released: the job stopped before sending"),
        }
        let label = match &outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Skipped { .. } => "skipped",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failed",
            Outcome::Released => "released",
            Outcome::Deferred { .. } => "deferred",
        };
        metrics::counter!("letterbox_deliveries_total", "outcome" => label).increment(1);
        report.finished = matches!(
            outcome,
            Outcome::Delivered { .. } | Outcome::Skipped { .. } | Outcome::Failed { .. }
        );
        let (tx, rx) = oneshot::channel();
        ctx.recorder
            .send((delivery.subscriber_id, outcome, node, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)??;
        Ok(report)
    }

    /// `try_attempt`, with a policy failure as the recipient's reason. (The evaluator
    /// task counted it towards the job's restart intensity already.)
    async fn attempt(&self, ctx: &Arc<JobContext>, claimed: Claimed) -> Outcome {
        match self.try_attempt(ctx, claimed).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed {
                reason: e.to_string(),
            },
        }
    }

    /// The attempt proper; policy failures come back as errors so they can be counted.
    async fn try_attempt(&self, ctx: &Arc<JobContext>, claimed: Claimed) -> Result<Outcome, PolicyError> {
        let inner = &self.inner;
        let stop = &ctx.stop;
        if stop.is_cancelled() {
            return Ok(Outcome::Released);
        }
        let delivery = &claimed.delivery;
        let claimed_node = claimed.node.clone();
        if let Some(deferred) = self.domain_paused(&delivery.email) {
            return Ok(deferred);
        }
        // The claim read the subscriber; read again only if a status changed since.
        let mut epoch = claimed.epoch;
        let recipient = match claimed.suppression {
            Some(suppression) if inner.store.status_epoch() == epoch => (claimed.subscriber, suppression),
            _ => {
                epoch = inner.store.status_epoch();
                match self.reread(&attempt_of(ctx, delivery)).await {
                    Ok(recipient) => recipient,
                    Err(outcome) => return Ok(outcome),
                }
            }
        };
        // Re-checked at send time: an unsubscribe wins over a snapshot taken earlier.
        let subscriber = match sendable(recipient) {
            Ok(subscriber) => subscriber,
            Err(skipped) => return Ok(skipped),
        };
        let unsubscribe_url = self.unsubscribe_url(ctx.newsletter.id, subscriber.id);
        let (tx, rx) = oneshot::channel();
        let sent = ctx.evaluations.send((subscriber, unsubscribe_url.clone(), tx));
        let evaluated = match sent {
            Ok(()) => rx.await.unwrap_or(Evaluated::Stopped),
            Err(_) => Evaluated::Stopped,
        };
        let (subscriber, verdict) = match evaluated {
            Evaluated::Done(subscriber, verdict) => (subscriber, verdict),
            Evaluated::Failed(e) => return Err(e),
            Evaluated::Stopped => return Ok(Outcome::Released),
        };
        let rendered = match verdict {
            Verdict::Send(rendered) => rendered,
            Verdict::Skip(reason) => return Ok(Outcome::Skipped { reason }),
        };

        let message_id = message_id(
            ctx.job_id,
            ctx.message_id_nonce.as_deref(),
            delivery.subscriber_id,
            &ctx.message_domain,
        );
        let mut outgoing = outgoing(&ctx.newsletter, subscriber, rendered, message_id, unsubscribe_url);
        outgoing.return_path = self.return_path(ctx.job_id, delivery.subscriber_id);
        let to = attempt_of(ctx, delivery);
        let holds = || inner.node.holds(&claimed_node);
        Ok(self
            .send_checked(&to, &outgoing, &ctx.transport, epoch, stop, &holds)
            .await)
    }

    /// The last steps of any attempt, a job's delivery or a one-off message: wait for
    /// the transport's rate, look again at what may have changed meanwhile (a status,
    /// the recipient's domain, the claim: `holds`), send, and classify the answer.
    /// `epoch` is the status epoch the recipient was last read at.
    pub(super) async fn send_checked(
        &self,
        to: &Attempt<'_>,
        outgoing: &Outgoing,
        transport: &Transport,
        epoch: u64,
        stop: &CancellationToken,
        holds: &(dyn Fn() -> bool + Sync),
    ) -> Outcome {
        let inner = &self.inner;
        tokio::select! {
            _ = async {
                self.fleet_rate_token(transport).await;
                transport.ready().await;
            } => {}
            _ = stop.cancelled() => return Outcome::Released,
        }
        // The wait for the rate can be long (a provider's 14/s shared by a whole
        // window of recipients): a status that changed meanwhile still wins.
        if inner.store.status_epoch() != epoch {
            match self.reread(to).await {
                Ok(recipient) => {
                    if let Err(skipped) = admitted(to, recipient) {
                        return skipped;
                    }
                }
                Err(outcome) => return outcome,
            }
        }
        if let Some(deferred) = self.domain_paused(to.email) {
            return deferred;
        }
        // Fencing: nothing goes out under a claim this node may no longer hold.
        if stop.is_cancelled() || !holds() {
            return Outcome::Released;
        }
        // Asked again inside the transport, once it has a connection: the wait for one
        // can outlast the lease.
        let go = || !stop.is_cancelled() && holds();
        match transport.send(outgoing, &go).await {
            Ok(reply) => Outcome::Delivered { reply },
            Err(MailError::Withheld) => Outcome::Released,
            Err(e) if e.is_transient() => match self.retry_or_fail(to, e.to_string()) {
                // A full mailbox (4.2.2) that outlasted every attempt is a soft bounce.
                Outcome::Failed { reason } => self.rejected(to, &e.to_string(), reason).await,
                retry => retry,
            },
            Err(e) => self.rejected(to, &e.to_string(), e.to_string()).await,
        }
    }

    /// The recipient's subscriber as stored now (`None` once erased) and its address's
    /// suppression, or the outcome when they cannot be read.
    pub(super) async fn reread(&self, to: &Attempt<'_>) -> Result<Recipient, Outcome> {
        let store = &self.inner.store;
        let subscriber = match store.subscriber(to.newsletter_id, to.subscriber_id).await {
            Ok(s) => Some(s),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(self.retry_or_fail(to, e.to_string())),
        };
        match store.suppressed(vec![to.email.to_string()]).await {
            Ok(mut list) => Ok((subscriber, list.pop())),
            Err(e) => Err(self.retry_or_fail(to, e.to_string())),
        }
    }

    /// The outcome for a recipient whose domain this node holds back, if it does.
    pub(super) fn domain_paused(&self, email: &str) -> Option<Outcome> {
        let domain = crate::bounces::domain_of(email);
        let pause = self.inner.blocks.paused(&domain)?;
        let until = std::time::UNIX_EPOCH + std::time::Duration::from_millis(pause.until_ms);
        Some(Outcome::Deferred {
            at_ms: pause.until_ms,
            reason: format!(
                "recipient domain {domain} paused until {}: {}",
                humantime::format_rfc3339_seconds(until),
                pause.reason
            ),
        })
    }

    /// A refusal the delivery ends on (`reason`): if the server's reply classifies as a
    /// bounce or a block (`bounces::Status`), it is recorded as one, with the rules
    /// applied, before the failure is: a crash between the two re-sends to a
    /// subscriber who is then skipped. A report that cannot be recorded now is tried
    /// again with the delivery, if it has attempts left.
    async fn rejected(&self, to: &Attempt<'_>, reply: &str, reason: String) -> Outcome {
        let classified = Status::in_reply(reply).and_then(|status| Some((status, status.bounce_kind()?)));
        let Some((status, kind)) = classified else {
            return Outcome::Failed { reason };
        };
        metrics::counter!("letterbox_rejections_total", "kind" => kind.as_str()).increment(1);
        if kind == BounceKind::Blocked {
            let domain = crate::bounces::domain_of(to.email);
            metrics::counter!("letterbox_sender_blocks_total", "domain" => domain.clone()).increment(1);
            if let Some(pause) = self.inner.blocks.note(&domain, reply) {
                metrics::counter!("letterbox_domain_pauses_total", "domain" => domain.clone()).increment(1);
                tracing::warn!(
                    domain,
                    reason = pause.reason,
                    "recipient domain paused on this node"
                );
            }
        }
        let report = NewBounce {
            kind,
            source: crate::bounces::sources::SMTP.into(),
            email: to.email.to_string(),
            newsletter_id: Some(to.newsletter_id),
            subscriber_id: Some(to.subscriber_id),
            job_id: to.job_id,
            letter_id: to.letter_id,
            status: Some(status.to_string()),
            diagnostic: Some(reply.to_string()),
            raw: None,
        };
        let rules = self.inner.config.bounces.rules;
        match self.inner.store.record_bounce(report, rules).await {
            Ok(records) => {
                let decision = records.first().map(|r| r.decision.as_str()).unwrap_or_default();
                Outcome::Failed {
                    reason: format!("{reason} [{decision}]"),
                }
            }
            Err(e) if e.is_unavailable() && to.attempts < to.retry.max_attempts => {
                tracing::warn!(error = %e, "a bounce could not be recorded: the delivery will be retried");
                self.retry_or_fail(to, format!("{reason} (its bounce could not be recorded: {e})"))
            }
            Err(e) => {
                tracing::warn!(error = %e, "a bounce could not be recorded");
                Outcome::Failed {
                    reason: format!("{reason} (its bounce could not be recorded: {e})"),
                }
            }
        }
    }

    /// A transient failure: retry later if the job's policy allows another attempt.
    pub(super) fn retry_or_fail(&self, to: &Attempt<'_>, error: String) -> Outcome {
        if to.attempts < to.retry.max_attempts {
            let unit = getrandom::u64().unwrap_or(0) as f64 / u64::MAX as f64;
            let at_ms = now_ms() + to.retry.delay_ms(to.attempts, unit);
            Outcome::Retry { at_ms, error }
        } else {
            Outcome::Failed {
                reason: format!("gave up after {} attempts: {error}", to.attempts),
            }
        }
    }
}

/// A recipient as last read: its subscriber (`None` once erased) and its address's
/// suppression.
pub(super) type Recipient = (Option<Subscriber>, Option<Suppression>);

/// Whom an attempt is for, as the retry and bounce rules see it: a job's delivery or a
/// one-off message (no job, and maybe no letter).
pub(super) struct Attempt<'a> {
    pub email: &'a str,
    pub newsletter_id: u64,
    pub subscriber_id: u64,
    pub job_id: Option<u64>,
    pub letter_id: Option<u64>,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    pub retry: &'a RetryPolicy,
    /// A double opt-in confirmation (see `confirmable`).
    pub confirmation: bool,
}

fn attempt_of<'a>(ctx: &'a JobContext, delivery: &'a Delivery) -> Attempt<'a> {
    Attempt {
        email: &delivery.email,
        newsletter_id: ctx.newsletter.id,
        subscriber_id: delivery.subscriber_id,
        job_id: Some(ctx.job_id),
        letter_id: Some(ctx.letter_id),
        attempts: delivery.attempts,
        retry: &ctx.retry,
        confirmation: false,
    }
}

/// `sendable`, or `confirmable` for a confirmation.
pub(super) fn admitted(to: &Attempt<'_>, recipient: Recipient) -> Result<Subscriber, Outcome> {
    match to.confirmation {
        true => confirmable(recipient),
        false => sendable(recipient),
    }
}

/// The subscriber, if a double opt-in confirmation may go to them: one who has not
/// confirmed (or unsubscribed and asked again), whose address is not suppressed.
fn confirmable((subscriber, suppression): Recipient) -> Result<Subscriber, Outcome> {
    let skip = |reason: String| Err(Outcome::Skipped { reason });
    match (subscriber, suppression) {
        (_, Some(suppression)) => skip(suppression.skip_reason()),
        (None, _) => skip("subscriber was deleted".into()),
        (Some(s), None) => match s.status {
            SubscriberStatus::Unconfirmed | SubscriberStatus::Unsubscribed => Ok(s),
            SubscriberStatus::Active => skip("subscriber has confirmed already".into()),
            other => skip(format!("subscriber is {}", other.as_str())),
        },
    }
}

/// The subscriber, if it may still be sent to; else the skip that says why not.
pub(super) fn sendable((subscriber, suppression): Recipient) -> Result<Subscriber, Outcome> {
    if let (Some(s), Some(suppression)) = (&subscriber, suppression)
        && s.status == SubscriberStatus::Active
    {
        return Err(Outcome::Skipped {
            reason: suppression.skip_reason(),
        });
    }
    match subscriber {
        None => Err(Outcome::Skipped {
            reason: "subscriber was deleted".into(),
        }),
        Some(s) if s.status != SubscriberStatus::Active => Err(Outcome::Skipped {
            reason: format!("subscriber is {}", s.status.as_str()),
        }),
        Some(s) => Ok(s),
    }
}
