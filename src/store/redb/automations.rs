//! Automations in redb: their specs and versions, per-subscriber states, durable timers
//! (indexed by due time per automation), failures and queued sends. A turn's effects,
//! states, failures and cursor are one closure of the writer's transaction, checked
//! first (the automation must still be at the turn's `turns`), so a turn applies whole
//! or not at all.

use redb::{ReadableTable, WriteTransaction};
use serde_json::Value;

use super::jobs::{add_pending, put_job};
use super::lists::{next_id, subscriber_in};
use super::tables::*;
use super::{RedbStore, decode, encode, events};
use crate::automations::*;
use crate::domain::{Job, now};
use crate::events::{NewEvent, job_changed, subscriber_changed};
use crate::messages::Message;
use crate::policy::Action;
use crate::store::{Automations, StoreError, TurnOutcome};

fn automation_in(txn: &WriteTransaction, id: u64) -> Result<Automation, StoreError> {
    let table = txn.open_table(AUTOMATIONS)?;
    let row = table
        .get(id)?
        .ok_or_else(|| StoreError::not_found("automation", id))?;
    decode(row.value())
}

fn put_automation(txn: &WriteTransaction, a: &Automation) -> Result<(), StoreError> {
    txn.open_table(AUTOMATIONS)?.insert(a.id, encode(a).as_slice())?;
    Ok(())
}

fn put_version(txn: &WriteTransaction, a: &Automation) -> Result<(), StoreError> {
    let version = AutomationVersion {
        version: a.version,
        spec: a.spec.clone(),
        created_at: a.updated_at,
    };
    txn.open_table(AUTOMATION_VERSIONS)?
        .insert((a.id, u64::from(a.version)), encode(&version).as_slice())?;
    Ok(())
}

/// Removes a timer (if there) with its due index entry.
fn remove_timer(
    txn: &WriteTransaction,
    automation_id: u64,
    subscriber_id: u64,
    name: &str,
) -> Result<(), StoreError> {
    let old: Option<Timer> = {
        let mut timers = txn.open_table(TIMERS)?;
        let removed = timers.remove((automation_id, subscriber_id, name))?;
        removed.map(|row| decode(row.value())).transpose()?
    };
    if let Some(old) = old {
        txn.open_table(TIMERS_DUE)?
            .remove((automation_id, old.due_ms, old.id))?;
    }
    Ok(())
}

fn put_timer(txn: &WriteTransaction, timer: &Timer) -> Result<(), StoreError> {
    remove_timer(txn, timer.automation_id, timer.subscriber_id, &timer.name)?;
    txn.open_table(TIMERS)?.insert(
        (timer.automation_id, timer.subscriber_id, timer.name.as_str()),
        encode(timer).as_slice(),
    )?;
    txn.open_table(TIMERS_DUE)?.insert(
        (timer.automation_id, timer.due_ms, timer.id),
        encode(&(timer.subscriber_id, &timer.name)).as_slice(),
    )?;
    Ok(())
}

/// Removes what automations keep about a subscriber being erased: their states (which
/// may hold personal data) and their timers. A walk over both tables: erasures are rare.
pub(super) fn forget_subscriber(txn: &WriteTransaction, subscriber_id: u64) -> Result<(), StoreError> {
    txn.open_table(AUTOMATION_STATES)?
        .retain(|(_, s), _| s != subscriber_id)?;
    let theirs: Vec<(u64, String)> = {
        let timers = txn.open_table(TIMERS)?;
        let mut out = Vec::new();
        for row in timers.iter()? {
            let (key, _) = row?;
            let (a, s, name) = key.value();
            if s == subscriber_id {
                out.push((a, name.to_string()));
            }
        }
        out
    };
    for (a, name) in theirs {
        remove_timer(txn, a, subscriber_id, &name)?;
    }
    Ok(())
}

