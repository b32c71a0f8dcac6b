//! The automation world (`letterbox:policy@0.3.0`, `wit`): its bindings, the conversions
//! between its types and letterbox's, the checks a reaction must pass before anything
//! acts on it, and `Automaton`, one automation's policy with warm instances.
//!
//! An automation is called for one event or timer at a time (they are rare next to a
//! letter's recipients, and each answer must be recorded on its own before anything is
//! sent). Its instances are reused like an evaluator's: `prepare` once with the config,
//! then up to `RECYCLE_AFTER` calls, and an instance that traps is dropped at once.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use wasmtime::Store;

use super::engine::{Policy, PolicyHost, Prepared};
use super::evaluator::RECYCLE_AFTER;
use super::sandbox::{HostState, log_output};
use super::{PolicyError, Problem, describe_trap, truncate};
use crate::domain::{PluginKind, Subscriber};
use crate::events::Event;

pub(super) mod bindings {
    wasmtime::component::bindgen!({ path: "wit", world: "automation" });
}

use bindings::letterbox::policy::automation_types as wit;

/// Largest state an automation may keep per subscriber (its JSON text).
pub const MAX_STATE_BYTES: usize = 16 << 10;

/// Most actions in one reaction.
pub const MAX_ACTIONS: usize = 32;

/// Longest timer name.
pub const MAX_TIMER_NAME: usize = 200;

/// Largest JSON a single action may carry (a timer's data, an attribute's value, an
/// event's data, a message's params and bodies together).
pub const MAX_ACTION_BYTES: usize = 256 << 10;

/// What an automation answered: what to do, and the subscriber's state from now on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reaction {
    pub actions: Vec<Action>,
    /// `None` forgets the state.
    pub state: Option<Value>,
}

/// One thing an automation asks the host to do, for the subscriber it was called about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    SendLetter {
        letter: u64,
    },
    SendMessage {
        template: String,
        subject: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        html: Option<String>,
        params: Map<String, Value>,
    },
    StartTimer {
        name: String,
        when: When,
        data: Value,
    },
    CancelTimer {
        name: String,
    },
    SetAttribute {
        name: String,
        value: Value,
    },
    RemoveAttribute {
        name: String,
    },
    Unsubscribe,
    Emit {
        kind: String,
        data: Map<String, Value>,
    },
}

impl Action {
    /// Whether the action is about a subscriber (all but `emit` need one).
    pub fn needs_subscriber(&self) -> bool {
        !matches!(self, Action::Emit { .. })
    }

    /// The action's name, as the WIT spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Action::SendLetter { .. } => "send-letter",
            Action::SendMessage { .. } => "send-message",
            Action::StartTimer { .. } => "start-timer",
            Action::CancelTimer { .. } => "cancel-timer",
            Action::SetAttribute { .. } => "set-attribute",
            Action::RemoveAttribute { .. } => "remove-attribute",
            Action::Unsubscribe => "unsubscribe",
            Action::Emit { .. } => "emit",
        }
    }
}

/// When a timer falls due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Seconds after the reaction is recorded.
    AfterSeconds(u64),
    /// Seconds since the Unix epoch (UTC).
    At(u64),
}

impl When {
    /// The due time in unix milliseconds, for a reaction recorded at `now_ms`.
    pub fn due_ms(self, now_ms: u64) -> u64 {
        match self {
            When::AfterSeconds(s) => now_ms.saturating_add(s.saturating_mul(1000)),
            When::At(s) => s.saturating_mul(1000),
        }
    }
}

/// A timer as the automation is told of it when it falls due.
#[derive(Debug, Clone, PartialEq)]
pub struct DueTimer {
    pub name: String,
    pub due_ms: u64,
    pub data: Value,
}

/// What an automation is called for.
#[derive(Debug, Clone, Copy)]
pub enum Trigger<'a> {
    Event(&'a Event),
    Timer(&'a DueTimer),
}

fn event_input(event: &Event) -> wit::Event {
    wit::Event {
        id: event.id,
        kind: event.kind.clone(),
        at_ms: event.at_ms,
        newsletter: event.newsletter_id,
        job: event.job_id,
        letter: event.letter_id,
        data: Value::Object(event.data.clone()).to_string(),
    }
}

fn timer_input(timer: &DueTimer) -> wit::Timer {
    wit::Timer {
        name: timer.name.clone(),
        due_at_ms: timer.due_ms,
        data: timer.data.to_string(),
    }
}

fn subscriber_input(s: &Subscriber) -> wit::Subscriber {
    wit::Subscriber {
        id: s.id,
        newsletter: s.newsletter_id,
        email: s.email.clone(),
        name: s.name.clone().unwrap_or_default(),
        attributes: serde_json::to_string(&s.attributes).unwrap_or_else(|_| "{}".into()),
        status: s.status.as_str().to_string(),
        subscribed_at: s.created_at,
    }
}

/// `text` as JSON, for the reason `what` names if it is not.
fn json_of(text: &str, what: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("{what} is not JSON: {e}"))
}

