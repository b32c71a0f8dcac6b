//! A letterbox filter policy in Rust (letterbox:policy@0.3.0, world `filter`).
//!
//! Two rules, both read from the letter's params:
//!   `{"segment": {"attribute": "plan", "equals": "pro"}}`
//!       only subscribers whose attribute `plan` is "pro" get the letter;
//!   `{"frequency_cap": {"attribute": "letters_30d", "max": 4}}`
//!       subscribers whose attribute `letters_30d` (a count your own system keeps)
//!       is already 4 or more are skipped.
//! A letter without params goes to everyone.

// wit-bindgen's code for `validate(letter)` takes the letter flattened into its fields.
#![allow(clippy::too_many_arguments)]

use std::cell::RefCell;

use serde_json::Value;

wit_bindgen::generate!({ path: "wit", world: "filter" });

#[derive(Default)]
struct Rules {
    /// (attribute, value it must equal)
    segment: Option<(String, Value)>,
    /// (attribute, most letters)
    cap: Option<(String, u64)>,
}

thread_local! {
    /// The letter's rules, parsed once per instance by `prepare`.
    static RULES: RefCell<Rules> = RefCell::new(Rules::default());
}

fn problem(field: &str, message: impl Into<String>) -> Problem {
    Problem {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The rules in a letter's params, or the problems for its author.
fn rules_of(letter: &Letter) -> Result<Rules, Vec<Problem>> {
    let params: Value = serde_json::from_str(&letter.params)
        .map_err(|e| vec![problem("params", format!("not JSON: {e}"))])?;
    let mut problems = Vec::new();
    let mut rules = Rules::default();
    if let Some(segment) = params.get("segment").filter(|s| !s.is_null()) {
        match (segment["attribute"].as_str(), segment.get("equals")) {
            (Some(attribute), Some(equals)) => {
                rules.segment = Some((attribute.to_string(), equals.clone()))
            }
            _ => problems.push(problem(
                "params.segment",
                r#"expected {"attribute": NAME, "equals": VALUE}"#,
            )),
        }
    }
    if let Some(cap) = params.get("frequency_cap").filter(|c| !c.is_null()) {
        match (cap["attribute"].as_str(), cap["max"].as_u64()) {
            (Some(attribute), Some(max)) => rules.cap = Some((attribute.to_string(), max)),
            _ => problems.push(problem(
                "params.frequency_cap",
                r#"expected {"attribute": NAME, "max": a whole number >= 0}"#,
            )),
        }
    }
    if problems.is_empty() { Ok(rules) } else { Err(problems) }
}

fn decide(rules: &Rules, recipient: &Recipient) -> Result<Decision, String> {
    if rules.segment.is_none() && rules.cap.is_none() {
        return Ok(Decision::Send);
    }
    let attributes: Value = serde_json::from_str(&recipient.attributes)
        .map_err(|e| format!("attributes are not JSON: {e}"))?;
    if let Some((attribute, equals)) = &rules.segment
        && attributes.get(attribute) != Some(equals)
    {
        return Ok(Decision::Skip("not in segment".to_string()));
    }
    if let Some((attribute, max)) = &rules.cap {
        let received = match &attributes[attribute] {
            Value::Null => 0.0,
            value => value
                .as_f64()
                .ok_or_else(|| format!("attribute {attribute} is not a number: {value}"))?,
        };
        if received >= *max as f64 {
            return Ok(Decision::Skip(format!(
                "frequency cap: {received} of {max} letters"
            )));
        }
    }
    Ok(Decision::Send)
}

struct Policy;

impl Guest for Policy {
    /// Called when a letter naming this policy is written: problems refuse it (422).
    fn validate(letter: Letter) -> Result<(), Vec<Problem>> {
        rules_of(&letter).map(drop)
    }

    /// Called once per instance, before any `filter` call.
    fn prepare(letter: Letter) -> Result<(), String> {
        let rules = rules_of(&letter).map_err(|problems| problems[0].message.clone())?;
        RULES.with(|cell| *cell.borrow_mut() = rules);
        Ok(())
    }

    /// One answer per recipient, in order; an error fails only that recipient.
    fn filter(recipients: Vec<Recipient>) -> Vec<Result<Decision, String>> {
        RULES.with(|cell| {
            let rules = cell.borrow();
            recipients.iter().map(|r| decide(&rules, r)).collect()
        })
    }
}

export!(Policy);
