//! The built-in template policy.
//!
//! Renders the letter's subject, text and HTML as minijinja templates with the variables
//! `name`, `email`, `attributes` (so `{{ attributes.plan }}`), `unsubscribe_url` and
//! `params` (the letter's params). HTML is auto-escaped; subject and text are not.
//!
//! `prepare` parses the templates once per instance; `render` then renders a batch of
//! recipients with them.

// The code wit-bindgen generates for `validate(letter)` takes the letter flattened into
// its fields.
#![allow(clippy::too_many_arguments)]

use std::cell::RefCell;

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value, context};

wit_bindgen::generate!({
    path: "../../wit",
    world: "template",
});

struct DefaultTemplate;

/// The parsed templates of the instance's letter.
struct Compiled {
    env: Environment<'static>,
    params: Value,
    html: bool,
}

thread_local! {
    static COMPILED: RefCell<Option<Compiled>> = const { RefCell::new(None) };
}

/// Parses the letter's templates; an error names the field (`subject`, `text`, `html`,
/// `params`) and what is wrong with it.
fn compile(letter: &Letter) -> Result<Compiled, Problem> {
    let params: serde_json::Value = serde_json::from_str(&letter.params).map_err(|e| Problem {
        field: "params".to_string(),
        message: format!("letter params are not JSON: {e}"),
    })?;
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
            .map_err(|e| Problem {
                field: name.to_string(),
                message: format!("{name} template: {e:#}"),
            })
    };
    add("subject", &letter.subject)?;
    add("text", &letter.text)?;
    if let Some(html) = &letter.html {
        add("html", html)?;
    }
    Ok(Compiled {
        env,
        params: Value::from(Serde(&params)),
        html: letter.html.is_some(),
    })
}

fn render_one(compiled: &Compiled, recipient: Recipient) -> Result<Rendered, String> {
    let attributes: serde_json::Value = serde_json::from_str(&recipient.attributes)
        .map_err(|e| format!("recipient attributes are not JSON: {e}"))?;
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
    let html = if compiled.html {
        Some(render("html")?)
    } else {
        None
    };
    Ok(Rendered {
        subject,
        text,
        html,
        headers: Vec::new(),
    })
}

impl Guest for DefaultTemplate {
    fn validate(letter: Letter) -> Result<(), Vec<Problem>> {
        compile(&letter).map(drop).map_err(|problem| vec![problem])
    }

    fn prepare(letter: Letter) -> Result<(), String> {
        let compiled = compile(&letter).map_err(|p| p.message)?;
        COMPILED.with(|cell| *cell.borrow_mut() = Some(compiled));
        Ok(())
    }

    fn render(recipients: Vec<Recipient>) -> Vec<Result<Rendered, String>> {
        COMPILED.with(|cell| {
            let cell = cell.borrow();
            let Some(compiled) = cell.as_ref() else {
                let missing = || Err("render was called before prepare".to_string());
                return recipients.iter().map(|_| missing()).collect();
            };
            recipients
                .into_iter()
                .map(|recipient| render_one(compiled, recipient))
                .collect()
        })
    }
}

export!(DefaultTemplate);
