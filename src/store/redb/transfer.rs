//! Moving a whole installation in and out of redb (`store::Transfer`): every table read
//! in one read transaction, and written back row for row, indexes included.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use tokio::sync::mpsc;

use super::jobs::IdempotencyRecord;
use super::tables::*;
use super::{RedbStore, decode, encode};
use crate::domain::*;
use crate::store::{Inventory, Record, StoreError, Transfer, normalise_email, refuse_in_flight};

/// Records per chunk an export sends.
const CHUNK: usize = 1000;

/// Collects records into chunks and sends each full one.
struct Chunks {
    out: mpsc::Sender<Vec<Record>>,
    chunk: Vec<Record>,
}

impl Chunks {
    fn push(&mut self, record: Record) -> Result<(), StoreError> {
        self.chunk.push(record);
        if self.chunk.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.chunk.is_empty() {
            let chunk = std::mem::take(&mut self.chunk);
            self.out.blocking_send(chunk).map_err(|_| StoreError::Closed)?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Transfer for RedbStore {
    async fn export(&self, out: mpsc::Sender<Vec<Record>>) -> Result<(), StoreError> {
        let db = self.inner.shared.db()?;
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            let mut chunks = Chunks {
                out,
                chunk: Vec::with_capacity(CHUNK),
            };
            for row in txn.open_table(SECRETS)?.iter()? {
                let (name, value) = row?;
                chunks.push(Record::Secret {
                    name: name.value().to_string(),
                    value: value.value().to_vec(),
                })?;
            }
            for row in txn.open_table(NEWSLETTERS)?.iter()? {
                chunks.push(Record::Newsletter(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(SUBSCRIBERS)?.iter()? {
                chunks.push(Record::Subscriber(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(LETTERS)?.iter()? {
                chunks.push(Record::Letter(decode(row?.1.value())?))?;
            }
            let blobs = txn.open_table(PLUGIN_BLOBS)?;
            for row in txn.open_table(PLUGINS)?.iter()? {
                let (id, meta) = row?;
                let plugin: Plugin = decode(meta.value())?;
                let bytes = blobs
                    .get(id.value())?
                    .ok_or_else(|| StoreError::Inconsistent(format!("plugin {} has no bytes", id.value())))?
                    .value()
                    .to_vec();
                chunks.push(Record::Plugin { plugin, bytes })?;
            }
            for row in txn.open_table(PLUGIN_VERSIONS)?.iter()? {
                let (key, version) = row?;
                chunks.push(Record::PluginVersion {
                    name: key.value().0.to_string(),
                    version: decode(version.value())?,
                })?;
            }
            for row in txn.open_table(PLUGIN_NAMES)?.iter()? {
                let (name, id) = row?;
                chunks.push(Record::PluginLatest {
                    name: name.value().to_string(),
                    id: id.value().to_string(),
                })?;
            }
            for row in txn.open_table(JOBS)?.iter()? {
                chunks.push(Record::Job(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(DELIVERIES)?.iter()? {
                chunks.push(Record::Delivery(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(IDEMPOTENCY_KEYS)?.iter()? {
                let (key, value) = row?;
                let record: IdempotencyRecord = decode(value.value())?;
                chunks.push(Record::IdempotencyKey {
                    key: key.value().to_string(),
                    request_hash: record.request_hash,
                    job_id: record.job_id,
                    created_at: record.created_at,
                })?;
            }
            for row in txn.open_table(EVENTS)?.iter()? {
                chunks.push(Record::Event(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(BOUNCES)?.iter()? {
                chunks.push(Record::Bounce(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(SUPPRESSIONS)?.iter()? {
                chunks.push(Record::Suppression(decode(row?.1.value())?))?;
            }
            // Automations before what refers to them.
            for row in txn.open_table(AUTOMATIONS)?.iter()? {
                chunks.push(Record::Automation(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(AUTOMATION_VERSIONS)?.iter()? {
                let (key, value) = row?;
                chunks.push(Record::AutomationVersion {
                    automation_id: key.value().0,
                    version: decode(value.value())?,
                })?;
            }
            for row in txn.open_table(AUTOMATION_STATES)?.iter()? {
                let (key, value) = row?;
                let (automation_id, subscriber_id) = key.value();
                chunks.push(Record::AutomationState {
                    automation_id,
                    subscriber_id,
                    state: decode(value.value())?,
                })?;
            }
            for row in txn.open_table(TIMERS)?.iter()? {
                chunks.push(Record::Timer(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(AUTOMATION_FAILURES)?.iter()? {
                chunks.push(Record::AutomationFailure(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(QUEUED_SENDS)?.iter()? {
                chunks.push(Record::QueuedSend(decode(row?.1.value())?))?;
            }
            let mut keys: std::collections::HashMap<u64, (String, String)> = std::collections::HashMap::new();
            for row in txn.open_table(MESSAGE_KEYS)?.iter()? {
                let (key, value) = row?;
                let record: super::messages::KeyRecord = decode(value.value())?;
                keys.insert(record.message_id, (key.value().to_string(), record.request_hash));
            }
            for row in txn.open_table(MESSAGES)?.iter()? {
                let message: crate::messages::Message = decode(row?.1.value())?;
                let idempotency = keys.remove(&message.id);
                chunks.push(Record::Message { message, idempotency })?;
            }
            for row in txn.open_table(WEBHOOKS)?.iter()? {
                chunks.push(Record::Webhook(decode(row?.1.value())?))?;
            }
            for row in txn.open_table(WEBHOOK_SENDS)?.iter()? {
                chunks.push(Record::WebhookSend(decode(row?.1.value())?))?;
            }
            chunks.flush()
        })
        .await
        .map_err(|e| StoreError::BatchFailed(format!("export task failed: {e}")))?
    }

    async fn import(&self, records: Vec<Record>) -> Result<(), StoreError> {
        // Validate first: nothing is written if one record cannot be.
        refuse_in_flight(&records)?;
        self.write(move |txn| {
            let mut secrets = txn.open_table(SECRETS)?;
            let mut newsletters = txn.open_table(NEWSLETTERS)?;
            let mut subscribers = txn.open_table(SUBSCRIBERS)?;
            let mut emails = txn.open_table(SUBSCRIBER_EMAILS)?;
            let mut homes = txn.open_table(SUBSCRIBER_HOMES)?;
            let mut unconfirmed = txn.open_table(UNCONFIRMED)?;
            let mut letters = txn.open_table(LETTERS)?;
            let mut plugins = txn.open_table(PLUGINS)?;
            let mut blobs = txn.open_table(PLUGIN_BLOBS)?;
            let mut versions = txn.open_table(PLUGIN_VERSIONS)?;
            let mut names = txn.open_table(PLUGIN_NAMES)?;
            let mut jobs = txn.open_table(JOBS)?;
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let mut states = txn.open_table(DELIVERY_STATES)?;
            let mut retries = txn.open_table(RETRY_SCHEDULE)?;
            let mut keys = txn.open_table(IDEMPOTENCY_KEYS)?;
            let mut events = txn.open_table(EVENTS)?;
            let mut events_by_subscriber = txn.open_table(EVENTS_BY_SUBSCRIBER)?;
            let mut bounces = txn.open_table(BOUNCES)?;
            let mut bounces_by_subscriber = txn.open_table(BOUNCES_BY_SUBSCRIBER)?;
            let mut unattributed = txn.open_table(UNATTRIBUTED_BOUNCES)?;
            let mut suppressions = txn.open_table(SUPPRESSIONS)?;
            let mut automations = txn.open_table(AUTOMATIONS)?;
            let mut automation_names = txn.open_table(AUTOMATION_NAMES)?;
            let mut automation_versions = txn.open_table(AUTOMATION_VERSIONS)?;
            let mut automation_states = txn.open_table(AUTOMATION_STATES)?;
            let mut timers = txn.open_table(TIMERS)?;
            let mut timers_due = txn.open_table(TIMERS_DUE)?;
            let mut failures = txn.open_table(AUTOMATION_FAILURES)?;
            let mut queued_sends = txn.open_table(QUEUED_SENDS)?;
            let mut message_keys = txn.open_table(MESSAGE_KEYS)?;
            // The highest id of each sequence in these records.
            let mut last = [
                ("newsletter", 0u64),
                ("subscriber", 0),
                ("letter", 0),
                ("job", 0),
                ("event", 0),
                ("bounce", 0),
                ("automation", 0),
                ("timer", 0),
                ("automation_failure", 0),
                ("queued_send", 0),
                ("message", 0),
                ("webhook", 0),
                ("webhook_send", 0),
            ];
            for record in records {
                match record {
                    Record::Secret { name, value } => {
                        secrets.insert(name.as_str(), value.as_slice())?;
                    }
                    Record::Newsletter(n) => {
                        last[0].1 = last[0].1.max(n.id);
                        newsletters.insert(n.id, encode(&n).as_slice())?;
                    }
                    Record::Subscriber(s) => {
                        last[1].1 = last[1].1.max(s.id);
                        let key = normalise_email(&s.email);
                        subscribers.insert((s.newsletter_id, s.id), encode(&s).as_slice())?;
                        emails.insert((s.newsletter_id, key.as_str()), s.id)?;
                        homes.insert(s.id, s.newsletter_id)?;
                        if s.status == SubscriberStatus::Unconfirmed {
                            unconfirmed.insert((s.created_at, s.id), ())?;
                        }
                    }
                    Record::Letter(l) => {
                        last[2].1 = last[2].1.max(l.id);
                        letters.insert(l.id, encode(&l).as_slice())?;
                    }
                    Record::Plugin { plugin, bytes } => {
                        plugins.insert(plugin.id.as_str(), encode(&plugin).as_slice())?;
                        blobs.insert(plugin.id.as_str(), bytes.as_slice())?;
                    }
                    Record::PluginVersion { name, version } => {
                        versions.insert((name.as_str(), version.version), encode(&version).as_slice())?;
                    }
                    Record::PluginLatest { name, id } => {
                        names.insert(name.as_str(), id.as_str())?;
                    }
                    Record::Job(job) => {
                        last[3].1 = last[3].1.max(job.id);
                        jobs.insert(job.id, encode(&job).as_slice())?;
                    }
                    Record::Delivery(d) => {
                        let (job, sid) = (d.job_id, d.subscriber_id);
                        states.insert((job, d.state.kind().code(), sid), ())?;
                        if let DeliveryState::Retrying {
                            next_attempt_at_ms, ..
                        } = d.state
                        {
                            retries.insert((job, next_attempt_at_ms, sid), ())?;
                        }
                        deliveries.insert((job, sid), encode(&d).as_slice())?;
                    }
                    Record::IdempotencyKey {
                        key,
                        request_hash,
                        job_id,
                        created_at,
                    } => {
                        let record = IdempotencyRecord {
                            request_hash,
                            job_id,
                            created_at,
                        };
                        keys.insert(key.as_str(), encode(&record).as_slice())?;
                    }
                    Record::Event(e) => {
                        last[4].1 = last[4].1.max(e.id);
                        if let Some(sid) = e.subscriber_id {
                            events_by_subscriber.insert((sid, e.id), ())?;
                        }
                        events.insert(e.id, encode(&e).as_slice())?;
                    }
                    Record::Bounce(b) => {
                        last[5].1 = last[5].1.max(b.id);
                        // An erased subscriber's reports keep their id but leave the index.
                        match b.subscriber_id {
                            Some(sid) if !b.email.is_empty() => {
                                bounces_by_subscriber.insert((sid, b.id), ())?;
                            }
                            Some(_) => {}
                            None => {
                                unattributed.insert(b.id, ())?;
                            }
                        }
                        bounces.insert(b.id, encode(&b).as_slice())?;
                    }
                    Record::Suppression(s) => {
                        let key = normalise_email(&s.email);
                        suppressions.insert(key.as_str(), encode(&s).as_slice())?;
                    }
                    Record::Automation(a) => {
                        last[6].1 = last[6].1.max(a.id);
                        automation_names.insert(a.spec.name.as_str(), a.id)?;
                        automations.insert(a.id, encode(&a).as_slice())?;
                    }
                    Record::AutomationVersion {
                        automation_id,
                        version,
                    } => {
                        automation_versions.insert(
                            (automation_id, u64::from(version.version)),
                            encode(&version).as_slice(),
                        )?;
                    }
                    Record::AutomationState {
                        automation_id,
                        subscriber_id,
                        state,
                    } => {
                        automation_states
                            .insert((automation_id, subscriber_id), encode(&state).as_slice())?;
                    }
                    Record::Timer(t) => {
                        last[7].1 = last[7].1.max(t.id);
                        timers_due.insert(
                            (t.automation_id, t.due_ms, t.id),
                            encode(&(t.subscriber_id, &t.name)).as_slice(),
                        )?;
                        timers.insert(
                            (t.automation_id, t.subscriber_id, t.name.as_str()),
                            encode(&t).as_slice(),
                        )?;
                    }
                    Record::AutomationFailure(f) => {
                        last[8].1 = last[8].1.max(f.id);
                        failures.insert((f.automation_id, f.id), encode(&f).as_slice())?;
                    }
                    Record::QueuedSend(q) => {
                        last[9].1 = last[9].1.max(q.id);
                        queued_sends.insert(q.id, encode(&q).as_slice())?;
                    }
                    Record::Message { message, idempotency } => {
                        last[10].1 = last[10].1.max(message.id);
                        super::messages::put_message(txn, &message, None)?;
                        if let Some((key, request_hash)) = idempotency {
                            let record = super::messages::KeyRecord {
                                request_hash,
                                message_id: message.id,
                            };
                            message_keys.insert(key.as_str(), encode(&record).as_slice())?;
                        }
                    }
                    Record::Webhook(w) => {
                        last[11].1 = last[11].1.max(w.id);
                        super::webhooks::put_webhook(txn, &w)?;
                    }
                    Record::WebhookSend(s) => {
                        last[12].1 = last[12].1.max(s.id);
                        super::webhooks::put_send(txn, &s, None)?;
                    }
                }
            }
            let mut sequences = txn.open_table(SEQUENCES)?;
            for (name, id) in last {
                let current = sequences.get(name)?.map(|v| v.value()).unwrap_or(0);
                if id > current {
                    sequences.insert(name, id)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn inventory(&self) -> Result<Inventory, StoreError> {
        self.read(|txn| {
            let mut inventory = Inventory {
                secrets: txn.open_table(SECRETS)?.len()?,
                newsletters: txn.open_table(NEWSLETTERS)?.len()?,
                subscribers: txn.open_table(SUBSCRIBERS)?.len()?,
                letters: txn.open_table(LETTERS)?.len()?,
                plugins: txn.open_table(PLUGINS)?.len()?,
                plugin_versions: txn.open_table(PLUGIN_VERSIONS)?.len()?,
                plugin_names: txn.open_table(PLUGIN_NAMES)?.len()?,
                jobs: 0,
                deliveries: txn.open_table(DELIVERIES)?.len()?,
                idempotency_keys: txn.open_table(IDEMPOTENCY_KEYS)?.len()?,
                events: txn.open_table(EVENTS)?.len()?,
                bounces: txn.open_table(BOUNCES)?.len()?,
                suppressions: txn.open_table(SUPPRESSIONS)?.len()?,
                automations: txn.open_table(AUTOMATIONS)?.len()?,
                automation_versions: txn.open_table(AUTOMATION_VERSIONS)?.len()?,
                automation_states: txn.open_table(AUTOMATION_STATES)?.len()?,
                timers: txn.open_table(TIMERS)?.len()?,
                automation_failures: txn.open_table(AUTOMATION_FAILURES)?.len()?,
                queued_sends: txn.open_table(QUEUED_SENDS)?.len()?,
                messages: txn.open_table(MESSAGES)?.len()?,
                webhooks: txn.open_table(WEBHOOKS)?.len()?,
                webhook_sends: txn.open_table(WEBHOOK_SENDS)?.len()?,
                counts: Counts::default(),
            };
            for row in txn.open_table(JOBS)?.iter()? {
                let job: Job = decode(row?.1.value())?;
                inventory.add(&Record::Job(job));
            }
            Ok(inventory)
        })
        .await
    }
}
