//! The automation worker: one task per node that runs every active automation's turns.
//!
//! A turn reads the events after the automation's cursor that it listens to and its due
//! timers (up to `BATCH` in all), calls the policy for each in order (a subscriber's
//! state carried from one call to the next), and commits every reaction with the new
//! cursor in one transaction (`store::Automations::commit_turn`). Only then are its
//! sends turned into jobs. A crash before the commit loses nothing: the next turn reads
//! the same work and calls the policy again, once; a commit that finds the automation
//! moved on (another node's turn) changes nothing.
//!
//! In a fleet each automation is leased to one node at a time (as long as the node's own
//! lease, `--lease`, renewed by every round), so a node's death costs at most that one
//! re-run, after the lease runs out.
//!
//! Waiting costs nothing: between turns the worker sleeps until the log's head moves,
//! the earliest timer falls due, or `POLL` passes (for automations created or resumed
//! meanwhile, and other nodes' work).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::model::*;
use crate::domain::{Letter, Subscriber, SubscriberStatus, now_ms};
use crate::events::{Event, EventFilter};
use crate::policy::automation::{DueTimer, OwnedTrigger};
use crate::policy::{Action, Automaton, PolicyError, Reaction};
use crate::runner::{Runner, RunnerError};
use crate::store::{Store, StoreError};

/// Events and timers one turn handles at most.
const BATCH: usize = 256;

/// The longest the worker sleeps without looking again.
const POLL: Duration = Duration::from_millis(500);

/// Queued sends turned into jobs per round.
const DISPATCH_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// How the worker behaves; the defaults are the server's.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Failures in a row after which an automation pauses itself.
    pub pause_after: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { pause_after: 20 }
    }
}

/// An automation's compiled policy and config, made again when either changes.
struct Loaded {
    version: u32,
    policy_id: String,
    automaton: Arc<Automaton>,
}

pub struct Worker {
    store: Store,
    runner: Runner,
    config: WorkerConfig,
    loaded: HashMap<u64, Loaded>,
    /// When this node's lease on each automation runs out, as far as it knows: renewed
    /// once half of it has passed, not every round.
    leases: HashMap<u64, u64>,
    /// Set when the server stops: a turn under way is dropped uncommitted.
    stop: CancellationToken,
}

/// What a turn found.
enum Turned {
    /// It handled something: there may be more.
    Busy,
    /// Nothing to do; the earliest timer is due then.
    Idle(Option<u64>),
}

