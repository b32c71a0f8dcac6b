// letterbox console: what a page cannot do without script, added to pages that work
// without it. No inline script anywhere (the Content-Security-Policy forbids it): this
// file finds its work through data- attributes.
"use strict";

// Times: the server writes UTC; show them in the browser's own zone.
function localTimes(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (!isNaN(when)) {
      el.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
      el.title = el.getAttribute("datetime");
    }
  }
}

// Forms that destroy something ask first.
function confirmations(root) {
  for (const form of root.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

// An element with text, built without HTML parsing (no markup from data, ever).
function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

// A problem+json answer (or any failed answer) as a message.
function problemText(xhr) {
  try {
    const problem = JSON.parse(xhr.responseText);
    if (problem.detail) return problem.detail;
  } catch (_) { /* not JSON */ }
  return `the server answered ${xhr.status} ${xhr.statusText}`;
}

// A field's problem shown next to it (the form's `data-error-for` paragraph).
function fieldProblem(form, name, message) {
  const p = form.querySelector(`[data-error-for="${name}"]`);
  if (!p) return false;
  p.textContent = message;
  p.hidden = false;
  p.closest(".field")?.classList.add("has-error");
  form.querySelector(`[name="${name}"]`)?.setAttribute("aria-invalid", "true");
  return true;
}

function clearProblems(form) {
  for (const p of form.querySelectorAll("[data-error-for]")) {
    p.hidden = true;
    p.textContent = "";
    p.closest(".field")?.classList.remove("has-error");
    form.querySelector(`[name="${p.dataset.errorFor}"]`)?.removeAttribute("aria-invalid");
  }
}

// Sends `file` as the body of a POST to `url` for `form` (its CSRF token in a header),
// with the upload's progress in the form's bar and `label` in `out` meanwhile; then
// `done(xhr, bar)` with the answer.
function sendFile(form, url, contentType, file, out, label, done) {
  const bar = form.querySelector("progress");
  const button = form.querySelector("button[type=submit]");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", url);
  xhr.setRequestHeader("content-type", contentType);
  xhr.setRequestHeader("x-csrf-token", form.querySelector("input[name=_csrf]").value);
  bar.hidden = false;
  bar.max = file.size || 1;
  bar.value = 0;
  button.disabled = true;
  out.append(el("p", label, { role: "status" }));
  xhr.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; }
  });
  xhr.addEventListener("loadend", () => {
    button.disabled = false;
    out.replaceChildren();
    done(xhr, bar);
  });
  xhr.send(file);
}

// CSV import: the file is the request's body (streamed into the store as it arrives),
// so the upload's progress is the import's; the answer lists what was refused.
function imports(root) {
  for (const form of root.querySelectorAll("form[data-import]")) {
    const input = form.querySelector("input[type=file]");
    const out = document.getElementById(form.dataset.import);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const file = input.files[0];
      out.replaceChildren();
      clearProblems(form);
      if (!file) {
        fieldProblem(form, "file", "choose a CSV file first");
        input.focus();
        return;
      }
      sendFile(form, form.action, "text/csv", file, out, `Importing ${file.name}…`, (xhr, bar) => {
        bar.value = bar.max;
        if (xhr.status === 201) {
          const summary = JSON.parse(xhr.responseText);
          out.append(el("p", `Imported ${file.name}.`, { role: "status", class: "flash" }));
          const dl = el("dl", null, { class: "summary" });
          for (const [label, key] of [["New", "inserted"], ["Updated", "updated"], ["Refused", "rejected"]]) {
            dl.append(el("dt", label), el("dd", summary[key] ?? 0));
          }
          out.append(dl);
          const errors = summary.errors || [];
          if (errors.length) {
            const table = el("table", null, { class: "list", id: "import-refused" });
            table.append(el("caption", "Rows refused"));
            const head = el("tr");
            head.append(el("th", "Row", { scope: "col" }), el("th", "Why", { scope: "col" }));
            const thead = el("thead");
            thead.append(head);
            table.append(thead);
            const body = el("tbody");
            for (const e of errors) {
              const tr = el("tr");
              tr.append(el("td", e.row), el("td", e.reason));
              body.append(tr);
            }
            table.append(body);
            out.append(table);
          }
          const more = el("p");
          more.append(el("a", "Show the subscribers", { href: window.location.pathname }));
          out.append(more);
        } else {
          const box = el("div", null, { class: "problem", role: "alert" });
          box.append(el("p", `The import failed: ${problemText(xhr)}`));
          out.append(box);
        }
      });
    });
  }
}

