//! The templates, compiled once, and what they may call: `asset("console.css")` (an
//! asset's hashed URL) and the `time`/`time_ms` filters (a `<time>` in UTC, which the
//! script shows in the browser's own zone). Every value is HTML-escaped unless a filter
//! says it made safe markup itself.

use minijinja::{Environment, Value};
use serde::Serialize;

use super::RenderError;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("macros.html", include_str!("templates/macros.html")),
    ("sign_in.html", include_str!("templates/sign_in.html")),
    ("error.html", include_str!("templates/error.html")),
    ("newsletters.html", include_str!("templates/newsletters.html")),
    ("newsletter.html", include_str!("templates/newsletter.html")),
    ("subscribers.html", include_str!("templates/subscribers.html")),
    ("subscriber.html", include_str!("templates/subscriber.html")),
    ("letter.html", include_str!("templates/letter.html")),
    ("jobs.html", include_str!("templates/jobs.html")),
    ("job.html", include_str!("templates/job.html")),
    ("health.html", include_str!("templates/health.html")),
    ("policies.html", include_str!("templates/policies.html")),
    ("policy.html", include_str!("templates/policy.html")),
    ("bounces.html", include_str!("templates/bounces.html")),
    ("suppressions.html", include_str!("templates/suppressions.html")),
    ("events.html", include_str!("templates/events.html")),
];

/// The console's templates.
pub struct Views {
    env: Environment<'static>,
}

impl Views {
    pub fn new() -> Result<Views, RenderError> {
        let mut env = Environment::new();
        // `.html` names are escaped for HTML (minijinja's default for them), so a
        // subscriber named `<script>` is text. An undefined name is an error when printed, not a blank (an `if` may test one).
        env.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
        for (name, source) in TEMPLATES {
            env.add_template(name, source).map_err(|e| RenderError {
                template: name.to_string(),
                message: e.to_string(),
            })?;
        }
        env.add_function("asset", |file: &str| {
            Value::from_safe_string(super::assets::url(file).to_string())
        });
        env.add_filter("time", |seconds: u64| time(seconds.saturating_mul(1000)));
        env.add_filter("time_ms", time);
        env.add_filter("size", size);
        // Our own, not minijinja's `json`/`urlencode` features: those would also reach
        // the letter check (`policy::template_check`), which must know exactly the
        // filters the built-in template's guest has.
        env.add_filter("query", |text: &str| -> String {
            url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
        });
        env.add_filter("json", |value: Value| -> String {
            serde_json::to_string(&value).unwrap_or_default()
        });
        Ok(Views { env })
    }

    /// `template` rendered with `context`.
    pub fn render(&self, template: &str, context: impl Serialize) -> Result<String, RenderError> {
        let fail = |e: minijinja::Error| RenderError {
            template: template.to_string(),
            message: format!("{e:#}"),
        };
        self.env
            .get_template(template)
            .map_err(fail)?
            .render(minijinja::value::Serde(&context))
            .map_err(fail)
    }
}

/// A byte count as people read it: `812 B`, `1.4 KiB`, `38.2 MiB`.
fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// A `<time>` for unix milliseconds: UTC in the text, which the script replaces with the
/// browser's local time.
fn time(ms: u64) -> Value {
    let utc = crate::webhooks::rfc3339(ms);
    let shown = format!("{} UTC", utc.get(..16).unwrap_or(&utc).replace('T', " "));
    Value::from_safe_string(format!("<time datetime=\"{utc}\">{shown}</time>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_values_are_escaped() {
        let views = Views::new().unwrap();
        let html = views
            .render(
                "error.html",
                minijinja::context! {
                    status => 404, title => "Not Found", detail => "<script>alert(1)</script>",
                    signed_in => false, csrf => "", errors => Vec::<String>::new(),
                },
            )
            .unwrap();
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>alert"));
    }

    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(size(812), "812 B");
        assert_eq!(size(1434), "1.4 KiB");
        assert_eq!(size(40_055_193), "38.2 MiB");
    }

    #[test]
    fn times_are_utc_in_the_text_and_the_attribute() {
        assert_eq!(
            time(1_796_115_600_000).to_string(),
            "<time datetime=\"2026-12-01T09:00:00.000Z\">2026-12-01 09:00 UTC</time>"
        );
    }
}
