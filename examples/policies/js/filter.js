// A letterbox filter policy in JavaScript (letterbox:policy@0.3.0, world `filter`).
//
// Two rules, both read from the letter's params:
//   {"segment": {"attribute": "plan", "equals": "pro"}}
//       only subscribers whose attribute `plan` is "pro" get the letter;
//   {"frequency_cap": {"attribute": "letters_30d", "max": 4}}
//       subscribers whose attribute `letters_30d` (a count your own system keeps)
//       is already 4 or more are skipped.
// A letter without params goes to everyone.
//
// WIT `u64` fields (`id`, `subscribedAt`) are numbers; field names are camelCase.

// `console`, which QuickJS lacks: lines go to the server's log (console.js).
import "./console.js";

let rules = { segment: null, cap: null };

// The rules in a letter's params, or a list of problems for its author.
function rulesOf(letter) {
  let params;
  try {
    params = JSON.parse(letter.params);
  } catch (e) {
    return { problems: [{ field: "params", message: `not JSON: ${e.message}` }] };
  }
  const problems = [];
  const segment = params.segment ?? null;
  if (segment !== null) {
    if (typeof segment !== "object" || typeof segment.attribute !== "string" || !("equals" in segment)) {
      problems.push({
        field: "params.segment",
        message: 'expected {"attribute": NAME, "equals": VALUE}',
      });
    }
  }
  const cap = params.frequency_cap ?? null;
  if (cap !== null) {
    if (typeof cap !== "object" || typeof cap.attribute !== "string" || !Number.isInteger(cap.max) || cap.max < 0) {
      problems.push({
        field: "params.frequency_cap",
        message: 'expected {"attribute": NAME, "max": a whole number >= 0}',
      });
    }
  }
  return { problems, segment, cap };
}

// Called when a letter naming this policy is written: problems refuse it (422).
export function validate(letter) {
  const { problems } = rulesOf(letter);
  // A thrown value becomes `err(value)`.
  if (problems.length > 0) throw problems;
}

// Called once per instance, before any `filter` call.
export function prepare(letter) {
  const parsed = rulesOf(letter);
  if (parsed.problems.length > 0) throw parsed.problems[0].message;
  rules = { segment: parsed.segment, cap: parsed.cap };
}

function decide(recipient) {
  if (rules.segment === null && rules.cap === null) return { tag: "send" };
  const attributes = JSON.parse(recipient.attributes);
  const { segment, cap } = rules;
  if (segment !== null && attributes[segment.attribute] !== segment.equals) {
    return { tag: "skip", val: "not in segment" };
  }
  if (cap !== null) {
    const received = attributes[cap.attribute] ?? 0;
    if (typeof received !== "number") {
      throw `attribute ${cap.attribute} is not a number: ${JSON.stringify(received)}`;
    }
    if (received >= cap.max) {
      return { tag: "skip", val: `frequency cap: ${received} of ${cap.max} letters` };
    }
  }
  return { tag: "send" };
}

// One answer per recipient, in order. An error for one recipient fails only that one.
export function filter(recipients) {
  return recipients.map((recipient) => {
    try {
      return { tag: "ok", val: decide(recipient) };
    } catch (e) {
      return { tag: "err", val: String(e) };
    }
  });
}
