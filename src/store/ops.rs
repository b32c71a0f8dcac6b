//! The store's domain operations. Each write closure runs inside the writer's shared
//! transaction; see the invariant in `store/mod.rs` (validate before writing).

use redb::{ReadableTable, WriteTransaction};

use super::tables::*;
use super::{Store, StoreError, decode, encode};
use crate::domain::*;

pub(super) fn next_id(txn: &WriteTransaction, sequence: &str) -> Result<u64, StoreError> {
    let mut table = txn.open_table(SEQUENCES)?;
    let next = table.get(sequence)?.map(|v| v.value()).unwrap_or(0) + 1;
    table.insert(sequence, next)?;
    Ok(next)
}

pub(super) fn job_in(txn: &WriteTransaction, id: u64) -> Result<Job, StoreError> {
    let table = txn.open_table(JOBS)?;
    let job = table.get(id)?.ok_or_else(|| StoreError::not_found("job", id))?;
    decode(job.value())
}

pub(super) fn put_job(txn: &WriteTransaction, job: &Job) -> Result<(), StoreError> {
    txn.open_table(JOBS)?.insert(job.id, encode(job).as_slice())?;
    Ok(())
}

/// Subscriber id → (newsletter id, subscriber), from the tables of a read or a write.
fn find_subscriber(
    homes: &impl ReadableTable<u64, u64>,
    rows: &impl ReadableTable<(u64, u64), &'static [u8]>,
    id: u64,
) -> Result<(u64, Subscriber), StoreError> {
    let home = homes
        .get(id)?
        .ok_or_else(|| StoreError::not_found("subscriber", id))?
        .value();
    let row = rows
        .get((home, id))?
        .ok_or_else(|| StoreError::Inconsistent(format!("subscriber {id} is indexed but missing")))?;
    Ok((home, decode(row.value())?))
}

/// `find_subscriber` inside a write.
fn subscriber_in(txn: &WriteTransaction, id: u64) -> Result<(u64, Subscriber), StoreError> {
    find_subscriber(
        &txn.open_table(SUBSCRIBER_HOMES)?,
        &txn.open_table(SUBSCRIBERS)?,
        id,
    )
}

/// Fills `SUBSCRIBER_HOMES` for data written before it existed; a no-op once it holds
/// an entry per subscriber (redb keeps table lengths, so the check is cheap).
pub(super) fn backfill_subscriber_homes(txn: &WriteTransaction) -> Result<(), StoreError> {
    use redb::ReadableTableMetadata;
    let subscribers = txn.open_table(SUBSCRIBERS)?;
    let mut homes = txn.open_table(SUBSCRIBER_HOMES)?;
    if homes.len()? == subscribers.len()? {
        return Ok(());
    }
    for row in subscribers.iter()? {
        let (newsletter_id, id) = row?.0.value();
        homes.insert(id, newsletter_id)?;
    }
    Ok(())
}

