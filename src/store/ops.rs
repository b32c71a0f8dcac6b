//! The store's domain operations. Each write closure runs inside the writer's shared
//! transaction; see the invariant in `store/mod.rs` (validate before writing).

use redb::{ReadableTable, WriteTransaction};

use super::tables::*;
use super::{Store, StoreError, decode, encode};
use crate::domain::*;

fn next_id(txn: &WriteTransaction, sequence: &str) -> Result<u64, StoreError> {
    let mut table = txn.open_table(SEQUENCES)?;
    let next = table.get(sequence)?.map(|v| v.value()).unwrap_or(0) + 1;
    table.insert(sequence, next)?;
    Ok(next)
}

fn job_in(txn: &WriteTransaction, id: u64) -> Result<Job, StoreError> {
    let table = txn.open_table(JOBS)?;
    let job = table.get(id)?.ok_or_else(|| StoreError::not_found("job", id))?;
    decode(job.value())
}

fn put_job(txn: &WriteTransaction, job: &Job) -> Result<(), StoreError> {
    txn.open_table(JOBS)?.insert(job.id, encode(job).as_slice())?;
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
                        let id = next_id(txn, "subscriber")?;
                        emails.insert((newsletter_id, key.as_str()), id)?;
                        summary.inserted += 1;
                        Subscriber {
                            id,
                            newsletter_id,
                            email: new.email,
                            name: new.name,
                            attributes: new.attributes,
                            status: SubscriberStatus::Active,
                            created_at: now(),
                        }
                    }
                };
                rows.insert((newsletter_id, subscriber.id), encode(&subscriber).as_slice())?;
            }
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
        self.write(move |txn| {
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
        .await
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

    pub async fn create_job(&self, mut job: Job) -> Result<Job, StoreError> {
        self.write(move |txn| {
            job.id = next_id(txn, "job")?;
            put_job(txn, &job)?;
            Ok(job)
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

    /// Jobs that were queued or running: the ones to resume at start-up.
    pub async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(JOBS)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                let job: Job = decode(row?.1.value())?;
                if job.state.is_unfinished() {
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

    /// Changes a job with `f` if it is in state `from`; a conflict otherwise.
    pub async fn update_job_from<F>(&self, id: u64, from: JobState, f: F) -> Result<Job, StoreError>
    where
        F: FnOnce(&mut Job) + Send + 'static,
    {
        self.write(move |txn| {
            let mut job = job_in(txn, id)?;
            if job.state != from {
                return Err(StoreError::Conflict(format!(
                    "job {id} is {}, not {}",
                    job.state.as_str(),
                    from.as_str()
                )));
            }
            f(&mut job);
            put_job(txn, &job)?;
            Ok(job)
        })
        .await
    }

    /// Records part of a job's recipient snapshot: a pending delivery for each recipient
    /// not recorded yet (so re-running after a crash is harmless).
    pub async fn add_recipients(
        &self,
        job_id: u64,
        recipients: Vec<(u64, String)>,
    ) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let mut queue = txn.open_table(QUEUE)?;
            let mut added = 0;
            for (subscriber_id, email) in recipients {
                if deliveries.get((job_id, subscriber_id))?.is_some() {
                    continue;
                }
                let delivery = Delivery {
                    job_id,
                    subscriber_id,
                    email,
                    attempts: 0,
                    state: DeliveryState::Pending,
                };
                deliveries.insert((job_id, subscriber_id), encode(&delivery).as_slice())?;
                queue.insert((job_id, subscriber_id), ())?;
                added += 1;
            }
            job.counts.pending += added;
            put_job(txn, &job)?;
            Ok(added)
        })
        .await
    }

    /// Claims up to `max` pending recipients of a job: pending → sending, durably, before
    /// any of their messages is sent. Returns the claimed deliveries.
    pub async fn claim(&self, job_id: u64, max: usize) -> Result<Vec<Delivery>, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let mut queue = txn.open_table(QUEUE)?;
            let keys: Vec<(u64, u64)> = queue
                .range((job_id, 0)..=(job_id, u64::MAX))?
                .take(max)
                .map(|row| row.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let mut inflight = txn.open_table(INFLIGHT)?;
            let mut claimed = Vec::with_capacity(keys.len());
            let since = now();
            for key in keys {
                let row = deliveries
                    .get(key)?
                    .ok_or_else(|| StoreError::Inconsistent(format!("queued delivery {key:?} has no row")))?;
                let mut delivery: Delivery = decode(row.value())?;
                drop(row);
                *job.counts.slot(&delivery.state) -= 1;
                delivery.state = DeliveryState::Sending { since };
                delivery.attempts += 1;
                *job.counts.slot(&delivery.state) += 1;
                deliveries.insert(key, encode(&delivery).as_slice())?;
                queue.remove(key)?;
                inflight.insert(key, ())?;
                claimed.push(delivery);
            }
            put_job(txn, &job)?;
            Ok(claimed)
        })
        .await
    }

    /// Records the outcome of a claimed delivery: sending → delivered | skipped | failed.
    pub async fn record(&self, job_id: u64, subscriber_id: u64, outcome: Outcome) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let key = (job_id, subscriber_id);
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let row = deliveries
                .get(key)?
                .ok_or_else(|| StoreError::not_found("delivery", format!("{key:?}")))?;
            let mut delivery: Delivery = decode(row.value())?;
            drop(row);
            if !matches!(delivery.state, DeliveryState::Sending { .. }) {
                return Err(StoreError::Conflict(format!(
                    "delivery {key:?} is not in flight ({:?})",
                    delivery.state
                )));
            }
            *job.counts.slot(&delivery.state) -= 1;
            delivery.state = outcome.into_state(now());
            *job.counts.slot(&delivery.state) += 1;
            deliveries.insert(key, encode(&delivery).as_slice())?;
            txn.open_table(INFLIGHT)?.remove(key)?;
            put_job(txn, &job)?;
            Ok(())
        })
        .await
    }

    /// After a crash: puts every recipient that was in flight back in the queue and
    /// counts them in `resent_after_crash`. Returns how many there were.
    pub async fn requeue_inflight(&self, job_id: u64) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut job = job_in(txn, job_id)?;
            let mut inflight = txn.open_table(INFLIGHT)?;
            let keys: Vec<(u64, u64)> = inflight
                .range((job_id, 0)..=(job_id, u64::MAX))?
                .map(|row| row.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let mut queue = txn.open_table(QUEUE)?;
            for &key in &keys {
                let found = deliveries.get(key)?.map(|row| decode::<Delivery>(row.value()));
                if let Some(delivery) = found {
                    let mut delivery = delivery?;
                    *job.counts.slot(&delivery.state) -= 1;
                    delivery.state = DeliveryState::Pending;
                    *job.counts.slot(&delivery.state) += 1;
                    deliveries.insert(key, encode(&delivery).as_slice())?;
                }
                inflight.remove(key)?;
                queue.insert(key, ())?;
            }
            let n = keys.len() as u64;
            job.resent_after_crash += n;
            put_job(txn, &job)?;
            Ok(n)
        })
        .await
    }

    /// Up to `limit` deliveries of a job with subscriber ids greater than `after`.
    pub async fn deliveries_after(
        &self,
        job_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(DELIVERIES)?;
            let Some(start) = after.checked_add(1) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::with_capacity(limit);
            for row in table.range((job_id, start)..=(job_id, u64::MAX))?.take(limit) {
                out.push(decode(row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }
}
