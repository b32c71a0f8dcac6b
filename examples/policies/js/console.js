// `console` for letterbox policies built with QuickJS, which has none: log/info/debug
// write a line to stdout, warn/error to stderr, and the server puts the first 4 KiB
// of each call's output in its log with the policy's name. `letterbox plugin new`
// writes this file beside policy.js, which imports it first.
import stdout from "wasi:cli/stdout@0.2.12";
import stderr from "wasi:cli/stderr@0.2.12";

// QuickJS has no TextEncoder.
function utf8(text) {
  const out = [];
  for (const ch of text) {
    const c = ch.codePointAt(0);
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
  }
  return new Uint8Array(out);
}

function show(value) {
  if (typeof value === "string") return value;
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

// The stream is fetched per line, not at load: the module is loaded while the
// component is snapshotted at build time, where no stream exists.
function writer(open) {
  return (...values) => {
    const stream = open();
    try {
      stream.blockingWriteAndFlush(utf8(values.map(show).join(" ") + "\n"));
    } catch {
      // The host never refuses output; if it did, a log line is not worth a failure.
    } finally {
      stream[Symbol.dispose]?.();
    }
  };
}

const out = writer(() => stdout.getStdout());
const err = writer(() => stderr.getStderr());
globalThis.console = { log: out, info: out, debug: out, warn: err, error: err };