/// Removes every row of `automation_id` from a table keyed by (automation, ...).
fn remove_all<K: redb::Key + 'static>(
    txn: &WriteTransaction,
    table: redb::TableDefinition<K, &[u8]>,
    automation_id: u64,
    first: impl Fn(&K::SelfType<'_>) -> u64,
) -> Result<(), StoreError> {
    let mut t = txn.open_table(table)?;
    t.retain(|key, _| first(&key) != automation_id)?;
    Ok(())
}

/// Applies one reaction's actions about `subscriber_id` (0: none) in `txn`: timers,
/// attributes, status, events and queued sends. Actions about a subscriber who is gone
/// are dropped.
fn apply(
    txn: &WriteTransaction,
    automation_id: u64,
    subscriber_id: u64,
    actions: &[Action],
    now_ms: u64,
    messages: &mut usize,
) -> Result<(usize, bool), StoreError> {
    let mut subscriber = match subscriber_id {
        0 => None,
        id => match subscriber_in(txn, id) {
            Ok((_, s)) => Some(s),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        },
    };
    let before = subscriber.clone();
    let mut queued = 0;
    let mut events: Vec<NewEvent> = Vec::new();
    for action in actions {
        if action.needs_subscriber() && subscriber.is_none() {
            continue;
        }
        if let Some(s) = subscriber.as_mut()
            && change_subscriber(action, s)
        {
            continue;
        }
        match action {
            Action::StartTimer { name, when, data } => {
                let timer = Timer {
                    id: next_id(txn, "timer")?,
                    automation_id,
                    subscriber_id,
                    name: name.clone(),
                    due_ms: when.due_ms(now_ms),
                    data: data.clone(),
                };
                put_timer(txn, &timer)?;
            }
            Action::CancelTimer { name } => remove_timer(txn, automation_id, subscriber_id, name)?,
            Action::Emit { .. } => events.extend(emitted(action, subscriber.as_ref())),
            Action::SendLetter { letter } => {
                let send = QueuedSend {
                    id: next_id(txn, "queued_send")?,
                    automation_id,
                    subscriber_id,
                    letter_id: *letter,
                    at_ms: now_ms,
                };
                txn.open_table(QUEUED_SENDS)?
                    .insert(send.id, encode(&send).as_slice())?;
                queued += 1;
            }
            Action::SendMessage { .. } => {
                let Some(s) = &subscriber else { continue };
                let newsletter: crate::domain::Newsletter = {
                    let table = txn.open_table(NEWSLETTERS)?;
                    let row = table
                        .get(s.newsletter_id)?
                        .ok_or_else(|| StoreError::not_found("newsletter", s.newsletter_id))?;
                    decode(row.value())?
                };
                if let Some(new) = message_of(action, s, &newsletter.from) {
                    let message = Message::new(next_id(txn, "message")?, new, now_ms);
                    super::messages::put_message(txn, &message, None)?;
                    events.push(message.event(crate::events::types::MESSAGE_QUEUED));
                    *messages += 1;
                }
            }
            // The subscriber's changes were made above.
            Action::SetAttribute { .. } | Action::RemoveAttribute { .. } | Action::Unsubscribe => {}
        }
    }
    let mut status_changed = false;
    if let (Some(before), Some(after)) = (&before, &subscriber)
        && before != after
    {
        status_changed = before.status != after.status;
        txn.open_table(SUBSCRIBERS)?
            .insert((after.newsletter_id, after.id), encode(after).as_slice())?;
        // The status change comes first in the log, then what the policy emitted.
        events.insert(0, subscriber_changed(Some(before), after).expect("a change"));
    }
    events::append(txn, events)?;
    Ok((queued, status_changed))
}

