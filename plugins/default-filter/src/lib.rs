//! The built-in filter policy.
//!
//! Sends to every recipient the host offers (the host only offers active subscribers),
//! unless the letter's params carry a segment, in which case only matching recipients
//! get the letter:
//!
//! ```json
//! {"segment": {"attribute": "plan", "equals": "pro"}}
//! {"segment": {"attribute": "plan", "in": ["pro", "team"]}}
//! {"segment": {"attribute": "beta", "exists": true}}
//! ```

// The code wit-bindgen generates for `validate(letter)` takes the letter flattened into
// its fields.
#![allow(clippy::too_many_arguments)]

use serde_json::Value;

wit_bindgen::generate!({
    path: "../../wit",
    world: "filter",
});

struct DefaultFilter;

thread_local! {
    /// The letter's segment, parsed once per instance by `prepare`.
    static SEGMENT: std::cell::RefCell<Option<Value>> = const { std::cell::RefCell::new(None) };
}

/// The segment of a letter's params, if any, checked for shape.
fn segment_of(letter: &Letter) -> Result<Option<Value>, String> {
    let params: Value =
        serde_json::from_str(&letter.params).map_err(|e| format!("letter params are not JSON: {e}"))?;
    let Some(segment) = params.get("segment") else {
        return Ok(None);
    };
    // An empty object matches nothing and everything alike: check the shape now.
    matches(segment, &Value::Object(Default::default()))?;
    Ok(Some(segment.clone()))
}

impl Guest for DefaultFilter {
    fn validate(letter: Letter) -> Result<(), Vec<Problem>> {
        segment_of(&letter).map(drop).map_err(|message| {
            vec![Problem {
                field: "params.segment".to_string(),
                message,
            }]
        })
    }

    fn prepare(letter: Letter) -> Result<(), String> {
        let segment = segment_of(&letter)?;
        SEGMENT.with(|cell| *cell.borrow_mut() = segment);
        Ok(())
    }

    fn filter(recipients: Vec<Recipient>) -> Vec<Result<Decision, String>> {
        SEGMENT.with(|cell| {
            let segment = cell.borrow();
            recipients
                .iter()
                .map(|recipient| {
                    let Some(segment) = segment.as_ref() else {
                        return Ok(Decision::Send);
                    };
                    let attributes: Value = serde_json::from_str(&recipient.attributes)
                        .map_err(|e| format!("recipient attributes are not JSON: {e}"))?;
                    if matches(segment, &attributes)? {
                        Ok(Decision::Send)
                    } else {
                        Ok(Decision::Skip("not in segment".to_string()))
                    }
                })
                .collect()
        })
    }
}

/// Whether `attributes` fall inside `segment`. Errors name what is wrong with the segment,
/// so an author sees it in the recipient's failure reason (and in a preview).
fn matches(segment: &Value, attributes: &Value) -> Result<bool, String> {
    let name = segment
        .get("attribute")
        .and_then(Value::as_str)
        .ok_or("segment needs an \"attribute\" string")?;
    let value = attributes.get(name);
    if let Some(expected) = segment.get("equals") {
        return Ok(value == Some(expected));
    }
    if let Some(options) = segment.get("in") {
        let options = options.as_array().ok_or("segment \"in\" must be an array")?;
        return Ok(value.is_some_and(|v| options.contains(v)));
    }
    if let Some(exists) = segment.get("exists") {
        let exists = exists.as_bool().ok_or("segment \"exists\" must be a boolean")?;
        return Ok(value.is_some_and(|v| !v.is_null()) == exists);
    }
    Err("segment needs one of \"equals\", \"in\" or \"exists\"".to_string())
}

export!(DefaultFilter);
