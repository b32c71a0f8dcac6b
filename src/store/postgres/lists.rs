//! Newsletters, subscribers and letters in PostgreSQL.

use std::collections::HashMap;

use serde_json::Value;
use tokio_postgres::Row;

use super::{
    PgStore, commit, domain_int, events, execute, is_unique_violation, query, query_opt, sql_int, sql_limit,
};
use crate::domain::*;
use crate::events::{NewEvent, subscriber_changed, subscriber_erased, types};
use crate::store::{Lists, StoreError, busy, normalise_email};

pub(super) const SUBSCRIBER_COLUMNS: &str = "id, newsletter_id, email, name, attributes, status, created_at";

fn status_of(text: &str) -> Result<SubscriberStatus, StoreError> {
    SubscriberStatus::parse(text)
        .ok_or_else(|| StoreError::Inconsistent(format!("unknown subscriber status {text:?}")))
}

/// A row of `SUBSCRIBER_COLUMNS`.
pub(super) fn subscriber(row: &Row) -> Result<Subscriber, StoreError> {
    let attributes: Value = row.get(4);
    let Value::Object(attributes) = attributes else {
        return Err(StoreError::Inconsistent(
            "subscriber attributes are not an object".into(),
        ));
    };
    Ok(Subscriber {
        id: domain_int(row.get(0)),
        newsletter_id: domain_int(row.get(1)),
        email: row.get(2),
        name: row.get(3),
        attributes,
        status: status_of(row.get(5))?,
        created_at: domain_int(row.get(6)),
    })
}

pub(super) fn newsletter(row: &Row) -> Newsletter {
    Newsletter {
        id: domain_int(row.get(0)),
        name: row.get(1),
        from: row.get(2),
        created_at: domain_int(row.get(3)),
    }
}

async fn newsletter_exists(tx: &impl deadpool_postgres::GenericClient, id: u64) -> Result<bool, StoreError> {
    Ok(
        query_opt(tx, "SELECT 1 FROM newsletters WHERE id = $1", &[&sql_int(id)])
            .await?
            .is_some(),
    )
}