fn commit(txn: &WriteTransaction, turn: Turn) -> Result<TurnOutcome, StoreError> {
    let mut automation = automation_in(txn, turn.automation_id)?;
    if automation.turns != turn.turns {
        return Err(StoreError::Conflict(format!(
            "automation {} moved on (turn {} committed elsewhere)",
            automation.id, automation.turns
        )));
    }
    let mut queued_sends = 0;
    let mut queued_messages = 0;
    let mut status_changed = false;
    for handled in turn.handled {
        let subscriber = handled.subscriber_id.unwrap_or(0);
        // A timer that fired is done, whatever the reaction; one started again since
        // (another id) stays.
        if let TriggerKey::Timer { timer } = &handled.trigger {
            let current: Option<Timer> = txn
                .open_table(TIMERS)?
                .get((timer.automation_id, timer.subscriber_id, timer.name.as_str()))?
                .map(|row| decode(row.value()))
                .transpose()?;
            if current.is_some_and(|c| c.id == timer.id) {
                remove_timer(txn, timer.automation_id, timer.subscriber_id, &timer.name)?;
            }
        }
        match handled.outcome {
            Ok(reaction) => {
                {
                    let mut states = txn.open_table(AUTOMATION_STATES)?;
                    match &reaction.state {
                        Some(state) => {
                            states.insert((automation.id, subscriber), state.to_string().as_bytes())?;
                        }
                        None => {
                            states.remove((automation.id, subscriber))?;
                        }
                    }
                }
                let (queued, changed) = apply(
                    txn,
                    automation.id,
                    subscriber,
                    &reaction.actions,
                    turn.now_ms,
                    &mut queued_messages,
                )?;
                queued_sends += queued;
                status_changed |= changed;
                automation.count_handled();
            }
            Err(reason) => {
                let failure = Failure {
                    id: next_id(txn, "automation_failure")?,
                    automation_id: automation.id,
                    trigger: handled.trigger,
                    subscriber_id: handled.subscriber_id,
                    reason,
                    at_ms: turn.now_ms,
                };
                txn.open_table(AUTOMATION_FAILURES)?
                    .insert((automation.id, failure.id), encode(&failure).as_slice())?;
                automation.count_failure(&failure.reason, turn.pause_after);
            }
        }
    }
    automation.cursor = automation.cursor.max(turn.cursor);
    automation.turns += 1;
    put_automation(txn, &automation)?;
    Ok(TurnOutcome {
        automation,
        queued_sends,
        queued_messages,
        status_changed,
    })
}

#[async_trait::async_trait]
impl Automations for RedbStore {
    async fn create_automation(&self, spec: AutomationSpec) -> Result<Automation, StoreError> {
        self.write(move |txn| {
            if txn
                .open_table(AUTOMATION_NAMES)?
                .get(spec.name.as_str())?
                .is_some()
            {
                return Err(StoreError::Conflict(format!(
                    "an automation named {:?} exists",
                    spec.name
                )));
            }
            let cursor = events::head(&txn.open_table(SEQUENCES)?)?;
            let automation = Automation::new(next_id(txn, "automation")?, spec, cursor, now());
            txn.open_table(AUTOMATION_NAMES)?
                .insert(automation.spec.name.as_str(), automation.id)?;
            put_automation(txn, &automation)?;
            put_version(txn, &automation)?;
            Ok(automation)
        })
        .await
    }

