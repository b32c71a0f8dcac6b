//! Automations in PostgreSQL (migrations/0007_automations.sql). A turn's commit locks
//! the automation's row first and checks its `turns` (the compare-and-set that makes a
//! turn's effects happen once across the fleet), then the subscribers it changes, and
//! appends its events last, like every other writer.

use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Row;

use super::jobs::put_job;
use super::lists::{SUBSCRIBER_COLUMNS, bump_shared_status_epoch, subscriber};
use super::{
    PgStore, commit, domain_int, events, execute, is_unique_violation, query, query_opt, sql_int, sql_limit,
};
use crate::automations::*;
use crate::domain::{Job, now};
use crate::events::{NewEvent, job_changed, subscriber_changed};
use crate::policy::Action;
use crate::store::{Automations, StoreError, TurnOutcome};

fn automation(row: &Row) -> Result<Automation, StoreError> {
    let mut a: Automation = serde_json::from_value(row.get(0))?;
    a.turns = domain_int(row.get(1));
    Ok(a)
}

fn timer(row: &Row) -> Result<Timer, StoreError> {
    Ok(Timer {
        automation_id: domain_int(row.get(0)),
        subscriber_id: domain_int(row.get(1)),
        name: row.get(2),
        id: domain_int(row.get(3)),
        due_ms: domain_int(row.get(4)),
        data: row.get(5),
    })
}

const TIMER_COLUMNS: &str = "automation_id, subscriber_id, name, id, due_ms, data";

async fn put_automation(tx: &impl GenericClient, a: &Automation) -> Result<(), StoreError> {
    execute(
        tx,
        "UPDATE automations SET name = $2, turns = $3, doc = $4 WHERE id = $1",
        &[
            &sql_int(a.id),
            &a.spec.name,
            &sql_int(a.turns),
            &serde_json::to_value(a)?,
        ],
    )
    .await?;
    Ok(())
}

async fn put_version(tx: &impl GenericClient, a: &Automation) -> Result<(), StoreError> {
    let version = AutomationVersion {
        version: a.version,
        spec: a.spec.clone(),
        created_at: a.updated_at,
    };
    execute(
        tx,
        "INSERT INTO automation_versions (automation_id, version, doc) VALUES ($1, $2, $3)",
        &[
            &sql_int(a.id),
            &i64::from(a.version),
            &serde_json::to_value(&version)?,
        ],
    )
    .await?;
    Ok(())
}

async fn locked(tx: &impl GenericClient, id: u64) -> Result<Automation, StoreError> {
    let row = query_opt(
        tx,
        "SELECT doc, turns FROM automations WHERE id = $1 FOR UPDATE",
        &[&sql_int(id)],
    )
    .await?
    .ok_or_else(|| StoreError::not_found("automation", id))?;
    automation(&row)
}

/// Removes what automations keep about a subscriber being erased: their states (which
/// may hold personal data) and their timers.
pub(super) async fn forget_subscriber(tx: &impl GenericClient, subscriber_id: u64) -> Result<(), StoreError> {
    let id = sql_int(subscriber_id);
    execute(
        tx,
        "DELETE FROM automation_states WHERE subscriber_id = $1",
        &[&id],
    )
    .await?;
    execute(tx, "DELETE FROM timers WHERE subscriber_id = $1", &[&id]).await?;
    Ok(())
}

fn name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("an automation named {name:?} exists"))
}

/// What a turn's reactions did, summed over them.
#[derive(Default)]
struct Applied {
    /// The events to append, in order.
    events: Vec<NewEvent>,
    status_changed: bool,
    queued_sends: usize,
    queued_messages: usize,
}