fn newsletter_exists(txn: &WriteTransaction, id: u64) -> Result<bool, StoreError> {
    Ok(txn.open_table(NEWSLETTERS)?.get(id)?.is_some())
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

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct IdempotencyRecord {
    request_hash: String,
    job_id: u64,
    created_at: u64,
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

impl Store {
    pub async fn create_newsletter(&self, name: String, from: String) -> Result<Newsletter, StoreError> {
        self.write(move |txn| {
            let newsletter = Newsletter {
                id: next_id(txn, "newsletter")?,
                name,
                from,
                created_at: now(),
            };
            txn.open_table(NEWSLETTERS)?
                .insert(newsletter.id, encode(&newsletter).as_slice())?;
            Ok(newsletter)
        })
        .await
    }

    pub async fn newsletter(&self, id: u64) -> Result<Newsletter, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(NEWSLETTERS)?;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::not_found("newsletter", id))?;
            decode(row.value())
        })
        .await
    }

    /// Inserts new subscribers and updates existing ones (matched by email), all in one
    /// transaction.
    pub async fn upsert_subscribers(
        &self,
        newsletter_id: u64,
        subscribers: Vec<NewSubscriber>,
    ) -> Result<ImportSummary, StoreError> {
        self.write(move |txn| {
            if !newsletter_exists(txn, newsletter_id)? {
                return Err(StoreError::not_found("newsletter", newsletter_id));
            }
            let mut summary = ImportSummary::default();
            let mut emails = txn.open_table(SUBSCRIBER_EMAILS)?;
            let mut rows = txn.open_table(SUBSCRIBERS)?;
            let mut homes = txn.open_table(SUBSCRIBER_HOMES)?;
            // Ids for the whole batch: one read and one write of the sequence.
            let mut sequences = txn.open_table(SEQUENCES)?;
            let mut last_id = sequences.get("subscriber")?.map(|v| v.value()).unwrap_or(0);
            let created_at = now();
            for new in subscribers {
                let key = normalise_email(&new.email);
                let existing = emails.get((newsletter_id, key.as_str()))?.map(|v| v.value());
                let subscriber = match existing {
                    Some(id) => {
                        let row = rows.get((newsletter_id, id))?.ok_or_else(|| {
                            StoreError::Inconsistent(format!("email index names missing subscriber {id}"))
                        })?;
                        let mut old: Subscriber = decode(row.value())?;
                        drop(row);
                        old.name = new.name.or(old.name);
                        old.attributes.extend(new.attributes);
                        summary.updated += 1;
                        old
                    }
                    None => {
                        last_id += 1;
                        let id = last_id;
                        emails.insert((newsletter_id, key.as_str()), id)?;
                        homes.insert(id, newsletter_id)?;
                        summary.inserted += 1;
                        Subscriber {
                            id,
                            newsletter_id,
                            email: new.email,
                            name: new.name,
                            attributes: new.attributes,
                            status: SubscriberStatus::Active,
                            created_at,
                        }
                    }
                };
                rows.insert((newsletter_id, subscriber.id), encode(&subscriber).as_slice())?;
            }
            sequences.insert("subscriber", last_id)?;
            Ok(summary)
        })
        .await
    }

    /// Up to `limit` subscribers of a newsletter with ids greater than `after`, in id order.
    pub async fn subscribers_after(
        &self,
        newsletter_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Subscriber>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(SUBSCRIBERS)?;
            let Some(start) = after.checked_add(1) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::with_capacity(limit);
            for row in table
                .range((newsletter_id, start)..=(newsletter_id, u64::MAX))?
                .take(limit)
            {
                out.push(decode(row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn subscriber(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(SUBSCRIBERS)?;
            let row = table
                .get((newsletter_id, id))?
                .ok_or_else(|| StoreError::not_found("subscriber", id))?;
            decode(row.value())
        })
        .await
    }

    /// Marks a subscriber unsubscribed. Idempotent.
    pub async fn unsubscribe(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError> {
        let result = self
            .write(move |txn| {
                let mut table = txn.open_table(SUBSCRIBERS)?;
                let row = table
                    .get((newsletter_id, id))?
                    .ok_or_else(|| StoreError::not_found("subscriber", id))?;
                let mut subscriber: Subscriber = decode(row.value())?;
                drop(row);
                subscriber.status = SubscriberStatus::Unsubscribed;
                table.insert((newsletter_id, id), encode(&subscriber).as_slice())?;
                Ok(subscriber)
            })
            .await;
        self.bump_status_epoch();
        result
    }

    /// How many jobs are in each state, and how many recipients the unfinished ones still
    /// have to deliver (pending, sending or waiting for a retry). Read per metrics scrape.
    pub async fn job_overview(&self) -> Result<JobOverview, StoreError> {
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

    /// A subscriber by id alone.
    pub async fn subscriber_by_id(&self, id: u64) -> Result<Subscriber, StoreError> {
        self.read(move |txn| {
            let homes = txn.open_table(SUBSCRIBER_HOMES)?;
            Ok(find_subscriber(&homes, &txn.open_table(SUBSCRIBERS)?, id)?.1)
        })
        .await
    }

    /// The subscriber of a newsletter with this email (domain case-insensitive), if any.
    pub async fn subscriber_by_email(
        &self,
        newsletter_id: u64,
        email: String,
    ) -> Result<Option<Subscriber>, StoreError> {
        self.read(move |txn| {
            if txn.open_table(NEWSLETTERS)?.get(newsletter_id)?.is_none() {
                return Err(StoreError::not_found("newsletter", newsletter_id));
            }
            let emails = txn.open_table(SUBSCRIBER_EMAILS)?;
            let Some(id) = emails.get((newsletter_id, normalise_email(&email).as_str()))? else {
                return Ok(None);
            };
            let table = txn.open_table(SUBSCRIBERS)?;
            let row = table.get((newsletter_id, id.value()))?;
            row.map(|r| decode(r.value())).transpose()
        })
        .await
    }

    /// Applies a change to a subscriber. A new email must not belong to another
    /// subscriber of the newsletter (`Conflict`). Running jobs see the change before
    /// their next message to this subscriber.
    pub async fn update_subscriber(&self, id: u64, patch: SubscriberPatch) -> Result<Subscriber, StoreError> {
        let result = self
            .write(move |txn| {
                let (home, mut subscriber) = subscriber_in(txn, id)?;
                if let Some(email) = patch.email {
                    let (old_key, new_key) = (normalise_email(&subscriber.email), normalise_email(&email));
                    if old_key != new_key {
                        let mut emails = txn.open_table(SUBSCRIBER_EMAILS)?;
                        if emails.get((home, new_key.as_str()))?.is_some() {
                            return Err(StoreError::Conflict(format!(
                                "another subscriber of newsletter {home} has the email {email}"
                            )));
                        }
                        emails.remove((home, old_key.as_str()))?;
                        emails.insert((home, new_key.as_str()), id)?;
                    }
                    subscriber.email = email;
                }
                if let Some(name) = patch.name {
                    subscriber.name = name;
                }
                for (key, value) in patch.attributes.unwrap_or_default() {
                    if value.is_null() {
                        subscriber.attributes.remove(&key);
                    } else {
                        subscriber.attributes.insert(key, value);
                    }
                }
                if let Some(status) = patch.status {
                    subscriber.status = status;
                }
                txn.open_table(SUBSCRIBERS)?
                    .insert((home, id), encode(&subscriber).as_slice())?;
                Ok(subscriber)
            })
            .await;
        self.bump_status_epoch();
        result
    }

    /// Erases a subscriber: their row and index entries go, and their email is blanked
    /// in the delivery records of every job of the newsletter (and in recorded replies
    /// and reasons that quote it), so no personal data is left. A running job skips
    /// them ("subscriber was deleted").
    pub async fn delete_subscriber(&self, id: u64) -> Result<(), StoreError> {
        let result = self
            .write(move |txn| {
                let (home, subscriber) = subscriber_in(txn, id)?;
                txn.open_table(SUBSCRIBERS)?.remove((home, id))?;
                txn.open_table(SUBSCRIBER_HOMES)?.remove(id)?;
                txn.open_table(SUBSCRIBER_EMAILS)?
                    .remove((home, normalise_email(&subscriber.email).as_str()))?;
                let jobs: Vec<u64> = {
                    let table = txn.open_table(JOBS)?;
                    let mut out = Vec::new();
                    for row in table.iter()? {
                        let (key, value) = row?;
                        let job: Job = decode(value.value())?;
                        if job.newsletter_id == home {
                            out.push(key.value());
                        }
                    }
                    out
                };
                let mut deliveries = txn.open_table(DELIVERIES)?;
                for job_id in jobs {
                    let Some(row) = deliveries.get((job_id, id))? else {
                        continue;
                    };
                    let mut delivery: Delivery = decode(row.value())?;
                    drop(row);
                    delivery.email = String::new();
                    let erased = encode(&delivery);
                    // Replies and reasons may quote the address ("550 <ann@…>: no such user").
                    let erased = String::from_utf8_lossy(&erased).replace(&subscriber.email, "[erased]");
                    deliveries.insert((job_id, id), erased.as_bytes())?;
                }
                Ok(())
            })
            .await;
        self.bump_status_epoch();
        result
    }

    /// Stores a letter, giving it an id. The newsletter must exist.
    pub async fn create_letter(&self, mut letter: Letter) -> Result<Letter, StoreError> {
        self.write(move |txn| {
            if !newsletter_exists(txn, letter.newsletter_id)? {
                return Err(StoreError::not_found("newsletter", letter.newsletter_id));
            }
            letter.id = next_id(txn, "letter")?;
            txn.open_table(LETTERS)?
                .insert(letter.id, encode(&letter).as_slice())?;
            Ok(letter)
        })
        .await
    }

    pub async fn letter(&self, id: u64) -> Result<Letter, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(LETTERS)?;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::not_found("letter", id))?;
            decode(row.value())
        })
        .await
    }

    /// Stores a new job, giving it an id. With an idempotency key, the key is recorded
    /// in the same transaction; if it was recorded before, nothing is created and the
    /// earlier job is returned (same request) or the reuse refused (different request).
    pub async fn create_job(
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

    pub async fn job(&self, id: u64) -> Result<Job, StoreError> {
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
    pub async fn jobs_to_recover(&self) -> Result<Vec<Job>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(JOBS)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let job: Job = decode(row?.1.value())?;
                let cancelling = job.state == JobState::Cancelled && job.counts.open() > 0;
                if job.state.is_unfinished() || job.counts.sending > 0 || cancelling {
                    out.push(job);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Jobs newest first, optionally only those in `state`, with ids below `before`.
    pub async fn list_jobs(
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

    /// Changes a job with `f` and returns the result.
    pub async fn update_job<F>(&self, id: u64, f: F) -> Result<Job, StoreError>
    where
        F: FnOnce(&mut Job) + Send + 'static,
    {
        self.write(move |txn| {
            let mut job = job_in(txn, id)?;
            f(&mut job);
            put_job(txn, &job)?;
            Ok(job)
        })
        .await
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
        self.write(move |txn| {
            let mut job = job_in(txn, id)?;
            if !from.contains(&job.state) {
                let expected: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
                return Err(StoreError::Conflict(format!(
                    "job {id} is {}, but this needs it to be {}",
                    job.state.as_str(),
                    expected.join(" or ")
                )));
            }
            f(&mut job);
            put_job(txn, &job)?;
            Ok(job)
        })
        .await
    }
}