    async fn automation(&self, id: u64) -> Result<Automation, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(AUTOMATIONS)?;
            let row = table
                .get(id)?
                .ok_or_else(|| StoreError::not_found("automation", id))?;
            decode(row.value())
        })
        .await
    }

    async fn list_automations(&self) -> Result<Vec<Automation>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(AUTOMATIONS)?;
            table.iter()?.map(|row| decode(row?.1.value())).collect()
        })
        .await
    }

    async fn update_automation(&self, id: u64, spec: AutomationSpec) -> Result<Automation, StoreError> {
        self.write(move |txn| {
            let mut automation = automation_in(txn, id)?;
            if spec.name != automation.spec.name {
                let mut names = txn.open_table(AUTOMATION_NAMES)?;
                if names.get(spec.name.as_str())?.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "an automation named {:?} exists",
                        spec.name
                    )));
                }
                names.remove(automation.spec.name.as_str())?;
                names.insert(spec.name.as_str(), id)?;
            }
            automation.spec = spec;
            automation.version += 1;
            automation.updated_at = now();
            put_automation(txn, &automation)?;
            put_version(txn, &automation)?;
            Ok(automation)
        })
        .await
    }

    async fn automation_versions(&self, id: u64) -> Result<Vec<AutomationVersion>, StoreError> {
        self.read(move |txn| {
            if txn.open_table(AUTOMATIONS)?.get(id)?.is_none() {
                return Err(StoreError::not_found("automation", id));
            }
            let table = txn.open_table(AUTOMATION_VERSIONS)?;
            table
                .range((id, 0)..=(id, u64::MAX))?
                .map(|row| decode(row?.1.value()))
                .collect()
        })
        .await
    }

    async fn set_automation_state(
        &self,
        id: u64,
        state: AutomationState,
        reason: Option<String>,
    ) -> Result<Automation, StoreError> {
        self.write(move |txn| {
            let mut automation = automation_in(txn, id)?;
            automation.set_state(state, reason, now());
            put_automation(txn, &automation)?;
            Ok(automation)
        })
        .await
    }

    async fn delete_automation(&self, id: u64) -> Result<(), StoreError> {
        self.write(move |txn| {
            let automation = automation_in(txn, id)?;
            txn.open_table(AUTOMATIONS)?.remove(id)?;
            txn.open_table(AUTOMATION_NAMES)?
                .remove(automation.spec.name.as_str())?;
            remove_all(txn, AUTOMATION_VERSIONS, id, |k| k.0)?;
            remove_all(txn, AUTOMATION_STATES, id, |k| k.0)?;
            remove_all(txn, AUTOMATION_FAILURES, id, |k| k.0)?;
            remove_all(txn, TIMERS, id, |k| k.0)?;
            remove_all(txn, TIMERS_DUE, id, |k| k.0)?;
            txn.open_table(QUEUED_SENDS)?.retain(|_, v| {
                serde_json::from_slice::<QueuedSend>(v).map_or(true, |s| s.automation_id != id)
            })?;
            Ok(())
        })
        .await
    }

    async fn due_timers(
        &self,
        automation_id: u64,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Timer>, StoreError> {
        self.read(move |txn| {
            let due = txn.open_table(TIMERS_DUE)?;
            let timers = txn.open_table(TIMERS)?;
            let mut out = Vec::new();
            for row in due.range((automation_id, 0, 0)..=(automation_id, now_ms, u64::MAX))? {
                let (subscriber_id, name): (u64, String) = decode(row?.1.value())?;
                let timer = timers
                    .get((automation_id, subscriber_id, name.as_str()))?
                    .ok_or_else(|| StoreError::Inconsistent(format!("timer {name:?} is due but missing")))?;
                out.push(decode(timer.value())?);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn next_timer_due(&self, automation_id: u64) -> Result<Option<u64>, StoreError> {
        self.read(move |txn| {
            let due = txn.open_table(TIMERS_DUE)?;
            let first = due
                .range((automation_id, 0, 0)..=(automation_id, u64::MAX, u64::MAX))?
                .next()
                .transpose()?;
            Ok(first.map(|(key, _)| key.value().1))
        })
        .await
    }

    async fn timers(
        &self,
        automation_id: u64,
        after: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<Timer>, StoreError> {
        self.read(move |txn| {
            let timers = txn.open_table(TIMERS)?;
            let (from_subscriber, from_name) = after.clone().unwrap_or((0, String::new()));
            let mut out = Vec::new();
            for row in timers.range((automation_id, from_subscriber, from_name.as_str())..)? {
                let (key, value) = row?;
                let (a, s, n) = key.value();
                if a != automation_id {
                    break;
                }
                if after
                    .as_ref()
                    .is_some_and(|(as_, an)| (s, n) == (*as_, an.as_str()))
                {
                    continue;
                }
                out.push(decode(value.value())?);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn automation_states(
        &self,
        automation_id: u64,
        subscribers: Vec<u64>,
    ) -> Result<Vec<(u64, Value)>, StoreError> {
        self.read(move |txn| {
            let states = txn.open_table(AUTOMATION_STATES)?;
            let mut out = Vec::new();
            for id in subscribers {
                if let Some(row) = states.get((automation_id, id))? {
                    out.push((id, decode(row.value())?));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn lease_automation(
        &self,
        _id: u64,
        _node: &str,
        _now_ms: u64,
        _until_ms: u64,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn commit_turn(&self, turn: Turn) -> Result<TurnOutcome, StoreError> {
        let result = self.write(move |txn| commit(txn, turn)).await;
        // An unsubscribe action changes a status: running jobs must see it.
        if result.as_ref().is_ok_and(|outcome| outcome.status_changed) {
            self.bump_status_epoch();
        }
        result
    }

    async fn automation_failures(
        &self,
        automation_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Failure>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(AUTOMATION_FAILURES)?;
            let start = after.saturating_add(1);
            table
                .range((automation_id, start)..=(automation_id, u64::MAX))?
                .take(limit)
                .map(|row| decode(row?.1.value()))
                .collect()
        })
        .await
    }

    async fn retry_failures(
        &self,
        automation_id: u64,
        ids: Vec<u64>,
        limit: usize,
    ) -> Result<Retried, StoreError> {
        self.write(move |txn| {
            automation_in(txn, automation_id)?;
            let failures: Vec<Failure> = {
                let table = txn.open_table(AUTOMATION_FAILURES)?;
                let mut out = Vec::new();
                if ids.is_empty() {
                    for row in table
                        .range((automation_id, 0)..=(automation_id, u64::MAX))?
                        .take(limit)
                    {
                        out.push(decode(row?.1.value())?);
                    }
                }
                for id in &ids {
                    let row = table
                        .get((automation_id, *id))?
                        .ok_or_else(|| StoreError::not_found("automation failure", id))?;
                    out.push(decode(row.value())?);
                }
                out
            };
            let now = crate::domain::now_ms();
            let mut retried = Retried::default();
            for failure in failures {
                let timer = failure.retry_timer(next_id(txn, "timer")?, now);
                let taken = txn
                    .open_table(TIMERS)?
                    .get((automation_id, timer.subscriber_id, timer.name.as_str()))?
                    .is_some();
                if taken && matches!(failure.trigger, TriggerKey::Timer { .. }) {
                    retried.kept.push(failure.id);
                    continue;
                }
                put_timer(txn, &timer)?;
                txn.open_table(AUTOMATION_FAILURES)?
                    .remove((automation_id, failure.id))?;
                retried.retried += 1;
            }
            Ok(retried)
        })
        .await
    }

    async fn queued_sends(&self, limit: usize) -> Result<Vec<QueuedSend>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(QUEUED_SENDS)?;
            table
                .iter()?
                .take(limit)
                .map(|row| decode(row?.1.value()))
                .collect()
        })
        .await
    }

    async fn dispatch_sends(&self, mut job: Job, sends: Vec<u64>) -> Result<Option<Job>, StoreError> {
        self.write(move |txn| {
            let mut recipients = Vec::new();
            let mut taken = 0;
            {
                let mut queue = txn.open_table(QUEUED_SENDS)?;
                for id in sends {
                    let Some(row) = queue.remove(id)? else { continue };
                    let send: QueuedSend = decode(row.value())?;
                    drop(row);
                    taken += 1;
                    recipients.push(send.subscriber_id);
                }
            }
            if taken == 0 {
                return Ok(None);
            }
            let mut present = Vec::new();
            for id in recipients {
                match subscriber_in(txn, id) {
                    Ok((_, s)) => present.push((s.id, s.email)),
                    Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            job.id = next_id(txn, "job")?;
            job.prepared = true;
            add_pending(txn, &mut job, present)?;
            put_job(txn, &job)?;
            events::append(txn, job_changed(None, &job))?;
            Ok(Some(job))
        })
        .await
    }
}