// Policy upload: the component's bytes are the request's body; a stored upload opens
// the policy's page, which shows its compilation; a refused one shows why at its field.
function uploads(root) {
  for (const form of root.querySelectorAll("form[data-upload]")) {
    const input = form.querySelector("input[type=file]");
    const out = document.getElementById("upload-result");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearProblems(form);
      out.replaceChildren();
      const file = input.files[0];
      const name = form.querySelector("input[name=name]").value.trim();
      if (!file) {
        fieldProblem(form, "file", "choose a .wasm file first");
        input.focus();
        return;
      }
      const kind = form.querySelector("select[name=kind]").value;
      const url = `${form.action}?${new URLSearchParams({ kind, name })}`;
      sendFile(form, url, "application/wasm", file, out, `Uploading ${file.name}…`, (xhr, bar) => {
        if (xhr.status === 200 || xhr.status === 201) {
          const plugin = JSON.parse(xhr.responseText);
          window.location.assign(`/console/policies/${encodeURIComponent(plugin.name)}?ok=uploaded`);
          return;
        }
        bar.hidden = true;
        let placed = false;
        try {
          for (const e of JSON.parse(xhr.responseText).errors || []) {
            placed = fieldProblem(form, e.field, e.message) || placed;
          }
        } catch (_) { /* not JSON */ }
        if (!placed) {
          const box = el("div", null, { class: "problem", role: "alert" });
          box.append(el("p", `The upload was refused: ${problemText(xhr)}`));
          out.append(box);
        } else {
          out.append(el("p", "The upload was refused: see the field marked.", { role: "alert" }));
        }
      });
    });
  }
}

// A policy page while a version compiles: ask for its state each second until no
// version is compiling, and show each one's state (and why it failed).
function pollPolicy(root) {
  const section = root.querySelector("[data-poll]");
  if (!section) return;
  const note = section.querySelector('[data-field="poll-state"]');
  const tick = async () => {
    let history;
    try {
      const response = await fetch(section.dataset.poll, { credentials: "same-origin" });
      history = await response.json();
      if (!response.ok) throw new Error(history.detail || response.statusText);
    } catch (e) {
      note.textContent = `The compilation's state could not be read (${e.message}); trying again.`;
      setTimeout(tick, 3000);
      return;
    }
    let compiling = false;
    for (const v of history.versions) {
      const status = section.querySelector(`[data-status-for="${v.id}"]`);
      if (status) { status.textContent = v.status; status.className = `status status-${v.status}`; }
      const error = section.querySelector(`[data-compile-error-for="${v.id}"]`);
      if (error) { error.textContent = v.error || ""; error.hidden = !v.error; }
      compiling = compiling || v.status === "compiling";
    }
    if (compiling) {
      setTimeout(tick, 1000);
    } else {
      const latest = history.versions[history.versions.length - 1];
      note.textContent = latest && latest.status === "failed"
        ? "The compilation failed: the reason is next to the version."
        : "Compiled: ready for letters.";
    }
  };
  setTimeout(tick, 500);
}

// The letter editor: as the author types, the draft is checked by the server (the
// same checks as saving) and each problem shown at its field; a draft that checks out
// is previewed in the frame (the form's Preview button, sent to the frame).
function liveLetter(root) {
  const form = root.querySelector("form[data-live-check]");
  if (!form) return;
  const previewButton = document.getElementById("preview-button");
  const state = document.getElementById("preview-state");
  let timer = null;
  let latest = 0;
  const clear = () => clearProblems(form);
  const check = async () => {
    const mine = ++latest;
    let answer;
    try {
      const response = await fetch(form.dataset.liveCheck, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        credentials: "same-origin",
      });
      answer = await response.json();
      if (!response.ok) throw new Error(answer.detail || response.statusText);
    } catch (e) {
      if (mine === latest) state.textContent = `The check failed: ${e.message}`;
      return;
    }
    if (mine !== latest) return;
    clear();
    const errors = answer.errors || [];
    const general = [];
    for (const e of errors) {
      const name = e.field.split(/[.[]/)[0];
      const p = form.querySelector(`[data-error-for="${name}"]`);
      if (p) {
        p.textContent = p.textContent ? `${p.textContent}; ${e.message}` : e.message;
        p.hidden = false;
        p.closest(".field")?.classList.add("has-error");
        form.querySelector(`[name="${name}"]`)?.setAttribute("aria-invalid", "true");
      } else {
        general.push(`${e.field}: ${e.message}`);
      }
    }
    if (errors.length === 0) {
      state.textContent = "The preview is up to date.";
      form.requestSubmit(previewButton);
    } else {
      state.textContent = `${errors.length === 1 ? "One problem" : `${errors.length} problems`}: see the fields marked.${general.length ? " " + general.join(" ") : ""}`;
    }
  };
  const soon = () => { clearTimeout(timer); timer = setTimeout(check, 400); };
  form.addEventListener("input", soon);
  form.addEventListener("change", soon);
  check();
}

