//! Bounce reports and the suppression list in PostgreSQL. A report locks the
//! subscribers it is about (in id order, so two reports about one address cannot
//! deadlock), records itself, changes their statuses and appends their events in one
//! transaction; the rules themselves are `bounces::decide`.

use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::lists::{SUBSCRIBER_COLUMNS, bump_shared_status_epoch, subscriber};
use super::{PgStore, commit, domain_int, events, execute, query, query_opt, sql_int, sql_limit};
use crate::bounces::{
    Bounce, BounceFilter, BounceKind, NewBounce, NewSuppression, Rules, Suppression, decide,
};
use crate::domain::{Subscriber, SubscriberStatus, now, now_ms};
use crate::events::subscriber_changed;
use crate::store::{Bounces, StoreError, normalise_email};

/// The subscribers a report is about, locked, each with whether the report named them.
async fn targets(tx: &impl GenericClient, report: &NewBounce) -> Result<Vec<(Subscriber, bool)>, StoreError> {
    let named: Option<(i64, String)> = if let Some(id) = report.subscriber_id {
        query_opt(
            tx,
            "SELECT id, email FROM subscribers WHERE id = $1",
            &[&sql_int(id)],
        )
        .await?
        .map(|row| (row.get(0), row.get(1)))
    } else if let Some(newsletter) = report.newsletter_id {
        if query_opt(
            tx,
            "SELECT 1 FROM newsletters WHERE id = $1",
            &[&sql_int(newsletter)],
        )
        .await?
        .is_none()
        {
            return Err(StoreError::not_found("newsletter", newsletter));
        }
        query_opt(
            tx,
            "SELECT id, email FROM subscribers WHERE newsletter_id = $1 AND email_key = $2",
            &[&sql_int(newsletter), &normalise_email(&report.email)],
        )
        .await?
        .map(|row| (row.get(0), row.get(1)))
    } else {
        None
    };
    let everyone = named.is_none() && report.subscriber_id.is_none() && report.newsletter_id.is_none();
    let rows = if everyone || report.kind == BounceKind::Complaint {
        let address = named
            .as_ref()
            .map_or(report.email.as_str(), |(_, email)| email.as_str());
        query(
            tx,
            &format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE email_key = $1 ORDER BY id FOR UPDATE"
            ),
            &[&normalise_email(address)],
        )
        .await?
    } else if let Some((id, _)) = &named {
        query(
            tx,
            &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1 FOR UPDATE"),
            &[id],
        )
        .await?
    } else {
        Vec::new()
    };
    rows.iter()
        .map(|row| {
            let s = subscriber(row)?;
            let is_named = named.as_ref().is_none_or(|(id, _)| domain_int(*id) == s.id);
            Ok((s, is_named))
        })
        .collect()
}

async fn insert_bounce(
    tx: &impl GenericClient,
    at_ms: u64,
    report: &NewBounce,
    subscriber_id: Option<u64>,
    decision: &crate::bounces::Decision,
) -> Result<Bounce, StoreError> {
    let row = query(tx, "SELECT nextval(pg_get_serial_sequence('bounces', 'id'))", &[]).await?;
    let bounce = Bounce::new(domain_int(row[0].get(0)), at_ms, report, subscriber_id, decision);
    execute(
        tx,
        "INSERT INTO bounces (id, at_ms, subscriber_id, doc) VALUES ($1, $2, $3, $4)",
        &[
            &sql_int(bounce.id),
            &sql_int(at_ms),
            &subscriber_id.map(sql_int),
            &serde_json::to_value(&bounce)?,
        ],
    )
    .await?;
    Ok(bounce)
}

/// Scrubs the reports about a subscriber who is being erased (see the redb backend).
pub(super) async fn scrub_subscriber(tx: &impl GenericClient, subscriber_id: u64) -> Result<(), StoreError> {
    execute(
        tx,
        "UPDATE bounces SET doc = (doc - 'raw' - 'diagnostic') || jsonb_build_object('email', '')
         WHERE subscriber_id = $1",
        &[&sql_int(subscriber_id)],
    )
    .await?;
    Ok(())
}

fn suppression_doc(new: NewSuppression, since: u64) -> Result<(String, Value), StoreError> {
    let key = normalise_email(&new.email);
    Ok((key, serde_json::to_value(new.into_suppression(since))?))
}

