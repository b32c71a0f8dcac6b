//! Per-recipient delivery state in PostgreSQL: claiming recipients (with where each
//! job's next claim starts looking, `ClaimHints`), recording their outcomes under
//! fencing, and moving them between states. `jobs.rs` owns the job rows and their
//! counts, and the `Jobs` methods, which call in here.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::jobs::{Delta, apply_counts};
use super::lists::{SUBSCRIBER_COLUMNS, subscriber};
use super::{PgStore, commit, domain_int, events, query, query_opt, sql_int, sql_limit};
use crate::domain::*;
use crate::events::delivery_failed;
use crate::store::{ClaimedRecipient, StoreError};

/// What a claim needs to know of a job before it starts.
pub(super) struct JobBasics {
    pub(super) newsletter_id: u64,
    pub(super) pending: u64,
    pub(super) retrying: u64,
}

/// The job's newsletter and how many recipients it has pending and retrying; `NotFound`
/// if there is no such job. Takes no lock.
pub(super) async fn job_basics(tx: &impl GenericClient, id: u64) -> Result<JobBasics, StoreError> {
    let row = query_opt(
        tx,
        "SELECT newsletter_id, pending, retrying FROM jobs WHERE id = $1",
        &[&sql_int(id)],
    )
    .await?
    .ok_or_else(|| StoreError::not_found("job", id))?;
    Ok(JobBasics {
        newsletter_id: domain_int(row.get(0)),
        pending: domain_int(row.get(1)),
        retrying: domain_int(row.get(2)),
    })
}

/// Where this node's next claim of each job's pending recipients starts looking: after
/// the highest subscriber id it claimed last.
///
/// Why: a claim is an index range scan of `deliveries_by_state` for the job's pending
/// rows, and every recipient claimed so far has left a dead entry at the front of that
/// range (its row moved to `sending`; the entry stays until vacuum). Scanning from the
/// start walked all of them: at 200,000 recipients ~30% of PostgreSQL's CPU in a send
/// went to `_bt_first` stepping over dead entries. Starting after the last claim skips
/// them.
///
/// Only a place to start, never a promise: rows can become pending again behind it (a
/// release, retry-failed, the rescue of a dead node's claims), so a claim that finds fewer rows than
/// it wants while the job's count says more are pending looks again from the start.
/// Releases made through this node forget the hints, so those rows go out first.
#[derive(Default)]
pub(super) struct ClaimHints(std::sync::Mutex<std::collections::HashMap<u64, u64>>);

impl ClaimHints {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u64>> {
        // A panic while holding it cannot leave the map wrong: every value is a hint.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn after(&self, job_id: u64) -> u64 {
        self.map().get(&job_id).copied().unwrap_or(0)
    }

    fn claimed_up_to(&self, job_id: u64, subscriber_id: u64) {
        let mut map = self.map();
        let hint = map.entry(job_id).or_default();
        *hint = (*hint).max(subscriber_id);
    }

    /// Every job's claims start from the front again.
    pub(super) fn forget_all(&self) {
        self.map().clear();
    }

    pub(super) fn forget(&self, job_id: u64) {
        self.map().remove(&job_id);
    }
}

/// A delivery from `subscriber_id, email, attempts, detail`.
pub(super) fn delivery(job_id: u64, row: &Row) -> Result<Delivery, StoreError> {
    Ok(Delivery {
        job_id,
        subscriber_id: domain_int(row.get(0)),
        email: row.get(1),
        attempts: u32::try_from(row.get::<_, i32>(2)).unwrap_or(0),
        state: serde_json::from_value(row.get(3))?,
    })
}

pub(super) fn state_code(kind: StateKind) -> i16 {
    i16::from(kind.code())
}

/// The state a `state` column holds; `None` for a code this binary does not know.
fn state_kind(code: i16) -> Option<StateKind> {
    StateKind::ALL.into_iter().find(|k| state_code(*k) == code)
}

