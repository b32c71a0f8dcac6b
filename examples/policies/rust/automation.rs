//! A letterbox automation policy in Rust (letterbox:policy@0.3.0, world `automation`):
//! a drip sequence. A welcome mail is the same with one step.
//!
//! Its config (checked by `validate` when the automation is created):
//!   `{"start_on": "subscriber.confirmed",
//!     "steps": [{"letter": 12, "after_days": 0}, {"letter": 13, "after_days": 3},
//!               {"letter": 14, "after_days": 7}],
//!     "goal": "custom.purchase"}`
//! - `start_on` (default `subscriber.confirmed`) starts the sequence for its subscriber,
//!   once: a second start is ignored.
//! - each step sends a letter of the subscriber's newsletter, `after_days` after the
//!   start, through a timer;
//! - the `goal` event (optional, `custom.*`) ends the sequence for its subscriber;
//!   unsubscribing ends it too (letterbox cancels the subscriber's timers).
//! - `seconds_per_day` (default 86400) is there to try it out in seconds.
//!
//! The automation must listen to `start_on` and `goal`:
//!   `letterbox automation create drip --policy drip --events subscriber.confirmed,custom.purchase --config @drip.json`

use serde_json::{Value, json};

wit_bindgen::generate!({ path: "wit", world: "automation" });

use letterbox::policy::automation_types::{Action, StartTimer, When};

/// The timer that fires the next step (a subscriber has at most one).
const TIMER: &str = "drip";

struct Config {
    start_on: String,
    /// (letter, seconds after the start), in order.
    steps: Vec<(u64, u64)>,
    goal: Option<String>,
}

thread_local! {
    /// The automation's config, parsed once per instance by `prepare`.
    static CONFIG: std::cell::RefCell<Option<Config>> = const { std::cell::RefCell::new(None) };
}

fn problem(field: &str, message: impl Into<String>) -> Problem {
    Problem {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The config, or the problems for its author.
fn parse(config: &str) -> Result<Config, Vec<Problem>> {
    let config: Value =
        serde_json::from_str(config).map_err(|e| vec![problem("config", format!("not JSON: {e}"))])?;
    let mut problems = Vec::new();
    let start_on = match config.get("start_on") {
        None => "subscriber.confirmed".to_string(),
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => {
            problems.push(problem("config.start_on", "must be an event type"));
            String::new()
        }
    };
    let per_day = match config.get("seconds_per_day") {
        None => 86_400,
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => n,
            _ => {
                problems.push(problem("config.seconds_per_day", "must be a whole number above 0"));
                86_400
            }
        },
    };
    let mut steps = Vec::new();
    match config.get("steps").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => {
            let mut last = 0.0;
            for (i, step) in list.iter().enumerate() {
                let letter = step.get("letter").and_then(Value::as_u64);
                let days = step.get("after_days").and_then(Value::as_f64);
                match (letter, days) {
                    (Some(letter), Some(days)) if days >= last => {
                        last = days;
                        steps.push((letter, (days * per_day as f64).round() as u64));
                    }
                    (Some(_), Some(_)) => problems.push(problem(
                        &format!("config.steps.{i}.after_days"),
                        "steps must come in order: after_days may not go down",
                    )),
                    _ => problems.push(problem(
                        &format!("config.steps.{i}"),
                        "a step is {\"letter\": LETTER_ID, \"after_days\": N}",
                    )),
                }
            }
        }
        _ => problems.push(problem("config.steps", "must be a list of at least one step")),
    }
    let goal = match config.get("goal") {
        None | Some(Value::Null) => None,
        Some(Value::String(kind)) if kind.starts_with("custom.") => Some(kind.clone()),
        Some(_) => {
            problems.push(problem("config.goal", "must be a custom event type (custom.…)"));
            None
        }
    };
    if problems.is_empty() {
        Ok(Config { start_on, steps, goal })
    } else {
        Err(problems)
    }
}

/// Sends step `step` now and starts the timer of the next one, if any.
fn run_step(config: &Config, step: usize) -> Reaction {
    let (letter, at) = config.steps[step];
    let mut actions = vec![Action::SendLetter(letter)];
    let state = match config.steps.get(step + 1) {
        Some(&(_, next_at)) => {
            actions.push(Action::StartTimer(StartTimer {
                name: TIMER.to_string(),
                when: When::AfterSeconds(next_at - at),
                data: json!({ "step": step + 1 }).to_string(),
            }));
            json!({ "step": step })
        }
        None => json!({ "done": "finished" }),
    };
    Reaction {
        actions,
        state: Some(state.to_string()),
    }
}

fn unchanged(state: Option<String>) -> Reaction {
    Reaction { actions: Vec::new(), state }
}

fn with_config<T>(f: impl FnOnce(&Config) -> Result<T, String>) -> Result<T, String> {
    CONFIG.with_borrow(|config| f(config.as_ref().ok_or("prepare was not called")?))
}

struct Drip;

impl Guest for Drip {
    fn validate(config: String) -> Result<(), Vec<Problem>> {
        parse(&config).map(|_| ())
    }

    fn prepare(config: String) -> Result<(), String> {
        let parsed = parse(&config).map_err(|problems| {
            problems
                .iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        CONFIG.set(Some(parsed));
        Ok(())
    }

    fn on_event(event: Event, subscriber: Option<Subscriber>, state: Option<String>) -> Result<Reaction, String> {
        with_config(|config| {
            if subscriber.is_none() {
                return Ok(unchanged(state));
            }
            if config.goal.as_deref() == Some(event.kind.as_str()) {
                // Reached the goal: no more steps, whatever was next.
                return Ok(Reaction {
                    actions: vec![Action::CancelTimer(TIMER.to_string())],
                    state: Some(json!({ "done": "goal" }).to_string()),
                });
            }
            if event.kind == config.start_on && state.is_none() {
                return Ok(match config.steps[0].1 {
                    0 => run_step(config, 0),
                    wait => Reaction {
                        actions: vec![Action::StartTimer(StartTimer {
                            name: TIMER.to_string(),
                            when: When::AfterSeconds(wait),
                            data: json!({ "step": 0 }).to_string(),
                        })],
                        state: Some(json!({ "step": null }).to_string()),
                    },
                });
            }
            // Started already, or another event: nothing to do.
            Ok(unchanged(state))
        })
    }

    fn on_timer(timer: Timer, _subscriber: Option<Subscriber>, state: Option<String>) -> Result<Reaction, String> {
        with_config(|config| {
            let done = state
                .as_deref()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                .is_some_and(|s| s.get("done").is_some());
            if done || timer.name != TIMER {
                return Ok(unchanged(state));
            }
            let data: Value = serde_json::from_str(&timer.data).map_err(|e| e.to_string())?;
            let step = data["step"].as_u64().ok_or("the timer has no step")? as usize;
            if step >= config.steps.len() {
                // The config lost steps since the timer started.
                return Ok(unchanged(Some(json!({ "done": "finished" }).to_string())));
            }
            Ok(run_step(config, step))
        })
    }
}

export!(Drip);
