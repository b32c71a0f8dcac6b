//! The built-in filter policy.
//!
//! Sends to every recipient the host offers (the host only offers active subscribers),
//! unless the letter's params carry a segment, in which case only matching recipients
//! get the letter (the rules are `letterbox-segment`'s, which the host checks letters
//! with too):
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
    letterbox_segment::segment_of(&letter.params)
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
                    if letterbox_segment::matches(segment, &attributes)? {
                        Ok(Decision::Send)
                    } else {
                        Ok(Decision::Skip("not in segment".to_string()))
                    }
                })
                .collect()
        })
    }
}

export!(DefaultFilter);
