//! A deliberately hostile filter used by letterbox's tests: it spins forever for
//! recipients whose email starts with `loop`, allocates without bound for `bomb`, and
//! sends to everyone else. It shows the host's time and memory limits are enforced per
//! call. Not embedded in the binary.

use std::hint::black_box;

wit_bindgen::generate!({
    path: "../../wit",
    world: "filter",
});

struct HostileFilter;

impl Guest for HostileFilter {
    fn filter(recipient: Recipient, _letter: Letter) -> Result<Decision, String> {
        if recipient.email.starts_with("loop") {
            let mut n: u64 = 0;
            loop {
                n = black_box(n.wrapping_add(1));
            }
        }
        if recipient.email.starts_with("bomb") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(black_box(vec![1u8; 1 << 20]));
            }
        }
        Ok(Decision::Send)
    }
}

export!(HostileFilter);
