//! Bounce reports and the suppression list in redb. A report, the statuses it changes
//! and their events are written in one closure of the writer's transaction; the rules
//! themselves are `bounces::decide`.

use redb::{ReadableTable, WriteTransaction};

use super::lists::{find_subscriber, next_id};
use super::tables::*;
use super::{RedbStore, decode, encode, events, ids_under};
use crate::bounces::{
    Bounce, BounceFilter, BounceKind, NewBounce, NewSuppression, Rules, Suppression, decide,
};
use crate::domain::{Subscriber, SubscriberStatus, now, now_ms};
use crate::events::subscriber_changed;
use crate::store::{Bounces, StoreError, normalise_email};

/// The subscribers a report is about, each with whether the report named them (only
/// those keep its job and letter).
fn targets(txn: &WriteTransaction, report: &NewBounce) -> Result<Vec<(Subscriber, bool)>, StoreError> {
    let homes = txn.open_table(SUBSCRIBER_HOMES)?;
    let rows = txn.open_table(SUBSCRIBERS)?;
    let emails = txn.open_table(SUBSCRIBER_EMAILS)?;
    let newsletters = txn.open_table(NEWSLETTERS)?;
    let mut named = None;
    if let Some(id) = report.subscriber_id {
        match find_subscriber(&homes, &rows, id) {
            Ok((_, s)) => named = Some(s),
            // Erased since: the report is kept, about nobody.
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    } else if let Some(newsletter) = report.newsletter_id {
        if newsletters.get(newsletter)?.is_none() {
            return Err(StoreError::not_found("newsletter", newsletter));
        }
        let key = normalise_email(&report.email);
        if let Some(id) = emails.get((newsletter, key.as_str()))? {
            named = Some(find_subscriber(&homes, &rows, id.value())?.1);
        }
    }
    let address = named.as_ref().map_or(report.email.as_str(), |s| s.email.as_str());
    let everyone = named.is_none() && report.subscriber_id.is_none() && report.newsletter_id.is_none();
    let mut out: Vec<(Subscriber, bool)> = Vec::new();
    if everyone || report.kind == BounceKind::Complaint {
        let key = normalise_email(address);
        for newsletter in newsletters.iter()? {
            let newsletter = newsletter?.0.value();
            if let Some(id) = emails.get((newsletter, key.as_str()))? {
                let subscriber = find_subscriber(&homes, &rows, id.value())?.1;
                let is_named = named.as_ref().is_none_or(|n| n.id == subscriber.id);
                out.push((subscriber, is_named));
            }
        }
    } else if let Some(named) = named {
        out.push((named, true));
    }
    Ok(out)
}

/// How many of a subscriber's counted soft bounces were recorded at or after `since_ms`.
fn soft_bounces_since(txn: &WriteTransaction, subscriber_id: u64, since_ms: u64) -> Result<u32, StoreError> {
    let table = txn.open_table(BOUNCES)?;
    let mut count = 0;
    for id in ids_under(&txn.open_table(BOUNCES_BY_SUBSCRIBER)?, subscriber_id)? {
        if let Some(row) = table.get(id)? {
            let bounce: Bounce = decode(row.value())?;
            if bounce.counted && bounce.kind == BounceKind::Soft && bounce.at_ms >= since_ms {
                count += 1;
            }
        }
    }
    Ok(count)
}

fn put_bounce(txn: &WriteTransaction, bounce: &Bounce) -> Result<(), StoreError> {
    txn.open_table(BOUNCES)?
        .insert(bounce.id, encode(bounce).as_slice())?;
    match bounce.subscriber_id {
        Some(sid) => {
            txn.open_table(BOUNCES_BY_SUBSCRIBER)?
                .insert((sid, bounce.id), ())?;
        }
        None => {
            txn.open_table(UNATTRIBUTED_BOUNCES)?.insert(bounce.id, ())?;
        }
    }
    Ok(())
}

fn put_subscriber(txn: &WriteTransaction, subscriber: &Subscriber) -> Result<(), StoreError> {
    txn.open_table(SUBSCRIBERS)?.insert(
        (subscriber.newsletter_id, subscriber.id),
        encode(subscriber).as_slice(),
    )?;
    Ok(())
}

/// Adds an address to the suppression list unless it is there; whether it was new.
fn suppress(txn: &WriteTransaction, new: NewSuppression, since: u64) -> Result<bool, StoreError> {
    let key = normalise_email(&new.email);
    let mut table = txn.open_table(SUPPRESSIONS)?;
    if table.get(key.as_str())?.is_some() {
        return Ok(false);
    }
    table.insert(key.as_str(), encode(&new.into_suppression(since)).as_slice())?;
    Ok(true)
}

/// Takes an address off the suppression list; what it was, if it was on it.
fn lift(txn: &WriteTransaction, email: &str) -> Result<Option<Suppression>, StoreError> {
    let mut list = txn.open_table(SUPPRESSIONS)?;
    let removed = list.remove(normalise_email(email).as_str())?;
    removed.map(|row| decode(row.value())).transpose()
}

/// Scrubs the reports about a subscriber who is being erased: they stay (kind, code,
/// decision) with nothing personal left, out of the subscriber's index.
pub(super) fn scrub_subscriber(txn: &WriteTransaction, subscriber_id: u64) -> Result<(), StoreError> {
    let mut index = txn.open_table(BOUNCES_BY_SUBSCRIBER)?;
    let ids = ids_under(&index, subscriber_id)?;
    let mut table = txn.open_table(BOUNCES)?;
    for id in ids {
        index.remove((subscriber_id, id))?;
        let Some(row) = table.get(id)? else { continue };
        let bounce: Bounce = decode(row.value())?;
        drop(row);
        table.insert(id, encode(&bounce.scrubbed()).as_slice())?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Bounces for RedbStore {
    async fn record_bounce(&self, report: NewBounce, rules: Rules) -> Result<Vec<Bounce>, StoreError> {
        let report = report.capped();
        let result = self
            .write(move |txn| {
                let targets = targets(txn, &report)?;
                let at_ms = now_ms();
                let mut records = Vec::new();
                let mut changes = Vec::new();
                let mut suppress_address = false;
                for (subscriber, named) in &targets {
                    let soft = match report.kind {
                        BounceKind::Soft => soft_bounces_since(txn, subscriber.id, rules.soft_since(at_ms))?,
                        _ => 0,
                    };
                    let decision = decide(&rules, &report, Some(subscriber), soft);
                    suppress_address |= decision.suppress_address;
                    let bounce = Bounce::new(
                        next_id(txn, "bounce")?,
                        at_ms,
                        &report.about(subscriber, *named),
                        Some(subscriber.id),
                        &decision,
                    );
                    put_bounce(txn, &bounce)?;
                    if let Some(status) = decision.status {
                        let mut after = subscriber.clone();
                        after.status = status;
                        put_subscriber(txn, &after)?;
                        changes.extend(subscriber_changed(Some(subscriber), &after));
                    }
                    records.push(bounce);
                }
                if targets.is_empty() {
                    let decision = decide(&rules, &report, None, 0);
                    suppress_address = decision.suppress_address;
                    let bounce = Bounce::new(next_id(txn, "bounce")?, at_ms, &report, None, &decision);
                    put_bounce(txn, &bounce)?;
                    records.push(bounce);
                }
                if suppress_address && let Some(entry) = records[0].complaint_suppression() {
                    suppress(txn, entry, now())?;
                }
                let mut log: Vec<_> = records.iter().filter_map(Bounce::event).collect();
                log.extend(changes);
                events::append(txn, log)?;
                Ok(records)
            })
            .await;
        self.bump_status_epoch();
        result
    }

    async fn bounces(
        &self,
        filter: BounceFilter,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Bounce>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(BOUNCES)?;
            let below = before.unwrap_or(u64::MAX);
            let ids: Vec<u64> = if let Some(sid) = filter.subscriber_id {
                txn.open_table(BOUNCES_BY_SUBSCRIBER)?
                    .range((sid, 0)..(sid, below))?
                    .rev()
                    .take(limit)
                    .map(|row| row.map(|(k, _)| k.value().1).map_err(StoreError::from))
                    .collect::<Result<_, _>>()?
            } else if filter.unattributed {
                txn.open_table(UNATTRIBUTED_BOUNCES)?
                    .range(..below)?
                    .rev()
                    .take(limit)
                    .map(|row| row.map(|(k, _)| k.value()).map_err(StoreError::from))
                    .collect::<Result<_, _>>()?
            } else {
                table
                    .range(..below)?
                    .rev()
                    .take(limit)
                    .map(|row| row.map(|(k, _)| k.value()).map_err(StoreError::from))
                    .collect::<Result<_, _>>()?
            };
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(row) = table.get(id)? {
                    out.push(decode(row.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn reinstate(&self, subscriber_id: u64) -> Result<(Subscriber, Option<Suppression>), StoreError> {
        let result = self
            .write(move |txn| {
                let (_, before) = find_subscriber(
                    &txn.open_table(SUBSCRIBER_HOMES)?,
                    &txn.open_table(SUBSCRIBERS)?,
                    subscriber_id,
                )?;
                if before.status == SubscriberStatus::Unsubscribed {
                    return Err(StoreError::Conflict(format!(
                        "subscriber {subscriber_id} unsubscribed: only they can subscribe again"
                    )));
                }
                if before.status == SubscriberStatus::Unconfirmed {
                    return Err(StoreError::Conflict(format!(
                        "subscriber {subscriber_id} has not confirmed: only they can, by their link"
                    )));
                }
                let mut after = before.clone();
                after.status = SubscriberStatus::Active;
                put_subscriber(txn, &after)?;
                let ids = ids_under(&txn.open_table(BOUNCES_BY_SUBSCRIBER)?, subscriber_id)?;
                let mut table = txn.open_table(BOUNCES)?;
                for id in ids {
                    let Some(row) = table.get(id)? else { continue };
                    let mut bounce: Bounce = decode(row.value())?;
                    drop(row);
                    if bounce.counted {
                        bounce.counted = false;
                        table.insert(id, encode(&bounce).as_slice())?;
                    }
                }
                drop(table);
                let lifted = lift(txn, &after.email)?;
                events::append(txn, subscriber_changed(Some(&before), &after))?;
                Ok((after, lifted))
            })
            .await;
        self.bump_status_epoch();
        result
    }

    async fn add_suppressions(&self, suppressions: Vec<NewSuppression>) -> Result<u64, StoreError> {
        let result = self
            .write(move |txn| {
                let since = now();
                let mut added = 0;
                for new in suppressions {
                    added += u64::from(suppress(txn, new, since)?);
                }
                Ok(added)
            })
            .await;
        self.bump_status_epoch();
        result
    }

    async fn remove_suppression(&self, email: String) -> Result<Suppression, StoreError> {
        self.write(move |txn| lift(txn, &email)?.ok_or_else(|| StoreError::not_found("suppression", email)))
            .await
    }

    async fn suppressions(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<Suppression>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(SUPPRESSIONS)?;
            let rows = match &after {
                Some(after) => {
                    let key = normalise_email(after);
                    table.range::<&str>((
                        std::ops::Bound::Excluded(key.as_str()),
                        std::ops::Bound::Unbounded,
                    ))?
                }
                None => table.range::<&str>(..)?,
            };
            rows.take(limit).map(|row| decode(row?.1.value())).collect()
        })
        .await
    }

    async fn suppressed(&self, emails: Vec<String>) -> Result<Vec<Suppression>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(SUPPRESSIONS)?;
            let mut out = Vec::new();
            for email in emails {
                if let Some(row) = table.get(normalise_email(&email).as_str())? {
                    out.push(decode(row.value())?);
                }
            }
            Ok(out)
        })
        .await
    }
}
