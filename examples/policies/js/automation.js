// A letterbox automation policy in JavaScript (letterbox:policy@0.3.0, world
// `automation`): a drip sequence. A welcome mail is the same with one step.
//
// Its config (checked by `validate` when the automation is created):
//   {"start_on": "subscriber.confirmed",
//    "steps": [{"letter": 12, "after_days": 0}, {"letter": 13, "after_days": 3},
//              {"letter": 14, "after_days": 7}],
//    "goal": "custom.purchase"}
// - `start_on` (default `subscriber.confirmed`) starts the sequence for its subscriber,
//   once: a second start is ignored;
// - each step sends a letter of the subscriber's newsletter, `after_days` after the
//   start, through a timer;
// - the `goal` event (optional, `custom.*`) ends the sequence for its subscriber;
//   unsubscribing ends it too (letterbox cancels the subscriber's timers);
// - `seconds_per_day` (default 86400) is there to try it out in seconds.
//
// WIT `u64` values are numbers; field names are camelCase; an `option` that is `none`
// arrives as `null` (test with `== null`).

// `console`, which QuickJS lacks: lines go to the server's log (console.js).
import "./console.js";

// The timer that fires the next step (a subscriber has at most one).
const TIMER = "drip";

let config = null;

// The config, or a list of problems for its author.
function parse(text) {
  let raw;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    return { problems: [{ field: "config", message: `not JSON: ${e.message}` }] };
  }
  const problems = [];
  const startOn = raw.start_on ?? "subscriber.confirmed";
  if (typeof startOn !== "string") problems.push({ field: "config.start_on", message: "must be an event type" });
  const perDay = raw.seconds_per_day ?? 86400;
  if (!Number.isInteger(perDay) || perDay <= 0) {
    problems.push({ field: "config.seconds_per_day", message: "must be a whole number above 0" });
  }
  const steps = [];
  if (!Array.isArray(raw.steps) || raw.steps.length === 0) {
    problems.push({ field: "config.steps", message: "must be a list of at least one step" });
  } else {
    let last = 0;
    raw.steps.forEach((step, i) => {
      const ok = step && Number.isInteger(step.letter) && step.letter >= 0 && typeof step.after_days === "number";
      if (!ok) {
        problems.push({ field: `config.steps.${i}`, message: 'a step is {"letter": LETTER_ID, "after_days": N}' });
      } else if (step.after_days < last) {
        problems.push({
          field: `config.steps.${i}.after_days`,
          message: "steps must come in order: after_days may not go down",
        });
      } else {
        last = step.after_days;
        steps.push({ letter: step.letter, at: Math.round(step.after_days * perDay) });
      }
    });
  }
  const goal = raw.goal ?? null;
  if (goal !== null && !(typeof goal === "string" && goal.startsWith("custom."))) {
    problems.push({ field: "config.goal", message: "must be a custom event type (custom.…)" });
  }
  return { problems, config: { startOn, steps, goal } };
}

// Sends step `step` now and starts the timer of the next one, if any.
function runStep(step) {
  const { letter, at } = config.steps[step];
  const actions = [{ tag: "send-letter", val: letter }];
  const next = config.steps[step + 1];
  if (next === undefined) {
    return { actions, state: JSON.stringify({ done: "finished" }) };
  }
  actions.push({
    tag: "start-timer",
    val: {
      name: TIMER,
      when: { tag: "after-seconds", val: next.at - at },
      data: JSON.stringify({ step: step + 1 }),
    },
  });
  return { actions, state: JSON.stringify({ step }) };
}

const unchanged = (state) => ({ actions: [], state });

// Called when an automation naming this policy is created: problems refuse it (422).
export function validate(text) {
  const { problems } = parse(text);
  // A thrown value becomes `err(value)`.
  if (problems.length > 0) throw problems;
}

// Called once per instance, before any other call, with the automation's config.
export function prepare(text) {
  const parsed = parse(text);
  if (parsed.problems.length > 0) throw parsed.problems.map((p) => `${p.field}: ${p.message}`).join("; ");
  config = parsed.config;
}

export function onEvent(event, subscriber, state) {
  if (subscriber == null) return unchanged(state);
  if (config.goal !== null && event.kind === config.goal) {
    // Reached the goal: no more steps, whatever was next.
    return { actions: [{ tag: "cancel-timer", val: TIMER }], state: JSON.stringify({ done: "goal" }) };
  }
  if (event.kind === config.startOn && state == null) {
    const wait = config.steps[0].at;
    if (wait === 0) return runStep(0);
    return {
      actions: [
        {
          tag: "start-timer",
          val: { name: TIMER, when: { tag: "after-seconds", val: wait }, data: JSON.stringify({ step: 0 }) },
        },
      ],
      state: JSON.stringify({ step: null }),
    };
  }
  // Started already, or another event: nothing to do.
  return unchanged(state);
}

export function onTimer(timer, subscriber, state) {
  const done = state != null && JSON.parse(state).done !== undefined;
  if (done || timer.name !== TIMER) return unchanged(state);
  const step = JSON.parse(timer.data).step;
  if (!Number.isInteger(step)) throw "the timer has no step";
  // The config lost steps since the timer started.
  if (step >= config.steps.length) return unchanged(JSON.stringify({ done: "finished" }));
  return runStep(step);
}
