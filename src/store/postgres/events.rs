//! The event log in PostgreSQL. Operations append inside their own transaction
//! (`append`) as its last statement: the `event_id` counter's row lock, held to the
//! commit, makes ids follow commit order across the fleet, with no gaps (see
//! migrations/0005_events.sql). Nothing else locks that row, and nothing is locked
//! after it, so it cannot deadlock.

use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::{IsolationLevel, Row};

use super::{PgStore, commit, domain_int, execute, query, sql_int, sql_limit};
use crate::domain::now_ms;
use crate::events::{Event, EventFilter, EventPage, NewEvent, SCAN_WINDOW};
use crate::store::{Events, StoreError};

pub(super) const COLUMNS: &str = "id, at_ms, type, newsletter_id, subscriber_id, job_id, letter_id, data";

pub(super) fn event(row: &Row) -> Result<Event, StoreError> {
    let Value::Object(data) = row.get::<_, Value>(7) else {
        return Err(StoreError::Inconsistent(
            "an event's data is not an object".into(),
        ));
    };
    let id = |i: usize| row.get::<_, Option<i64>>(i).map(domain_int);
    Ok(Event {
        id: domain_int(row.get(0)),
        at_ms: domain_int(row.get(1)),
        kind: row.get(2),
        newsletter_id: id(3),
        subscriber_id: id(4),
        job_id: id(5),
        letter_id: id(6),
        data,
    })
}

/// Appends events in `tx`, numbered after the fleet's last one. Must be the last
/// statement before the commit (see the module docs). Returns them as stored.
pub(super) async fn append(
    tx: &impl GenericClient,
    events: impl IntoIterator<Item = NewEvent>,
) -> Result<Vec<Event>, StoreError> {
    let events: Vec<NewEvent> = events.into_iter().collect();
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let n = events.len() as i64;
    let row = query(
        tx,
        "UPDATE fleet_counters SET value = value + $1 WHERE name = 'event_id' RETURNING value",
        &[&n],
    )
    .await?;
    let last = domain_int(
        row.first()
            .ok_or_else(|| StoreError::Inconsistent("the event_id counter is missing".into()))?
            .get(0),
    );
    let at_ms = now_ms();
    let events: Vec<Event> = events
        .into_iter()
        .enumerate()
        .map(|(i, new)| new.into_event(last - n as u64 + 1 + i as u64, at_ms))
        .collect();
    insert(tx, &events).await?;
    Ok(events)
}

/// Writes events as they are, ids included.
pub(super) async fn insert(tx: &impl GenericClient, events: &[Event]) -> Result<(), StoreError> {
    let ids: Vec<i64> = events.iter().map(|e| sql_int(e.id)).collect();
    let at: Vec<i64> = events.iter().map(|e| sql_int(e.at_ms)).collect();
    let types: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let opt = |f: fn(&Event) -> Option<u64>| -> Vec<Option<i64>> {
        events.iter().map(|e| f(e).map(sql_int)).collect()
    };
    let data: Vec<Value> = events.iter().map(|e| Value::Object(e.data.clone())).collect();
    execute(
        tx,
        "INSERT INTO events (id, at_ms, type, newsletter_id, subscriber_id, job_id, letter_id, data)
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
                              $6::bigint[], $7::bigint[], $8::jsonb[])",
        &[
            &ids,
            &at,
            &types,
            &opt(|e| e.newsletter_id),
            &opt(|e| e.subscriber_id),
            &opt(|e| e.job_id),
            &opt(|e| e.letter_id),
            &data,
        ],
    )
    .await?;
    Ok(())
}

/// Removes the data of every event of a subscriber who is being erased.
pub(super) async fn scrub_subscriber(tx: &impl GenericClient, subscriber_id: u64) -> Result<(), StoreError> {
    execute(
        tx,
        "UPDATE events SET data = '{}' WHERE subscriber_id = $1 AND data <> '{}'",
        &[&sql_int(subscriber_id)],
    )
    .await?;
    Ok(())
}

