"""A letterbox filter policy in Python (letterbox:policy@0.3.0, world `filter`).

Two rules, both read from the letter's params:
  {"segment": {"attribute": "plan", "equals": "pro"}}
      only subscribers whose attribute `plan` is "pro" get the letter;
  {"frequency_cap": {"attribute": "letters_30d", "max": 4}}
      subscribers whose attribute `letters_30d` (a count your own system keeps)
      is already 4 or more are skipped.
A letter without params goes to everyone.
"""

import json

from componentize_py_types import Err, Ok
from wit_world import WitWorld as Policy
from wit_world.imports.types import Decision_Send, Decision_Skip, Problem

SEND = Decision_Send()
rules = {"segment": None, "cap": None}


def rules_of(letter):
    """The rules in a letter's params, and the problems for its author."""
    try:
        params = json.loads(letter.params)
    except ValueError as e:
        return [Problem("params", f"not JSON: {e}")], None, None
    problems = []
    segment = params.get("segment")
    if segment is not None and not (
        isinstance(segment, dict) and isinstance(segment.get("attribute"), str) and "equals" in segment
    ):
        problems.append(Problem("params.segment", 'expected {"attribute": NAME, "equals": VALUE}'))
    cap = params.get("frequency_cap")
    if cap is not None and not (
        isinstance(cap, dict)
        and isinstance(cap.get("attribute"), str)
        and isinstance(cap.get("max"), int)
        and not isinstance(cap.get("max"), bool)
        and cap["max"] >= 0
    ):
        problems.append(
            Problem("params.frequency_cap", 'expected {"attribute": NAME, "max": a whole number >= 0}')
        )
    return problems, segment, cap


def decide(recipient):
    segment, cap = rules["segment"], rules["cap"]
    if segment is None and cap is None:
        return SEND
    attributes = json.loads(recipient.attributes)
    if segment is not None and attributes.get(segment["attribute"]) != segment["equals"]:
        return Decision_Skip("not in segment")
    if cap is not None:
        received = attributes.get(cap["attribute"])
        if received is None:
            received = 0
        if isinstance(received, bool) or not isinstance(received, (int, float)):
            raise ValueError(f"attribute {cap['attribute']} is not a number: {json.dumps(received)}")
        if received >= cap["max"]:
            return Decision_Skip(f"frequency cap: {received} of {cap['max']} letters")
    return SEND


class WitWorld(Policy):
    def validate(self, letter):
        """Called when a letter naming this policy is written: problems refuse it (422)."""
        problems, _, _ = rules_of(letter)
        if problems:
            raise Err(problems)

    def prepare(self, letter):
        """Called once per instance, before any `filter` call."""
        problems, segment, cap = rules_of(letter)
        if problems:
            raise Err(problems[0].message)
        rules["segment"], rules["cap"] = segment, cap

    def filter(self, recipients):
        """One answer per recipient, in order; an error fails only that recipient."""
        out = []
        for recipient in recipients:
            try:
                out.append(Ok(decide(recipient)))
            except ValueError as e:
                out.append(Err(str(e)))
            except Exception as e:
                out.append(Err(f"{type(e).__name__}: {e}"))
        return out