/// Applies one reaction's actions about `subscriber_id` (0: none): timers, attributes,
/// status, queued sends and messages, and the events they make, into `out`. Actions
/// about a subscriber who is gone are dropped.
async fn apply(
    tx: &impl GenericClient,
    automation_id: u64,
    subscriber_id: u64,
    actions: &[Action],
    now_ms: u64,
    out: &mut Applied,
) -> Result<(), StoreError> {
    let events = &mut out.events;
    let mut current = match subscriber_id {
        0 => None,
        id => query_opt(
            tx,
            &format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1 FOR UPDATE"),
            &[&sql_int(id)],
        )
        .await?
        .map(|row| subscriber(&row))
        .transpose()?,
    };
    let before = current.clone();
    let (a, s) = (sql_int(automation_id), sql_int(subscriber_id));
    // Where this reaction's events begin: its subscriber's change goes first.
    let first_event = events.len();
    for action in actions {
        if action.needs_subscriber() && current.is_none() {
            continue;
        }
        if let Some(c) = current.as_mut()
            && change_subscriber(action, c)
        {
            continue;
        }
        match action {
            Action::StartTimer { name, when, data } => {
                execute(
                    tx,
                    "INSERT INTO timers (automation_id, subscriber_id, name, id, due_ms, data)
                     VALUES ($1, $2, $3, nextval('timer_ids'), $4, $5)
                     ON CONFLICT (automation_id, subscriber_id, name)
                     DO UPDATE SET id = excluded.id, due_ms = excluded.due_ms, data = excluded.data",
                    &[&a, &s, name, &sql_int(when.due_ms(now_ms)), data],
                )
                .await?;
            }
            Action::CancelTimer { name } => {
                execute(
                    tx,
                    "DELETE FROM timers WHERE automation_id = $1 AND subscriber_id = $2 AND name = $3",
                    &[&a, &s, name],
                )
                .await?;
            }
            Action::Emit { .. } => events.extend(emitted(action, current.as_ref())),
            Action::SendLetter { letter } => {
                execute(
                    tx,
                    "INSERT INTO queued_sends (automation_id, subscriber_id, letter_id, at_ms)
                     VALUES ($1, $2, $3, $4)",
                    &[&a, &s, &sql_int(*letter), &sql_int(now_ms)],
                )
                .await?;
                out.queued_sends += 1;
            }
            Action::SendMessage { .. } => {
                let Some(s) = &current else { continue };
                let from: String = query_opt(
                    tx,
                    "SELECT from_addr FROM newsletters WHERE id = $1",
                    &[&sql_int(s.newsletter_id)],
                )
                .await?
                .ok_or_else(|| StoreError::not_found("newsletter", s.newsletter_id))?
                .get(0);
                if let Some(new) = message_of(action, s, &from) {
                    let message = super::messages::insert_message(tx, new, None).await?;
                    events.push(message.event(crate::events::types::MESSAGE_QUEUED));
                    out.queued_messages += 1;
                }
            }
            // The subscriber's changes were made above.
            Action::SetAttribute { .. } | Action::RemoveAttribute { .. } | Action::Unsubscribe => {}
        }
    }
    if let (Some(before), Some(after)) = (&before, &current)
        && before != after
    {
        execute(
            tx,
            "UPDATE subscribers SET attributes = $2, status = $3 WHERE id = $1",
            &[
                &sql_int(after.id),
                &Value::Object(after.attributes.clone()),
                &after.status.as_str(),
            ],
        )
        .await?;
        out.status_changed |= before.status != after.status;
        // The change comes before what this reaction emitted and queued.
        events.insert(
            first_event,
            subscriber_changed(Some(before), after).expect("a change"),
        );
    }
    Ok(())
}

