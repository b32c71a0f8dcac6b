"""A letterbox automation policy in Python (letterbox:policy@0.3.0, world `automation`):
a drip sequence. A welcome mail is the same with one step.

Its config (checked by `validate` when the automation is created):
  {"start_on": "subscriber.confirmed",
   "steps": [{"letter": 12, "after_days": 0}, {"letter": 13, "after_days": 3},
             {"letter": 14, "after_days": 7}],
   "goal": "custom.purchase"}
- `start_on` (default `subscriber.confirmed`) starts the sequence for its subscriber,
  once: a second start is ignored;
- each step sends a letter of the subscriber's newsletter, `after_days` after the
  start, through a timer;
- the `goal` event (optional, `custom.*`) ends the sequence for its subscriber;
  unsubscribing ends it too (letterbox cancels the subscriber's timers);
- `seconds_per_day` (default 86400) is there to try it out in seconds.
"""

import json

from componentize_py_types import Err
from wit_world import WitWorld as Policy
from wit_world.imports.automation_types import (
    Action_CancelTimer,
    Action_SendLetter,
    Action_StartTimer,
    Reaction,
    StartTimer,
    When_AfterSeconds,
)
from wit_world.imports.types import Problem

# The timer that fires the next step (a subscriber has at most one).
TIMER = "drip"

config = None


def is_whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


def parse(text):
    """The config, and the problems for its author."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        return [Problem("config", f"not JSON: {e}")], None
    problems = []
    start_on = raw.get("start_on", "subscriber.confirmed")
    if not isinstance(start_on, str):
        problems.append(Problem("config.start_on", "must be an event type"))
    per_day = raw.get("seconds_per_day", 86400)
    if not is_whole(per_day) or per_day <= 0:
        problems.append(Problem("config.seconds_per_day", "must be a whole number above 0"))
        per_day = 86400
    steps = []
    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append(Problem("config.steps", "must be a list of at least one step"))
    else:
        last = 0
        for i, step in enumerate(raw_steps):
            letter = step.get("letter") if isinstance(step, dict) else None
            days = step.get("after_days") if isinstance(step, dict) else None
            if not (is_whole(letter) and letter >= 0 and isinstance(days, (int, float)) and not isinstance(days, bool)):
                problems.append(Problem(f"config.steps.{i}", 'a step is {"letter": LETTER_ID, "after_days": N}'))
            elif days < last:
                problems.append(
                    Problem(f"config.steps.{i}.after_days", "steps must come in order: after_days may not go down")
                )
            else:
                last = days
                steps.append((letter, round(days * per_day)))
    goal = raw.get("goal")
    if goal is not None and not (isinstance(goal, str) and goal.startswith("custom.")):
        problems.append(Problem("config.goal", "must be a custom event type (custom.…)"))
    return problems, {"start_on": start_on, "steps": steps, "goal": goal}


def timer(wait, step):
    return Action_StartTimer(StartTimer(TIMER, When_AfterSeconds(wait), json.dumps({"step": step})))


def run_step(step):
    """Sends step `step` now and starts the timer of the next one, if any."""
    letter, at = config["steps"][step]
    actions = [Action_SendLetter(letter)]
    if step + 1 < len(config["steps"]):
        actions.append(timer(config["steps"][step + 1][1] - at, step + 1))
        return Reaction(actions, json.dumps({"step": step}))
    return Reaction(actions, json.dumps({"done": "finished"}))


def unchanged(state):
    return Reaction([], state)


class WitWorld(Policy):
    def validate(self, text):
        """Called when an automation naming this policy is created: problems refuse it (422)."""
        problems, _ = parse(text)
        if problems:
            raise Err(problems)

    def prepare(self, text):
        """Called once per instance, before any other call, with the automation's config."""
        global config
        problems, parsed = parse(text)
        if problems:
            raise Err("; ".join(f"{p.field}: {p.message}" for p in problems))
        config = parsed

    def on_event(self, event, subscriber, state):
        if subscriber is None:
            return unchanged(state)
        if config["goal"] is not None and event.kind == config["goal"]:
            # Reached the goal: no more steps, whatever was next.
            return Reaction([Action_CancelTimer(TIMER)], json.dumps({"done": "goal"}))
        if event.kind == config["start_on"] and state is None:
            wait = config["steps"][0][1]
            if wait == 0:
                return run_step(0)
            return Reaction([timer(wait, 0)], json.dumps({"step": None}))
        # Started already, or another event: nothing to do.
        return unchanged(state)

    def on_timer(self, t, subscriber, state):
        done = state is not None and "done" in json.loads(state)
        if done or t.name != TIMER:
            return unchanged(state)
        step = json.loads(t.data).get("step")
        if not is_whole(step):
            raise Err("the timer has no step")
        if step >= len(config["steps"]):
            # The config lost steps since the timer started.
            return unchanged(json.dumps({"done": "finished"}))
        return run_step(step)
