//! The host's check of a letter written for the built-in template: its subject, text
//! and HTML are minijinja templates, parsed here with the same minijinja version and
//! settings as `plugins/default-template`, so a letter that would fail for every
//! recipient is refused when it is written (422, with the field, line and column)
//! instead of failing at send time until restart intensity pauses the job.
//!
//! Parsing finds syntax errors. A trial render with an empty recipient then finds what
//! minijinja only notices when it runs (an unknown filter, test or function, an
//! included template that does not exist); errors that depend on a recipient's data
//! (arithmetic on a missing attribute, say) are not refused, since another recipient's
//! data may be fine. The trial render has a fuel limit so that a letter cannot make the
//! request spin.

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value, context};
use serde_json::Map;

/// Instructions the trial render may run: far more than a real letter needs, and
/// milliseconds of CPU at most.
const TRIAL_FUEL: u64 = 200_000;

/// One problem with one field of a letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateProblem {
    /// `subject`, `text` or `html`.
    pub field: &'static str,
    /// What is wrong and where: `line 1, column 4: syntax error: …`.
    pub message: String,
}

/// Every problem the built-in template would have with this letter; empty when none.
pub fn check_default_template(
    subject: &str,
    text: &str,
    html: Option<&str>,
    params: &Map<String, serde_json::Value>,
) -> Vec<TemplateProblem> {
    let mut env = Environment::new();
    // As in the guest: lenient undefined, HTML auto-escaped. Debug keeps the spans
    // that give a column.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|name| {
        if name == "html" {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env.set_debug(true);
    env.set_fuel(Some(TRIAL_FUEL));
    let mut problems = Vec::new();
    let sources = [("subject", Some(subject)), ("text", Some(text)), ("html", html)];
    let mut parsed = Vec::new();
    for (field, source) in sources {
        let Some(source) = source else { continue };
        match env.add_template_owned(field, source.to_string()) {
            Ok(()) => parsed.push((field, source)),
            Err(e) => problems.push(TemplateProblem {
                field,
                message: describe(&e, source),
            }),
        }
    }
    let ctx = context! {
        name => "",
        email => "preview@example.org",
        attributes => Value::from(Serde(serde_json::Value::Object(Map::new()))),
        unsubscribe_url => "https://example.org/u/preview",
        params => Value::from(Serde(serde_json::Value::Object(params.clone()))),
    };
    for (field, source) in parsed {
        let rendered = env.get_template(field).and_then(|t| t.render(&ctx));
        if let Err(e) = rendered
            && is_fault_of_the_template(e.kind())
        {
            // An error inside an included template is reported where it is.
            let (field, source) = match e.name() {
                Some(name) if name != field => match sources.iter().find(|(f, _)| *f == name) {
                    Some((f, Some(s))) => (*f, *s),
                    _ => (field, source),
                },
                _ => (field, source),
            };
            problems.push(TemplateProblem {
                field,
                message: describe(&e, source),
            });
        }
    }
    problems
}

/// Errors that every recipient would get, whatever their data.
fn is_fault_of_the_template(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::SyntaxError
            | ErrorKind::UnknownFilter
            | ErrorKind::UnknownTest
            | ErrorKind::UnknownFunction
            | ErrorKind::UnknownBlock
            | ErrorKind::TemplateNotFound
            | ErrorKind::BadInclude
            | ErrorKind::BadEscape
            | ErrorKind::InvalidDelimiter
    )
}

/// `line L, column C: kind: detail`, the column counted in characters from 1.
fn describe(e: &Error, source: &str) -> String {
    let what = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    let column = e.range().and_then(|range| {
        let start = range.start.min(source.len());
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        source.get(line_start..start).map(|s| s.chars().count() + 1)
    });
    match (e.line(), column) {
        (Some(line), Some(column)) => format!("line {line}, column {column}: {what}"),
        (Some(line), None) => format!("line {line}: {what}"),
        _ => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(subject: &str, text: &str, html: Option<&str>) -> Vec<TemplateProblem> {
        check_default_template(subject, text, html, &Map::new())
    }

    #[test]
    fn good_letters_pass() {
        assert!(
            check(
                "Hi {{ name }}",
                "{% for x in attributes.tags %}{{ x }}{% endfor %}",
                None
            )
            .is_empty()
        );
        assert!(
            check(
                "{{ params.title | upper }}",
                "{{ attributes.n + 1 }}",
                Some("<p>{{ name }}</p>")
            )
            .is_empty(),
            "data-dependent errors are not the letter's fault"
        );
    }

    #[test]
    fn syntax_errors_name_field_line_and_column() {
        let problems = check("Hi {{ name", "ok", None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "subject");
        assert!(problems[0].message.starts_with("line 1, column "), "{problems:?}");
        assert!(problems[0].message.contains("syntax error"), "{problems:?}");

        let problems = check("ok", "first line\nsecond {% for %}", Some("{% if %}"));
        let fields: Vec<_> = problems.iter().map(|p| p.field).collect();
        assert_eq!(fields, ["text", "html"], "{problems:?}");
        assert!(problems[0].message.starts_with("line 2, column "), "{problems:?}");
    }

    #[test]
    fn unknown_filters_are_found_by_the_trial_render() {
        let problems = check("ok", "{{ name | shout }}", None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "text");
        assert!(problems[0].message.contains("unknown filter"), "{problems:?}");
    }

    #[test]
    fn a_runaway_template_does_not_spin() {
        let problems = check(
            "ok",
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            None,
        );
        // Out of fuel: not refused (a template may be heavy for some data), but the
        // check returns instead of running 10^10 iterations.
        assert!(problems.is_empty(), "{problems:?}");
    }
}