#[async_trait::async_trait]
impl Bounces for PgStore {
    async fn record_bounce(&self, report: NewBounce, rules: Rules) -> Result<Vec<Bounce>, StoreError> {
        let report = report.capped();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let targets = targets(&tx, &report).await?;
        let at_ms = now_ms();
        let mut records = Vec::new();
        let mut changes = Vec::new();
        let mut suppress_address = false;
        for (before, named) in &targets {
            let soft = match report.kind {
                BounceKind::Soft => {
                    let row = query(
                        &tx,
                        "SELECT count(*) FROM bounces WHERE subscriber_id = $1 AND at_ms >= $2
                         AND doc->>'kind' = 'soft' AND (doc->>'counted')::boolean",
                        &[&sql_int(before.id), &sql_int(rules.soft_since(at_ms))],
                    )
                    .await?;
                    u32::try_from(row[0].get::<_, i64>(0)).unwrap_or(u32::MAX)
                }
                _ => 0,
            };
            let decision = decide(&rules, &report, Some(before), soft);
            suppress_address |= decision.suppress_address;
            let mine = report.about(before, *named);
            records.push(insert_bounce(&tx, at_ms, &mine, Some(before.id), &decision).await?);
            if let Some(status) = decision.status {
                let mut after = before.clone();
                after.status = status;
                execute(
                    &tx,
                    "UPDATE subscribers SET status = $2 WHERE id = $1",
                    &[&sql_int(after.id), &status.as_str()],
                )
                .await?;
                changes.extend(subscriber_changed(Some(before), &after));
            }
        }
        if targets.is_empty() {
            let decision = decide(&rules, &report, None, 0);
            suppress_address = decision.suppress_address;
            records.push(insert_bounce(&tx, at_ms, &report, None, &decision).await?);
        }
        if suppress_address && let Some(entry) = records[0].complaint_suppression() {
            let (key, doc) = suppression_doc(entry, now())?;
            execute(
                &tx,
                "INSERT INTO suppressions (email_key, doc) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&key, &doc],
            )
            .await?;
        }
        let changed = !changes.is_empty() || suppress_address;
        if changed {
            bump_shared_status_epoch(&tx).await?;
        }
        let mut log: Vec<_> = records.iter().filter_map(Bounce::event).collect();
        log.extend(changes);
        let appended = events::append(&tx, log).await?;
        commit(tx).await?;
        if changed {
            self.bump_status_epoch();
        }
        self.published(&appended);
        Ok(records)
    }

    async fn bounces(
        &self,
        filter: BounceFilter,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Bounce>, StoreError> {
        let client = self.client().await?;
        let below = sql_int(before.unwrap_or(i64::MAX as u64));
        let rows = if let Some(sid) = filter.subscriber_id {
            query(
                &client,
                "SELECT doc FROM bounces WHERE subscriber_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
                &[&sql_int(sid), &below, &sql_limit(limit)],
            )
            .await?
        } else if filter.unattributed {
            query(
                &client,
                "SELECT doc FROM bounces WHERE subscriber_id IS NULL AND id < $1 ORDER BY id DESC LIMIT $2",
                &[&below, &sql_limit(limit)],
            )
            .await?
        } else {
            query(
                &client,
                "SELECT doc FROM bounces WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&below, &sql_limit(limit)],
            )
            .await?
        };
        rows.iter()
            .map(|row| Ok(serde_json::from_value(row.get(0))?))
            .collect()
    }

    async fn reinstate(&self, subscriber_id: u64) -> Result<(Subscriber, Option<Suppression>), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = query_opt(
            &tx,
            &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1 FOR UPDATE"),
            &[&sql_int(subscriber_id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("subscriber", subscriber_id))?;
        let before = subscriber(&row)?;
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
        execute(
            &tx,
            "UPDATE subscribers SET status = 'active' WHERE id = $1",
            &[&sql_int(subscriber_id)],
        )
        .await?;
        execute(
            &tx,
            "UPDATE bounces SET doc = jsonb_set(doc, '{counted}', 'false')
             WHERE subscriber_id = $1 AND (doc->>'counted')::boolean",
            &[&sql_int(subscriber_id)],
        )
        .await?;
        let lifted = query_opt(
            &tx,
            "DELETE FROM suppressions WHERE email_key = $1 RETURNING doc",
            &[&normalise_email(&after.email)],
        )
        .await?
        .map(|row| serde_json::from_value(row.get(0)))
        .transpose()?;
        bump_shared_status_epoch(&tx).await?;
        let appended = events::append(&tx, subscriber_changed(Some(&before), &after)).await?;
        commit(tx).await?;
        self.bump_status_epoch();
        self.published(&appended);
        Ok((after, lifted))
    }

    async fn add_suppressions(&self, suppressions: Vec<NewSuppression>) -> Result<u64, StoreError> {
        let since = now();
        let (keys, docs): (Vec<String>, Vec<Value>) = suppressions
            .into_iter()
            .map(|new| suppression_doc(new, since))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let added = execute(
            &tx,
            "INSERT INTO suppressions (email_key, doc) SELECT * FROM unnest($1::text[], $2::jsonb[])
             ON CONFLICT DO NOTHING",
            &[&keys, &docs],
        )
        .await?;
        if added > 0 {
            bump_shared_status_epoch(&tx).await?;
        }
        commit(tx).await?;
        self.bump_status_epoch();
        Ok(added)
    }

    async fn remove_suppression(&self, email: String) -> Result<Suppression, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "DELETE FROM suppressions WHERE email_key = $1 RETURNING doc",
            &[&normalise_email(&email)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("suppression", email))?;
        Ok(serde_json::from_value(row.get(0))?)
    }

    async fn suppressions(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<Suppression>, StoreError> {
        let client = self.client().await?;
        let after = after.map(|a| normalise_email(&a)).unwrap_or_default();
        let rows = query(
            &client,
            "SELECT doc FROM suppressions WHERE email_key > $1 ORDER BY email_key LIMIT $2",
            &[&after, &sql_limit(limit)],
        )
        .await?;
        rows.iter()
            .map(|row| Ok(serde_json::from_value(row.get(0))?))
            .collect()
    }

    async fn suppressed(&self, emails: Vec<String>) -> Result<Vec<Suppression>, StoreError> {
        let keys: Vec<String> = emails.iter().map(|e| normalise_email(e)).collect();
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT doc FROM suppressions WHERE email_key = ANY($1)",
            &[&keys],
        )
        .await?;
        rows.iter()
            .map(|row| Ok(serde_json::from_value(row.get(0))?))
            .collect()
    }
}