// "Send at": the browser's local date and time, with its offset from UTC at that date.
function localSendTimes(root) {
  for (const form of root.querySelectorAll("form[data-local-time]")) {
    form.addEventListener("submit", () => {
      const local = form.querySelector("input[name=send_at]").value;
      const offset = form.querySelector("input[name=tz_offset]");
      if (local && offset) offset.value = String(new Date(local).getTimezoneOffset());
    });
  }
}

// A job's live view: the server's progress events (the API's own stream) update the
// counts, rate, ETA and whether the job is stalled, until its `end` event.
function liveJob(root) {
  const section = root.querySelector("[data-live]");
  if (!section || !window.EventSource) return;
  const set = (name, text) => {
    const node = section.querySelector(`[data-field="${name}"]`);
    if (node) node.textContent = text;
    return node;
  };
  const source = new EventSource(section.dataset.live);
  const update = (event) => {
    const job = JSON.parse(event.data);
    const state = set("state", job.state);
    if (state) state.className = `status status-${job.state}`;
    set("pause_reason", job.pause_reason || "");
    for (const [key, value] of Object.entries(job.counts)) {
      const node = section.querySelector(`[data-count="${key}"]`);
      if (node) node.textContent = value;
    }
    set("rate", `${job.rate_per_second.toFixed(1)} / s`);
    set("eta", job.eta_seconds == null ? "–" : `${job.eta_seconds} s`);
    const stalled = set("stalled", job.stalled ? `Stalled since ${new Date(job.stalled.since * 1000).toLocaleString()}: ${job.stalled.reason}` : "");
    if (stalled) stalled.hidden = !job.stalled;
    const error = set("error", job.error || "");
    if (error) error.hidden = !job.error;
    const c = job.counts;
    const total = Object.values(c).reduce((a, b) => a + b, 0);
    const bar = section.querySelector('[data-field="done"]');
    if (bar) { bar.max = Math.max(total, 1); bar.value = total - c.pending - c.sending - c.retrying; }
  };
  source.addEventListener("progress", update);
  source.addEventListener("end", (event) => {
    update(event);
    source.close();
    const ended = section.querySelector('[data-field="ended"]');
    if (ended) ended.hidden = false;
  });
}

// The event log at its head: events recorded after the page was drawn are added at the
// top as the server's stream (the API's own follower) delivers them.
function liveEvents(root) {
  const section = root.querySelector("[data-events-live]");
  if (!section || !window.EventSource) return;
  const body = section.querySelector("[data-events]");
  const note = section.querySelector('[data-field="live-state"]');
  const source = new EventSource(section.dataset.eventsLive);
  source.addEventListener("open", () => { note.textContent = "New events appear here as they are recorded."; });
  source.addEventListener("error", () => { note.textContent = "The live log is reconnecting…"; });
  source.addEventListener("message", (message) => {
    const e = JSON.parse(message.data);
    section.querySelector("[data-events-empty]")?.remove();
    const tr = el("tr", null, { class: "new" });
    const kind = el("td", `${e.type} `);
    kind.append(el("span", `#${e.id}`, { class: "meta" }));
    const when = el("td");
    when.append(el("time", new Date(e.at_ms).toISOString(), { datetime: new Date(e.at_ms).toISOString() }));
    localTimes(when);
    const about = el("td");
    for (const [key, label, path] of [["subscriber_id", "subscriber", "subscribers"], ["newsletter_id", "newsletter", "newsletters"], ["job_id", "job", "jobs"]]) {
      if (e[key] != null) {
        about.append(el("a", `${label} ${e[key]}`, { href: `/console/${path}/${e[key]}` }), " ");
      }
    }
    const data = el("td");
    if (e.data && Object.keys(e.data).length) data.append(el("code", JSON.stringify(e.data), { class: "data" }));
    tr.append(kind, when, about, data);
    body.prepend(tr);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  liveEvents(document);
  liveJob(document);
  liveLetter(document);
  localSendTimes(document);
  localTimes(document);
  confirmations(document);
  imports(document);
  uploads(document);
  pollPolicy(document);
});
