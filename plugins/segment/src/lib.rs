//! The built-in filter's segments: which recipients a letter's `params.segment` names.
//!
//! ```json
//! {"segment": {"attribute": "plan", "equals": "pro"}}
//! {"segment": {"attribute": "plan", "in": ["pro", "team"]}}
//! {"segment": {"attribute": "beta", "exists": true}}
//! ```
//!
//! One copy for the guest (`default-filter`) and the host (which checks a letter with
//! it when the letter is written), so the two can never disagree.

use serde_json::Value;

/// The segment in a letter's params (JSON text), if any, checked for shape.
pub fn segment_of(params: &str) -> Result<Option<Value>, String> {
    let params: Value =
        serde_json::from_str(params).map_err(|e| format!("letter params are not JSON: {e}"))?;
    let Some(segment) = params.get("segment") else {
        return Ok(None);
    };
    // An empty object matches nothing and everything alike: check the shape now.
    matches(segment, &Value::Object(Default::default()))?;
    Ok(Some(segment.clone()))
}

/// Whether `attributes` fall inside `segment`. Errors name what is wrong with the segment,
/// so an author sees it in the recipient's failure reason (and in a preview).
pub fn matches(segment: &Value, attributes: &Value) -> Result<bool, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn segments_match_and_bad_shapes_are_named() {
        let pro = json!({"plan": "pro", "beta": null});
        assert_eq!(
            matches(&json!({"attribute": "plan", "equals": "pro"}), &pro),
            Ok(true)
        );
        assert_eq!(
            matches(&json!({"attribute": "plan", "in": ["team"]}), &pro),
            Ok(false)
        );
        assert_eq!(
            matches(&json!({"attribute": "beta", "exists": true}), &pro),
            Ok(false)
        );
        assert_eq!(segment_of("{}"), Ok(None));
        assert_eq!(
            segment_of(r#"{"segment": {"attribute": "plan"}}"#),
            Err("segment needs one of \"equals\", \"in\" or \"exists\"".to_string())
        );
        assert!(
            segment_of("nope")
                .unwrap_err()
                .starts_with("letter params are not JSON")
        );
    }
}