/// The retry time a state is indexed under.
pub(super) fn due_ms(state: &DeliveryState) -> Option<i64> {
    match state {
        DeliveryState::Retrying {
            next_attempt_at_ms, ..
        } => Some(sql_int(*next_attempt_at_ms)),
        _ => None,
    }
}

/// Moves up to `max` of a job's recipients in state `from` (in subscriber order) to
/// `to`, with a fresh attempt budget if `reset_attempts`. Returns how many moved, by
/// their state before.
pub(super) async fn move_state(
    tx: &impl GenericClient,
    job_id: u64,
    from: &[StateKind],
    to: &DeliveryState,
    reset_attempts: bool,
    max: usize,
) -> Result<Vec<StateKind>, StoreError> {
    let from: Vec<i16> = from.iter().map(|k| state_code(*k)).collect();
    let rows = query(
        tx,
        // The locked rows are re-checked against the WHERE clause, and `picked.state` is
        // their state as locked, so a row another transaction moved meanwhile is skipped.
        "WITH picked AS (
             SELECT subscriber_id, state FROM deliveries
             WHERE job_id = $1 AND state = ANY($2) ORDER BY state, subscriber_id LIMIT $3 FOR UPDATE
         )
         UPDATE deliveries d
            SET state = $4, due_ms = $5, detail = $6, claimed_by = NULL,
                attempts = CASE WHEN $7 THEN 0 ELSE d.attempts END
         FROM picked WHERE d.job_id = $1 AND d.subscriber_id = picked.subscriber_id
         RETURNING picked.state",
        &[
            &sql_int(job_id),
            &from,
            &sql_limit(max),
            &state_code(to.kind()),
            &due_ms(to),
            &serde_json::to_value(to)?,
            &reset_attempts,
        ],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let code: i16 = row.get(0);
            state_kind(code).ok_or_else(|| StoreError::Inconsistent(format!("unknown delivery state {code}")))
        })
        .collect()
}

