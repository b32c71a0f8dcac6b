//! Jobs, idempotency keys and the `Jobs` methods in PostgreSQL; the per-recipient
//! work (claims, records, state moves) is in `deliveries.rs`.
//!
//! A delivery's state, its `due_ms` and the job's counts change in one transaction.
//! Counts change by increments (`apply_counts`), the last statement before the commit,
//! so concurrent claims and records of one job (from any node) hold the job's row only
//! briefly and never lose an update.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::deliveries::{delivery, job_basics, move_state, state_code};
use super::{PgStore, commit, domain_int, events, execute, query, query_opt, sql_int, sql_limit};
use crate::domain::*;
use crate::events::job_changed;
use crate::store::{ClaimedRecipient, IdempotencyKey, JobChange, Jobs, NewJob, StoreError, wrong_state};

pub(super) const JOB_COLUMNS: &str =
    "doc, state, pending, sending, delivered, skipped, retrying, failed, cancelled, resent_after_crash";

/// A row of `JOB_COLUMNS`: the document, with the columns that are the truth.
pub(super) fn job(row: &Row) -> Result<Job, StoreError> {
    let mut job: Job = serde_json::from_value(row.get(0))?;
    let state: &str = row.get(1);
    job.state = JobState::parse(state)
        .ok_or_else(|| StoreError::Inconsistent(format!("unknown job state {state:?}")))?;
    job.counts = Counts {
        pending: domain_int(row.get(2)),
        sending: domain_int(row.get(3)),
        delivered: domain_int(row.get(4)),
        skipped: domain_int(row.get(5)),
        retrying: domain_int(row.get(6)),
        failed: domain_int(row.get(7)),
        cancelled: domain_int(row.get(8)),
    };
    job.resent_after_crash = domain_int(row.get(9));
    Ok(job)
}

/// The job, locked for the rest of the transaction.
async fn job_for_update(tx: &impl GenericClient, id: u64) -> Result<Job, StoreError> {
    let row = query_opt(
        tx,
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"),
        &[&sql_int(id)],
    )
    .await?
    .ok_or_else(|| StoreError::not_found("job", id))?;
    job(&row)
}

/// Writes the whole job (the caller holds its row lock).
pub(super) async fn put_job(tx: &impl GenericClient, job: &Job) -> Result<(), StoreError> {
    let c = job.counts;
    execute(
        tx,
        "UPDATE jobs SET state = $2, doc = $3, pending = $4, sending = $5, delivered = $6, skipped = $7,
                retrying = $8, failed = $9, cancelled = $10, resent_after_crash = $11
         WHERE id = $1",
        &[
            &sql_int(job.id),
            &job.state.as_str(),
            &serde_json::to_value(job)?,
            &sql_int(c.pending),
            &sql_int(c.sending),
            &sql_int(c.delivered),
            &sql_int(c.skipped),
            &sql_int(c.retrying),
            &sql_int(c.failed),
            &sql_int(c.cancelled),
            &sql_int(job.resent_after_crash),
        ],
    )
    .await?;
    Ok(())
}

/// Changes in a job's counts, by `StateKind::code`.
#[derive(Default)]
pub(super) struct Delta(pub(super) [i64; 7]);

impl Delta {
    pub(super) fn moved(&mut self, from: StateKind, to: StateKind, n: i64) {
        self.0[from.code() as usize] -= n;
        self.0[to.code() as usize] += n;
    }
}

/// Adds `delta` to the job's counts (and `resent` to `resent_after_crash`); returns the
/// job as it now is. The last statement of a transaction: it locks the job's row.
pub(super) async fn apply_counts(
    tx: &impl GenericClient,
    job_id: u64,
    delta: &Delta,
    resent: i64,
) -> Result<Job, StoreError> {
    let d = &delta.0;
    let row = query_opt(
        tx,
        &format!(
            "UPDATE jobs SET pending = pending + $2, sending = sending + $3, delivered = delivered + $4,
                    skipped = skipped + $5, retrying = retrying + $6, failed = failed + $7,
                    cancelled = cancelled + $8, resent_after_crash = resent_after_crash + $9
             WHERE id = $1 RETURNING {JOB_COLUMNS}"
        ),
        &[
            &sql_int(job_id),
            &d[0],
            &d[1],
            &d[2],
            &d[3],
            &d[4],
            &d[5],
            &d[6],
            &resent,
        ],
    )
    .await?
    .ok_or_else(|| StoreError::not_found("job", job_id))?;
    job(&row)
}