#[async_trait::async_trait]
impl Automations for PgStore {
    async fn create_automation(&self, spec: AutomationSpec) -> Result<Automation, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let cursor = query(
            &tx,
            "SELECT value FROM fleet_counters WHERE name = 'event_id'",
            &[],
        )
        .await?
        .first()
        .map(|r| domain_int(r.get(0)))
        .unwrap_or(0);
        let mut automation = Automation::new(0, spec, cursor, now());
        let statement = tx
            .prepare_cached("INSERT INTO automations (name, doc) VALUES ($1, '{}') RETURNING id")
            .await?;
        let row = match tx.query_one(&statement, &[&automation.spec.name]).await {
            Err(e) if is_unique_violation(&e) => return Err(name_taken(&automation.spec.name)),
            other => other?,
        };
        automation.id = domain_int(row.get(0));
        put_automation(&tx, &automation).await?;
        put_version(&tx, &automation).await?;
        commit(tx).await?;
        Ok(automation)
    }

    async fn automation(&self, id: u64) -> Result<Automation, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT doc, turns FROM automations WHERE id = $1",
            &[&sql_int(id)],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("automation", id))?;
        automation(&row)
    }

    async fn list_automations(&self) -> Result<Vec<Automation>, StoreError> {
        let client = self.client().await?;
        query(&client, "SELECT doc, turns FROM automations ORDER BY id", &[])
            .await?
            .iter()
            .map(automation)
            .collect()
    }

    async fn update_automation(&self, id: u64, spec: AutomationSpec) -> Result<Automation, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut automation = locked(&tx, id).await?;
        if spec.name != automation.spec.name
            && query_opt(&tx, "SELECT 1 FROM automations WHERE name = $1", &[&spec.name])
                .await?
                .is_some()
        {
            return Err(name_taken(&spec.name));
        }
        automation.spec = spec;
        automation.version += 1;
        automation.updated_at = now();
        let statement = tx
            .prepare_cached("UPDATE automations SET name = $2, doc = $3 WHERE id = $1")
            .await?;
        let written = tx
            .execute(
                &statement,
                &[
                    &sql_int(id),
                    &automation.spec.name,
                    &serde_json::to_value(&automation)?,
                ],
            )
            .await;
        match written {
            Err(e) if is_unique_violation(&e) => return Err(name_taken(&automation.spec.name)),
            other => other?,
        };
        put_version(&tx, &automation).await?;
        commit(tx).await?;
        Ok(automation)
    }

    async fn automation_versions(&self, id: u64) -> Result<Vec<AutomationVersion>, StoreError> {
        let client = self.client().await?;
        if query_opt(
            &client,
            "SELECT 1 FROM automations WHERE id = $1",
            &[&sql_int(id)],
        )
        .await?
        .is_none()
        {
            return Err(StoreError::not_found("automation", id));
        }
        query(
            &client,
            "SELECT doc FROM automation_versions WHERE automation_id = $1 ORDER BY version",
            &[&sql_int(id)],
        )
        .await?
        .iter()
        .map(|row| Ok(serde_json::from_value(row.get(0))?))
        .collect()
    }

    async fn set_automation_state(
        &self,
        id: u64,
        state: AutomationState,
        reason: Option<String>,
    ) -> Result<Automation, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut automation = locked(&tx, id).await?;
        automation.set_state(state, reason, now());
        put_automation(&tx, &automation).await?;
        commit(tx).await?;
        Ok(automation)
    }

    async fn delete_automation(&self, id: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        // The other tables' rows go with it (ON DELETE CASCADE).
        let deleted = execute(&client, "DELETE FROM automations WHERE id = $1", &[&sql_int(id)]).await?;
        if deleted == 0 {
            return Err(StoreError::not_found("automation", id));
        }
        Ok(())
    }

    async fn due_timers(
        &self,
        automation_id: u64,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Timer>, StoreError> {
        let client = self.client().await?;
        query(
            &client,
            &format!(
                "SELECT {TIMER_COLUMNS} FROM timers WHERE automation_id = $1 AND due_ms <= $2
                 ORDER BY due_ms, id LIMIT $3"
            ),
            &[&sql_int(automation_id), &sql_int(now_ms), &sql_limit(limit)],
        )
        .await?
        .iter()
        .map(timer)
        .collect()
    }

    async fn next_timer_due(&self, automation_id: u64) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT due_ms FROM timers WHERE automation_id = $1 ORDER BY due_ms, id LIMIT 1",
            &[&sql_int(automation_id)],
        )
        .await?;
        Ok(row.map(|r| domain_int(r.get(0))))
    }

    async fn timers(
        &self,
        automation_id: u64,
        after: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<Timer>, StoreError> {
        let client = self.client().await?;
        let (subscriber, name) = after.map_or((-1, String::new()), |(s, n)| (sql_int(s), n));
        query(
            &client,
            &format!(
                "SELECT {TIMER_COLUMNS} FROM timers WHERE automation_id = $1 AND (subscriber_id, name) > ($2, $3)
                 ORDER BY subscriber_id, name LIMIT $4"
            ),
            &[&sql_int(automation_id), &subscriber, &name, &sql_limit(limit)],
        )
        .await?
        .iter()
        .map(timer)
        .collect()
    }

    async fn automation_states(
        &self,
        automation_id: u64,
        subscribers: Vec<u64>,
    ) -> Result<Vec<(u64, Value)>, StoreError> {
        let client = self.client().await?;
        let ids: Vec<i64> = subscribers.into_iter().map(sql_int).collect();
        Ok(query(
            &client,
            "SELECT subscriber_id, state FROM automation_states
             WHERE automation_id = $1 AND subscriber_id = ANY($2) ORDER BY subscriber_id",
            &[&sql_int(automation_id), &ids],
        )
        .await?
        .iter()
        .map(|row| (domain_int(row.get(0)), row.get(1)))
        .collect())
    }

    async fn lease_automation(
        &self,
        id: u64,
        node: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let taken = execute(
            &client,
            "UPDATE automations SET lease_node = $2, lease_until_ms = $4
             WHERE id = $1 AND (lease_node IS NULL OR lease_node = $2 OR lease_until_ms < $3)",
            &[&sql_int(id), &node, &sql_int(now_ms), &sql_int(until_ms)],
        )
        .await?;
        Ok(taken == 1)
    }

    async fn commit_turn(&self, turn: Turn) -> Result<TurnOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut automation = locked(&tx, turn.automation_id).await?;
        if automation.turns != turn.turns {
            return Err(StoreError::Conflict(format!(
                "automation {} moved on (turn {} committed elsewhere)",
                automation.id, automation.turns
            )));
        }
        let a = sql_int(automation.id);
        let mut applied = Applied::default();
        for handled in turn.handled {
            let subscriber = handled.subscriber_id.unwrap_or(0);
            // A timer that fired is done, whatever the reaction; one started again
            // since (another id) stays.
            if let TriggerKey::Timer { timer } = &handled.trigger {
                execute(
                    &tx,
                    "DELETE FROM timers WHERE automation_id = $1 AND subscriber_id = $2 AND name = $3 AND id = $4",
                    &[&a, &sql_int(timer.subscriber_id), &timer.name, &sql_int(timer.id)],
                )
                .await?;
            }
            match handled.outcome {
                Ok(reaction) => {
                    match &reaction.state {
                        Some(state) => {
                            execute(
                                &tx,
                                "INSERT INTO automation_states (automation_id, subscriber_id, state)
                                 VALUES ($1, $2, $3)
                                 ON CONFLICT (automation_id, subscriber_id) DO UPDATE SET state = excluded.state",
                                &[&a, &sql_int(subscriber), state],
                            )
                            .await?;
                        }
                        None => {
                            execute(
                                &tx,
                                "DELETE FROM automation_states WHERE automation_id = $1 AND subscriber_id = $2",
                                &[&a, &sql_int(subscriber)],
                            )
                            .await?;
                        }
                    }
                    apply(
                        &tx,
                        automation.id,
                        subscriber,
                        &reaction.actions,
                        turn.now_ms,
                        &mut applied,
                    )
                    .await?;
                    automation.count_handled();
                }
                Err(reason) => {
                    let mut failure = Failure {
                        id: 0,
                        automation_id: automation.id,
                        trigger: handled.trigger,
                        subscriber_id: handled.subscriber_id,
                        reason,
                        at_ms: turn.now_ms,
                    };
                    let row = query(
                        &tx,
                        "INSERT INTO automation_failures (automation_id, doc) VALUES ($1, '{}') RETURNING id",
                        &[&a],
                    )
                    .await?;
                    failure.id = domain_int(row[0].get(0));
                    execute(
                        &tx,
                        "UPDATE automation_failures SET doc = $3 WHERE automation_id = $1 AND id = $2",
                        &[&a, &sql_int(failure.id), &serde_json::to_value(&failure)?],
                    )
                    .await?;
                    automation.count_failure(&failure.reason, turn.pause_after);
                }
            }
        }
        automation.cursor = automation.cursor.max(turn.cursor);
        automation.turns += 1;
        put_automation(&tx, &automation).await?;
        if applied.status_changed {
            bump_shared_status_epoch(&tx).await?;
        }
        let appended = events::append(&tx, applied.events).await?;
        commit(tx).await?;
        self.published(&appended);
        if applied.status_changed {
            self.bump_status_epoch();
        }
        Ok(TurnOutcome {
            automation,
            queued_sends: applied.queued_sends,
            queued_messages: applied.queued_messages,
            status_changed: applied.status_changed,
        })
    }

    async fn automation_failures(
        &self,
        automation_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Failure>, StoreError> {
        let client = self.client().await?;
        query(
            &client,
            "SELECT doc FROM automation_failures WHERE automation_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[&sql_int(automation_id), &sql_int(after), &sql_limit(limit)],
        )
        .await?
        .iter()
        .map(|row| Ok(serde_json::from_value(row.get(0))?))
        .collect()
    }

    async fn retry_failures(
        &self,
        automation_id: u64,
        ids: Vec<u64>,
        limit: usize,
    ) -> Result<Retried, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Locked like a turn's commit: a retry and a turn of one automation do not mix.
        locked(&tx, automation_id).await?;
        let a = sql_int(automation_id);
        let rows = if ids.is_empty() {
            query(
                &tx,
                "SELECT doc FROM automation_failures WHERE automation_id = $1 ORDER BY id LIMIT $2 FOR UPDATE",
                &[&a, &sql_limit(limit)],
            )
            .await?
        } else {
            let wanted: Vec<i64> = ids.iter().map(|id| sql_int(*id)).collect();
            query(
                &tx,
                "SELECT doc FROM automation_failures WHERE automation_id = $1 AND id = ANY($2) ORDER BY id FOR UPDATE",
                &[&a, &wanted],
            )
            .await?
        };
        let failures: Vec<Failure> = rows
            .iter()
            .map(|r| serde_json::from_value(r.get(0)))
            .collect::<Result<_, _>>()?;
        if let Some(missing) = ids.iter().find(|id| !failures.iter().any(|f| f.id == **id)) {
            return Err(StoreError::not_found("automation failure", missing));
        }
        let now = crate::domain::now_ms();
        let mut retried = Retried::default();
        for failure in failures {
            let timer = failure.retry_timer(0, now);
            // A failed timer started again since stands; a retried event's timer is
            // made due now again.
            let on_conflict = match failure.trigger {
                TriggerKey::Timer { .. } => "DO NOTHING",
                TriggerKey::Event { .. } => "DO UPDATE SET id = excluded.id, due_ms = excluded.due_ms",
            };
            let inserted = execute(
                &tx,
                &format!(
                    "INSERT INTO timers (automation_id, subscriber_id, name, id, due_ms, data)
                     VALUES ($1, $2, $3, nextval('timer_ids'), $4, $5)
                     ON CONFLICT (automation_id, subscriber_id, name) {on_conflict}"
                ),
                &[
                    &a,
                    &sql_int(timer.subscriber_id),
                    &timer.name,
                    &sql_int(now),
                    &timer.data,
                ],
            )
            .await?;
            if inserted == 0 {
                retried.kept.push(failure.id);
                continue;
            }
            execute(
                &tx,
                "DELETE FROM automation_failures WHERE automation_id = $1 AND id = $2",
                &[&a, &sql_int(failure.id)],
            )
            .await?;
            retried.retried += 1;
        }
        commit(tx).await?;
        Ok(retried)
    }

    async fn queued_sends(&self, limit: usize) -> Result<Vec<QueuedSend>, StoreError> {
        let client = self.client().await?;
        Ok(query(
            &client,
            "SELECT id, automation_id, subscriber_id, letter_id, at_ms FROM queued_sends ORDER BY id LIMIT $1",
            &[&sql_limit(limit)],
        )
        .await?
        .iter()
        .map(|row| QueuedSend {
            id: domain_int(row.get(0)),
            automation_id: domain_int(row.get(1)),
            subscriber_id: domain_int(row.get(2)),
            letter_id: domain_int(row.get(3)),
            at_ms: domain_int(row.get(4)),
        })
        .collect())
    }

    async fn dispatch_sends(&self, mut job: Job, sends: Vec<u64>) -> Result<Option<Job>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<i64> = sends.into_iter().map(sql_int).collect();
        // Taken by whoever deletes them first: another node's dispatch of the same
        // sends waits for this one and finds none.
        let taken = query(
            &tx,
            "DELETE FROM queued_sends WHERE id = ANY($1) RETURNING subscriber_id",
            &[&ids],
        )
        .await?;
        if taken.is_empty() {
            return Ok(None);
        }
        let subscribers: Vec<i64> = taken.iter().map(|r| r.get(0)).collect();
        let present = query(
            &tx,
            "SELECT id, email FROM subscribers WHERE id = ANY($1) ORDER BY id",
            &[&subscribers],
        )
        .await?;
        let id = query(&tx, "SELECT nextval(pg_get_serial_sequence('jobs', 'id'))", &[]).await?;
        job.id = domain_int(id[0].get(0));
        job.prepared = true;
        job.counts.pending = present.len() as u64;
        execute(
            &tx,
            "INSERT INTO jobs (id, newsletter_id, state, doc) VALUES ($1, $2, $3, '{}')",
            &[&sql_int(job.id), &sql_int(job.newsletter_id), &job.state.as_str()],
        )
        .await?;
        let (ids, emails): (Vec<i64>, Vec<String>) = present
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
            .unzip();
        let pending = serde_json::to_value(crate::domain::DeliveryState::Pending)?;
        execute(
            &tx,
            "INSERT INTO deliveries (job_id, subscriber_id, state, attempts, email, detail)
             SELECT $1, u.id, 0, 0, u.email, $4 FROM unnest($2::bigint[], $3::text[]) AS u(id, email)
             ON CONFLICT (job_id, subscriber_id) DO NOTHING",
            &[&sql_int(job.id), &ids, &emails, &pending],
        )
        .await?;
        put_job(&tx, &job).await?;
        let appended = events::append(&tx, job_changed(None, &job)).await?;
        commit(tx).await?;
        self.published(&appended);
        Ok(Some(job))
    }
}
