"""A letterbox template policy in Python (letterbox:policy@0.3.0, world `template`).

The subject, text and HTML may use {{name}}, {{email}} and {{unsubscribe_url}}.
A subscriber whose attributes hold a list of picks,
  {"picks": [{"title": "Rust 2026", "url": "https://example.org/rust"}, ...]}
gets them listed under the body, headed by the letter's params.picks_heading
(default "Picked for you"). Values are HTML-escaped in the HTML body.
An unknown placeholder (a typo such as {{nmae}}) refuses the letter when it is written.
"""

import html as html_escape
import json
import re

from componentize_py_types import Err, Ok
from wit_world import WitWorld as Policy
from wit_world.imports.types import Problem, Rendered

PLACEHOLDERS = ("name", "email", "unsubscribe_url")
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")

state = {"letter": None, "heading": "Picked for you"}


def problems_of(letter):
    problems = []
    for field in ("subject", "text", "html"):
        source = getattr(letter, field)
        if source is None:
            continue
        for name in PLACEHOLDER.findall(source):
            if name not in PLACEHOLDERS:
                known = ", ".join(PLACEHOLDERS)
                problems.append(Problem(field, f"unknown placeholder {{{{{name}}}}}; known: {known}"))
    try:
        params = json.loads(letter.params)
    except ValueError as e:
        return problems + [Problem("params", f"not JSON: {e}")]
    if "picks_heading" in params and not isinstance(params["picks_heading"], str):
        problems.append(Problem("params.picks_heading", "expected a string"))
    return problems


def fill(source, values, escape):
    return PLACEHOLDER.sub(lambda m: escape(values[m.group(1)]), source)


def picks_of(attributes):
    """A pick is {"title": ..., "url": ...} or a plain string."""
    picks = attributes.get("picks")
    out = []
    for p in picks if isinstance(picks, list) else []:
        if isinstance(p, dict):
            url = p.get("url")
            out.append((str(p.get("title") or url or ""), str(url) if url else None))
        else:
            out.append((str(p), None))
    return out


def render1(recipient):
    letter, heading = state["letter"], state["heading"]
    attributes = json.loads(recipient.attributes)
    values = {
        "name": recipient.name or recipient.email,
        "email": recipient.email,
        "unsubscribe_url": recipient.unsubscribe_url,
    }
    picks = picks_of(attributes)
    text = fill(letter.text, values, str)
    if picks:
        text += f"\n\n{heading}:\n"
        for title, url in picks:
            text += f"- {title}: {url}\n" if url else f"- {title}\n"
    body = None
    if letter.html is not None:
        body = fill(letter.html, values, html_escape.escape)
        if picks:
            items = "".join(
                f'<li><a href="{html_escape.escape(url)}">{html_escape.escape(title)}</a></li>\n'
                if url
                else f"<li>{html_escape.escape(title)}</li>\n"
                for title, url in picks
            )
            block = f"<h2>{html_escape.escape(heading)}</h2>\n<ul>\n{items}</ul>\n"
            end = body.rfind("</body>")
            body = body[:end] + block + body[end:] if end >= 0 else body + block
    return Rendered(subject=fill(letter.subject, values, str), text=text, html=body, headers=[])


class WitWorld(Policy):
    def validate(self, letter):
        """Called when a letter naming this policy is written: problems refuse it (422)."""
        problems = problems_of(letter)
        if problems:
            raise Err(problems)

    def prepare(self, letter):
        """Called once per instance, before any `render` call."""
        problems = problems_of(letter)
        if problems:
            raise Err(f"{problems[0].field}: {problems[0].message}")
        state["letter"] = letter
        state["heading"] = json.loads(letter.params).get("picks_heading", "Picked for you")

    def render(self, recipients):
        """One message per recipient, in order; an error fails only that recipient."""
        out = []
        for recipient in recipients:
            try:
                out.append(Ok(render1(recipient)))
            except Exception as e:
                out.append(Err(f"{type(e).__name__}: {e}"))
        return out
