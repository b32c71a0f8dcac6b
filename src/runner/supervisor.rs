//! A job's supervisor: see the module docs of `runner` for the invariants. `supervise`
//! owns the job's life (schedule, job slot, snapshot, claiming, exit); each recipient's
//! attempt is `deliver.rs`'s, and the job's evaluator and recorder tasks are
//! `batches.rs`'s.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batches::{Evaluation, FailureGuard, Recording, evaluator, recorder};
use super::health::Backoff;
use super::limits::{FailureWindow, RateMeter};
use super::{BULK_BATCH, CLAIM_BATCH, Control, Runner, RunnerError};
use crate::bounces::Suppression;
use crate::domain::*;
use crate::mail::{self, Transport};
use crate::policy::LetterInput;
use crate::store::{StoreError, normalise_email};

/// Restart intensity of a job's supervisor: more crashes (panics in `drive`) than this
/// within the window pause the job instead of driving it again.
const SUPERVISOR_MAX_CRASHES: usize = 3;
const SUPERVISOR_CRASH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Subscribers read from the store per page when a job snapshots its list.
const SNAPSHOT_PAGE: usize = 1000;

/// What a job needs for every delivery, resolved once when it starts running.
pub(super) struct JobContext {
    pub(super) job_id: u64,
    pub(super) letter_id: u64,
    pub(super) newsletter: Newsletter,
    pub(super) message_domain: String,
    pub(super) message_id_nonce: Option<String>,
    pub(super) transport: Transport,
    pub(super) retry: RetryPolicy,
    /// The job's own concurrency.
    pub(super) slots: Arc<Semaphore>,
    /// Cancelled when the job stops: deliveries that have not started sending give their
    /// recipient back instead.
    pub(super) stop: CancellationToken,
    pub(super) guard: Arc<FailureGuard>,
    /// Recipients to evaluate go to the job's evaluator task, which runs those waiting
    /// together in one trip to the blocking pool.
    pub(super) evaluations: mpsc::UnboundedSender<Evaluation>,
    /// Outcomes go to the job's recorder, which writes those that arrive together in one
    /// store operation (one read and write of the job's counts instead of one each).
    pub(super) recorder: mpsc::UnboundedSender<Recording>,
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
pub(super) struct Claimed {
    pub(super) delivery: Delivery,
    pub(super) subscriber: Option<Subscriber>,
    pub(super) suppression: Option<Option<Suppression>>,
    pub(super) epoch: u64,
    pub(super) node: String,
}

/// What a delivery task tells its supervisor.
pub(super) struct Report {
    /// The recipient's delivery is over (delivered, skipped or failed).
    pub(super) finished: bool,
    /// When the recipient's next attempt is due, if it will retry.
    pub(super) retry_at_ms: Option<u64>,
}

/// What a job's send loop keeps between its turns (`Runner::send_all`).
#[derive(Default)]
struct Sending {
    /// The delivery tasks, and for each its subscriber and the node it was claimed under.
    running: JoinSet<Result<Report, StoreError>>,
    in_flight: HashMap<tokio::task::Id, (u64, String)>,
    /// The last claim came back short: nothing is pending until a retry falls due or
    /// someone requeues recipients.
    dry: bool,
    next_retry: Option<u64>,
    /// The store failed a claim: claim again after a pause, meanwhile letting what is
    /// in flight finish and be recorded.
    store_backoff: Backoff,
    claim_after: Option<tokio::time::Instant>,
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

    /// Runs the job until it has nothing left to do or is told to stop: its start time,
    /// a job slot, the tasks it sends with, its recipients' snapshot, then the sending.
    async fn drive(
        &self,
        job_id: u64,
        control: &mut watch::Receiver<Control>,
        meter: &Arc<std::sync::Mutex<RateMeter>>,
    ) -> Result<JobEnd, RunnerError> {
        let mut job = self.inner.store.job(job_id).await?;
        if self.stopping(control) || !job.state.is_unfinished() {
            return Ok(JobEnd::Stopped);
        }
        self.release_stale_claims(&job).await?;
        if job.state == JobState::Scheduled {
            let Some(queued) = self.wait_for_send_at(job, control).await? else {
                return Ok(JobEnd::Stopped);
            };
            job = queued;
        }
        let Some(running) = self.take_slot(job, control).await? else {
            return Ok(JobEnd::Stopped);
        };
        job = running;
        let ctx = self.start_job_tasks(&job).await?;
        if !job.prepared {
            let Some(prepared) = self.snapshot(job, control).await? else {
                return Ok(JobEnd::Stopped);
            };
            job = prepared;
        }
        if job.state != JobState::Running {
            return Ok(JobEnd::Stopped);
        }
        self.send_all(&job, ctx, control, meter).await
    }

