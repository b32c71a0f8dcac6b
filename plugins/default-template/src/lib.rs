//! The built-in template policy.
//!
//! Renders the letter's subject, text and HTML as minijinja templates with the variables
//! `name`, `email`, `attributes` (so `{{ attributes.plan }}`), `unsubscribe_url` and
//! `params` (the letter's params). HTML is auto-escaped; subject and text are not.

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value, context};

wit_bindgen::generate!({
    path: "../../wit",
    world: "template",
});

struct DefaultTemplate;

impl Guest for DefaultTemplate {
    fn render(recipient: Recipient, letter: Letter) -> Result<Rendered, String> {
        let attributes: serde_json::Value = serde_json::from_str(&recipient.attributes)
            .map_err(|e| format!("recipient attributes are not JSON: {e}"))?;
        let params: serde_json::Value =
            serde_json::from_str(&letter.params).map_err(|e| format!("letter params are not JSON: {e}"))?;
        let ctx = context! {
            name => recipient.name,
            email => recipient.email,
            attributes => Value::from(Serde(&attributes)),
            unsubscribe_url => recipient.unsubscribe_url,
            params => Value::from(Serde(&params)),
        };

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
        let render = |name: &str, source: &str| -> Result<String, String> {
            env.render_named_str(name, source, &ctx)
                .map_err(|e| format!("{name} template: {e:#}"))
        };
        let subject = render("subject", &letter.subject)?;
        // A subject is one header line: fold any newline a template produced.
        let subject = subject.replace(['\r', '\n'], " ");
        let text = render("text", &letter.text)?;
        let html = match &letter.html {
            Some(html) => Some(render("html", html)?),
            None => None,
        };
        Ok(Rendered {
            subject,
            text,
            html,
            headers: Vec::new(),
        })
    }
}

export!(DefaultTemplate);
