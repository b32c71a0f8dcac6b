//! An automation for letterbox's tests, scripted by what it is handed, and hostile on
//! request. Not embedded in the binary.
//!
//! - An event's or a timer's `data.actions` is a list of actions in JSON, answered as
//!   they are: `{"send_letter": 3}`, `{"start_timer": {"name": "n", "after_seconds": 2,
//!   "data": {...}}}`, `{"start_timer": {"name": "n", "at": SECS}}`, `{"cancel_timer": "n"}`,
//!   `{"set_attribute": ["plan", "pro"]}`, `{"remove_attribute": "plan"}`,
//!   `"unsubscribe"`, `{"emit": ["custom.x", {...}]}`, `{"send_message": {"template":
//!   "default-template", "subject": "s", "text": "t", "params": {}}}`.
//! - `data.state` (any JSON), when present, is the new state; otherwise the state
//!   becomes `{"calls": N}`, one more than the state it was handed.
//! - `data.raw_state` (a string) is handed back as the state's text unchecked, to try
//!   the host's checks.
//! - Event types `custom.loop`, `custom.bomb` and `custom.trap` loop for ever, allocate
//!   until memory runs out, and panic; `custom.fail` answers `err`.
//! - The config's `"validate"` (a list of `[field, message]`) is what `validate`
//!   answers; `"prepare_error"` makes `prepare` fail; `"script"` (an object like an
//!   event's data) is how it answers events whose data has no `actions`, such as
//!   `subscriber.created` (the timer bench arms its timers so).

use std::cell::RefCell;

use serde_json::{Value, json};

wit_bindgen::generate!({
    path: "../../wit",
    world: "automation",
});

use letterbox::policy::automation_types::{Action, Attribute, CustomEvent, Message, StartTimer, When};

struct TestAutomation;

thread_local! {
    /// The config's `"script"`, kept by `prepare` (an instance is single-threaded).
    static SCRIPT: RefCell<Option<Value>> = const { RefCell::new(None) };
}

fn action(v: &Value) -> Result<Action, String> {
    if v == "unsubscribe" {
        return Ok(Action::Unsubscribe);
    }
    let (key, arg) = v
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or(format!("not an action: {v}"))?;
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .ok_or(format!("{key}: expected a string"))
    };
    Ok(match key.as_str() {
        "send_letter" => Action::SendLetter(arg.as_u64().ok_or("send_letter: expected an id")?),
        "start_timer" => Action::StartTimer(StartTimer {
            name: text(&arg["name"])?,
            when: match (arg["after_seconds"].as_u64(), arg["at"].as_u64()) {
                (Some(s), _) => When::AfterSeconds(s),
                (None, Some(at)) => When::At(at),
                _ => return Err("start_timer: after_seconds or at".into()),
            },
            data: arg.get("data").cloned().unwrap_or(json!({})).to_string(),
        }),
        "cancel_timer" => Action::CancelTimer(text(arg)?),
        "set_attribute" => Action::SetAttribute(Attribute {
            name: text(&arg[0])?,
            value: arg[1].to_string(),
        }),
        "remove_attribute" => Action::RemoveAttribute(text(arg)?),
        "emit" => Action::Emit(CustomEvent {
            kind: text(&arg[0])?,
            data: arg[1].to_string(),
        }),
        "send_message" => Action::SendMessage(Message {
            template: text(&arg["template"])?,
            subject: text(&arg["subject"])?,
            text: text(&arg["text"])?,
            html: arg["html"].as_str().map(str::to_string),
            params: arg.get("params").cloned().unwrap_or(json!({})).to_string(),
        }),
        other => return Err(format!("unknown action {other}")),
    })
}

fn react(data: &Value, state: Option<String>) -> Result<Reaction, String> {
    let actions = match data.get("actions").and_then(Value::as_array) {
        Some(list) => list.iter().map(action).collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let state = if let Some(raw) = data.get("raw_state").and_then(Value::as_str) {
        Some(raw.to_string())
    } else if let Some(state) = data.get("state") {
        (!state.is_null()).then(|| state.to_string())
    } else {
        let calls = state
            .as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .and_then(|s| s["calls"].as_u64())
            .unwrap_or(0);
        Some(json!({ "calls": calls + 1 }).to_string())
    };
    Ok(Reaction { actions, state })
}

impl Guest for TestAutomation {
    fn validate(config: String) -> Result<(), Vec<Problem>> {
        let config: Value = serde_json::from_str(&config).map_err(|e| {
            vec![Problem {
                field: "config".into(),
                message: e.to_string(),
            }]
        })?;
        match config.get("validate").and_then(Value::as_array) {
            Some(problems) if !problems.is_empty() => Err(problems
                .iter()
                .map(|p| Problem {
                    field: p[0].as_str().unwrap_or("").into(),
                    message: p[1].as_str().unwrap_or("").into(),
                })
                .collect()),
            _ => Ok(()),
        }
    }

    fn prepare(config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        if let Some(reason) = config.get("prepare_error").and_then(Value::as_str) {
            return Err(reason.to_string());
        }
        SCRIPT.with(|s| *s.borrow_mut() = config.get("script").cloned());
        Ok(())
    }

    fn on_event(
        event: Event,
        _subscriber: Option<Subscriber>,
        state: Option<String>,
    ) -> Result<Reaction, String> {
        match event.kind.as_str() {
            "custom.loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "custom.bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "custom.trap" => panic!("test-automation traps on {}", event.id),
            "custom.fail" => Err(format!("test-automation fails event {}", event.id)),
            _ => {
                let data: Value = serde_json::from_str(&event.data).map_err(|e| e.to_string())?;
                match SCRIPT.with(|s| s.borrow().clone()) {
                    Some(script) if data.get("actions").is_none() => react(&script, state),
                    _ => react(&data, state),
                }
            }
        }
    }

    fn on_timer(
        timer: Timer,
        _subscriber: Option<Subscriber>,
        state: Option<String>,
    ) -> Result<Reaction, String> {
        let data: Value = serde_json::from_str(&timer.data).map_err(|e| e.to_string())?;
        react(&data, state)
    }
}

export!(TestAutomation);