    /// Nothing of this job is in flight here now: a claim this node still holds was
    /// left by a supervisor that stopped on a store error. Give it back.
    async fn release_stale_claims(&self, job: &Job) -> Result<(), RunnerError> {
        if job.counts.sending > 0 {
            let released = self
                .inner
                .store
                .release_claims(&self.inner.node.id(), job.id)
                .await?;
            if released > 0 {
                tracing::warn!(
                    released,
                    "recipients claimed by an earlier run of this job here go back to the queue"
                );
            }
        }
        Ok(())
    }

    /// Waits for a scheduled job's time, then queues it with the policy versions its
    /// letter names then. `None`: stopped, or another node or a person moved it on.
    async fn wait_for_send_at(
        &self,
        job: Job,
        control: &mut watch::Receiver<Control>,
    ) -> Result<Option<Job>, RunnerError> {
        let store = &self.inner.store;
        let job_id = job.id;
        let at_ms = job.send_at.unwrap_or(0).saturating_mul(1000);
        let wait = std::time::Duration::from_millis(at_ms.saturating_sub(now_ms()));
        tracing::info!(?wait, "job scheduled");
        if self
            .until_stopped(control, tokio::time::sleep(wait))
            .await
            .is_none()
        {
            return Ok(None);
        }
        // A name means the latest version at the moment the job starts.
        let letter = store.letter(job.letter_id).await?;
        let ((filter, _), (template, _)) = self.resolve_letter(&letter).await?;
        match store
            .update_job_from(job_id, &[JobState::Scheduled], move |job| {
                job.state = JobState::Queued;
                job.filter = filter;
                job.template = template;
            })
            .await
        {
            Ok(job) => Ok(Some(job)),
            // Another node started it, or someone paused or cancelled it.
            Err(StoreError::Conflict(_)) => {
                let job = store.job(job_id).await?;
                Ok(matches!(job.state, JobState::Queued | JobState::Running).then_some(job))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A job slot, counted across every node of the store: the job is `running` while
    /// it holds one, until its end is recorded. `None`: stopped, or no longer running.
    async fn take_slot(
        &self,
        mut job: Job,
        control: &mut watch::Receiver<Control>,
    ) -> Result<Option<Job>, RunnerError> {
        let inner = &self.inner;
        while job.state == JobState::Queued {
            let (now, started) = inner
                .store
                .start_job(job.id, inner.config.max_running_jobs)
                .await?;
            job = now;
            if started || job.state != JobState::Queued {
                break;
            }
            // A local job ending wakes this at once; a job ending on another node is
            // seen by polling.
            let freed =
                tokio::time::timeout(std::time::Duration::from_millis(500), inner.slot_freed.notified());
            if self.until_stopped(control, freed).await.is_none() {
                return Ok(None);
            }
        }
        Ok((job.state == JobState::Running).then_some(job))
    }

    /// What every delivery of a running job shares: its letter, newsletter, transport
    /// and policies, and the job's recorder and evaluator tasks, started here.
    async fn start_job_tasks(&self, job: &Job) -> Result<Arc<JobContext>, RunnerError> {
        let inner = &self.inner;
        let store = &inner.store;
        let job_id = job.id;
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
        Ok(Arc::new(JobContext {
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
        }))
    }

    /// The job's recipients: its newsletter's active subscribers when it starts, read a
    /// page at a time. `None`: stopped meanwhile (a restart snapshots again; adding a
    /// recipient twice adds it once).
    async fn snapshot(
        &self,
        job: Job,
        control: &mut watch::Receiver<Control>,
    ) -> Result<Option<Job>, RunnerError> {
        let store = &self.inner.store;
        let mut after = 0;
        loop {
            if self.stopping(control) {
                return Ok(None);
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
            store.add_recipients(job.id, recipients).await?;
        }
        let job = store.update_job(job.id, |job| job.prepared = true).await?;
        tracing::info!(recipients = job.counts.total(), "job started");
        Ok(Some(job))
    }

    /// Claims recipients and delivers each in a task of its own, within the job's
    /// window, until none are left, the job stops or pauses.
    async fn send_all(
        &self,
        job: &Job,
        ctx: Arc<JobContext>,
        control: &mut watch::Receiver<Control>,
        meter: &Arc<std::sync::Mutex<RateMeter>>,
    ) -> Result<JobEnd, RunnerError> {
        let inner = &self.inner;
        let job_id = job.id;
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
        let mut sending = Sending::default();
        loop {
            let pausing = ctx.guard.pausing();
            let stopping = self.stopping(control) || pausing.is_some();
            if stopping {
                ctx.stop.cancel();
            }
            // Claims are made only under a fresh lease (see `fleet`).
            let node = inner.node.id();
            let leased = inner.node.holds(&node);
            let store_waits = sending
                .claim_after
                .is_some_and(|at| tokio::time::Instant::now() < at);
            if !stopping && !sending.dry && leased && !store_waits && sending.running.len() + batch <= window
            {
                let want = window - sending.running.len();
                self.claim(&ctx, node, want, &mut sending).await?;
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
                    sending.claim_after.get_or_insert_with(tokio::time::Instant::now);
                }
                let wait = match sending.claim_after {
                    Some(at) if store_waits => at.saturating_duration_since(tokio::time::Instant::now()),
                    _ => std::time::Duration::from_millis(100),
                };
                let running = &mut sending.running;
                tokio::select! {
                    Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                        self.joined(joined, &mut sending.in_flight, meter, &mut sending.next_retry, job_id).await?;
                    }
                    _ = tokio::time::sleep(wait) => {}
                    _ = control.changed() => {}
                    _ = inner.shutdown.cancelled(), if !inner.shutdown.is_cancelled() => {}
                }
                continue;
            }
            if sending.running.is_empty() {
                if stopping {
                    return Ok(match pausing {
                        Some(reason) => JobEnd::Paused(reason),
                        None => JobEnd::Stopped,
                    });
                }
                let Some(at) = sending.next_retry else {
                    return Ok(JobEnd::Drained);
                };
                let wait = std::time::Duration::from_millis(at.saturating_sub(now_ms()));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = control.changed() => {}
                    _ = inner.shutdown.cancelled() => {}
                }
                sending.dry = false;
                continue;
            }
            let retry_wait = match sending.next_retry {
                Some(at) if sending.dry => std::time::Duration::from_millis(at.saturating_sub(now_ms())),
                _ => std::time::Duration::MAX,
            };
            let joined = tokio::select! {
                joined = sending.running.join_next_with_id() => joined,
                // A stop or a nudge (recipients were requeued).
                _ = control.changed() => { sending.dry = false; continue }
                _ = inner.shutdown.cancelled(), if !inner.shutdown.is_cancelled() => continue,
                // Drain timed out: dropping `running` aborts what is left, which stays
                // `sending` and is sent again at the next start.
                _ = inner.abandon.cancelled() => return Ok(JobEnd::Stopped),
                _ = tokio::time::sleep(retry_wait), if retry_wait != std::time::Duration::MAX => { sending.dry = false; continue }
            };
            if let Some(joined) = joined {
                self.joined(
                    joined,
                    &mut sending.in_flight,
                    meter,
                    &mut sending.next_retry,
                    job_id,
                )
                .await?;
            }
        }
    }

    /// Claims up to `want` recipients under `node`'s lease, reads their addresses'
    /// suppressions once, and starts a delivery task for each. A store that is
    /// unavailable stalls the job and sets when to claim again.
    async fn claim(
        &self,
        ctx: &Arc<JobContext>,
        node: String,
        want: usize,
        sending: &mut Sending,
    ) -> Result<(), RunnerError> {
        let inner = &self.inner;
        let store = &inner.store;
        let job_id = ctx.job_id;
        // Read before the claim reads the subscribers: see `Store::status_epoch`.
        let epoch = store.status_epoch();
        let claimed = match store.claim(&node, job_id, want, now_ms()).await {
            Ok(claimed) => claimed,
            Err(e) if e.is_unavailable() => {
                inner.stalls.stall(job_id, &e);
                sending.claim_after = Some(tokio::time::Instant::now() + sending.store_backoff.next());
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if sending.claim_after.take().is_some() {
            sending.store_backoff.reset();
            inner.stalls.clear(job_id);
        }
        if claimed.len() < want {
            sending.dry = true;
            sending.next_retry = match store.next_retry_at(job_id).await {
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
            let handle = sending
                .running
                .spawn(async move { runner.deliver(&ctx, claimed).await }.instrument(span));
            sending
                .in_flight
                .insert(handle.id(), (subscriber_id, node.clone()));
        }
        Ok(())
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
}
