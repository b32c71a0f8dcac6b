//! Jobs and per-recipient delivery state in redb. Every change of a delivery's state
//! goes through `Tables::set_state`, which keeps the delivery row, the state index, the
//! retry schedule and the job's counts in step inside the same transaction.

use redb::{ReadableTable, Table, WriteTransaction};

use super::lists::next_id;
use super::tables::*;
use super::{RedbStore, decode, encode, events};
use crate::domain::*;
use crate::events::job_changed;
use crate::store::{ClaimedRecipient, IdempotencyKey, JobChange, Jobs, NewJob, StoreError, wrong_state};

pub(super) fn job_in(txn: &WriteTransaction, id: u64) -> Result<Job, StoreError> {
    let table = txn.open_table(JOBS)?;
    let job = table.get(id)?.ok_or_else(|| StoreError::not_found("job", id))?;
    decode(job.value())
}

pub(super) fn put_job(txn: &WriteTransaction, job: &Job) -> Result<(), StoreError> {
    txn.open_table(JOBS)?.insert(job.id, encode(job).as_slice())?;
    Ok(())
}

/// Adds pending deliveries to `job` (counted in it, which the caller stores) for the
/// recipients it does not have yet; returns how many.
pub(super) fn add_pending(
    txn: &WriteTransaction,
    job: &mut Job,
    recipients: Vec<(u64, String)>,
) -> Result<u64, StoreError> {
    let mut t = Tables::open(txn)?;
    let mut added = 0;
    for (subscriber_id, email) in recipients {
        if t.deliveries.get((job.id, subscriber_id))?.is_some() {
            continue;
        }
        let delivery = Delivery {
            job_id: job.id,
            subscriber_id,
            email,
            attempts: 0,
            state: DeliveryState::Pending,
        };
        t.deliveries
            .insert((job.id, subscriber_id), encode(&delivery).as_slice())?;
        t.index(&delivery)?;
        added += 1;
    }
    job.counts.pending += added;
    Ok(added)
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct IdempotencyRecord {
    pub(super) request_hash: String,
    pub(super) job_id: u64,
    pub(super) created_at: u64,
}

/// The tables a delivery state change touches, opened once per operation.
struct Tables<'t> {
    deliveries: Table<'t, (u64, u64), &'static [u8]>,
    states: Table<'t, (u64, u8, u64), ()>,
    retries: Table<'t, (u64, u64, u64), ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            deliveries: txn.open_table(DELIVERIES)?,
            states: txn.open_table(DELIVERY_STATES)?,
            retries: txn.open_table(RETRY_SCHEDULE)?,
        })
    }

    fn get(&self, job_id: u64, subscriber_id: u64) -> Result<Delivery, StoreError> {
        let row = self.deliveries.get((job_id, subscriber_id))?.ok_or_else(|| {
            StoreError::Inconsistent(format!("job {job_id} has no delivery {subscriber_id}"))
        })?;
        decode(row.value())
    }

    /// Up to `max` subscriber ids of `job`'s deliveries in state `kind`, in id order.
    fn ids_in(&self, job_id: u64, kind: StateKind, max: usize) -> Result<Vec<u64>, StoreError> {
        let code = kind.code();
        self.states
            .range((job_id, code, 0)..=(job_id, code, u64::MAX))?
            .take(max)
            .map(|row| row.map(|(k, _)| k.value().2).map_err(StoreError::from))
            .collect()
    }

    /// Moves one delivery to `state`, keeping index, schedule and counts in step.
    fn set_state(
        &mut self,
        job: &mut Job,
        delivery: &mut Delivery,
        state: DeliveryState,
    ) -> Result<(), StoreError> {
        let (job_id, sid) = (job.id, delivery.subscriber_id);
        self.states.remove((job_id, delivery.state.kind().code(), sid))?;
        if let DeliveryState::Retrying {
            next_attempt_at_ms, ..
        } = delivery.state
        {
            self.retries.remove((job_id, next_attempt_at_ms, sid))?;
        }
        let old = job.counts.slot(&delivery.state);
        *old = old.saturating_sub(1);
        delivery.state = state;
        *job.counts.slot(&delivery.state) += 1;
        self.index(delivery)?;
        self.deliveries
            .insert((job_id, sid), encode(delivery).as_slice())?;
        Ok(())
    }

    fn index(&mut self, delivery: &Delivery) -> Result<(), StoreError> {
        let (job_id, sid) = (delivery.job_id, delivery.subscriber_id);
        self.states
            .insert((job_id, delivery.state.kind().code(), sid), ())?;
        if let DeliveryState::Retrying {
            next_attempt_at_ms, ..
        } = delivery.state
        {
            self.retries.insert((job_id, next_attempt_at_ms, sid), ())?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Jobs for RedbStore {
    /// Stores a new job, giving it an id. With an idempotency key, the key is recorded
    /// in the same transaction; if it was recorded before, nothing is created and the
    /// earlier job is returned (same request) or the reuse refused (different request).
    async fn create_job(
        &self,
        mut job: Job,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<NewJob, StoreError> {
        self.write(move |txn| {
            if let Some(key) = &idempotency {
                let keys = txn.open_table(IDEMPOTENCY_KEYS)?;
                if let Some(row) = keys.get(key.key.as_str())? {
                    let earlier: IdempotencyRecord = decode(row.value())?;
                    if earlier.request_hash != key.request_hash {
                        return Ok(NewJob::KeyReused);
                    }
                    return Ok(NewJob::Existing(job_in(txn, earlier.job_id)?));
                }
            }
            job.id = next_id(txn, "job")?;
            put_job(txn, &job)?;
            events::append(txn, job_changed(None, &job))?;
            if let Some(key) = idempotency {
                let record = IdempotencyRecord {
                    request_hash: key.request_hash,
                    job_id: job.id,
                    created_at: now(),
                };
                txn.open_table(IDEMPOTENCY_KEYS)?
                    .insert(key.key.as_str(), encode(&record).as_slice())?;
            }
            Ok(NewJob::Created(job))
        })
        .await
    }

    /// The keys are not indexed by time: one pass over the table (one key per job sent
    /// with one), in the writer like every write.
    async fn prune_idempotency_keys(&self, created_before: u64, limit: usize) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut keys = txn.open_table(IDEMPOTENCY_KEYS)?;
            let mut old = Vec::new();
            for row in keys.iter()? {
                let (key, value) = row?;
                let record: IdempotencyRecord = decode(value.value())?;
                if record.created_at < created_before {
                    old.push(key.value().to_string());
                    if old.len() >= limit {
                        break;
                    }
                }
            }
            for key in &old {
                keys.remove(key.as_str())?;
            }
            Ok(old.len())
        })
        .await
    }

    async fn job(&self, id: u64) -> Result<Job, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(JOBS)?;
            let row = table.get(id)?.ok_or_else(|| StoreError::not_found("job", id))?;
            decode(row.value())
        })
        .await
    }

    /// Jobs a restart must look at: unfinished ones (to resume), any with recipients
    /// left in flight (to requeue them), and cancelled ones whose cancellation had not
    /// finished marking recipients.
    async fn jobs_to_work(&self) -> Result<Vec<Job>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(JOBS)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let job: Job = decode(row?.1.value())?;
                let cancelling = job.state == JobState::Cancelled && job.counts.open() > 0;
                if job.state.is_unfinished() || cancelling {
                    out.push(job);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Jobs newest first, optionally only those in `state`, with ids below `before`.
    async fn list_jobs(
        &self,
        state: Option<JobState>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(JOBS)?;
            let end = before.unwrap_or(u64::MAX);
            let mut out = Vec::with_capacity(limit.min(1024));
            for row in table.range(..end)?.rev() {
                if out.len() == limit {
                    break;
                }
                let job: Job = decode(row?.1.value())?;
                if state.is_none_or(|s| s == job.state) {
                    out.push(job);
                }
            }
            Ok(out)
        })
        .await
    }

    /// How many jobs are in each state, and how many recipients the unfinished ones still
    /// have to deliver (pending, sending or waiting for a retry). Read per metrics scrape.
    async fn job_overview(&self) -> Result<JobOverview, StoreError> {
        self.read(|txn| {
            let mut overview = JobOverview::default();
            for row in txn.open_table(JOBS)?.iter()? {
                let job: Job = decode(row?.1.value())?;
                *overview.by_state.entry(job.state).or_default() += 1;
                if job.state.is_unfinished() {
                    overview.open_recipients += job.counts.pending + job.counts.sending + job.counts.retrying;
                }
            }
            Ok(overview)
        })
        .await
    }

    async fn change_job(
        &self,
        id: u64,
        from: Option<&'static [JobState]>,
        change: JobChange,
    ) -> Result<Job, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, id)?;
            if let Some(from) = from
                && !from.contains(&job.state)
            {
                return Err(wrong_state(&job, from));
            }
            let before = job.clone();
            change(&mut job);
            put_job(txn, &job)?;
            events::append(txn, job_changed(Some(&before), &job))?;
            Ok(job)
        })
        .await
    }

    /// Records part of a job's recipient snapshot: a pending delivery for each recipient
    /// not recorded yet (so re-running after a crash is harmless).
    async fn add_recipients(&self, job_id: u64, recipients: Vec<(u64, String)>) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let added = add_pending(txn, &mut job, recipients)?;
            put_job(txn, &job)?;
            Ok(added)
        })
        .await
    }

    /// Claims up to `max` recipients of a job, durably moving them to `sending` before any
    /// of their messages is sent: first the retries due at `now_ms`, then pending ones in
    /// subscriber order. Each claim counts as an attempt. Each comes with its subscriber
    /// as of the claim (`None` if it was deleted), read in the same transaction.
    /// One process holds a redb file, so claims need no owner.
    async fn claim(
        &self,
        _node: &str,
        job_id: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<ClaimedRecipient>, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let subscribers = txn.open_table(SUBSCRIBERS)?;
            let mut t = Tables::open(txn)?;
            let mut ids: Vec<u64> = t
                .retries
                .range((job_id, 0, 0)..=(job_id, now_ms, u64::MAX))?
                .take(max)
                .map(|row| row.map(|(k, _)| k.value().2))
                .collect::<Result<_, _>>()?;
            ids.extend(t.ids_in(job_id, StateKind::Pending, max - ids.len())?);
            let since = now();
            let mut claimed = Vec::with_capacity(ids.len());
            for sid in ids {
                let mut delivery = t.get(job_id, sid)?;
                delivery.attempts += 1;
                t.set_state(&mut job, &mut delivery, DeliveryState::Sending { since })?;
                let subscriber = match subscribers.get((job.newsletter_id, sid))? {
                    Some(row) => Some(decode(row.value())?),
                    None => None,
                };
                claimed.push((delivery, subscriber));
            }
            put_job(txn, &job)?;
            Ok(claimed)
        })
        .await
    }

    /// Records the outcomes of claimed deliveries (sending → delivered | skipped |
    /// retrying | failed). All of them must be in flight, or nothing is recorded.
    async fn record(
        &self,
        _node: &str,
        job_id: u64,
        outcomes: Vec<(u64, Outcome)>,
    ) -> Result<Job, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let mut t = Tables::open(txn)?;
            let mut rows = Vec::with_capacity(outcomes.len());
            for (sid, outcome) in outcomes {
                let delivery = t.get(job_id, sid)?;
                if !matches!(delivery.state, DeliveryState::Sending { .. }) {
                    return Err(StoreError::Conflict(format!(
                        "delivery {sid} of job {job_id} is not in flight ({})",
                        delivery.state.kind().as_str()
                    )));
                }
                rows.push((delivery, outcome));
            }
            let at = now();
            let mut failed = Vec::new();
            for (mut delivery, outcome) in rows {
                if !outcome.is_attempt() {
                    delivery.attempts = delivery.attempts.saturating_sub(1);
                }
                t.set_state(&mut job, &mut delivery, outcome.into_state(at))?;
                if let DeliveryState::Failed { reason, .. } = &delivery.state {
                    failed.push(crate::events::delivery_failed(
                        &job,
                        delivery.subscriber_id,
                        &delivery.email,
                        reason,
                        delivery.attempts,
                    ));
                }
            }
            drop(t);
            put_job(txn, &job)?;
            events::append(txn, failed)?;
            Ok(job)
        })
        .await
    }

    /// When the earliest retry of a job is due (unix ms), if it has any.
    async fn next_retry_at(&self, job_id: u64) -> Result<Option<u64>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(RETRY_SCHEDULE)?;
            let first = table
                .range((job_id, 0, 0)..=(job_id, u64::MAX, u64::MAX))?
                .next()
                .transpose()?;
            Ok(first.map(|(k, _)| k.value().1))
        })
        .await
    }

    /// Marks up to `max` of a cancelled job's pending or retrying recipients cancelled.
    /// Returns how many it marked; call again until that is 0.
    async fn release_claims(&self, _node: &str, job_id: u64) -> Result<u64, StoreError> {
        self.requeue_inflight(job_id).await
    }

    async fn cancel_open(&self, job_id: u64, max: usize) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let mut t = Tables::open(txn)?;
            let mut ids = t.ids_in(job_id, StateKind::Pending, max)?;
            ids.extend(t.ids_in(job_id, StateKind::Retrying, max - ids.len())?);
            let at = now();
            for &sid in &ids {
                let mut delivery = t.get(job_id, sid)?;
                t.set_state(&mut job, &mut delivery, DeliveryState::Cancelled { at })?;
            }
            put_job(txn, &job)?;
            Ok(ids.len() as u64)
        })
        .await
    }

    /// Puts up to `max` failed recipients of a job back in `pending` with a fresh attempt
    /// budget. A completed job is running again from the first call. Returns how many it
    /// requeued; call again until that is 0.
    async fn requeue_failed(&self, job_id: u64, max: usize) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let mut t = Tables::open(txn)?;
            let ids = t.ids_in(job_id, StateKind::Failed, max)?;
            for &sid in &ids {
                let mut delivery = t.get(job_id, sid)?;
                delivery.attempts = 0;
                t.set_state(&mut job, &mut delivery, DeliveryState::Pending)?;
            }
            let before = job.clone();
            if !ids.is_empty() && job.state == JobState::Completed {
                job.state = JobState::Running;
                job.finished_at = None;
            }
            drop(t);
            put_job(txn, &job)?;
            events::append(txn, job_changed(Some(&before), &job))?;
            Ok(ids.len() as u64)
        })
        .await
    }

    /// Completes a running job if none of its recipients needs more work. Returns the
    /// job and whether it is now completed.
    async fn start_job(&self, job_id: u64, max_running: u32) -> Result<(Job, bool), StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            if job.state != JobState::Queued {
                let running = job.state == JobState::Running;
                return Ok((job, running));
            }
            let (mut running, mut queued_before) = (0u64, 0u64);
            for row in txn.open_table(JOBS)?.iter()? {
                let (id, value) = row?;
                let other: Job = decode(value.value())?;
                match other.state {
                    JobState::Running => running += 1,
                    JobState::Queued if id.value() < job_id => queued_before += 1,
                    _ => {}
                }
            }
            if running + queued_before >= u64::from(max_running.max(1)) {
                return Ok((job, false));
            }
            let before = job.clone();
            job.state = JobState::Running;
            job.started_at.get_or_insert_with(now);
            put_job(txn, &job)?;
            events::append(txn, job_changed(Some(&before), &job))?;
            Ok((job, true))
        })
        .await
    }

    async fn complete_if_done(&self, job_id: u64) -> Result<(Job, bool), StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            if job.state != JobState::Running || job.counts.open() > 0 {
                return Ok((job, false));
            }
            let before = job.clone();
            job.state = JobState::Completed;
            job.finished_at = Some(now());
            put_job(txn, &job)?;
            events::append(txn, job_changed(Some(&before), &job))?;
            Ok((job, true))
        })
        .await
    }

    /// Up to `limit` deliveries of a job with subscriber ids greater than `after`, all of
    /// them or only those in state `kind`, in subscriber id order.
    async fn deliveries(
        &self,
        job_id: u64,
        kind: Option<StateKind>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.read(move |txn| {
            let deliveries = txn.open_table(DELIVERIES)?;
            let Some(start) = after.checked_add(1) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::with_capacity(limit.min(1024));
            match kind {
                None => {
                    for row in deliveries
                        .range((job_id, start)..=(job_id, u64::MAX))?
                        .take(limit)
                    {
                        out.push(decode(row?.1.value())?);
                    }
                }
                Some(kind) => {
                    let states = txn.open_table(DELIVERY_STATES)?;
                    let code = kind.code();
                    for row in states
                        .range((job_id, code, start)..=(job_id, code, u64::MAX))?
                        .take(limit)
                    {
                        let key = (job_id, row?.0.value().2);
                        let delivery = deliveries.get(key)?.ok_or_else(|| {
                            StoreError::Inconsistent(format!("state index names missing delivery {key:?}"))
                        })?;
                        out.push(decode(delivery.value())?);
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}

impl RedbStore {
    /// After a crash: puts every recipient that was in flight back in `pending` and counts
    /// them in `resent_after_crash`. Returns how many there were.
    pub(super) async fn requeue_inflight(&self, job_id: u64) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let mut t = Tables::open(txn)?;
            let ids = t.ids_in(job_id, StateKind::Sending, usize::MAX)?;
            for &sid in &ids {
                let mut delivery = t.get(job_id, sid)?;
                t.set_state(&mut job, &mut delivery, DeliveryState::Pending)?;
            }
            job.resent_after_crash += ids.len() as u64;
            put_job(txn, &job)?;
            Ok(ids.len() as u64)
        })
        .await
    }
}