impl Worker {
    pub fn new(store: Store, runner: Runner, config: WorkerConfig) -> Worker {
        Worker {
            store,
            runner,
            config,
            loaded: HashMap::new(),
            leases: HashMap::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Runs turns until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        self.stop = stop.clone();
        let mut head = self.store.event_head();
        loop {
            if stop.is_cancelled() || self.runner.is_stopping() {
                return;
            }
            let (busy, next_due) = match self.round().await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(error = %e, "automation round failed; trying again");
                    (false, None)
                }
            };
            if let Err(e) = self.dispatch().await {
                tracing::warn!(error = %e, "turning automations' sends into jobs failed; trying again");
            }
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            let wait = next_due
                .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                .unwrap_or(POLL)
                .min(POLL);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = head.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One turn of each active automation this node may run: whether any had work,
    /// and when the earliest timer is due.
    async fn round(&mut self) -> Result<(bool, Option<u64>), WorkerError> {
        let node = self.runner.node_id();
        let automations = self.store.list_automations().await?;
        self.loaded
            .retain(|id, _| automations.iter().any(|a| a.id == *id));
        self.leases
            .retain(|id, _| automations.iter().any(|a| a.id == *id));
        let (mut busy, mut next_due) = (false, None::<u64>);
        for automation in automations {
            if automation.state != AutomationState::Active {
                continue;
            }
            let now = now_ms();
            let lease = self.runner.lease().as_millis() as u64;
            let held = self
                .leases
                .get(&automation.id)
                .is_some_and(|until| *until > now + lease / 2);
            if !held {
                let until = now + lease;
                if self
                    .store
                    .lease_automation(automation.id, &node, now, until)
                    .await?
                {
                    self.leases.insert(automation.id, until);
                } else {
                    self.leases.remove(&automation.id);
                    continue;
                }
            }
            let id = automation.id;
            match self.turn(automation).await {
                Ok(Turned::Busy) => busy = true,
                Ok(Turned::Idle(due)) => {
                    next_due = match (next_due, due) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                }
                Err(e) => tracing::warn!(automation = id, error = %e, "automation turn failed; trying again"),
            }
        }
        Ok((busy, next_due))
    }

    /// The automaton for `automation`'s spec and its policy's current version; an
    /// automation whose policy cannot be used is paused with the reason.
    async fn automaton(&mut self, automation: &Automation) -> Result<Option<Arc<Automaton>>, WorkerError> {
        let policy = match self.runner.automation_policy(&automation.spec.policy).await {
            Ok(policy) => policy,
            Err(RunnerError::Store(e)) => return Err(e.into()),
            Err(e) => {
                let reason = format!("its policy {:?} cannot be used: {e}", automation.spec.policy);
                tracing::warn!(automation = automation.id, reason, "pausing automation");
                self.store
                    .set_automation_state(automation.id, AutomationState::Paused, Some(reason))
                    .await?;
                return Ok(None);
            }
        };
        let policy_id = policy.label().to_string();
        if let Some(loaded) = self.loaded.get(&automation.id)
            && loaded.version == automation.version
            && loaded.policy_id == policy_id
        {
            return Ok(Some(loaded.automaton.clone()));
        }
        let automaton = Arc::new(
            self.runner
                .policies()
                .automaton(policy, &automation.spec.config)?,
        );
        self.loaded.insert(
            automation.id,
            Loaded {
                version: automation.version,
                policy_id,
                automaton: automaton.clone(),
            },
        );
        Ok(Some(automaton))
    }

    async fn turn(&mut self, automation: Automation) -> Result<Turned, WorkerError> {
        let now = now_ms();
        let page = self
            .store
            .events_after(
                EventFilter {
                    types: automation.spec.events.clone(),
                    subscriber_id: None,
                },
                automation.cursor,
                BATCH,
            )
            .await?;
        let events: Vec<Event> = page
            .events
            .into_iter()
            .filter(|e| automation.spec.listens_to(&e.kind, e.newsletter_id))
            .collect();
        let timers = self
            .store
            .due_timers(automation.id, now, BATCH.saturating_sub(events.len()).max(1))
            .await?;
        if events.is_empty() && timers.is_empty() {
            if page.next > automation.cursor {
                // Only events it does not listen to: move past them.
                let turn = Turn {
                    automation_id: automation.id,
                    turns: automation.turns,
                    cursor: page.next,
                    handled: Vec::new(),
                    now_ms: now,
                    pause_after: self.config.pause_after,
                };
                self.commit(turn).await?;
                return Ok(Turned::Busy);
            }
            return Ok(Turned::Idle(self.store.next_timer_due(automation.id).await?));
        }
        let Some(automaton) = self.automaton(&automation).await? else {
            return Ok(Turned::Busy);
        };

        // The subscribers and states this turn is about, read once.
        // 0 keys the state of events and timers about nobody.
        let mut ids: Vec<u64> = events
            .iter()
            .map(|e| e.subscriber_id.unwrap_or(0))
            .chain(timers.iter().map(|t| t.subscriber_id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut subscribers: HashMap<u64, Option<Subscriber>> = HashMap::new();
        for &id in ids.iter().filter(|id| **id != 0) {
            let found = match self.store.subscriber_by_id(id).await {
                Ok(s) => Some(s),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            subscribers.insert(id, found);
        }
        let mut states: HashMap<u64, Value> = self
            .store
            .automation_states(automation.id, ids)
            .await?
            .into_iter()
            .collect();
        let mut letters: HashMap<u64, Option<Letter>> = HashMap::new();
        let mut templates: HashMap<String, Result<(), String>> = HashMap::new();

        let mut handled = Vec::with_capacity(events.len() + timers.len());
        // The turn stops where the automation pauses itself: what comes after waits
        // for it to be resumed, and the cursor stays before it.
        let mut failing = automation.failures_in_a_row;
        let mut cursor = page.next;
        let pauses = |failing: u32| failing >= self.config.pause_after;
        for event in events {
            if self.stop.is_cancelled() {
                return Ok(Turned::Idle(None));
            }
            if pauses(failing) {
                // Everything before this event in the log was handled or not listened to.
                cursor = event.id - 1;
                break;
            }
            let key = event.subscriber_id.unwrap_or(0);
            let subscriber = match event.subscriber_id {
                // Erased since: there is nobody to react about.
                Some(id) => match subscribers.get(&id).cloned().flatten() {
                    Some(s) => Some(s),
                    None => continue,
                },
                None => None,
            };
            let state = states.get(&key).cloned();
            let outcome = automaton
                .react_async(OwnedTrigger::Event(event.clone()), subscriber.clone(), state)
                .await;
            let outcome = self
                .checked(outcome, subscriber.as_ref(), &mut letters, &mut templates)
                .await?;
            failing = if outcome.is_ok() { 0 } else { failing + 1 };
            remember(&mut states, key, &outcome);
            handled.push(Handled {
                trigger: TriggerKey::Event { event_id: event.id },
                subscriber_id: event.subscriber_id,
                outcome,
            });
        }
        for timer in timers {
            if self.stop.is_cancelled() {
                return Ok(Turned::Idle(None));
            }
            if pauses(failing) {
                break;
            }
            let key = timer.subscriber_id;
            let state = states.get(&key).cloned();
            // A failed event retried (`Automations::retry_failures`) is handed to
            // `on-event` again, with its subscriber whatever their status, as when it
            // came; any other timer is run for active subscribers only.
            let retried = timer.retried_event();
            let subscriber = match key {
                0 => None,
                id => match subscribers.get(&id).cloned().flatten() {
                    Some(s) if retried.is_some() || s.status == SubscriberStatus::Active => Some(s),
                    // Unsubscribed, bounced, complained or erased: the timer is
                    // cancelled, not run (a retried event: only erased).
                    _ => {
                        handled.push(Handled {
                            trigger: TriggerKey::Timer { timer },
                            subscriber_id: Some(id),
                            outcome: Ok(Reaction {
                                actions: Vec::new(),
                                state,
                            }),
                        });
                        continue;
                    }
                },
            };
            let trigger = match retried {
                Some(event_id) => self
                    .store
                    .events_after(EventFilter::default(), event_id.saturating_sub(1), 1)
                    .await?
                    .events
                    .into_iter()
                    .find(|e| e.id == event_id)
                    .map(OwnedTrigger::Event)
                    .ok_or_else(|| {
                        format!("event {event_id} is no longer in the log (pruned by --event-retention)")
                    }),
                None => Ok(OwnedTrigger::Timer(DueTimer {
                    name: timer.name.clone(),
                    due_ms: timer.due_ms,
                    data: timer.data.clone(),
                })),
            };
            let outcome = match trigger {
                Ok(trigger) => {
                    let outcome = automaton.react_async(trigger, subscriber.clone(), state).await;
                    self.checked(outcome, subscriber.as_ref(), &mut letters, &mut templates)
                        .await?
                }
                Err(reason) => Err(reason),
            };
            failing = if outcome.is_ok() { 0 } else { failing + 1 };
            remember(&mut states, key, &outcome);
            handled.push(Handled {
                trigger: TriggerKey::Timer { timer },
                subscriber_id: (key != 0).then_some(key),
                outcome,
            });
        }
        let turn = Turn {
            automation_id: automation.id,
            turns: automation.turns,
            cursor,
            handled,
            now_ms: now_ms(),
            pause_after: self.config.pause_after,
        };
        self.commit(turn).await?;
        Ok(Turned::Busy)
    }

    async fn commit(&self, turn: Turn) -> Result<(), WorkerError> {
        let id = turn.automation_id;
        match self.store.commit_turn(turn).await {
            Ok(outcome) => {
                if outcome.queued_messages > 0 {
                    self.runner.wake_message_worker();
                }
                if outcome.automation.state == AutomationState::Paused {
                    tracing::warn!(
                        automation = id,
                        reason = outcome.automation.pause_reason.as_deref().unwrap_or(""),
                        "automation paused itself"
                    );
                }
                Ok(())
            }
            // Another turn of it committed first: this one's work is read again.
            Err(StoreError::Conflict(why)) => {
                tracing::debug!(automation = id, why, "turn superseded");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A policy's answer as a turn records it: an error's reason, or the reaction once
    /// its sends are possible (the letter exists and is of the subscriber's newsletter;
    /// a message's template policy resolves and compiles).
    async fn checked(
        &self,
        outcome: Result<Reaction, PolicyError>,
        subscriber: Option<&Subscriber>,
        letters: &mut HashMap<u64, Option<Letter>>,
        templates: &mut HashMap<String, Result<(), String>>,
    ) -> Result<Result<Reaction, String>, WorkerError> {
        let reaction = match outcome {
            Ok(reaction) => reaction,
            // The engine itself failed (shut down): not the policy's fault, not a
            // failure to keep; the turn is tried again.
            Err(e @ PolicyError::Engine(_)) => return Err(e.into()),
            Err(e) => return Ok(Err(e.to_string())),
        };
        for action in &reaction.actions {
            if subscriber.is_none() && action.needs_subscriber() {
                return Ok(Err(format!(
                    "{}: the event names no subscriber to do it for",
                    action.name()
                )));
            }
            match action {
                Action::SendLetter { letter } => {
                    if !letters.contains_key(letter) {
                        let found = match self.store.letter(*letter).await {
                            Ok(l) => Some(l),
                            Err(StoreError::NotFound { .. }) => None,
                            Err(e) => return Err(e.into()),
                        };
                        letters.insert(*letter, found);
                    }
                    let newsletter = letters[letter].as_ref().map(|l| l.newsletter_id);
                    match (newsletter, subscriber) {
                        (None, _) => return Ok(Err(format!("send_letter: there is no letter {letter}"))),
                        (Some(n), Some(s)) if n != s.newsletter_id => {
                            return Ok(Err(format!(
                                "send_letter: letter {letter} is of newsletter {n}, not the subscriber's ({})",
                                s.newsletter_id
                            )));
                        }
                        _ => {}
                    }
                }
                Action::SendMessage { template, .. } => {
                    if !templates.contains_key(template) {
                        let usable = match self.runner.check_message_template(template).await {
                            Ok(()) => Ok(()),
                            Err(RunnerError::Store(e)) => return Err(e.into()),
                            Err(e) => Err(e.to_string()),
                        };
                        templates.insert(template.clone(), usable);
                    }
                    if let Err(why) = &templates[template] {
                        return Ok(Err(format!("send_message: {why}")));
                    }
                }
                _ => {}
            }
        }
        Ok(Ok(reaction))
    }

    /// Turns queued sends into jobs.
    async fn dispatch(&self) -> Result<(), WorkerError> {
        let queued = self.store.queued_sends(DISPATCH_BATCH).await?;
        if queued.is_empty() {
            return Ok(());
        }
        // One job per letter, but a job has one delivery per subscriber: a letter sent
        // twice to someone (two reactions asked for it) takes two jobs.
        let mut jobs: Vec<(u64, HashSet<u64>, Vec<u64>)> = Vec::new();
        for send in queued {
            let job = jobs
                .iter_mut()
                .find(|(letter, to, _)| *letter == send.letter_id && !to.contains(&send.subscriber_id));
            match job {
                Some((_, to, sends)) => {
                    to.insert(send.subscriber_id);
                    sends.push(send.id);
                }
                None => jobs.push((send.letter_id, HashSet::from([send.subscriber_id]), vec![send.id])),
            }
        }
        for (letter, _, sends) in jobs {
            let n = sends.len();
            if let Some(job) = self.runner.dispatch_sends(letter, sends).await? {
                tracing::info!(job = job.id, letter, sends = n, "automations' sends became a job");
            }
        }
        Ok(())
    }
}

/// The state a subscriber's next call in the same turn sees.
fn remember(states: &mut HashMap<u64, Value>, key: u64, outcome: &Result<Reaction, String>) {
    if let Ok(reaction) = outcome {
        match &reaction.state {
            Some(state) => {
                states.insert(key, state.clone());
            }
            None => {
                states.remove(&key);
            }
        }
    }
}
