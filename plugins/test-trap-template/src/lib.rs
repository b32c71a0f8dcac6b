//! A deliberately broken template used by letterbox's tests: it traps (panics, which is
//! `unreachable` in Wasm) for any recipient whose email starts with `trap`, and renders a
//! fixed message for everyone else. Built against WIT 0.2 (so a 0.2 component stays
//! in the tests), where recipients come in batches: it shows that a trap fails only the recipient it trapped on, not the batch
//! it came in. Not embedded in the binary.

// The code wit-bindgen generates for `validate(letter)` takes the letter flattened into
// its fields.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "../../wit/0.2",
    world: "template",
});

struct TrapTemplate;

thread_local! {
    static SUBJECT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Guest for TrapTemplate {
    fn validate(_letter: Letter) -> Result<(), Vec<Problem>> {
        Ok(())
    }

    fn prepare(letter: Letter) -> Result<(), String> {
        SUBJECT.with(|s| *s.borrow_mut() = letter.subject);
        Ok(())
    }

    fn render(recipients: Vec<Recipient>) -> Vec<Result<Rendered, String>> {
        recipients
            .into_iter()
            .map(|recipient| {
                if recipient.email.starts_with("trap") {
                    panic!("test-trap-template traps for {}", recipient.email);
                }
                Ok(Rendered {
                    subject: SUBJECT.with(|s| s.borrow().clone()),
                    text: format!("hello {}", recipient.email),
                    html: None,
                    headers: Vec::new(),
                })
            })
            .collect()
    }
}

export!(TrapTemplate);