fn object_of(text: &str, what: &str) -> Result<Map<String, Value>, String> {
    match json_of(text, what)? {
        Value::Object(map) => Ok(map),
        other => Err(format!("{what} must be a JSON object, not {other}")),
    }
}

/// The reaction as letterbox keeps it, or why it cannot be acted on.
fn reaction_of(r: wit::Reaction) -> Result<Reaction, String> {
    if r.actions.len() > MAX_ACTIONS {
        return Err(format!(
            "{} actions, more than the {MAX_ACTIONS} a reaction may hold",
            r.actions.len()
        ));
    }
    let state = match r.state {
        None => None,
        Some(text) if text.len() > MAX_STATE_BYTES => {
            return Err(format!(
                "its state is {} bytes, more than the {MAX_STATE_BYTES} an automation may keep per subscriber",
                text.len()
            ));
        }
        Some(text) => Some(json_of(&text, "its state")?),
    };
    let actions = r
        .actions
        .into_iter()
        .enumerate()
        .map(|(i, a)| action_of(a).map_err(|e| format!("action {i}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(Reaction { actions, state })
}

fn action_of(a: wit::Action) -> Result<Action, String> {
    let size = match &a {
        wit::Action::SendMessage(m) => {
            m.subject.len() + m.text.len() + m.html.as_ref().map_or(0, String::len) + m.params.len()
        }
        wit::Action::StartTimer(t) => t.data.len(),
        wit::Action::SetAttribute(at) => at.value.len(),
        wit::Action::Emit(e) => e.data.len(),
        _ => 0,
    };
    if size > MAX_ACTION_BYTES {
        return Err(format!("it carries {size} bytes, more than {MAX_ACTION_BYTES}"));
    }
    let name_ok = |name: &str, what: &str| -> Result<(), String> {
        if name.is_empty() || name.len() > MAX_TIMER_NAME || name.chars().any(char::is_control) {
            Err(format!(
                "{what} must be 1 to {MAX_TIMER_NAME} bytes with no control characters, not {name:?}"
            ))
        } else if name.starts_with("letterbox.") {
            Err(format!(
                "{what} {name:?} starts with `letterbox.`, which letterbox keeps for its own timers"
            ))
        } else {
            Ok(())
        }
    };
    Ok(match a {
        wit::Action::SendLetter(letter) => Action::SendLetter { letter },
        wit::Action::SendMessage(m) => Action::SendMessage {
            template: m.template,
            subject: m.subject,
            text: m.text,
            html: m.html,
            params: object_of(&m.params, "the message's params")?,
        },
        wit::Action::StartTimer(t) => {
            name_ok(&t.name, "a timer's name")?;
            Action::StartTimer {
                name: t.name,
                when: match t.when {
                    wit::When::AfterSeconds(s) => When::AfterSeconds(s),
                    wit::When::At(s) => When::At(s),
                },
                data: json_of(&t.data, "the timer's data")?,
            }
        }
        wit::Action::CancelTimer(name) => {
            name_ok(&name, "a timer's name")?;
            Action::CancelTimer { name }
        }
        wit::Action::SetAttribute(at) => {
            name_ok(&at.name, "an attribute's name")?;
            Action::SetAttribute {
                value: json_of(&at.value, "the attribute's value")?,
                name: at.name,
            }
        }
        wit::Action::RemoveAttribute(name) => {
            name_ok(&name, "an attribute's name")?;
            Action::RemoveAttribute { name }
        }
        wit::Action::Unsubscribe => Action::Unsubscribe,
        wit::Action::Emit(e) => {
            if !crate::events::is_custom(&e.kind) {
                return Err(format!(
                    "an emitted event's type must be custom.<name> (letters, digits, `.`, `_`, `-`), not {:?}",
                    e.kind
                ));
            }
            Action::Emit {
                data: object_of(&e.data, "the event's data")?,
                kind: e.kind,
            }
        }
    })
}

/// One warm instance of an automation's policy.
struct Live {
    store: Store<HostState>,
    bindings: bindings::Automation,
    calls: u32,
    /// What `prepare` answered with the config: an `err` fails every call on it.
    prepared: Result<(), String>,
}

/// One automation's policy and config, with warm instances to reuse across calls.
pub struct Automaton {
    host: PolicyHost,
    policy: Arc<Policy>,
    /// The config as the policy receives it (JSON text).
    config: String,
    idle: Mutex<Vec<Live>>,
    max_idle: usize,
}

impl PolicyHost {
    /// An automaton for `policy` (an automation policy) with `config`.
    pub fn automaton(
        &self,
        policy: Arc<Policy>,
        config: &Map<String, Value>,
    ) -> Result<Automaton, PolicyError> {
        if policy.kind() != PluginKind::Automation {
            return Err(PolicyError::Engine(format!(
                "{} is {} policy, not an automation",
                policy.label,
                policy.kind().with_article()
            )));
        }
        Ok(Automaton {
            max_idle: self.parallel_evaluations,
            host: self.clone(),
            policy,
            config: Value::Object(config.clone()).to_string(),
            idle: Mutex::new(Vec::new()),
        })
    }
}

impl Automaton {
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The policy's answer for `trigger` about `subscriber`, whose state for this
    /// automation is `state`. Blocking.
    pub fn react(
        &self,
        trigger: Trigger<'_>,
        subscriber: Option<&Subscriber>,
        state: Option<&Value>,
    ) -> Result<Reaction, PolicyError> {
        let label = &self.policy.label;
        let trap = |detail: String| PolicyError::Trap {
            policy: label.clone(),
            detail,
        };
        let rejected = |reason: String| PolicyError::Rejected {
            policy: label.clone(),
            reason: truncate(reason),
        };
        let popped = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut live = match popped {
            Some(live) if live.calls < RECYCLE_AFTER => live,
            _ => self.instantiate()?,
        };
        if let Err(reason) = &live.prepared {
            let reason = format!("prepare failed: {reason}");
            self.give_back(live);
            return Err(rejected(reason));
        }
        let subscriber = subscriber.map(subscriber_input);
        let state = state.map(Value::to_string);
        live.store.set_epoch_deadline(self.host.limits.deadline_ticks());
        let answer = match trigger {
            Trigger::Event(event) => live.bindings.call_on_event(
                &mut live.store,
                &event_input(event),
                subscriber.as_ref(),
                state.as_deref(),
            ),
            Trigger::Timer(timer) => live.bindings.call_on_timer(
                &mut live.store,
                &timer_input(timer),
                subscriber.as_ref(),
                state.as_deref(),
            ),
        };
        log_output(label, &live.store);
        // A trap loses the instance: it is not given back.
        let answer = answer.map_err(|e| trap(describe_trap(&e)))?;
        live.calls += 1;
        self.give_back(live);
        reaction_of(answer.map_err(rejected)?).map_err(|reason| PolicyError::BadReaction {
            policy: label.clone(),
            reason: truncate(reason),
        })
    }

    /// `react` on the blocking pool, within the process-wide evaluation limit.
    pub async fn react_async(
        self: &Arc<Self>,
        trigger: OwnedTrigger,
        subscriber: Option<Subscriber>,
        state: Option<Value>,
    ) -> Result<Reaction, PolicyError> {
        let _permit = self
            .host
            .evaluations
            .acquire()
            .await
            .map_err(|_| PolicyError::Engine("the policy engine is shut down".into()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let trigger = match &trigger {
                OwnedTrigger::Event(e) => Trigger::Event(e),
                OwnedTrigger::Timer(t) => Trigger::Timer(t),
            };
            this.react(trigger, subscriber.as_ref(), state.as_ref())
        })
        .await
        .map_err(|e| PolicyError::Engine(format!("automation call panicked: {e}")))?
    }

    /// The policy's check of the config (`validate`), on an instance of its own: the
    /// problems it finds. Blocking.
    pub fn validate(&self) -> Result<Vec<Problem>, PolicyError> {
        let Prepared::Automation(pre) = &self.policy.pre else {
            unreachable!("checked in PolicyHost::automaton")
        };
        let mut store = self.host.new_store(self.policy.memory_bytes);
        let found = pre
            .instantiate(&mut store)
            .and_then(|a| a.call_validate(&mut store, &self.config));
        log_output(&self.policy.label, &store);
        let found = found.map_err(|e| PolicyError::Trap {
            policy: self.policy.label.clone(),
            detail: describe_trap(&e),
        })?;
        Ok(match found {
            Ok(()) => Vec::new(),
            Err(problems) => problems
                .into_iter()
                .map(|p| Problem {
                    field: truncate(p.field),
                    message: truncate(p.message),
                })
                .collect(),
        })
    }

    /// `validate` on the blocking pool, within the process-wide evaluation limit.
    pub async fn validate_async(self: &Arc<Self>) -> Result<Vec<Problem>, PolicyError> {
        let _permit = self
            .host
            .evaluations
            .acquire()
            .await
            .map_err(|_| PolicyError::Engine("the policy engine is shut down".into()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.validate())
            .await
            .map_err(|e| PolicyError::Engine(format!("automation check panicked: {e}")))?
    }

    fn instantiate(&self) -> Result<Live, PolicyError> {
        let Prepared::Automation(pre) = &self.policy.pre else {
            unreachable!("checked in PolicyHost::automaton")
        };
        let trap = |e: wasmtime::Error| PolicyError::Trap {
            policy: self.policy.label.clone(),
            detail: describe_trap(&e),
        };
        let mut store = self.host.new_store(self.policy.memory_bytes);
        let bindings = pre.instantiate(&mut store).map_err(trap)?;
        let prepared = bindings.call_prepare(&mut store, &self.config);
        log_output(&self.policy.label, &store);
        Ok(Live {
            prepared: prepared.map_err(trap)?.map_err(truncate),
            store,
            bindings,
            calls: 0,
        })
    }

    fn give_back(&self, live: Live) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(live);
        }
    }
}

/// A `Trigger` that owns what it names, for the trip to the blocking pool.
#[derive(Debug, Clone)]
pub enum OwnedTrigger {
    Event(Event),
    Timer(DueTimer),
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::SubscriberStatus;
    use crate::policy::{PolicyLimits, builtin};

    const TEST_AUTOMATION: &[u8] =
        include_bytes!(concat!(env!("LETTERBOX_WASM_DIR"), "/test_automation.wasm"));

    fn automaton(config: Value) -> Automaton {
        let host = PolicyHost::new(PolicyLimits::default(), None).unwrap();
        let policy = host
            .prepare("a", "test-automation", PluginKind::Automation, TEST_AUTOMATION)
            .unwrap();
        assert_eq!(policy.wit_version(), "0.3");
        host.automaton(policy, config.as_object().unwrap()).unwrap()
    }

    fn event(id: u64, kind: &str, data: Value) -> Event {
        Event {
            id,
            at_ms: 1_700_000_000_000,
            kind: kind.into(),
            newsletter_id: Some(1),
            subscriber_id: Some(7),
            job_id: None,
            letter_id: None,
            data: data.as_object().unwrap().clone(),
        }
    }

    fn subscriber() -> Subscriber {
        Subscriber {
            id: 7,
            newsletter_id: 1,
            email: "a@example.org".into(),
            name: None,
            attributes: Default::default(),
            status: SubscriberStatus::Active,
            created_at: 0,
        }
    }

    #[test]
    fn every_action_crosses_and_the_state_comes_back() {
        let a = automaton(json!({}));
        let e = event(
            1,
            "custom.go",
            json!({"actions": [
                {"send_letter": 3},
                {"send_message": {"template": "default-template", "subject": "s", "text": "t", "params": {"k": 1}}},
                {"start_timer": {"name": "n", "after_seconds": 2, "data": {"step": 1}}},
                {"start_timer": {"name": "m", "at": 1_800_000_000u64}},
                {"cancel_timer": "n"},
                {"set_attribute": ["plan", {"tier": "pro"}]},
                {"remove_attribute": "old"},
                "unsubscribe",
                {"emit": ["custom.done", {"x": true}]}
            ]}),
        );
        let s = subscriber();
        let r = a.react(Trigger::Event(&e), Some(&s), None).unwrap();
        assert_eq!(r.state, Some(json!({"calls": 1})));
        assert_eq!(
            r.actions,
            vec![
                Action::SendLetter { letter: 3 },
                Action::SendMessage {
                    template: "default-template".into(),
                    subject: "s".into(),
                    text: "t".into(),
                    html: None,
                    params: json!({"k": 1}).as_object().unwrap().clone(),
                },
                Action::StartTimer {
                    name: "n".into(),
                    when: When::AfterSeconds(2),
                    data: json!({"step": 1}),
                },
                Action::StartTimer {
                    name: "m".into(),
                    when: When::At(1_800_000_000),
                    data: json!({}),
                },
                Action::CancelTimer { name: "n".into() },
                Action::SetAttribute {
                    name: "plan".into(),
                    value: json!({"tier": "pro"}),
                },
                Action::RemoveAttribute { name: "old".into() },
                Action::Unsubscribe,
                Action::Emit {
                    kind: "custom.done".into(),
                    data: json!({"x": true}).as_object().unwrap().clone(),
                },
            ]
        );
        // The state handed in is what the policy sees; a timer reaches on-timer.
        let timer = DueTimer {
            name: "n".into(),
            due_ms: 5,
            data: json!({"state": {"step": 2}}),
        };
        let r = a
            .react(Trigger::Timer(&timer), Some(&s), Some(&json!({"calls": 41})))
            .unwrap();
        assert_eq!(r.state, Some(json!({"step": 2})));
        let e = event(2, "custom.go", json!({}));
        let r = a
            .react(Trigger::Event(&e), None, Some(&json!({"calls": 41})))
            .unwrap();
        assert_eq!(r.state, Some(json!({"calls": 42})));
        assert_eq!(When::AfterSeconds(2).due_ms(1_000), 3_000);
    }

    /// A loop, a memory bomb, a trap and an `err` fail their own call; the next call
    /// on the same automaton works.
    #[test]
    fn a_hostile_call_fails_alone() {
        let a = automaton(json!({}));
        let s = subscriber();
        for (kind, expect) in [
            ("custom.loop", "timed out"),
            ("custom.bomb", ""),
            ("custom.trap", "trapped"),
            ("custom.fail", "fails event"),
        ] {
            let e = event(9, kind, json!({}));
            let err = a.react(Trigger::Event(&e), Some(&s), None).unwrap_err();
            match (&err, kind) {
                (PolicyError::Rejected { reason, .. }, "custom.fail") => {
                    assert!(reason.contains(expect), "{reason}")
                }
                (PolicyError::Trap { detail, .. }, _) if kind != "custom.fail" => {
                    assert!(detail.contains(expect), "{kind}: {detail}")
                }
                _ => panic!("{kind}: {err:?}"),
            }
            let ok = event(10, "custom.ok", json!({}));
            assert!(
                a.react(Trigger::Event(&ok), Some(&s), None).is_ok(),
                "after {kind}"
            );
        }
    }

    #[test]
    fn a_reaction_the_host_cannot_act_on_fails_with_the_reason() {
        let a = automaton(json!({}));
        let s = subscriber();
        let cases = [
            (json!({"raw_state": "{not json"}), "its state is not JSON"),
            (
                json!({"raw_state": "x".repeat(MAX_STATE_BYTES + 1)}),
                "more than the 16384",
            ),
            (
                json!({"actions": [{"emit": ["purchase", {}]}]}),
                "must be custom.<name>",
            ),
            (
                json!({"actions": [{"emit": ["custom.x", [1]]}]}),
                "must be a JSON object",
            ),
            (
                json!({"actions": [{"cancel_timer": ""}]}),
                "a timer's name must be",
            ),
            (
                json!({"actions": vec![json!("unsubscribe"); MAX_ACTIONS + 1]}),
                "33 actions",
            ),
        ];
        for (data, expect) in cases {
            let e = event(1, "custom.go", data.clone());
            match a.react(Trigger::Event(&e), Some(&s), None) {
                Err(PolicyError::BadReaction { reason, .. }) => {
                    assert!(reason.contains(expect), "{data}: {reason}")
                }
                other => panic!("{data}: {other:?}"),
            }
        }
    }

    #[test]
    fn validate_and_prepare_speak_for_the_config() {
        let a = automaton(json!({"validate": [["config.delay", "must be a number"]]}));
        assert_eq!(
            a.validate().unwrap(),
            [Problem {
                field: "config.delay".into(),
                message: "must be a number".into()
            }]
        );
        assert!(automaton(json!({})).validate().unwrap().is_empty());
        let a = automaton(json!({"prepare_error": "no steps"}));
        let e = event(1, "custom.go", json!({}));
        match a.react(Trigger::Event(&e), None, None) {
            Err(PolicyError::Rejected { reason, .. }) => assert_eq!(reason, "prepare failed: no steps"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kinds_are_not_mixed_up() {
        let host = PolicyHost::new(PolicyLimits::default(), None).unwrap();
        let e = host
            .prepare("a", "test-automation", PluginKind::Filter, TEST_AUTOMATION)
            .err()
            .unwrap();
        assert!(e.to_string().contains("upload it with kind=automation"), "{e}");
        let filter = host
            .prepare("f", "default-filter", PluginKind::Filter, builtin::DEFAULT_FILTER)
            .unwrap();
        let e = host.automaton(filter, &Map::new()).err().unwrap();
        assert!(e.to_string().contains("not an automation"), "{e}");
        let e = host
            .prepare(
                "t",
                "default-filter",
                PluginKind::Automation,
                builtin::DEFAULT_FILTER,
            )
            .err()
            .unwrap();
        assert!(e.to_string().contains("upload it with kind=filter"), "{e}");
    }
}