#[async_trait::async_trait]
impl Jobs for PgStore {
    async fn create_job(
        &self,
        mut job: Job,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<NewJob, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(key) = &idempotency {
            // Two nodes given the same key at once: the second waits here, then finds
            // the first one's job.
            execute(
                &tx,
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&key.key],
            )
            .await?;
            let earlier = query_opt(
                &tx,
                "SELECT request_hash, job_id FROM idempotency_keys WHERE key = $1",
                &[&key.key],
            )
            .await?;
            if let Some(earlier) = earlier {
                if earlier.get::<_, &str>(0) != key.request_hash {
                    return Ok(NewJob::KeyReused);
                }
                let id = domain_int(earlier.get(1));
                let row = query_opt(
                    &tx,
                    &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
                    &[&sql_int(id)],
                )
                .await?
                .ok_or_else(|| StoreError::Inconsistent(format!("idempotency key names missing job {id}")))?;
                return Ok(NewJob::Existing(self::job(&row)?));
            }
        }
        // An edit or deletion of the letter (which locks it for update) waits for this
        // job to commit, then sees it and is refused; or this waits for the edit, and
        // the job sends the edited letter. Never a job that sends two versions.
        execute(
            &tx,
            "SELECT 1 FROM letters WHERE id = $1 FOR SHARE",
            &[&sql_int(job.letter_id)],
        )
        .await?;
        let id = query(&tx, "SELECT nextval(pg_get_serial_sequence('jobs', 'id'))", &[]).await?;
        job.id = domain_int(id[0].get(0));
        // The row, then every column through the one writer of a whole job.
        execute(
            &tx,
            "INSERT INTO jobs (id, newsletter_id, state, doc) VALUES ($1, $2, $3, '{}')",
            &[&sql_int(job.id), &sql_int(job.newsletter_id), &job.state.as_str()],
        )
        .await?;
        put_job(&tx, &job).await?;
        if let Some(key) = idempotency {
            execute(
                &tx,
                "INSERT INTO idempotency_keys (key, request_hash, job_id, created_at) VALUES ($1, $2, $3, $4)",
                &[&key.key, &key.request_hash, &sql_int(job.id), &sql_int(now())],
            )
            .await?;
        }
        let appended = events::append(&tx, job_changed(None, &job)).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok(NewJob::Created(job))
    }

    /// One statement; `SKIP LOCKED` so that nodes pruning at the same time, or a
    /// request replaying a key, never wait on each other.
    async fn prune_idempotency_keys(&self, created_before: u64, limit: usize) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let pruned = execute(
            &client,
            "DELETE FROM idempotency_keys WHERE key IN (
                 SELECT key FROM idempotency_keys WHERE created_at < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&sql_int(created_before), &sql_limit(limit)],
        )
        .await?;
        Ok(pruned as usize)
    }

    async fn job(&self, id: u64) -> Result<Job, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
            &[&sql_int(id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("job", id))?;
        job(&row)
    }

    async fn jobs_to_work(&self) -> Result<Vec<Job>, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs
                 WHERE state IN ('scheduled', 'queued', 'running')
                    OR (state = 'cancelled' AND pending + sending + retrying > 0)
                 ORDER BY id"
            ),
            &[],
        )
        .await?;
        rows.iter().map(job).collect()
    }

    async fn list_jobs(
        &self,
        state: Option<JobState>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::text IS NULL OR state = $1) AND id < $2
                 ORDER BY id DESC LIMIT $3"
            ),
            &[
                &state.map(JobState::as_str),
                &before.map_or(i64::MAX, sql_int),
                &sql_limit(limit),
            ],
        )
        .await?;
        rows.iter().map(job).collect()
    }

    async fn job_overview(&self) -> Result<JobOverview, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT state, count(*), coalesce(sum(pending + sending + retrying), 0)::bigint
             FROM jobs GROUP BY state",
            &[],
        )
        .await?;
        let mut overview = JobOverview::default();
        for row in rows {
            let name: &str = row.get(0);
            let state = JobState::parse(name)
                .ok_or_else(|| StoreError::Inconsistent(format!("unknown job state {name:?}")))?;
            overview.by_state.insert(state, domain_int(row.get(1)));
            if state.is_unfinished() {
                overview.open_recipients += domain_int(row.get(2));
            }
        }
        Ok(overview)
    }

    async fn change_job(
        &self,
        id: u64,
        from: Option<&'static [JobState]>,
        change: JobChange,
    ) -> Result<Job, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut job = job_for_update(&tx, id).await?;
        if let Some(from) = from
            && !from.contains(&job.state)
        {
            return Err(wrong_state(&job, from));
        }
        let before = job.clone();
        change(&mut job);
        put_job(&tx, &job).await?;
        let appended = events::append(&tx, job_changed(Some(&before), &job)).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok(job)
    }

    async fn start_job(&self, job_id: u64, max_running: u32) -> Result<(Job, bool), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // One slot decision at a time across the fleet.
        execute(
            &tx,
            "SELECT pg_advisory_xact_lock(hashtextextended('letterbox:job-slots', 0))",
            &[],
        )
        .await?;
        let mut job = job_for_update(&tx, job_id).await?;
        if job.state != JobState::Queued {
            let running = job.state == JobState::Running;
            return Ok((job, running));
        }
        let taken = query(
            &tx,
            "SELECT count(*) FILTER (WHERE state = 'running')
                  + count(*) FILTER (WHERE state = 'queued' AND id < $1)
             FROM jobs WHERE state IN ('running', 'queued')",
            &[&sql_int(job_id)],
        )
        .await?;
        if domain_int(taken[0].get(0)) >= u64::from(max_running.max(1)) {
            return Ok((job, false));
        }
        let before = job.clone();
        job.state = JobState::Running;
        job.started_at.get_or_insert_with(now);
        put_job(&tx, &job).await?;
        let appended = events::append(&tx, job_changed(Some(&before), &job)).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok((job, true))
    }

    async fn complete_if_done(&self, job_id: u64) -> Result<(Job, bool), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut job = job_for_update(&tx, job_id).await?;
        if job.state != JobState::Running || job.counts.open() > 0 {
            return Ok((job, false));
        }
        let before = job.clone();
        job.state = JobState::Completed;
        job.finished_at = Some(now());
        put_job(&tx, &job).await?;
        let appended = events::append(&tx, job_changed(Some(&before), &job)).await?;
        commit(tx).await?;
        self.published(&appended);
        self.claim_hints.forget(job_id);
        Ok((job, true))
    }

    async fn add_recipients(&self, job_id: u64, recipients: Vec<(u64, String)>) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        job_basics(&tx, job_id).await?;
        let (ids, emails): (Vec<i64>, Vec<String>) = recipients
            .into_iter()
            .map(|(id, email)| (sql_int(id), email))
            .unzip();
        let pending = serde_json::to_value(DeliveryState::Pending)?;
        let added = execute(
            &tx,
            "INSERT INTO deliveries (job_id, subscriber_id, state, attempts, email, detail)
             SELECT $1, u.id, 0, 0, u.email, $4 FROM unnest($2::bigint[], $3::text[]) AS u(id, email)
             ON CONFLICT (job_id, subscriber_id) DO NOTHING",
            &[&sql_int(job_id), &ids, &emails, &pending],
        )
        .await?;
        let mut delta = Delta::default();
        delta.0[StateKind::Pending.code() as usize] = added as i64;
        apply_counts(&tx, job_id, &delta, 0).await?;
        commit(tx).await?;
        Ok(added)
    }

    async fn claim(
        &self,
        node: &str,
        job_id: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<ClaimedRecipient>, StoreError> {
        self.claim_recipients(node, job_id, max, now_ms).await
    }

    async fn record(
        &self,
        node: &str,
        job_id: u64,
        outcomes: Vec<(u64, Outcome)>,
    ) -> Result<Job, StoreError> {
        self.record_outcomes(node, job_id, outcomes).await
    }

    async fn next_retry_at(&self, job_id: u64) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = query(
            &client,
            "SELECT min(due_ms) FROM deliveries WHERE job_id = $1 AND state = 4",
            &[&sql_int(job_id)],
        )
        .await?;
        Ok(row[0].get::<_, Option<i64>>(0).map(domain_int))
    }

    async fn release_claims(&self, node: &str, job_id: u64) -> Result<u64, StoreError> {
        self.claim_hints.forget(job_id);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        job_basics(&tx, job_id).await?;
        let pending = serde_json::to_value(DeliveryState::Pending)?;
        let n = execute(
            &tx,
            "UPDATE deliveries SET state = 0, detail = $3, claimed_by = NULL
             WHERE job_id = $1 AND state = 1 AND claimed_by = $2",
            &[&sql_int(job_id), &node, &pending],
        )
        .await?;
        if n > 0 {
            let mut delta = Delta::default();
            delta.moved(StateKind::Sending, StateKind::Pending, n as i64);
            apply_counts(&tx, job_id, &delta, n as i64).await?;
        }
        commit(tx).await?;
        Ok(n)
    }

    async fn cancel_open(&self, job_id: u64, max: usize) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        job_basics(&tx, job_id).await?;
        let moved = move_state(
            &tx,
            job_id,
            &[StateKind::Pending, StateKind::Retrying],
            &DeliveryState::Cancelled { at: now() },
            false,
            max,
        )
        .await?;
        let mut delta = Delta::default();
        for from in &moved {
            delta.moved(*from, StateKind::Cancelled, 1);
        }
        apply_counts(&tx, job_id, &delta, 0).await?;
        commit(tx).await?;
        Ok(moved.len() as u64)
    }

    async fn requeue_failed(&self, job_id: u64, max: usize) -> Result<u64, StoreError> {
        self.claim_hints.forget(job_id);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        job_basics(&tx, job_id).await?;
        let moved = move_state(
            &tx,
            job_id,
            &[StateKind::Failed],
            &DeliveryState::Pending,
            true,
            max,
        )
        .await?;
        let n = moved.len() as i64;
        let mut delta = Delta::default();
        delta.moved(StateKind::Failed, StateKind::Pending, n);
        let mut job = apply_counts(&tx, job_id, &delta, 0).await?;
        let before = job.clone();
        if n > 0 && job.state == JobState::Completed {
            job.state = JobState::Running;
            job.finished_at = None;
            put_job(&tx, &job).await?;
        }
        let appended = events::append(&tx, job_changed(Some(&before), &job)).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok(moved.len() as u64)
    }

    async fn deliveries(
        &self,
        job_id: u64,
        kind: Option<StateKind>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let client = self.client().await?;
        let rows = match kind {
            None => {
                query(
                    &client,
                    "SELECT subscriber_id, email, attempts, detail FROM deliveries
                     WHERE job_id = $1 AND subscriber_id > $2 ORDER BY subscriber_id LIMIT $3",
                    &[&sql_int(job_id), &sql_int(after), &sql_limit(limit)],
                )
                .await?
            }
            Some(kind) => {
                query(
                    &client,
                    "SELECT subscriber_id, email, attempts, detail FROM deliveries
                     WHERE job_id = $1 AND state = $2 AND subscriber_id > $3 ORDER BY subscriber_id LIMIT $4",
                    &[
                        &sql_int(job_id),
                        &state_code(kind),
                        &sql_int(after),
                        &sql_limit(limit),
                    ],
                )
                .await?
            }
        };
        rows.iter().map(|row| delivery(job_id, row)).collect()
    }
}
