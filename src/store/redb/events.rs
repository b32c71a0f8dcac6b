//! The event log in redb. Operations append inside the writer's transaction (`append`),
//! so an event commits with the change it records; the writer publishes the new head
//! after the commit (`writer_loop`).

use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use serde_json::Map;

use super::tables::*;
use super::{RedbStore, decode, encode, ids_under};
use crate::domain::now_ms;
use crate::events::{Event, EventFilter, EventPage, NewEvent, SCAN_WINDOW};
use crate::store::{Events, StoreError};

/// The id of the newest event, committed or in this transaction.
pub(super) fn head(sequences: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    Ok(sequences.get("event")?.map(|v| v.value()).unwrap_or(0))
}

/// Appends events to the log in `txn`, numbering them after the last one. The caller
/// appends after it has validated, so a refused operation leaves no event behind.
pub(super) fn append(
    txn: &WriteTransaction,
    events: impl IntoIterator<Item = NewEvent>,
) -> Result<Vec<Event>, StoreError> {
    let mut sequences = txn.open_table(SEQUENCES)?;
    let mut last = head(&sequences)?;
    let mut table = txn.open_table(EVENTS)?;
    let mut by_subscriber = txn.open_table(EVENTS_BY_SUBSCRIBER)?;
    let at_ms = now_ms();
    let mut out = Vec::new();
    for new in events {
        last += 1;
        let event = new.into_event(last, at_ms);
        table.insert(event.id, encode(&event).as_slice())?;
        if let Some(sid) = event.subscriber_id {
            by_subscriber.insert((sid, event.id), ())?;
        }
        out.push(event);
    }
    if !out.is_empty() {
        sequences.insert("event", last)?;
    }
    Ok(out)
}

/// Removes the data of every event of a subscriber who is being erased; their types,
/// times and ids stay, so counts and cursors do not change.
pub(super) fn scrub_subscriber(txn: &WriteTransaction, subscriber_id: u64) -> Result<(), StoreError> {
    let mut table = txn.open_table(EVENTS)?;
    let ids = ids_under(&txn.open_table(EVENTS_BY_SUBSCRIBER)?, subscriber_id)?;
    for id in ids {
        let Some(row) = table.get(id)? else { continue };
        let mut event: Event = decode(row.value())?;
        drop(row);
        if !event.data.is_empty() {
            event.data = Map::new();
            table.insert(id, encode(&event).as_slice())?;
        }
    }
    Ok(())
}

fn read_page(
    txn: &ReadTransaction,
    filter: &EventFilter,
    after: u64,
    limit: usize,
) -> Result<EventPage, StoreError> {
    let table = txn.open_table(EVENTS)?;
    let head = head(&txn.open_table(SEQUENCES)?)?;
    let mut events = Vec::new();
    let Some(start) = after.checked_add(1) else {
        return Ok(EventPage::new(events, limit, after, after, head));
    };
    let full = |events: &Vec<Event>| events.len() >= limit;
    // Where a short page leaves the cursor: as far as was examined.
    let examined;
    if let Some(sid) = filter.subscriber_id {
        for row in txn
            .open_table(EVENTS_BY_SUBSCRIBER)?
            .range((sid, start)..=(sid, u64::MAX))?
        {
            let id = row?.0.value().1;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::Inconsistent(format!("event {id} is indexed but missing")))?;
            let event: Event = decode(row.value())?;
            if filter.matches(&event) {
                events.push(event);
                if full(&events) {
                    break;
                }
            }
        }
        examined = head;
    } else {
        let end = if filter.types.is_empty() {
            u64::MAX
        } else {
            after.saturating_add(SCAN_WINDOW)
        };
        for row in table.range(start..=end)? {
            let event: Event = decode(row?.1.value())?;
            if filter.matches(&event) {
                events.push(event);
                if full(&events) {
                    break;
                }
            }
        }
        examined = end;
    }
    Ok(EventPage::new(events, limit, after, examined, head))
}

#[async_trait::async_trait]
impl Events for RedbStore {
    async fn append_events(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        self.write(move |txn| {
            {
                let homes = txn.open_table(SUBSCRIBER_HOMES)?;
                for sid in events.iter().filter_map(|e| e.subscriber_id) {
                    if homes.get(sid)?.is_none() {
                        return Err(StoreError::not_found("subscriber", sid));
                    }
                }
            }
            append(txn, events)
        })
        .await
    }

    async fn events_after(
        &self,
        filter: EventFilter,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.read(move |txn| read_page(txn, &filter, after, limit)).await
    }

    /// Event ids follow time closely (one writer stamps them), so the oldest events are
    /// the first rows: a prune reads from the start and stops at the first young one.
    async fn prune_events(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(EVENTS)?;
            let mut doomed = Vec::new();
            for row in table.iter()?.take(limit) {
                let event: Event = decode(row?.1.value())?;
                if event.at_ms >= before_ms {
                    break;
                }
                doomed.push((event.id, event.subscriber_id));
            }
            let mut by_subscriber = txn.open_table(EVENTS_BY_SUBSCRIBER)?;
            for (id, subscriber) in &doomed {
                table.remove(id)?;
                if let Some(sid) = subscriber {
                    by_subscriber.remove((*sid, *id))?;
                }
            }
            Ok(doomed.len())
        })
        .await
    }

    fn event_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.shared.event_head.subscribe()
    }
}
