// A letterbox template policy in JavaScript (letterbox:policy@0.3.0, world `template`).
//
// The subject, text and HTML may use {{name}}, {{email}} and {{unsubscribe_url}}.
// A subscriber whose attributes hold a list of picks,
//   {"picks": [{"title": "Rust 2026", "url": "https://example.org/rust"}, ...]}
// gets them listed under the body, headed by the letter's params.picks_heading
// (default "Picked for you"). Values are HTML-escaped in the HTML body.
// An unknown placeholder (a typo such as {{nmae}}) refuses the letter when it is written.

// `console`, which QuickJS lacks: lines go to the server's log (console.js).
import "./console.js";

const PLACEHOLDERS = ["name", "email", "unsubscribe_url"];
const PLACEHOLDER = /\{\{\s*([a-z_]+)\s*\}\}/g;

let letter = null;
let heading = "Picked for you";

function problemsOf(letter) {
  const problems = [];
  for (const field of ["subject", "text", "html"]) {
    const source = letter[field];
    if (source === undefined || source === null) continue;
    for (const [, name] of source.matchAll(PLACEHOLDER)) {
      if (!PLACEHOLDERS.includes(name)) {
        problems.push({
          field,
          message: `unknown placeholder {{${name}}}; known: ${PLACEHOLDERS.join(", ")}`,
        });
      }
    }
  }
  let params;
  try {
    params = JSON.parse(letter.params);
  } catch (e) {
    problems.push({ field: "params", message: `not JSON: ${e.message}` });
    return problems;
  }
  if ("picks_heading" in params && typeof params.picks_heading !== "string") {
    problems.push({ field: "params.picks_heading", message: "expected a string" });
  }
  return problems;
}

export function validate(letter) {
  const problems = problemsOf(letter);
  if (problems.length > 0) throw problems;
}

export function prepare(l) {
  const problems = problemsOf(l);
  if (problems.length > 0) throw `${problems[0].field}: ${problems[0].message}`;
  letter = l;
  heading = JSON.parse(l.params).picks_heading ?? "Picked for you";
}

function escapeHtml(s) {
  return s
    .replaceAll("&", "&amp;")
    .replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;")
    .replaceAll("'", "&#39;");
}

function fill(source, values, escape) {
  return source.replace(PLACEHOLDER, (_, name) => escape(values[name]));
}

// A pick is {"title": ..., "url": ...} or a plain string.
function picksOf(attributes) {
  const picks = Array.isArray(attributes.picks) ? attributes.picks : [];
  return picks.map((p) =>
    typeof p === "object" && p !== null
      ? { title: String(p.title ?? p.url ?? ""), url: p.url ? String(p.url) : null }
      : { title: String(p), url: null },
  );
}

function render1(recipient) {
  const attributes = JSON.parse(recipient.attributes);
  const values = {
    name: recipient.name || recipient.email,
    email: recipient.email,
    unsubscribe_url: recipient.unsubscribeUrl,
  };
  const picks = picksOf(attributes);
  let text = fill(letter.text, values, (v) => v);
  if (picks.length > 0) {
    text += `\n\n${heading}:\n`;
    for (const p of picks) text += p.url ? `- ${p.title}: ${p.url}\n` : `- ${p.title}\n`;
  }
  let html;
  if (letter.html !== undefined && letter.html !== null) {
    html = fill(letter.html, values, escapeHtml);
    if (picks.length > 0) {
      let list = `<h2>${escapeHtml(heading)}</h2>\n<ul>\n`;
      for (const p of picks) {
        const title = escapeHtml(p.title);
        list += p.url ? `<li><a href="${escapeHtml(p.url)}">${title}</a></li>\n` : `<li>${title}</li>\n`;
      }
      list += "</ul>\n";
      const end = html.lastIndexOf("</body>");
      html = end >= 0 ? html.slice(0, end) + list + html.slice(end) : html + list;
    }
  }
  return {
    subject: fill(letter.subject, values, (v) => v),
    text,
    html,
    headers: [],
  };
}

// One message per recipient, in order. An error for one recipient fails only that one.
export function render(recipients) {
  return recipients.map((recipient) => {
    try {
      return { tag: "ok", val: render1(recipient) };
    } catch (e) {
      return { tag: "err", val: String(e) };
    }
  });
}
