//! A deliberately hostile filter used by letterbox's tests: it spins forever for
//! recipients whose email starts with `loop`, allocates without bound for `bomb`, tries
//! the network for `net` (a TCP connection to the letter's `connect` parameter, then a
//! name lookup) and sends to everyone else. It shows the host's time and memory limits
//! are enforced per call and that linking sockets grants no network. Not embedded in the
//! binary.

use std::hint::black_box;

wit_bindgen::generate!({
    path: "../../wit/0.1",
    world: "filter",
});

struct HostileFilter;

impl Guest for HostileFilter {
    fn filter(recipient: Recipient, letter: Letter) -> Result<Decision, String> {
        if recipient.email.starts_with("net") {
            return Ok(Decision::Skip(network(&letter.params)));
        }
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

/// What became of each attempt to reach the network, as one line.
fn network(params: &str) -> String {
    use std::net::{TcpStream, ToSocketAddrs};
    // `{"connect": "127.0.0.1:PORT"}`, read without a JSON parser.
    let address = params
        .split("\"connect\":")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .unwrap_or("127.0.0.1:9");
    let connect = match TcpStream::connect(address) {
        Ok(_) => "CONNECTED".to_string(),
        Err(e) => format!("connect refused: {e}"),
    };
    let lookup = match ("localhost", 80).to_socket_addrs() {
        Ok(found) => format!("RESOLVED {}", found.count()),
        Err(e) => format!("lookup refused: {e}"),
    };
    format!("{connect}; {lookup}")
}

export!(HostileFilter);