impl PgStore {
    pub(super) async fn claim_recipients(
        &self,
        node: &str,
        job_id: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<ClaimedRecipient>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let JobBasics {
            newsletter_id,
            pending,
            retrying,
        } = job_basics(&tx, job_id).await?;
        let sending = serde_json::to_value(DeliveryState::Sending { since: now() })?;
        // (due, delivery): retries due first, earliest first; then pending by id.
        let mut claimed: Vec<(i64, Delivery)> = Vec::with_capacity(max);
        let mut delta = Delta::default();
        if retrying > 0 {
            let rows = query(
                &tx,
                "WITH picked AS (
                     SELECT subscriber_id, due_ms FROM deliveries
                     WHERE job_id = $1 AND state = 4 AND due_ms <= $2
                     ORDER BY due_ms, subscriber_id LIMIT $3 FOR UPDATE SKIP LOCKED
                 )
                 UPDATE deliveries d
                    SET state = 1, attempts = d.attempts + 1, due_ms = NULL, detail = $4, claimed_by = $5
                 FROM picked WHERE d.job_id = $1 AND d.subscriber_id = picked.subscriber_id
                 RETURNING d.subscriber_id, d.email, d.attempts, d.detail, picked.due_ms",
                &[
                    &sql_int(job_id),
                    &sql_int(now_ms),
                    &sql_limit(max),
                    &sending,
                    &node,
                ],
            )
            .await?;
            for row in &rows {
                claimed.push((row.get(4), delivery(job_id, row)?));
            }
            delta.moved(StateKind::Retrying, StateKind::Sending, rows.len() as i64);
        }
        let hint = self.claim_hints.after(job_id);
        let (mut from, mut taken, mut ahead) = (hint, 0, hint);
        loop {
            let room = max - claimed.len();
            if room == 0 || pending == 0 {
                break;
            }
            let rows = query(
                &tx,
                "WITH picked AS (
                     SELECT subscriber_id FROM deliveries WHERE job_id = $1 AND state = 0 AND subscriber_id > $5
                     ORDER BY subscriber_id LIMIT $2 FOR UPDATE SKIP LOCKED
                 )
                 UPDATE deliveries d SET state = 1, attempts = d.attempts + 1, detail = $3, claimed_by = $4
                 FROM picked WHERE d.job_id = $1 AND d.subscriber_id = picked.subscriber_id
                 RETURNING d.subscriber_id, d.email, d.attempts, d.detail",
                &[&sql_int(job_id), &sql_limit(room), &sending, &node, &sql_int(from)],
            )
            .await?;
            for row in &rows {
                let d = delivery(job_id, row)?;
                if from == hint {
                    ahead = ahead.max(d.subscriber_id);
                }
                claimed.push((i64::MAX, d));
            }
            delta.moved(StateKind::Pending, StateKind::Sending, rows.len() as i64);
            taken += rows.len() as u64;
            // Short after the hint while the job's count says more are pending (as it
            // was read when this transaction began): look once more from the front.
            if from == 0 || rows.len() == room || taken >= pending {
                break;
            }
            from = 0;
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        claimed.sort_by_key(|(due, d)| (*due, d.subscriber_id));
        let ids: Vec<i64> = claimed.iter().map(|(_, d)| sql_int(d.subscriber_id)).collect();
        let rows = query(
            &tx,
            &format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = ANY($1) AND newsletter_id = $2"
            ),
            &[&ids, &sql_int(newsletter_id)],
        )
        .await?;
        let mut subscribers = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let s = subscriber(row)?;
            subscribers.insert(s.id, s);
        }
        apply_counts(&tx, job_id, &delta, 0).await?;
        commit(tx).await?;
        // Only once they are claimed: a claim that fails leaves its rows pending, and
        // they stay in front of where the next one looks.
        if ahead > hint {
            self.claim_hints.claimed_up_to(job_id, ahead);
        }
        Ok(claimed
            .into_iter()
            .map(|(_, d)| {
                let subscriber = subscribers.remove(&d.subscriber_id);
                (d, subscriber)
            })
            .collect())
    }

    pub(super) async fn record_outcomes(
        &self,
        node: &str,
        job_id: u64,
        outcomes: Vec<(u64, Outcome)>,
    ) -> Result<Job, StoreError> {
        let mut client = self.client().await?;
        let ids: Vec<u64> = outcomes.iter().map(|(id, _)| *id).collect();
        let tx = client.transaction().await?;
        match record_in(&tx, node, job_id, outcomes).await {
            Ok(Some((job, appended))) => {
                commit(tx).await?;
                self.published(&appended);
                Ok(job)
            }
            // The rows it changed are released before the refusal is returned, not
            // whenever the dropped transaction's ROLLBACK reaches the server: a claim
            // right after (another connection, SKIP LOCKED) would pass over them.
            Ok(None) => {
                tx.rollback().await?;
                Err(record_refused(&client, node, job_id, &ids).await)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }
}

/// `Jobs::record`'s work inside its transaction: the job as it is after, and the events
/// appended.
///
/// One statement records every outcome, and only where the delivery is still in flight
/// and claimed by `node` (fencing): no row lock is taken before it, and a record costs two
/// statements (this and the job's counts), not four. When fewer rows than outcomes
/// change, the caller rolls back and `record_refused` says why.
async fn record_in(
    tx: &impl GenericClient,
    node: &str,
    job_id: u64,
    outcomes: Vec<(u64, Outcome)>,
) -> Result<Option<(Job, Vec<crate::events::Event>)>, StoreError> {
    let at = now();
    let n = outcomes.len();
    let (mut sids, mut states, mut attempted, mut dues, mut details) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut delta = Delta::default();
    let mut reasons = std::collections::HashMap::new();
    for (sid, outcome) in outcomes {
        attempted.push(outcome.is_attempt());
        let new = outcome.into_state(at);
        delta.moved(StateKind::Sending, new.kind(), 1);
        sids.push(sql_int(sid));
        states.push(state_code(new.kind()));
        dues.push(due_ms(&new));
        details.push(serde_json::to_value(&new)?);
        if let DeliveryState::Failed { reason, .. } = new {
            reasons.insert(sid, reason);
        }
    }
    // An outcome that was not an attempt (the message never left) gives its attempt back.
    // The fencing test is one expression so that no index can serve it: the rows are
    // found by their key. Matched on `state` instead, the planner walks the job's range of
    // `deliveries_by_state` for in-flight rows, where every recipient sent so far has
    // left a dead entry (measured: 9.5 ms a record at 100k recipients, against 0.5).
    let rows = query(
        tx,
        "UPDATE deliveries d
            SET state = u.state, due_ms = u.due, detail = u.detail, claimed_by = NULL,
                attempts = CASE WHEN u.attempted THEN d.attempts ELSE greatest(d.attempts - 1, 0) END
         FROM unnest($2::bigint[], $3::smallint[], $4::bool[], $5::bigint[], $6::jsonb[])
              AS u(id, state, attempted, due, detail)
         WHERE d.job_id = $1 AND d.subscriber_id = u.id AND coalesce(d.state = $7 AND d.claimed_by = $8, false)
         RETURNING d.subscriber_id, d.email, d.attempts",
        &[
            &sql_int(job_id),
            &sids,
            &states,
            &attempted,
            &dues,
            &details,
            &state_code(StateKind::Sending),
            &node,
        ],
    )
    .await?;
    if rows.len() != n {
        return Ok(None);
    }
    let job = apply_counts(tx, job_id, &delta, 0).await?;
    let failed = rows.iter().filter_map(|row| {
        let sid = domain_int(row.get(0));
        let reason = reasons.get(&sid)?;
        let tries: i32 = row.get(2);
        Some(delivery_failed(
            &job,
            sid,
            row.get(1),
            reason,
            u32::try_from(tries).unwrap_or(0),
        ))
    });
    let appended = events::append(tx, failed).await?;
    Ok(Some((job, appended)))
}

/// Why `record_in` changed fewer deliveries than it had outcomes for, read after its
/// transaction rolled back: the job is gone, a delivery was taken over by another node
/// (its lease expired), is not in flight, or does not exist.
async fn record_refused(client: &impl GenericClient, node: &str, job_id: u64, ids: &[u64]) -> StoreError {
    if let Err(e) = job_basics(client, job_id).await {
        return e;
    }
    let sql_ids: Vec<i64> = ids.iter().map(|id| sql_int(*id)).collect();
    let rows = match query(
        client,
        "SELECT subscriber_id, state, claimed_by FROM deliveries
         WHERE job_id = $1 AND subscriber_id = ANY($2) ORDER BY subscriber_id",
        &[&sql_int(job_id), &sql_ids],
    )
    .await
    {
        Ok(rows) => rows,
        Err(e) => return e,
    };
    let mut current = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let sid = domain_int(row.get(0));
        let state: i16 = row.get(1);
        // Fencing: a claim that is no longer this node's was taken over after its
        // lease expired (put back to pending and claimed again elsewhere).
        if state == state_code(StateKind::Sending) && row.get::<_, Option<&str>>(2) != Some(node) {
            return StoreError::TakenOver(format!(
                "delivery {sid} of job {job_id} is no longer claimed by node {node}: its lease expired \
                 and another node took the recipient over"
            ));
        }
        current.insert(sid, state);
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    for sid in ids {
        let Some(state) = current.get(sid) else {
            return StoreError::Inconsistent(format!("job {job_id} has no delivery {sid}"));
        };
        if !seen.insert(*sid) {
            return StoreError::Conflict(format!(
                "delivery {sid} of job {job_id} has two outcomes in one record"
            ));
        }
        if *state != state_code(StateKind::Sending) {
            return StoreError::Conflict(format!(
                "delivery {sid} of job {job_id} is not in flight ({})",
                state_kind(*state).map_or("unknown", StateKind::as_str)
            ));
        }
    }
    // Every delivery is in flight and this node's now: it changed between the record
    // and this reading (released and claimed again by this node). Nothing was written.
    StoreError::Conflict(format!(
        "the deliveries of job {job_id} changed while their outcomes were recorded; nothing was recorded"
    ))
}
