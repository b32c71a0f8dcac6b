//! A deliberately hostile template used by letterbox's tests. What it does depends on
//! the recipient's email prefix:
//! - `stack`: recurses until the stack overflows;
//! - `unreachable`: executes the `unreachable` instruction;
//! - `huge`: tries to return a 100 MB body;
//! - `big`: returns a 2 MiB body (under the memory limit, over the output cap);
//! - `flood`: writes 20 MB to stdout, then renders normally;
//! - anything else: renders normally.
//!
//! Not embedded in the binary.

use std::hint::black_box;
use std::io::Write;

wit_bindgen::generate!({
    path: "../../wit/0.1",
    world: "template",
});

struct HostileTemplate;

// Unbounded on purpose: this is the stack-overflow case.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 64]);
    recurse(depth + 1) + frame[0]
}

impl Guest for HostileTemplate {
    fn render(recipient: Recipient, letter: Letter) -> Result<Rendered, String> {
        let email = recipient.email.as_str();
        let text = if email.starts_with("stack") {
            recurse(0).to_string()
        } else if email.starts_with("unreachable") {
            core::arch::wasm32::unreachable()
        } else if email.starts_with("huge") {
            "x".repeat(100 << 20)
        } else if email.starts_with("big") {
            "x".repeat(2 << 20)
        } else {
            if email.starts_with("flood") {
                let chunk = vec![b'y'; 64 * 1024];
                let mut out = std::io::stdout();
                for _ in 0..320 {
                    let _ = out.write_all(&chunk);
                }
            }
            format!("hello {email}")
        };
        Ok(Rendered {
            subject: letter.subject,
            text,
            html: None,
            headers: Vec::new(),
        })
    }
}

export!(HostileTemplate);
