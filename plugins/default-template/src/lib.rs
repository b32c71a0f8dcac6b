//! The built-in template policy.
//!
//! Renders the letter's subject, text and HTML as minijinja templates with the variables
//! `name`, `email`, `attributes` (so `{{ attributes.plan }}`), `unsubscribe_url` and
//! `params` (the letter's params). HTML is auto-escaped; subject and text are not.
//!
//! The host reuses an instance for many recipients of the same letter, so the parsed
//! templates are kept between calls and rebuilt only when the letter changes.

use std::cell::RefCell;

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value, context};

wit_bindgen::generate!({
    path: "../../wit",
    world: "template",
});

struct DefaultTemplate;

/// The parsed templates of one letter.
struct Compiled {
    /// The letter's id and sources these templates were parsed from.
    key: (u64, String, String, Option<String>, String),
    env: Environment<'static>,
    params: Value,
}

thread_local! {
    static COMPILED: RefCell<Option<Compiled>> = const { RefCell::new(None) };
}

fn compile(letter: &Letter) -> Result<Compiled, String> {
    let params: serde_json::Value =
        serde_json::from_str(&letter.params).map_err(|e| format!("letter params are not JSON: {e}"))?;
    let mut env = Environment::new();
    // Lenient undefined: a subscriber without some attribute gets an empty string
    // rather than failing, which is what authors of `{{ attributes.city }}` expect.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|name| {
        if name == "html" {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    let mut add = |name: &'static str, source: &str| {
        env.add_template_owned(name, source.to_string())
            .map_err(|e| format!("{name} template: {e:#}"))
    };
    add("subject", &letter.subject)?;
    add("text", &letter.text)?;
    if let Some(html) = &letter.html {
        add("html", html)?;
    }
    Ok(Compiled {
        key: key(letter),
        env,
        params: Value::from(Serde(&params)),
    })
}

fn key(letter: &Letter) -> (u64, String, String, Option<String>, String) {
    (
        letter.id,
        letter.subject.clone(),
        letter.text.clone(),
        letter.html.clone(),
        letter.params.clone(),
    )
}

impl Guest for DefaultTemplate {
    fn render(recipient: Recipient, letter: Letter) -> Result<Rendered, String> {
        let attributes: serde_json::Value = serde_json::from_str(&recipient.attributes)
            .map_err(|e| format!("recipient attributes are not JSON: {e}"))?;
        COMPILED.with(|cell| {
            let mut cell = cell.borrow_mut();
            let fresh = match cell.as_ref() {
                Some(compiled) => {
                    compiled.key.0 != letter.id
                        || compiled.key.1 != letter.subject
                        || compiled.key.2 != letter.text
                        || compiled.key.3 != letter.html
                        || compiled.key.4 != letter.params
                }
                None => true,
            };
            if fresh {
                *cell = Some(compile(&letter)?);
            }
            let compiled = cell.as_ref().expect("just compiled");
            let ctx = context! {
                name => recipient.name,
                email => recipient.email,
                attributes => Value::from(Serde(&attributes)),
                unsubscribe_url => recipient.unsubscribe_url,
                params => compiled.params.clone(),
            };
            let render = |name: &str| -> Result<String, String> {
                compiled
                    .env
                    .get_template(name)
                    .and_then(|t| t.render(&ctx))
                    .map_err(|e| format!("{name} template: {e:#}"))
            };
            // A subject is one header line: fold any newline a template produced.
            let subject = render("subject")?.replace(['\r', '\n'], " ");
            let text = render("text")?;
            let html = match letter.html {
                Some(_) => Some(render("html")?),
                None => None,
            };
            Ok(Rendered {
                subject,
                text,
                html,
                headers: Vec::new(),
            })
        })
    }
}

export!(DefaultTemplate);
