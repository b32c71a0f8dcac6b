//! Moving a whole installation in and out of PostgreSQL (`store::Transfer`): an export
//! reads every table in one REPEATABLE READ snapshot, a page at a time; an import writes
//! each chunk in one transaction (subscribers and deliveries as `unnest` batches) and
//! moves the id sequences past what it wrote.

use serde_json::Value;
use tokio::sync::mpsc;

use super::deliveries::{delivery, due_ms, state_code};
use super::jobs::{JOB_COLUMNS, job, put_job};
use super::lists::{SUBSCRIBER_COLUMNS, newsletter, subscriber};
use super::plugins::{plugin, version};
use super::{PgStore, commit, domain_int, events, execute, query, sql_int};
use crate::domain::*;
use crate::store::{Inventory, Record, StoreError, Transfer, normalise_email, refuse_in_flight};

/// Rows per page of an export, and so records per chunk it sends.
const PAGE: i64 = 1000;

async fn send(out: &mpsc::Sender<Vec<Record>>, chunk: Vec<Record>) -> Result<(), StoreError> {
    if chunk.is_empty() {
        return Ok(());
    }
    out.send(chunk).await.map_err(|_| StoreError::Closed)
}

#[async_trait::async_trait]
impl Transfer for PgStore {
    async fn export(&self, out: mpsc::Sender<Vec<Record>>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The snapshot stays open while the importer writes each chunk; it is not stuck.
        execute(&tx, "SET LOCAL idle_in_transaction_session_timeout = 0", &[]).await?;
        let rows = query(&tx, "SELECT name, value FROM secrets ORDER BY name", &[]).await?;
        let secrets = rows
            .iter()
            .map(|r| Record::Secret {
                name: r.get(0),
                value: r.get(1),
            })
            .collect();
        send(&out, secrets).await?;
        let rows = query(
            &tx,
            "SELECT id, name, from_addr, created_at FROM newsletters ORDER BY id",
            &[],
        )
        .await?;
        send(
            &out,
            rows.iter().map(|r| Record::Newsletter(newsletter(r))).collect(),
        )
        .await?;
        let mut after = 0i64;
        loop {
            let rows = query(
                &tx,
                &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id > $1 ORDER BY id LIMIT $2"),
                &[&after, &PAGE],
            )
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            let chunk = rows
                .iter()
                .map(|r| subscriber(r).map(Record::Subscriber))
                .collect::<Result<_, _>>()?;
            send(&out, chunk).await?;
        }
        let rows = query(&tx, "SELECT doc FROM letters ORDER BY id", &[]).await?;
        let letters = rows
            .iter()
            .map(|r| Ok(Record::Letter(serde_json::from_value(r.get(0))?)))
            .collect::<Result<_, StoreError>>()?;
        send(&out, letters).await?;
        // Components are up to a few MiB each: a page of ten.
        let mut after = String::new();
        loop {
            let rows = query(
                &tx,
                "SELECT id, kind, name, size, created_at, bytes FROM plugin_blobs WHERE id > $1 ORDER BY id LIMIT 10",
                &[&after],
            )
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            let chunk = rows
                .iter()
                .map(|r| {
                    Ok(Record::Plugin {
                        plugin: plugin(r)?,
                        bytes: r.get(5),
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            send(&out, chunk).await?;
        }
        let rows = query(
            &tx,
            "SELECT version, id, size, uploaded_at, name FROM plugin_versions ORDER BY name, version",
            &[],
        )
        .await?;
        let versions = rows
            .iter()
            .map(|r| Record::PluginVersion {
                name: r.get(4),
                version: version(r),
            })
            .collect();
        send(&out, versions).await?;
        let rows = query(&tx, "SELECT name, id FROM plugin_names ORDER BY name", &[]).await?;
        let names = rows
            .iter()
            .map(|r| Record::PluginLatest {
                name: r.get(0),
                id: r.get(1),
            })
            .collect();
        send(&out, names).await?;
        let rows = query(&tx, &format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id"), &[]).await?;
        let jobs = rows
            .iter()
            .map(|r| job(r).map(Record::Job))
            .collect::<Result<_, _>>()?;
        send(&out, jobs).await?;
        let (mut after_job, mut after_sub) = (0i64, 0i64);
        loop {
            let rows = query(
                &tx,
                "SELECT subscriber_id, email, attempts, detail, job_id FROM deliveries
                 WHERE (job_id, subscriber_id) > ($1, $2) ORDER BY job_id, subscriber_id LIMIT $3",
                &[&after_job, &after_sub, &PAGE],
            )
            .await?;
            let Some(last) = rows.last() else { break };
            (after_job, after_sub) = (last.get(4), last.get(0));
            let chunk = rows
                .iter()
                .map(|r| delivery(domain_int(r.get(4)), r).map(Record::Delivery))
                .collect::<Result<_, _>>()?;
            send(&out, chunk).await?;
        }
        let rows = query(
            &tx,
            "SELECT key, request_hash, job_id, created_at FROM idempotency_keys ORDER BY key",
            &[],
        )
        .await?;
        let keys = rows
            .iter()
            .map(|r| Record::IdempotencyKey {
                key: r.get(0),
                request_hash: r.get(1),
                job_id: domain_int(r.get(2)),
                created_at: domain_int(r.get(3)),
            })
            .collect();
        send(&out, keys).await?;
        let mut after_event = 0i64;
        loop {
            let rows = query(
                &tx,
                &format!(
                    "SELECT {} FROM events WHERE id > $1 ORDER BY id LIMIT $2",
                    events::COLUMNS
                ),
                &[&after_event, &PAGE],
            )
            .await?;
            let Some(last) = rows.last() else { break };
            after_event = last.get(0);
            let chunk = rows
                .iter()
                .map(|r| events::event(r).map(Record::Event))
                .collect::<Result<_, _>>()?;
            send(&out, chunk).await?;
        }
        let mut after_bounce = 0i64;
        loop {
            let rows = query(
                &tx,
                "SELECT id, doc FROM bounces WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after_bounce, &PAGE],
            )
            .await?;
            let Some(last) = rows.last() else { break };
            after_bounce = last.get(0);
            let chunk = rows
                .iter()
                .map(|r| Ok(Record::Bounce(serde_json::from_value(r.get(1))?)))
                .collect::<Result<_, StoreError>>()?;
            send(&out, chunk).await?;
        }
        let mut after_key = String::new();
        loop {
            let rows = query(
                &tx,
                "SELECT email_key, doc FROM suppressions WHERE email_key > $1 ORDER BY email_key LIMIT $2",
                &[&after_key, &PAGE],
            )
            .await?;
            let Some(last) = rows.last() else { break };
            after_key = last.get(0);
            let chunk = rows
                .iter()
                .map(|r| Ok(Record::Suppression(serde_json::from_value(r.get(1))?)))
                .collect::<Result<_, StoreError>>()?;
            send(&out, chunk).await?;
        }
        export_automations(&tx, &out).await?;
        export_messages(&tx, &out).await?;
        export_webhooks(&tx, &out).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn import(&self, records: Vec<Record>) -> Result<(), StoreError> {
        // Validate first: nothing is written if one record cannot be.
        refuse_in_flight(&records)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Subscribers and deliveries, the many, go in batches of one statement.
        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut log = Vec::new();
        for record in records {
            match record {
                Record::Subscriber(s) => subscribers.push(s),
                Record::Delivery(d) => deliveries.push(d),
                // Events refer to nothing that must be written before them.
                Record::Event(e) => log.push(e),
                other => {
                    // Keep the order: what a record refers to was written before it.
                    flush_subscribers(&tx, &mut subscribers).await?;
                    flush_deliveries(&tx, &mut deliveries).await?;
                    import_one(&tx, other).await?;
                }
            }
        }
        flush_subscribers(&tx, &mut subscribers).await?;
        flush_deliveries(&tx, &mut deliveries).await?;
        if !log.is_empty() {
            events::insert(&tx, &log).await?;
            execute(
                &tx,
                "UPDATE fleet_counters SET value = greatest(value, (SELECT max(id) FROM events))
                 WHERE name = 'event_id'",
                &[],
            )
            .await?;
        }
        // New ids continue after the imported ones.
        for table in [
            "newsletters",
            "subscribers",
            "letters",
            "jobs",
            "bounces",
            "automations",
            "automation_failures",
            "queued_sends",
            "messages",
            "webhooks",
            "webhook_sends",
        ] {
            query(
                &tx,
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table} HAVING max(id) IS NOT NULL"
                ),
                &[],
            )
            .await?;
        }
        query(
            &tx,
            "SELECT setval('timer_ids', max(id)) FROM timers HAVING max(id) IS NOT NULL",
            &[],
        )
        .await?;
        commit(tx).await
    }

    async fn inventory(&self) -> Result<Inventory, StoreError> {
        let client = self.client().await?;
        let row = query(
            &client,
            "SELECT (SELECT count(*) FROM secrets), (SELECT count(*) FROM newsletters),
                    (SELECT count(*) FROM subscribers), (SELECT count(*) FROM letters),
                    (SELECT count(*) FROM plugin_blobs), (SELECT count(*) FROM plugin_versions),
                    (SELECT count(*) FROM plugin_names), (SELECT count(*) FROM jobs),
                    (SELECT count(*) FROM deliveries), (SELECT count(*) FROM idempotency_keys),
                    (SELECT count(*) FROM events), (SELECT count(*) FROM bounces),
                    (SELECT count(*) FROM suppressions),
                    (SELECT count(*) FROM automations), (SELECT count(*) FROM automation_versions),
                    (SELECT count(*) FROM automation_states), (SELECT count(*) FROM timers),
                    (SELECT count(*) FROM automation_failures), (SELECT count(*) FROM queued_sends),
                    (SELECT count(*) FROM messages),
                    (SELECT count(*) FROM webhooks), (SELECT count(*) FROM webhook_sends),
                    coalesce(sum(pending), 0)::bigint, coalesce(sum(sending), 0)::bigint,
                    coalesce(sum(delivered), 0)::bigint, coalesce(sum(skipped), 0)::bigint,
                    coalesce(sum(retrying), 0)::bigint, coalesce(sum(failed), 0)::bigint,
                    coalesce(sum(cancelled), 0)::bigint
             FROM jobs",
            &[],
        )
        .await?;
        let r = &row[0];
        let n = |i: usize| domain_int(r.get(i));
        Ok(Inventory {
            secrets: n(0),
            newsletters: n(1),
            subscribers: n(2),
            letters: n(3),
            plugins: n(4),
            plugin_versions: n(5),
            plugin_names: n(6),
            jobs: n(7),
            deliveries: n(8),
            idempotency_keys: n(9),
            events: n(10),
            bounces: n(11),
            suppressions: n(12),
            automations: n(13),
            automation_versions: n(14),
            automation_states: n(15),
            timers: n(16),
            automation_failures: n(17),
            queued_sends: n(18),
            messages: n(19),
            webhooks: n(20),
            webhook_sends: n(21),
            counts: Counts {
                pending: n(22),
                sending: n(23),
                delivered: n(24),
                skipped: n(25),
                retrying: n(26),
                failed: n(27),
                cancelled: n(28),
            },
        })
    }
}

/// Writes one record.
async fn import_one(tx: &deadpool_postgres::Transaction<'_>, record: Record) -> Result<(), StoreError> {
    match record {
        Record::Secret { name, value } => {
            execute(
                tx,
                "INSERT INTO secrets (name, value) VALUES ($1, $2)",
                &[&name, &value],
            )
            .await?;
        }
        Record::Newsletter(n) => {
            execute(
                tx,
                "INSERT INTO newsletters (id, name, from_addr, created_at) VALUES ($1, $2, $3, $4)",
                &[&sql_int(n.id), &n.name, &n.from, &sql_int(n.created_at)],
            )
            .await?;
        }
        Record::Letter(l) => {
            execute(
                tx,
                "INSERT INTO letters (id, newsletter_id, doc) VALUES ($1, $2, $3)",
                &[
                    &sql_int(l.id),
                    &sql_int(l.newsletter_id),
                    &serde_json::to_value(&l)?,
                ],
            )
            .await?;
        }
        Record::Plugin { plugin, bytes } => {
            execute(
                tx,
                "INSERT INTO plugin_blobs (id, kind, name, size, created_at, bytes) VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &plugin.id,
                    &plugin.kind.as_str(),
                    &plugin.name,
                    &sql_int(plugin.size),
                    &sql_int(plugin.created_at),
                    &bytes,
                ],
            )
            .await?;
        }
        Record::PluginVersion { name, version } => {
            execute(
                tx,
                "INSERT INTO plugin_versions (name, version, id, size, uploaded_at) VALUES ($1, $2, $3, $4, $5)",
                &[
                    &name,
                    &sql_int(version.version),
                    &version.id,
                    &sql_int(version.size),
                    &sql_int(version.uploaded_at),
                ],
            )
            .await?;
        }
        Record::PluginLatest { name, id } => {
            execute(
                tx,
                "INSERT INTO plugin_names (name, id) VALUES ($1, $2)",
                &[&name, &id],
            )
            .await?;
        }
        Record::Job(job) => {
            // The row, then every column through the one function that writes a job.
            execute(
                tx,
                "INSERT INTO jobs (id, newsletter_id, state, doc) VALUES ($1, $2, $3, '{}')",
                &[&sql_int(job.id), &sql_int(job.newsletter_id), &job.state.as_str()],
            )
            .await?;
            put_job(tx, &job).await?;
        }
        Record::IdempotencyKey {
            key,
            request_hash,
            job_id,
            created_at,
        } => {
            execute(
                tx,
                "INSERT INTO idempotency_keys (key, request_hash, job_id, created_at) VALUES ($1, $2, $3, $4)",
                &[&key, &request_hash, &sql_int(job_id), &sql_int(created_at)],
            )
            .await?;
        }
        // `import` batches these; one alone is a batch of one.
        Record::Subscriber(s) => flush_subscribers(tx, &mut vec![s]).await?,
        Record::Delivery(d) => flush_deliveries(tx, &mut vec![d]).await?,
        Record::Event(e) => events::insert(tx, &[e]).await?,
        Record::Bounce(b) => {
            execute(
                tx,
                "INSERT INTO bounces (id, at_ms, subscriber_id, doc) VALUES ($1, $2, $3, $4)",
                &[
                    &sql_int(b.id),
                    &sql_int(b.at_ms),
                    &b.subscriber_id.map(sql_int),
                    &serde_json::to_value(&b)?,
                ],
            )
            .await?;
        }
        Record::Suppression(s) => {
            execute(
                tx,
                "INSERT INTO suppressions (email_key, doc) VALUES ($1, $2)",
                &[&normalise_email(&s.email), &serde_json::to_value(&s)?],
            )
            .await?;
        }
        Record::Automation(a) => {
            execute(
                tx,
                "INSERT INTO automations (id, name, turns, doc) VALUES ($1, $2, $3, $4)",
                &[
                    &sql_int(a.id),
                    &a.spec.name,
                    &sql_int(a.turns),
                    &serde_json::to_value(&a)?,
                ],
            )
            .await?;
        }
        Record::AutomationVersion {
            automation_id,
            version,
        } => {
            execute(
                tx,
                "INSERT INTO automation_versions (automation_id, version, doc) VALUES ($1, $2, $3)",
                &[
                    &sql_int(automation_id),
                    &i64::from(version.version),
                    &serde_json::to_value(&version)?,
                ],
            )
            .await?;
        }
        Record::AutomationState {
            automation_id,
            subscriber_id,
            state,
        } => {
            execute(
                tx,
                "INSERT INTO automation_states (automation_id, subscriber_id, state) VALUES ($1, $2, $3)",
                &[&sql_int(automation_id), &sql_int(subscriber_id), &state],
            )
            .await?;
        }
        Record::Timer(t) => {
            execute(
                tx,
                "INSERT INTO timers (automation_id, subscriber_id, name, id, due_ms, data)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &sql_int(t.automation_id),
                    &sql_int(t.subscriber_id),
                    &t.name,
                    &sql_int(t.id),
                    &sql_int(t.due_ms),
                    &t.data,
                ],
            )
            .await?;
        }
        Record::AutomationFailure(f) => {
            execute(
                tx,
                "INSERT INTO automation_failures (automation_id, id, doc) VALUES ($1, $2, $3)",
                &[
                    &sql_int(f.automation_id),
                    &sql_int(f.id),
                    &serde_json::to_value(&f)?,
                ],
            )
            .await?;
        }
        Record::QueuedSend(q) => {
            execute(
                tx,
                "INSERT INTO queued_sends (id, automation_id, subscriber_id, letter_id, at_ms)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &sql_int(q.id),
                    &sql_int(q.automation_id),
                    &sql_int(q.subscriber_id),
                    &sql_int(q.letter_id),
                    &sql_int(q.at_ms),
                ],
            )
            .await?;
        }
        Record::Message {
            message: m,
            idempotency,
        } => {
            let (key, hash) = match idempotency {
                Some((key, hash)) => (Some(key), Some(hash)),
                None => (None, None),
            };
            execute(
                tx,
                "INSERT INTO messages (id, subscriber_id, state, next_attempt_ms, lease_node, lease_until_ms,
                                       idempotency_key, request_hash, doc)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &sql_int(m.id),
                    &sql_int(m.subscriber_id),
                    &m.state.as_str(),
                    &sql_int(m.next_attempt_ms),
                    &m.lease_node,
                    &sql_int(m.lease_until_ms),
                    &key,
                    &hash,
                    &serde_json::to_value(&m)?,
                ],
            )
            .await?;
        }
        Record::Webhook(w) => super::webhooks::import_webhook(tx, &w).await?,
        Record::WebhookSend(s) => super::webhooks::import_send(tx, &s).await?,
    }
    Ok(())
}

