//! A letterbox template policy in Rust (letterbox:policy@0.3.0, world `template`).
//!
//! The subject, text and HTML may use `{{name}}`, `{{email}}` and `{{unsubscribe_url}}`.
//! A subscriber whose attributes hold a list of picks,
//!   `{"picks": [{"title": "Rust 2026", "url": "https://example.org/rust"}, ...]}`
//! gets them listed under the body, headed by the letter's `params.picks_heading`
//! (default "Picked for you"). Values are HTML-escaped in the HTML body.
//! An unknown placeholder (a typo such as `{{nmae}}`) refuses the letter when it is
//! written.

// wit-bindgen's code for `validate(letter)` takes the letter flattened into its fields.
#![allow(clippy::too_many_arguments)]

use std::cell::RefCell;

use serde_json::Value;

wit_bindgen::generate!({ path: "wit", world: "template" });

const PLACEHOLDERS: [&str; 3] = ["name", "email", "unsubscribe_url"];

thread_local! {
    /// The letter and the picks' heading, kept once per instance by `prepare`.
    static LETTER: RefCell<Option<(Letter, String)>> = const { RefCell::new(None) };
}

/// The `{{placeholder}}` names in `source`, with the text between them:
/// `("Hi ", Some("name"))`, ..., `("!", None)`.
fn pieces(source: &str) -> Vec<(&str, Option<&str>)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else { break };
        let name = rest[start + 2..start + 2 + len].trim();
        out.push((&rest[..start], Some(name)));
        rest = &rest[start + 2 + len + 2..];
    }
    out.push((rest, None));
    out
}

fn fill(source: &str, values: &[(&str, &str)], escape: fn(&str) -> String) -> String {
    let mut out = String::with_capacity(source.len() + 64);
    for (text, name) in pieces(source) {
        out.push_str(text);
        if let Some(name) = name {
            let value = values.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| *v);
            out.push_str(&escape(value));
        }
    }
    out
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn problems_of(letter: &Letter) -> Vec<Problem> {
    let mut problems = Vec::new();
    let fields = [("subject", Some(&letter.subject)), ("text", Some(&letter.text)), ("html", letter.html.as_ref())];
    for (field, source) in fields {
        for (_, name) in pieces(source.map_or("", |s| s.as_str())) {
            if let Some(name) = name.filter(|n| !PLACEHOLDERS.contains(n)) {
                problems.push(Problem {
                    field: field.to_string(),
                    message: format!(
                        "unknown placeholder {{{{{name}}}}}; known: {}",
                        PLACEHOLDERS.join(", ")
                    ),
                });
            }
        }
    }
    match serde_json::from_str::<Value>(&letter.params) {
        Err(e) => problems.push(Problem {
            field: "params".to_string(),
            message: format!("not JSON: {e}"),
        }),
        Ok(params) => {
            if params.get("picks_heading").is_some_and(|h| !h.is_string()) {
                problems.push(Problem {
                    field: "params.picks_heading".to_string(),
                    message: "expected a string".to_string(),
                });
            }
        }
    }
    problems
}

/// A pick is `{"title": ..., "url": ...}` or a plain string.
fn picks_of(attributes: &Value) -> Vec<(String, Option<String>)> {
    let Some(picks) = attributes["picks"].as_array() else {
        return Vec::new();
    };
    picks
        .iter()
        .map(|p| match p {
            Value::Object(p) => {
                let url = p.get("url").and_then(Value::as_str).map(str::to_string);
                let title = match p.get("title") {
                    Some(Value::String(t)) => t.clone(),
                    Some(t) if !t.is_null() => t.to_string(),
                    _ => url.clone().unwrap_or_default(),
                };
                (title, url)
            }
            Value::String(s) => (s.clone(), None),
            other => (other.to_string(), None),
        })
        .collect()
}

fn render1(letter: &Letter, heading: &str, recipient: &Recipient) -> Result<Rendered, String> {
    let attributes: Value = serde_json::from_str(&recipient.attributes)
        .map_err(|e| format!("attributes are not JSON: {e}"))?;
    let name = if recipient.name.is_empty() { &recipient.email } else { &recipient.name };
    let values = [
        ("name", name.as_str()),
        ("email", recipient.email.as_str()),
        ("unsubscribe_url", recipient.unsubscribe_url.as_str()),
    ];
    let picks = picks_of(&attributes);
    let mut text = fill(&letter.text, &values, str::to_string);
    if !picks.is_empty() {
        text.push_str(&format!("\n\n{heading}:\n"));
        for (title, url) in &picks {
            match url {
                Some(url) => text.push_str(&format!("- {title}: {url}\n")),
                None => text.push_str(&format!("- {title}\n")),
            }
        }
    }
    let html = letter.html.as_ref().map(|source| {
        let mut html = fill(source, &values, escape_html);
        if !picks.is_empty() {
            let mut list = format!("<h2>{}</h2>\n<ul>\n", escape_html(heading));
            for (title, url) in &picks {
                match url {
                    Some(url) => list.push_str(&format!(
                        "<li><a href=\"{}\">{}</a></li>\n",
                        escape_html(url),
                        escape_html(title)
                    )),
                    None => list.push_str(&format!("<li>{}</li>\n", escape_html(title))),
                }
            }
            list.push_str("</ul>\n");
            match html.rfind("</body>") {
                Some(end) => html.insert_str(end, &list),
                None => html.push_str(&list),
            }
        }
        html
    });
    Ok(Rendered {
        subject: fill(&letter.subject, &values, str::to_string),
        text,
        html,
        headers: Vec::new(),
    })
}

struct Policy;

impl Guest for Policy {
    /// Called when a letter naming this policy is written: problems refuse it (422).
    fn validate(letter: Letter) -> Result<(), Vec<Problem>> {
        let problems = problems_of(&letter);
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Called once per instance, before any `render` call.
    fn prepare(letter: Letter) -> Result<(), String> {
        if let Some(p) = problems_of(&letter).first() {
            return Err(format!("{}: {}", p.field, p.message));
        }
        let params: Value = serde_json::from_str(&letter.params).map_err(|e| e.to_string())?;
        let heading = params["picks_heading"].as_str().unwrap_or("Picked for you").to_string();
        LETTER.with(|cell| *cell.borrow_mut() = Some((letter, heading)));
        Ok(())
    }

    /// One message per recipient, in order; an error fails only that recipient.
    fn render(recipients: Vec<Recipient>) -> Vec<Result<Rendered, String>> {
        LETTER.with(|cell| {
            let prepared = cell.borrow();
            let Some((letter, heading)) = prepared.as_ref() else {
                return recipients.iter().map(|_| Err("prepare was not called".to_string())).collect();
            };
            recipients.iter().map(|r| render1(letter, heading, r)).collect()
        })
    }
}

export!(Policy);
