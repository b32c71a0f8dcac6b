//! A deliberately broken template used by letterbox's tests: it traps (panics, which is
//! `unreachable` in Wasm) for any recipient whose email starts with `trap`, and renders a
//! fixed message for everyone else. It shows that one trapping call fails only its
//! recipient. Not embedded in the binary.

wit_bindgen::generate!({
    path: "../../wit",
    world: "template",
});

struct TrapTemplate;

impl Guest for TrapTemplate {
    fn render(recipient: Recipient, letter: Letter) -> Result<Rendered, String> {
        if recipient.email.starts_with("trap") {
            panic!("test-trap-template traps for {}", recipient.email);
        }
        Ok(Rendered {
            subject: letter.subject,
            text: format!("hello {}", recipient.email),
            html: None,
            headers: Vec::new(),
        })
    }
}

export!(TrapTemplate);
