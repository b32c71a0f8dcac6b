//! Example template policy: A/B-test subject lines.
//!
//! The letter's params list the variants; each recipient gets one, chosen by a stable
//! hash of the letter and recipient ids, so the split is even and a message sent again
//! after a crash carries the same variant as the first copy:
//!
//! ```json
//! {"ab": {"subjects": ["Big news, {{ name }}", "{{ name }}, you'll want to see this"]}}
//! ```
//!
//! Subjects, text and HTML are minijinja templates with the same variables as the
//! default template (`name`, `email`, `attributes`, `unsubscribe_url`, `params`), plus
//! `variant` ("A", "B", ...). The message gets an `X-Letterbox-Variant` header so replies
//! and bounces can be attributed. Without `ab` in the params it uses the letter's subject.

// The code wit-bindgen generates for `validate(letter)` takes the letter flattened into
// its fields.
#![allow(clippy::too_many_arguments)]

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value, context};
use serde_json::Value as Json;

wit_bindgen::generate!({
    path: "../../wit",
    world: "template",
});

struct AbSubject;

/// FNV-1a: tiny, deterministic across runs and platforms (unlike std's hasher).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The instance's letter, kept by `prepare`.
struct Prepared {
    letter: Letter,
    params: Json,
    subjects: Vec<String>,
}

thread_local! {
    static PREPARED: std::cell::RefCell<Option<Prepared>> = const { std::cell::RefCell::new(None) };
}

fn prepared(letter: Letter) -> Result<Prepared, Problem> {
    let problem = |message: String| Problem {
        field: "params.ab.subjects".into(),
        message,
    };
    let params: Json = serde_json::from_str(&letter.params).map_err(|e| problem(format!("params: {e}")))?;
    let subjects: Vec<String> = match params.pointer("/ab/subjects") {
        None => vec![letter.subject.clone()],
        Some(Json::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| problem("ab.subjects must hold strings".into()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(problem("ab.subjects must be a non-empty array of strings".into())),
    };
    Ok(Prepared {
        letter,
        params,
        subjects,
    })
}

impl Guest for AbSubject {
    fn validate(letter: Letter) -> Result<(), Vec<Problem>> {
        prepared(letter).map(drop).map_err(|p| vec![p])
    }

    fn prepare(letter: Letter) -> Result<(), String> {
        let ready = prepared(letter).map_err(|p| p.message)?;
        PREPARED.with(|cell| *cell.borrow_mut() = Some(ready));
        Ok(())
    }

    fn render(recipients: Vec<Recipient>) -> Vec<Result<Rendered, String>> {
        PREPARED.with(|cell| {
            let cell = cell.borrow();
            recipients
                .into_iter()
                .map(|recipient| match cell.as_ref() {
                    Some(prepared) => render_one(prepared, recipient),
                    None => Err("render was called before prepare".into()),
                })
                .collect()
        })
    }
}

fn render_one(prepared: &Prepared, recipient: Recipient) -> Result<Rendered, String> {
    let Prepared {
        letter,
        params,
        subjects,
    } = prepared;
    let attributes: Json =
        serde_json::from_str(&recipient.attributes).map_err(|e| format!("attributes: {e}"))?;
    let seed = letter
        .id
        .to_le_bytes()
        .into_iter()
        .chain(recipient.id.to_le_bytes());
    let index = (fnv1a(seed) % subjects.len() as u64) as usize;
    let variant = char::from(b'A' + (index % 26) as u8).to_string();

    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|name| {
        if name == "html" {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    let ctx = context! {
        name => recipient.name,
        email => recipient.email,
        attributes => Value::from(Serde(&attributes)),
        unsubscribe_url => recipient.unsubscribe_url,
        params => Value::from(Serde(params)),
        variant => variant.clone(),
    };
    let render = |name: &str, source: &str| {
        env.render_named_str(name, source, &ctx)
            .map_err(|e| format!("{name} template: {e:#}"))
    };
    Ok(Rendered {
        subject: render("subject", &subjects[index])?.replace(['\r', '\n'], " "),
        text: render("text", &letter.text)?,
        html: letter
            .html
            .as_deref()
            .map(|html| render("html", html))
            .transpose()?,
        headers: vec![Header {
            name: "X-Letterbox-Variant".into(),
            value: variant,
        }],
    })
}

export!(AbSubject);