impl PgStore {
    /// After a commit that appended `events`: wakes this node's readers.
    pub(super) fn published(&self, events: &[Event]) {
        if let Some(last) = events.last() {
            self.publish_head(last.id);
        }
    }

    pub(super) fn publish_head(&self, head: u64) {
        self.event_head.send_if_modified(|h| {
            let moved = head > *h;
            *h = (*h).max(head);
            moved
        });
    }
}

#[async_trait::async_trait]
impl Events for PgStore {
    async fn append_events(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut named: Vec<i64> = events
            .iter()
            .filter_map(|e| e.subscriber_id.map(sql_int))
            .collect();
        named.sort_unstable();
        named.dedup();
        if !named.is_empty() {
            // Shared locks: an erasure of one of them waits for this commit (and then
            // scrubs these events too), or this waits for the erasure and finds nothing.
            let found = query(
                &tx,
                "SELECT id FROM subscribers WHERE id = ANY($1) ORDER BY id FOR SHARE",
                &[&named],
            )
            .await?;
            if let Some(missing) = named
                .iter()
                .find(|id| !found.iter().any(|r| r.get::<_, i64>(0) == **id))
            {
                return Err(StoreError::not_found("subscriber", missing));
            }
        }
        let events = append(&tx, events).await?;
        commit(tx).await?;
        self.published(&events);
        Ok(events)
    }

    /// One read-only snapshot for the events and the head, so `next` never passes an
    /// event the read could not see.
    async fn events_after(
        &self,
        filter: EventFilter,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let head = query(
            &tx,
            "SELECT value FROM fleet_counters WHERE name = 'event_id'",
            &[],
        )
        .await?;
        let head = head.first().map(|r| domain_int(r.get(0))).unwrap_or(0);
        let (exact, prefixes): (Vec<&str>, Vec<&str>) =
            filter
                .types
                .iter()
                .fold((Vec::new(), Vec::new()), |(mut exact, mut prefixes), t| {
                    match t.strip_suffix('*') {
                        Some(prefix) => prefixes.push(prefix),
                        None => exact.push(t.as_str()),
                    }
                    (exact, prefixes)
                });
        let any_type = filter.types.is_empty();
        let type_clause = "($2 OR type = ANY($3) OR EXISTS (SELECT 1 FROM unnest($4::text[]) p WHERE starts_with(type, p)))";
        let (rows, examined) = match filter.subscriber_id {
            Some(sid) => {
                let rows = query(
                    &tx,
                    &format!(
                        "SELECT {COLUMNS} FROM events WHERE subscriber_id = $1 AND {type_clause}
                         AND id > $5 ORDER BY id LIMIT $6"
                    ),
                    &[
                        &sql_int(sid),
                        &any_type,
                        &exact,
                        &prefixes,
                        &sql_int(after),
                        &sql_limit(limit),
                    ],
                )
                .await?;
                (rows, head)
            }
            None => {
                let end = if any_type {
                    u64::MAX
                } else {
                    after.saturating_add(SCAN_WINDOW)
                };
                let rows = query(
                    &tx,
                    &format!(
                        "SELECT {COLUMNS} FROM events WHERE id > $1 AND id <= $5 AND {type_clause}
                         ORDER BY id LIMIT $6"
                    ),
                    &[
                        &sql_int(after),
                        &any_type,
                        &exact,
                        &prefixes,
                        &sql_int(end),
                        &sql_limit(limit),
                    ],
                )
                .await?;
                (rows, end)
            }
        };
        tx.commit().await?;
        let events = rows.iter().map(event).collect::<Result<Vec<_>, _>>()?;
        Ok(EventPage::new(events, limit, after, examined, head))
    }

    /// Oldest first by time (an index), skipping rows another node is deleting.
    async fn prune_events(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let n = execute(
            &client,
            "DELETE FROM events WHERE id IN (
                SELECT id FROM events WHERE at_ms < $1 ORDER BY at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&sql_int(before_ms), &sql_limit(limit)],
        )
        .await?;
        Ok(n as usize)
    }

    fn event_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.event_head.subscribe()
    }
}
