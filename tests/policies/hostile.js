// A hostile filter in JavaScript, for the tests: by the recipient's address it loops
// forever (loop@), allocates until memory runs out (bomb@), or tries the network
// (net@, at the letter's params.connect) and reports what happened as its skip reason.

// `console`, which QuickJS lacks: lines go to the server's log (console.js).
import "./console.js";

let connect = "127.0.0.1:9";

export function validate(letter) {}

export function prepare(letter) {
  connect = JSON.parse(letter.params).connect ?? connect;
  console.log("hostile prepared for", connect, "✓");
}

function attempt() {
  // QuickJS (what `plugin build` uses) has no fetch and no sockets; StarlingMonkey's
  // fetch needs wasi:http, which letterbox refuses at upload. Whatever is here must not
  // reach the network.
  try {
    if (typeof fetch !== "function") return `connect refused: fetch is ${typeof fetch}`;
    fetch(`http://${connect}/`);
    return "connect refused: fetch returned";
  } catch (e) {
    return `connect refused: ${e}`;
  }
}

export function filter(recipients) {
  return recipients.map((r) => {
    if (r.email.startsWith("loop@")) {
      for (;;) {}
    }
    if (r.email.startsWith("bomb@")) {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(8 << 20).fill(1));
    }
    if (r.email.startsWith("net@")) return { tag: "ok", val: { tag: "skip", val: attempt() } };
    return { tag: "ok", val: { tag: "send" } };
  });
}