/// Rows of one import merged by email key, in first-seen order, as applying them one
/// after the other would leave them: a later row's name wins if it has one, attributes
/// merge. Returns the merged rows and how many rows were folded into an earlier one
/// (each an update of a subscriber this import inserts or updates).
fn merge_duplicates(subscribers: Vec<NewSubscriber>) -> (Vec<(String, NewSubscriber)>, u64) {
    let mut order: Vec<(String, NewSubscriber)> = Vec::with_capacity(subscribers.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(subscribers.len());
    let mut folded = 0;
    for new in subscribers {
        let key = normalise_email(&new.email);
        match index.get(&key) {
            Some(&i) => {
                let earlier = &mut order[i].1;
                if new.name.is_some() {
                    earlier.name = new.name;
                }
                earlier.attributes.extend(new.attributes);
                folded += 1;
            }
            None => {
                index.insert(key.clone(), order.len());
                order.push((key, new));
            }
        }
    }
    (order, folded)
}

/// An import that adds this many subscribers refreshes the planner's statistics.
const ANALYZE_AFTER_IMPORT: u64 = 10_000;

#[async_trait::async_trait]
impl Lists for PgStore {
    async fn create_newsletter(&self, name: String, from: String) -> Result<Newsletter, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = query(
            &tx,
            "INSERT INTO newsletters (name, from_addr, created_at) VALUES ($1, $2, $3)
             RETURNING id, name, from_addr, created_at",
            &[&name, &from, &sql_int(now())],
        )
        .await?;
        commit(tx).await?;
        Ok(newsletter(&row[0]))
    }

    async fn newsletter(&self, id: u64) -> Result<Newsletter, StoreError> {
        let client = self.client().await?;
        let tx = &client;
        let row = query_opt(
            tx,
            "SELECT id, name, from_addr, created_at FROM newsletters WHERE id = $1",
            &[&sql_int(id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("newsletter", id))?;
        Ok(newsletter(&row))
    }

    async fn newsletters_after(&self, after: u64, limit: usize) -> Result<Vec<Newsletter>, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT id, name, from_addr, created_at FROM newsletters WHERE id > $1 ORDER BY id LIMIT $2",
            &[&sql_int(after), &sql_limit(limit)],
        )
        .await?;
        Ok(rows.iter().map(newsletter).collect())
    }

    async fn update_newsletter(
        &self,
        id: u64,
        name: Option<String>,
        from: Option<String>,
    ) -> Result<Newsletter, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "UPDATE newsletters SET name = COALESCE($2, name), from_addr = COALESCE($3, from_addr)
             WHERE id = $1 RETURNING id, name, from_addr, created_at",
            &[&sql_int(id), &name, &from],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("newsletter", id))?;
        Ok(newsletter(&row))
    }

    async fn delete_newsletter(&self, id: u64) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The row lock keeps a concurrent import or letter from slipping in between the
        // checks and the delete (each of them reads the newsletter first).
        query_opt(
            &tx,
            "SELECT 1 FROM newsletters WHERE id = $1 FOR UPDATE",
            &[&sql_int(id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("newsletter", id))?;
        let subscribers: i64 = query(
            &tx,
            "SELECT count(*) FROM subscribers WHERE newsletter_id = $1",
            &[&sql_int(id)],
        )
        .await?[0]
            .get(0);
        if subscribers > 0 {
            return Err(StoreError::Conflict(format!(
                "newsletter {id} has {subscribers} subscriber(s): erase them first"
            )));
        }
        if let Some(job) = unfinished_job(&tx, "newsletter_id = $1", id).await? {
            return Err(busy(&format!("newsletter {id}"), &job));
        }
        execute(
            &tx,
            "DELETE FROM letters WHERE newsletter_id = $1",
            &[&sql_int(id)],
        )
        .await?;
        execute(&tx, "DELETE FROM newsletters WHERE id = $1", &[&sql_int(id)]).await?;
        commit(tx).await
    }

    async fn subscribe_unconfirmed(
        &self,
        newsletter_id: u64,
        new: NewSubscriber,
    ) -> Result<(Subscriber, bool), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !newsletter_exists(&tx, newsletter_id).await? {
            return Err(StoreError::not_found("newsletter", newsletter_id));
        }
        let key = normalise_email(&new.email);
        let inserted = query_opt(
            &tx,
            &format!(
                "INSERT INTO subscribers (newsletter_id, email, email_key, name, attributes, status, created_at)
                 VALUES ($1, $2, $3, $4, $5, 'unconfirmed', $6)
                 ON CONFLICT (newsletter_id, email_key) DO NOTHING
                 RETURNING {SUBSCRIBER_COLUMNS}"
            ),
            &[
                &sql_int(newsletter_id),
                &new.email,
                &key,
                &new.name,
                &Value::Object(new.attributes),
                &sql_int(now()),
            ],
        )
        .await?;
        let Some(row) = inserted else {
            let row = query_opt(
                &tx,
                &format!(
                    "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE newsletter_id = $1 AND email_key = $2"
                ),
                &[&sql_int(newsletter_id), &key],
            )
            .await?
            .ok_or_else(|| StoreError::Inconsistent(format!("{key} is taken and missing")))?;
            return Ok((subscriber(&row)?, false));
        };
        let created = subscriber(&row)?;
        let appended = events::append(&tx, subscriber_changed(None, &created)).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok((created, true))
    }

    async fn unconfirmed_before(&self, created_before: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let client = self.client().await?;
        Ok(query(
            &client,
            "SELECT id FROM subscribers WHERE status = 'unconfirmed' AND created_at < $1 ORDER BY id LIMIT $2",
            &[&sql_int(created_before), &sql_limit(limit)],
        )
        .await?
        .iter()
        .map(|r| domain_int(r.get(0)))
        .collect())
    }

    async fn imported(&self, inserted: u64) {
        // Autovacuum analyses a table once a tenth of it changed, within a minute or so;
        // until then the planner takes a list that grew from nothing to a million rows
        // for a small one, and a search's plan can be 15x slower (benches/console.py).
        if inserted < ANALYZE_AFTER_IMPORT {
            return;
        }
        let analysed = async {
            let client = self.client().await?;
            client.batch_execute("ANALYZE subscribers").await?;
            Ok::<_, StoreError>(())
        };
        if let Err(e) = analysed.await {
            tracing::warn!(error = %e, "could not refresh the subscribers' statistics after an import");
        }
    }

    async fn upsert_subscribers(
        &self,
        newsletter_id: u64,
        subscribers: Vec<NewSubscriber>,
    ) -> Result<ImportSummary, StoreError> {
        let (rows, folded) = merge_duplicates(subscribers);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !newsletter_exists(&tx, newsletter_id).await? {
            return Err(StoreError::not_found("newsletter", newsletter_id));
        }
        let (mut emails, mut keys, mut names, mut attributes) = (
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
        );
        for (key, new) in rows {
            keys.push(key);
            emails.push(new.email);
            names.push(new.name);
            attributes.push(Value::Object(new.attributes));
        }
        // The rows as they were, locked, so each event says what changed.
        let before: HashMap<u64, Subscriber> = query(
            &tx,
            &format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers
                 WHERE newsletter_id = $1 AND email_key = ANY($2) ORDER BY id FOR UPDATE"
            ),
            &[&sql_int(newsletter_id), &keys],
        )
        .await?
        .iter()
        .map(|r| subscriber(r).map(|s| (s.id, s)))
        .collect::<Result<_, _>>()?;
        let total = keys.len() as u64;
        // One statement for the batch; `xmax = 0` tells a fresh row from an updated one,
        // and a row the import would not change is not written (nor returned).
        // WITH ORDINALITY keeps the rows in import order, so ids follow it.
        let written = query(
            &tx,
            &format!(
                "INSERT INTO subscribers (newsletter_id, email, email_key, name, attributes, status, created_at)
                 SELECT $1, u.email, u.key, u.name, u.attributes, 'active', $6
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::jsonb[]) WITH ORDINALITY
                      AS u(email, key, name, attributes, n)
                 ORDER BY u.n
                 ON CONFLICT (newsletter_id, email_key) DO UPDATE
                    SET name = coalesce(EXCLUDED.name, subscribers.name),
                        attributes = subscribers.attributes || EXCLUDED.attributes
                    WHERE subscribers.name IS DISTINCT FROM coalesce(EXCLUDED.name, subscribers.name)
                       OR subscribers.attributes IS DISTINCT FROM subscribers.attributes || EXCLUDED.attributes
                 RETURNING {SUBSCRIBER_COLUMNS}, (xmax = 0)"
            ),
            &[
                &sql_int(newsletter_id),
                &emails,
                &keys,
                &names,
                &attributes,
                &sql_int(now()),
            ],
        )
        .await?;
        let mut inserted = 0;
        let mut changes = Vec::with_capacity(written.len());
        for row in &written {
            let after = subscriber(row)?;
            let fresh: bool = row.get(7);
            inserted += u64::from(fresh);
            let change = match (fresh, before.get(&after.id)) {
                (true, _) => subscriber_changed(None, &after),
                (false, Some(before)) => subscriber_changed(Some(before), &after),
                // Inserted by another node after the read above.
                (false, None) => {
                    let mut event = NewEvent::new(types::SUBSCRIBER_UPDATED);
                    event.newsletter_id = Some(after.newsletter_id);
                    event.subscriber_id = Some(after.id);
                    event.data.insert("email".into(), after.email.clone().into());
                    Some(event)
                }
            };
            changes.extend(change);
        }
        let appended = events::append(&tx, changes).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok(ImportSummary {
            inserted,
            updated: total - inserted + folded,
            ..Default::default()
        })
    }

    async fn subscribers_after(
        &self,
        newsletter_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Subscriber>, StoreError> {
        let client = self.client().await?;
        let tx = &client;
        let rows = query(
            tx,
            &format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers
                 WHERE newsletter_id = $1 AND id > $2 ORDER BY id LIMIT $3"
            ),
            &[&sql_int(newsletter_id), &sql_int(after), &sql_limit(limit)],
        )
        .await?;
        rows.iter().map(subscriber).collect()
    }

    async fn search_subscribers(
        &self,
        newsletter_id: u64,
        filter: SubscriberFilter,
        after: u64,
        limit: usize,
        scan: usize,
    ) -> Result<SubscriberSearch, StoreError> {
        let client = self.client().await?;
        if !newsletter_exists(&client, newsletter_id).await? {
            return Err(StoreError::not_found("newsletter", newsletter_id));
        }
        // The look reads the next `scan` subscribers in id order and keeps what the
        // filter wants (`SubscriberFilter::matches` in SQL; strpos needs no escaping of
        // LIKE's wildcards). The outer LIMIT stops the walk as soon as the page is full,
        // so a common match reads a page's worth of rows, and a rare one at most `scan`.
        let status = filter.status.map(|s| s.as_str());
        let (key, value) = filter.attribute.clone().unzip();
        let rows = query(
            &client,
            &format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM (
                     SELECT {SUBSCRIBER_COLUMNS} FROM subscribers
                     WHERE newsletter_id = $1 AND id > $2 ORDER BY id LIMIT $3) look
                 WHERE ($4::text IS NULL OR strpos(lower(email), $4) > 0
                        OR strpos(lower(coalesce(name, '')), $4) > 0)
                   AND ($5::text IS NULL OR status = $5)
                   AND ($6::text IS NULL OR CASE jsonb_typeof(attributes -> $6)
                            WHEN 'string' THEN attributes ->> $6 ELSE (attributes -> $6)::text END = $7)
                 ORDER BY id LIMIT $8"
            ),
            &[
                &sql_int(newsletter_id),
                &sql_int(after),
                &sql_limit(scan),
                &filter.text,
                &status,
                &key,
                &value,
                &sql_limit(limit),
            ],
        )
        .await?;
        let items: Vec<Subscriber> = rows.iter().map(subscriber).collect::<Result<_, _>>()?;
        let next = match items.last() {
            Some(last) if items.len() == limit => Some(last.id),
            // The page did not fill: the whole look was read. Where it ended (if it
            // read all `scan`) is where the next one starts.
            _ => query_opt(
                &client,
                "SELECT id FROM subscribers WHERE newsletter_id = $1 AND id > $2 ORDER BY id OFFSET $3 LIMIT 1",
                &[&sql_int(newsletter_id), &sql_int(after), &sql_limit(scan.saturating_sub(1))],
            )
            .await?
            .map(|row| domain_int(row.get(0))),
        };
        Ok(SubscriberSearch { items, next })
    }

    async fn subscriber(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError> {
        let client = self.client().await?;
        let tx = &client;
        let row = query_opt(
            tx,
            &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1 AND newsletter_id = $2"),
            &[&sql_int(id), &sql_int(newsletter_id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("subscriber", id))?;
        subscriber(&row)
    }

    async fn subscriber_by_id(&self, id: u64) -> Result<Subscriber, StoreError> {
        let client = self.client().await?;
        let tx = &client;
        let row = query_opt(
            tx,
            &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1"),
            &[&sql_int(id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("subscriber", id))?;
        subscriber(&row)
    }

    async fn subscriber_by_email(
        &self,
        newsletter_id: u64,
        email: String,
    ) -> Result<Option<Subscriber>, StoreError> {
        let client = self.client().await?;
        let tx = &client;
        if !newsletter_exists(tx, newsletter_id).await? {
            return Err(StoreError::not_found("newsletter", newsletter_id));
        }
        let row = query_opt(
            tx,
            &format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE newsletter_id = $1 AND email_key = $2"
            ),
            &[&sql_int(newsletter_id), &normalise_email(&email)],
        )
        .await?;
        row.as_ref().map(subscriber).transpose()
    }

    async fn subscribers_with_email(&self, email: String) -> Result<Vec<Subscriber>, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE email_key = $1 ORDER BY id"),
            &[&normalise_email(&email)],
        )
        .await?;
        rows.iter().map(subscriber).collect()
    }

    async fn unsubscribe(&self, newsletter_id: u64, id: u64) -> Result<Subscriber, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = query_opt(
            &tx,
            &format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1 AND newsletter_id = $2 FOR UPDATE"
            ),
            &[&sql_int(id), &sql_int(newsletter_id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("subscriber", id))?;
        let before = subscriber(&row)?;
        let mut after = before.clone();
        after.status = SubscriberStatus::Unsubscribed;
        execute(
            &tx,
            "UPDATE subscribers SET status = 'unsubscribed' WHERE id = $1",
            &[&sql_int(id)],
        )
        .await?;
        bump_shared_status_epoch(&tx).await?;
        let appended = events::append(&tx, subscriber_changed(Some(&before), &after)).await?;
        commit(tx).await?;
        self.bump_status_epoch();
        self.published(&appended);
        Ok(after)
    }

    async fn update_subscriber(&self, id: u64, patch: SubscriberPatch) -> Result<Subscriber, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = query_opt(
            &tx,
            &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1 FOR UPDATE"),
            &[&sql_int(id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("subscriber", id))?;
        let mut subscriber = subscriber(&row)?;
        let before = subscriber.clone();
        let home = subscriber.newsletter_id;
        // The unique (newsletter, email_key) index refuses a taken email below.
        let confirming = patch.confirming;
        patch.apply(&mut subscriber);
        let statement = tx
            .prepare_cached(
                "UPDATE subscribers SET email = $2, email_key = $3, name = $4, attributes = $5, status = $6
                 WHERE id = $1",
            )
            .await?;
        let attributes = Value::Object(std::mem::take(&mut subscriber.attributes));
        let written = tx
            .execute(
                &statement,
                &[
                    &sql_int(id),
                    &subscriber.email,
                    &normalise_email(&subscriber.email),
                    &subscriber.name,
                    &attributes,
                    &subscriber.status.as_str(),
                ],
            )
            .await;
        match written {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!(
                    "another subscriber of newsletter {home} has the email {}",
                    subscriber.email
                )));
            }
            other => other?,
        };
        let Value::Object(attributes) = attributes else {
            unreachable!("made from an object above")
        };
        subscriber.attributes = attributes;
        bump_shared_status_epoch(&tx).await?;
        let event = match confirming {
            true => crate::events::subscriber_confirmed(&before, &subscriber),
            false => subscriber_changed(Some(&before), &subscriber),
        };
        let appended = events::append(&tx, event).await?;
        commit(tx).await?;
        self.bump_status_epoch();
        self.published(&appended);
        Ok(subscriber)
    }

    async fn delete_subscriber(&self, id: u64) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = query_opt(
            &tx,
            "DELETE FROM subscribers WHERE id = $1 RETURNING newsletter_id, email",
            &[&sql_int(id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("subscriber", id))?;
        let (home, email): (i64, String) = (row.get(0), row.get(1));
        // Replies and reasons may quote the address ("550 <ann@…>: no such user").
        execute(
            &tx,
            "UPDATE deliveries SET email = '', detail = replace(detail::text, $3, '[erased]')::jsonb
             WHERE subscriber_id = $1 AND job_id IN (SELECT id FROM jobs WHERE newsletter_id = $2)",
            &[&sql_int(id), &home, &email],
        )
        .await?;
        events::scrub_subscriber(&tx, id).await?;
        super::bounces::scrub_subscriber(&tx, id).await?;
        super::automations::forget_subscriber(&tx, id).await?;
        super::messages::forget_subscriber(&tx, id).await?;
        bump_shared_status_epoch(&tx).await?;
        let appended = events::append(&tx, [subscriber_erased(domain_int(home), id)]).await?;
        commit(tx).await?;
        self.bump_status_epoch();
        self.published(&appended);
        Ok(())
    }

    async fn create_letter(&self, mut letter: Letter) -> Result<Letter, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !newsletter_exists(&tx, letter.newsletter_id).await? {
            return Err(StoreError::not_found("newsletter", letter.newsletter_id));
        }
        let row = query(
            &tx,
            "INSERT INTO letters (newsletter_id, doc) VALUES ($1, '{}') RETURNING id",
            &[&sql_int(letter.newsletter_id)],
        )
        .await?;
        letter.id = domain_int(row[0].get(0));
        execute(
            &tx,
            "UPDATE letters SET doc = $2 WHERE id = $1",
            &[&sql_int(letter.id), &serde_json::to_value(&letter)?],
        )
        .await?;
        commit(tx).await?;
        Ok(letter)
    }

    async fn letter(&self, id: u64) -> Result<Letter, StoreError> {
        let client = self.client().await?;
        let tx = &client;
        let row = query_opt(tx, "SELECT doc FROM letters WHERE id = $1", &[&sql_int(id)])
            .await?
            .ok_or_else(|| StoreError::not_found("letter", id))?;
        Ok(serde_json::from_value(row.get(0))?)
    }

    async fn letters_after(
        &self,
        newsletter_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Letter>, StoreError> {
        let client = self.client().await?;
        if !newsletter_exists(&client, newsletter_id).await? {
            return Err(StoreError::not_found("newsletter", newsletter_id));
        }
        let rows = query(
            &client,
            "SELECT doc FROM letters WHERE newsletter_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[&sql_int(newsletter_id), &sql_int(after), &sql_limit(limit)],
        )
        .await?;
        rows.iter()
            .map(|row| Ok(serde_json::from_value(row.get(0))?))
            .collect()
    }

    async fn update_letter(&self, mut letter: Letter) -> Result<Letter, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let before: Letter = lock_letter(&tx, letter.id).await?;
        if let Some(job) = unfinished_job(&tx, "(doc->>'letter_id')::bigint = $1", letter.id).await? {
            return Err(busy(&format!("letter {}", letter.id), &job));
        }
        letter.newsletter_id = before.newsletter_id;
        letter.created_at = before.created_at;
        execute(
            &tx,
            "UPDATE letters SET doc = $2 WHERE id = $1",
            &[&sql_int(letter.id), &serde_json::to_value(&letter)?],
        )
        .await?;
        commit(tx).await?;
        Ok(letter)
    }

    async fn delete_letter(&self, id: u64) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock_letter(&tx, id).await?;
        if let Some(job) = unfinished_job(&tx, "(doc->>'letter_id')::bigint = $1", id).await? {
            return Err(busy(&format!("letter {id}"), &job));
        }
        execute(&tx, "DELETE FROM letters WHERE id = $1", &[&sql_int(id)]).await?;
        commit(tx).await
    }
}

