//! Newsletters, subscribers and letters in redb. Each write closure runs inside the
//! writer's shared transaction; see the invariant in `store/redb/mod.rs` (validate
//! before writing).

use redb::{ReadableTable, WriteTransaction};

use super::tables::*;
use super::{RedbStore, decode, encode, events};
use crate::domain::*;
use crate::events::subscriber_changed;
use crate::store::{Lists, StoreError, busy, normalise_email};

pub(super) fn next_id(txn: &WriteTransaction, sequence: &str) -> Result<u64, StoreError> {
    let mut table = txn.open_table(SEQUENCES)?;
    let next = table.get(sequence)?.map(|v| v.value()).unwrap_or(0) + 1;
    table.insert(sequence, next)?;
    Ok(next)
}

/// Subscriber id → (newsletter id, subscriber), from the tables of a read or a write.
pub(super) fn find_subscriber(
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
pub(super) fn subscriber_in(txn: &WriteTransaction, id: u64) -> Result<(u64, Subscriber), StoreError> {
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

/// The first job matching `of` that is not finished, if any (jobs are few: a scan).
fn unfinished_job(txn: &WriteTransaction, of: impl Fn(&Job) -> bool) -> Result<Option<Job>, StoreError> {
    for row in txn.open_table(JOBS)?.iter()? {
        let job: Job = decode(row?.1.value())?;
        if !job.state.is_finished() && of(&job) {
            return Ok(Some(job));
        }
    }
    Ok(None)
}

#[async_trait::async_trait]
impl Lists for RedbStore {
    async fn create_newsletter(&self, name: String, from: String) -> Result<Newsletter, StoreError> {
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

    async fn newsletter(&self, id: u64) -> Result<Newsletter, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(NEWSLETTERS)?;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::not_found("newsletter", id))?;
            decode(row.value())
        })
        .await
    }

    async fn newsletters_after(&self, after: u64, limit: usize) -> Result<Vec<Newsletter>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(NEWSLETTERS)?;
            let mut out = Vec::new();
            for row in table.range(after.saturating_add(1)..)?.take(limit) {
                out.push(decode(row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_newsletter(
        &self,
        id: u64,
        name: Option<String>,
        from: Option<String>,
    ) -> Result<Newsletter, StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(NEWSLETTERS)?;
            let mut newsletter: Newsletter = decode(
                table
                    .get(id)?
                    .ok_or_else(|| StoreError::not_found("newsletter", id))?
                    .value(),
            )?;
            newsletter.name = name.unwrap_or(newsletter.name);
            newsletter.from = from.unwrap_or(newsletter.from);
            table.insert(id, encode(&newsletter).as_slice())?;
            Ok(newsletter)
        })
        .await
    }

    async fn delete_newsletter(&self, id: u64) -> Result<(), StoreError> {
        self.write(move |txn| {
            if !newsletter_exists(txn, id)? {
                return Err(StoreError::not_found("newsletter", id));
            }
            // Counted only so far: this runs on the writer, which a million-row walk
            // to refuse would hold up.
            let subscribers = txn
                .open_table(SUBSCRIBERS)?
                .range((id, 0)..=(id, u64::MAX))?
                .take(10_001)
                .count();
            if subscribers > 0 {
                let shown = match subscribers {
                    10_001 => "more than 10000".to_string(),
                    n => n.to_string(),
                };
                return Err(StoreError::Conflict(format!(
                    "newsletter {id} has {shown} subscriber(s): erase them first"
                )));
            }
            if let Some(job) = unfinished_job(txn, |job| job.newsletter_id == id)? {
                return Err(busy(&format!("newsletter {id}"), &job));
            }
            let mut letters = txn.open_table(LETTERS)?;
            let mut doomed = Vec::new();
            for row in letters.iter()? {
                let (key, value) = row?;
                let letter: Letter = decode(value.value())?;
                if letter.newsletter_id == id {
                    doomed.push(key.value());
                }
            }
            for letter in doomed {
                letters.remove(letter)?;
            }
            txn.open_table(NEWSLETTERS)?.remove(id)?;
            Ok(())
        })
        .await
    }

    /// Inserts new subscribers and updates existing ones (matched by email), all in one
    /// transaction.
    async fn upsert_subscribers(
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
            let mut changes = Vec::new();
            for new in subscribers {
                let key = normalise_email(&new.email);
                let existing = emails.get((newsletter_id, key.as_str()))?.map(|v| v.value());
                let subscriber = match existing {
                    Some(id) => {
                        let row = rows.get((newsletter_id, id))?.ok_or_else(|| {
                            StoreError::Inconsistent(format!("email index names missing subscriber {id}"))
                        })?;
                        let before: Subscriber = decode(row.value())?;
                        drop(row);
                        let mut after = before.clone();
                        after.name = new.name.or(after.name);
                        after.attributes.extend(new.attributes);
                        summary.updated += 1;
                        if after == before {
                            // Importing the same list again writes nothing.
                            continue;
                        }
                        changes.extend(subscriber_changed(Some(&before), &after));
                        after
                    }
                    None => {
                        last_id += 1;
                        let id = last_id;
                        emails.insert((newsletter_id, key.as_str()), id)?;
                        homes.insert(id, newsletter_id)?;
                        summary.inserted += 1;
                        let subscriber = Subscriber {
                            id,
                            newsletter_id,
                            email: new.email,
                            name: new.name,
                            attributes: new.attributes,
                            status: SubscriberStatus::Active,
                            created_at,
                        };
                        changes.extend(subscriber_changed(None, &subscriber));
                        subscriber
                    }
                };
                rows.insert((newsletter_id, subscriber.id), encode(&subscriber).as_slice())?;
            }
            sequences.insert("subscriber", last_id)?;
            drop((emails, rows, homes, sequences));
            events::append(txn, changes)?;
            Ok(summary)
        })
        .await
    }

    async fn subscribe_unconfirmed(
        &self,
        newsletter_id: u64,
        new: NewSubscriber,
    ) -> Result<(Subscriber, bool), StoreError> {
        self.write(move |txn| {
            if !newsletter_exists(txn, newsletter_id)? {
                return Err(StoreError::not_found("newsletter", newsletter_id));
            }
            let key = normalise_email(&new.email);
            let existing = txn
                .open_table(SUBSCRIBER_EMAILS)?
                .get((newsletter_id, key.as_str()))?
                .map(|v| v.value());
            if let Some(id) = existing {
                return Ok((subscriber_in(txn, id)?.1, false));
            }
            let subscriber = Subscriber {
                id: next_id(txn, "subscriber")?,
                newsletter_id,
                email: new.email,
                name: new.name,
                attributes: new.attributes,
                status: SubscriberStatus::Unconfirmed,
                created_at: now(),
            };
            txn.open_table(UNCONFIRMED)?
                .insert((subscriber.created_at, subscriber.id), ())?;
            txn.open_table(SUBSCRIBER_EMAILS)?
                .insert((newsletter_id, key.as_str()), subscriber.id)?;
            txn.open_table(SUBSCRIBER_HOMES)?
                .insert(subscriber.id, newsletter_id)?;
            txn.open_table(SUBSCRIBERS)?
                .insert((newsletter_id, subscriber.id), encode(&subscriber).as_slice())?;
            events::append(txn, subscriber_changed(None, &subscriber))?;
            Ok((subscriber, true))
        })
        .await
    }

    /// Reads `UNCONFIRMED` up to `created_before`, dropping the entries of subscribers
    /// who are no longer unconfirmed (hence a write).
    async fn unconfirmed_before(&self, created_before: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        self.write(move |txn| {
            let mut index = txn.open_table(UNCONFIRMED)?;
            let mut out = Vec::new();
            let mut stale = Vec::new();
            let homes = txn.open_table(SUBSCRIBER_HOMES)?;
            let rows = txn.open_table(SUBSCRIBERS)?;
            for row in index.range(..(created_before, 0))? {
                let (created, id) = row?.0.value();
                match find_subscriber(&homes, &rows, id) {
                    Ok((_, s)) if s.status == SubscriberStatus::Unconfirmed => {
                        out.push(id);
                        if out.len() >= limit {
                            break;
                        }
                    }
                    // Confirmed (or made active, or erased) since: nothing to expire.
                    Ok(_) | Err(StoreError::NotFound { .. }) => stale.push((created, id)),
                    Err(e) => return Err(e),
                }
            }
            for key in stale {
                index.remove(key)?;
            }
            Ok(out)
        })
        .await
    }

    /// Up to `limit` subscribers of a newsletter with ids greater than `after`, in id order.
    async fn subscribers_after(
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

    async fn search_subscribers(
        &self,
        newsletter_id: u64,
        filter: SubscriberFilter,
        after: u64,
        limit: usize,
        scan: usize,
    ) -> Result<SubscriberSearch, StoreError> {
        self.read(move |txn| {
            if txn.open_table(NEWSLETTERS)?.get(newsletter_id)?.is_none() {
                return Err(StoreError::not_found("newsletter", newsletter_id));
            }
            let table = txn.open_table(SUBSCRIBERS)?;
            let Some(start) = after.checked_add(1) else {
                return Ok(SubscriberSearch {
                    items: Vec::new(),
                    next: None,
                });
            };
            let mut items = Vec::new();
            let mut scanned = 0;
            for row in table.range((newsletter_id, start)..=(newsletter_id, u64::MAX))? {
                let (key, value) = row?;
                let id = key.value().1;
                scanned += 1;
                let subscriber: Subscriber = decode(value.value())?;
                if filter.matches(&subscriber) {
                    items.push(subscriber);
                    if items.len() == limit {
                        return Ok(SubscriberSearch {
                            items,
                            next: Some(id),
                        });
                    }
                }
                if scanned == scan {
                    return Ok(SubscriberSearch {
                        items,
                        next: Some(id),
                    });
                }
            }
            Ok(SubscriberSearch { items, next: None })
        })
        .await
    }

    async fn subscriber(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError> {
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
    async fn unsubscribe(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError> {
        let result = self
            .write(move |txn| {
                let mut table = txn.open_table(SUBSCRIBERS)?;
                let row = table
                    .get((newsletter_id, id))?
                    .ok_or_else(|| StoreError::not_found("subscriber", id))?;
                let before: Subscriber = decode(row.value())?;
                drop(row);
                let mut subscriber = before.clone();
                subscriber.status = SubscriberStatus::Unsubscribed;
                table.insert((newsletter_id, id), encode(&subscriber).as_slice())?;
                drop(table);
                events::append(txn, subscriber_changed(Some(&before), &subscriber))?;
                Ok(subscriber)
            })
            .await;
        self.bump_status_epoch();
        result
    }

    /// A subscriber by id alone.
    async fn subscriber_by_id(&self, id: u64) -> Result<Subscriber, StoreError> {
        self.read(move |txn| {
            let homes = txn.open_table(SUBSCRIBER_HOMES)?;
            Ok(find_subscriber(&homes, &txn.open_table(SUBSCRIBERS)?, id)?.1)
        })
        .await
    }

    /// The subscriber of a newsletter with this email (domain case-insensitive), if any.
    async fn subscriber_by_email(
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

    /// One index lookup per newsletter (there are few).
    async fn subscribers_with_email(&self, email: String) -> Result<Vec<Subscriber>, StoreError> {
        self.read(move |txn| {
            let key = normalise_email(&email);
            let emails = txn.open_table(SUBSCRIBER_EMAILS)?;
            let rows = txn.open_table(SUBSCRIBERS)?;
            let mut out = Vec::new();
            for newsletter in txn.open_table(NEWSLETTERS)?.iter()? {
                let newsletter = newsletter?.0.value();
                let Some(id) = emails.get((newsletter, key.as_str()))? else {
                    continue;
                };
                if let Some(row) = rows.get((newsletter, id.value()))? {
                    out.push(decode(row.value())?);
                }
            }
            out.sort_by_key(|s: &Subscriber| s.id);
            Ok(out)
        })
        .await
    }

    /// Applies a change to a subscriber. A new email must not belong to another
    /// subscriber of the newsletter (`Conflict`). Running jobs see the change before
    /// their next message to this subscriber.
    async fn update_subscriber(&self, id: u64, patch: SubscriberPatch) -> Result<Subscriber, StoreError> {
        let result = self
            .write(move |txn| {
                let (home, mut subscriber) = subscriber_in(txn, id)?;
                let before = subscriber.clone();
                if let Some(email) = &patch.email {
                    let (old_key, new_key) = (normalise_email(&subscriber.email), normalise_email(email));
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
                }
                let confirming = patch.confirming;
                patch.apply(&mut subscriber);
                txn.open_table(SUBSCRIBERS)?
                    .insert((home, id), encode(&subscriber).as_slice())?;
                let event = match confirming {
                    true => crate::events::subscriber_confirmed(&before, &subscriber),
                    false => subscriber_changed(Some(&before), &subscriber),
                };
                events::append(txn, event)?;
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
    async fn delete_subscriber(&self, id: u64) -> Result<(), StoreError> {
        let result = self
            .write(move |txn| {
                let (home, subscriber) = subscriber_in(txn, id)?;
                txn.open_table(SUBSCRIBERS)?.remove((home, id))?;
                txn.open_table(SUBSCRIBER_HOMES)?.remove(id)?;
                txn.open_table(SUBSCRIBER_EMAILS)?
                    .remove((home, normalise_email(&subscriber.email).as_str()))?;
                txn.open_table(UNCONFIRMED)?.remove((subscriber.created_at, id))?;
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
                drop(deliveries);
                events::scrub_subscriber(txn, id)?;
                super::bounces::scrub_subscriber(txn, id)?;
                super::automations::forget_subscriber(txn, id)?;
                super::messages::forget_subscriber(txn, id)?;
                events::append(txn, [crate::events::subscriber_erased(home, id)])?;
                Ok(())
            })
            .await;
        self.bump_status_epoch();
        result
    }

    /// Stores a letter, giving it an id. The newsletter must exist.
    async fn create_letter(&self, mut letter: Letter) -> Result<Letter, StoreError> {
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

    async fn letter(&self, id: u64) -> Result<Letter, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(LETTERS)?;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::not_found("letter", id))?;
            decode(row.value())
        })
        .await
    }

    async fn letters_after(
        &self,
        newsletter_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Letter>, StoreError> {
        self.read(move |txn| {
            if txn.open_table(NEWSLETTERS)?.get(newsletter_id)?.is_none() {
                return Err(StoreError::not_found("newsletter", newsletter_id));
            }
            // Letters of every newsletter share one table keyed by id; they are few
            // (one per issue sent), so a scan from the cursor is enough.
            let table = txn.open_table(LETTERS)?;
            let mut out = Vec::new();
            for row in table.range(after.saturating_add(1)..)? {
                let letter: Letter = decode(row?.1.value())?;
                if letter.newsletter_id == newsletter_id {
                    out.push(letter);
                    if out.len() == limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn update_letter(&self, mut letter: Letter) -> Result<Letter, StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(LETTERS)?;
            let before: Letter = decode(
                table
                    .get(letter.id)?
                    .ok_or_else(|| StoreError::not_found("letter", letter.id))?
                    .value(),
            )?;
            if let Some(job) = unfinished_job(txn, |job| job.letter_id == letter.id)? {
                return Err(busy(&format!("letter {}", letter.id), &job));
            }
            letter.newsletter_id = before.newsletter_id;
            letter.created_at = before.created_at;
            table.insert(letter.id, encode(&letter).as_slice())?;
            Ok(letter)
        })
        .await
    }

    async fn delete_letter(&self, id: u64) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(LETTERS)?;
            if table.get(id)?.is_none() {
                return Err(StoreError::not_found("letter", id));
            }
            if let Some(job) = unfinished_job(txn, |job| job.letter_id == id)? {
                return Err(busy(&format!("letter {id}"), &job));
            }
            table.remove(id)?;
            Ok(())
        })
        .await
    }
}