/// Webhook endpoints, then their sends, in keyed pages.
async fn export_webhooks(
    tx: &deadpool_postgres::Transaction<'_>,
    out: &mpsc::Sender<Vec<Record>>,
) -> Result<(), StoreError> {
    let rows = query(tx, "SELECT doc FROM webhooks ORDER BY id", &[]).await?;
    let chunk = rows
        .iter()
        .map(|r| Ok(Record::Webhook(serde_json::from_value(r.get(0))?)))
        .collect::<Result<_, StoreError>>()?;
    send(out, chunk).await?;
    let mut after = 0i64;
    loop {
        let rows = query(
            tx,
            "SELECT id, doc FROM webhook_sends WHERE id > $1 ORDER BY id LIMIT 1000",
            &[&after],
        )
        .await?;
        let Some(last) = rows.last() else { return Ok(()) };
        after = last.get(0);
        let chunk = rows
            .iter()
            .map(|r| Ok(Record::WebhookSend(serde_json::from_value(r.get(1))?)))
            .collect::<Result<_, StoreError>>()?;
        send(out, chunk).await?;
    }
}

/// One-off messages with their idempotency keys, in keyed pages.
async fn export_messages(
    tx: &deadpool_postgres::Transaction<'_>,
    out: &mpsc::Sender<Vec<Record>>,
) -> Result<(), StoreError> {
    let mut after = 0i64;
    loop {
        let rows = query(
            tx,
            "SELECT id, idempotency_key, request_hash, doc FROM messages WHERE id > $1 ORDER BY id LIMIT 1000",
            &[&after],
        )
        .await?;
        let Some(last) = rows.last() else { return Ok(()) };
        after = last.get(0);
        let chunk = rows
            .iter()
            .map(|r| {
                let idempotency = match (r.get::<_, Option<String>>(1), r.get::<_, Option<String>>(2)) {
                    (Some(key), Some(hash)) => Some((key, hash)),
                    _ => None,
                };
                Ok(Record::Message {
                    message: serde_json::from_value(r.get(3))?,
                    idempotency,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        send(out, chunk).await?;
    }
}

/// Automations and everything of theirs, automations first, in keyed pages.
async fn export_automations(
    tx: &deadpool_postgres::Transaction<'_>,
    out: &tokio::sync::mpsc::Sender<Vec<Record>>,
) -> Result<(), StoreError> {
    let rows = query(tx, "SELECT doc, turns FROM automations ORDER BY id", &[]).await?;
    let mut chunk = Vec::new();
    for r in &rows {
        let mut a: crate::automations::Automation = serde_json::from_value(r.get(0))?;
        a.turns = domain_int(r.get(1));
        chunk.push(Record::Automation(a));
    }
    send(out, chunk).await?;
    let rows = query(
        tx,
        "SELECT automation_id, doc FROM automation_versions ORDER BY automation_id, version",
        &[],
    )
    .await?;
    let chunk = rows
        .iter()
        .map(|r| {
            Ok(Record::AutomationVersion {
                automation_id: domain_int(r.get(0)),
                version: serde_json::from_value(r.get(1))?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    send(out, chunk).await?;
    let (mut after_a, mut after_s) = (-1i64, -1i64);
    loop {
        let rows = query(
            tx,
            "SELECT automation_id, subscriber_id, state FROM automation_states
             WHERE (automation_id, subscriber_id) > ($1, $2) ORDER BY automation_id, subscriber_id LIMIT $3",
            &[&after_a, &after_s, &PAGE],
        )
        .await?;
        let Some(last) = rows.last() else { break };
        (after_a, after_s) = (last.get(0), last.get(1));
        let chunk = rows
            .iter()
            .map(|r| Record::AutomationState {
                automation_id: domain_int(r.get(0)),
                subscriber_id: domain_int(r.get(1)),
                state: r.get(2),
            })
            .collect();
        send(out, chunk).await?;
    }
    let mut after_t = -1i64;
    loop {
        let rows = query(
            tx,
            "SELECT automation_id, subscriber_id, name, id, due_ms, data FROM timers
             WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after_t, &PAGE],
        )
        .await?;
        let Some(last) = rows.last() else { break };
        after_t = last.get(3);
        let chunk = rows
            .iter()
            .map(|r| {
                Record::Timer(crate::automations::Timer {
                    automation_id: domain_int(r.get(0)),
                    subscriber_id: domain_int(r.get(1)),
                    name: r.get(2),
                    id: domain_int(r.get(3)),
                    due_ms: domain_int(r.get(4)),
                    data: r.get(5),
                })
            })
            .collect();
        send(out, chunk).await?;
    }
    let rows = query(
        tx,
        "SELECT doc FROM automation_failures ORDER BY automation_id, id",
        &[],
    )
    .await?;
    let chunk = rows
        .iter()
        .map(|r| Ok(Record::AutomationFailure(serde_json::from_value(r.get(0))?)))
        .collect::<Result<_, StoreError>>()?;
    send(out, chunk).await?;
    let rows = query(
        tx,
        "SELECT id, automation_id, subscriber_id, letter_id, at_ms FROM queued_sends ORDER BY id",
        &[],
    )
    .await?;
    let chunk = rows
        .iter()
        .map(|r| {
            Record::QueuedSend(crate::automations::QueuedSend {
                id: domain_int(r.get(0)),
                automation_id: domain_int(r.get(1)),
                subscriber_id: domain_int(r.get(2)),
                letter_id: domain_int(r.get(3)),
                at_ms: domain_int(r.get(4)),
            })
        })
        .collect();
    send(out, chunk).await?;
    Ok(())
}

async fn flush_subscribers(
    tx: &deadpool_postgres::Transaction<'_>,
    batch: &mut Vec<Subscriber>,
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(batch.len());
    let mut newsletters = Vec::with_capacity(batch.len());
    let mut emails = Vec::with_capacity(batch.len());
    let mut keys = Vec::with_capacity(batch.len());
    let mut names: Vec<Option<String>> = Vec::with_capacity(batch.len());
    let mut attributes = Vec::with_capacity(batch.len());
    let mut statuses = Vec::with_capacity(batch.len());
    let mut created = Vec::with_capacity(batch.len());
    for s in batch.drain(..) {
        ids.push(sql_int(s.id));
        newsletters.push(sql_int(s.newsletter_id));
        keys.push(normalise_email(&s.email));
        emails.push(s.email);
        names.push(s.name);
        attributes.push(Value::Object(s.attributes));
        statuses.push(s.status.as_str());
        created.push(sql_int(s.created_at));
    }
    execute(
        tx,
        "INSERT INTO subscribers (id, newsletter_id, email, email_key, name, attributes, status, created_at)
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                              $7::text[], $8::bigint[])",
        &[
            &ids,
            &newsletters,
            &emails,
            &keys,
            &names,
            &attributes,
            &statuses,
            &created,
        ],
    )
    .await?;
    Ok(())
}

async fn flush_deliveries(
    tx: &deadpool_postgres::Transaction<'_>,
    batch: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut jobs = Vec::with_capacity(batch.len());
    let mut subscribers = Vec::with_capacity(batch.len());
    let mut states = Vec::with_capacity(batch.len());
    let mut attempts = Vec::with_capacity(batch.len());
    let mut emails = Vec::with_capacity(batch.len());
    let mut due: Vec<Option<i64>> = Vec::with_capacity(batch.len());
    let mut details = Vec::with_capacity(batch.len());
    for d in batch.drain(..) {
        jobs.push(sql_int(d.job_id));
        subscribers.push(sql_int(d.subscriber_id));
        states.push(state_code(d.state.kind()));
        attempts.push(i32::try_from(d.attempts).unwrap_or(i32::MAX));
        due.push(due_ms(&d.state));
        details.push(serde_json::to_value(&d.state)?);
        emails.push(d.email);
    }
    execute(
        tx,
        "INSERT INTO deliveries (job_id, subscriber_id, state, attempts, email, due_ms, detail)
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::integer[], $5::text[],
                              $6::bigint[], $7::jsonb[])",
        &[&jobs, &subscribers, &states, &attempts, &emails, &due, &details],
    )
    .await?;
    Ok(())
}