/// A letter, locked for update: a job being created for it (which takes a share lock)
/// commits first or waits for this transaction.
async fn lock_letter(tx: &impl deadpool_postgres::GenericClient, id: u64) -> Result<Letter, StoreError> {
    let row = query_opt(
        tx,
        "SELECT doc FROM letters WHERE id = $1 FOR UPDATE",
        &[&sql_int(id)],
    )
    .await?
    .ok_or_else(|| StoreError::not_found("letter", id))?;
    Ok(serde_json::from_value(row.get(0))?)
}

/// The first job matching `condition` (with `$1` = `id`) that is not finished, if any.
async fn unfinished_job(
    tx: &impl deadpool_postgres::GenericClient,
    condition: &str,
    id: u64,
) -> Result<Option<Job>, StoreError> {
    let finished: Vec<&str> = JobState::ALL
        .into_iter()
        .filter(|s| s.is_finished())
        .map(JobState::as_str)
        .collect();
    let row = query_opt(
        tx,
        &format!(
            "SELECT {} FROM jobs WHERE {condition} AND state <> ALL($2) ORDER BY id LIMIT 1",
            super::jobs::JOB_COLUMNS
        ),
        &[&sql_int(id), &finished],
    )
    .await?;
    row.map(|row| super::jobs::job(&row)).transpose()
}

/// Counts a status change for the whole fleet, in the transaction that makes it: the
/// other nodes see the count move only once the change is visible (`PgStore::refresh`).
pub(super) async fn bump_shared_status_epoch(
    tx: &impl deadpool_postgres::GenericClient,
) -> Result<(), StoreError> {
    execute(
        tx,
        "UPDATE fleet_counters SET value = value + 1 WHERE name = 'status_epoch'",
        &[],
    )
    .await?;
    Ok(())
}
