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

// CSV import: the file is the request's body (streamed into the store as it arrives),
// so the upload's progress is the import's; the answer lists what was refused.
function imports(root) {
  for (const form of root.querySelectorAll("form[data-import]")) {
    const input = form.querySelector("input[type=file]");
    const bar = form.querySelector("progress");
    const button = form.querySelector("button[type=submit]");
    const error = form.querySelector("[data-error-for=file]");
    const out = document.getElementById(form.dataset.import);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const file = input.files[0];
      out.replaceChildren();
      if (!file) {
        error.textContent = "choose a CSV file first";
        error.hidden = false;
        input.setAttribute("aria-invalid", "true");
        input.focus();
        return;
      }
      error.hidden = true;
      input.removeAttribute("aria-invalid");
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("content-type", "text/csv");
      xhr.setRequestHeader("x-csrf-token", form.querySelector("input[name=_csrf]").value);
      bar.hidden = false;
      bar.max = file.size || 1;
      bar.value = 0;
      button.disabled = true;
      out.append(el("p", `Importing ${file.name}…`, { role: "status" }));
      xhr.upload.addEventListener("progress", (e) => {
        if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; }
      });
      xhr.addEventListener("loadend", () => {
        button.disabled = false;
        bar.value = bar.max;
        out.replaceChildren();
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
      xhr.send(file);
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  confirmations(document);
  imports(document);
});
