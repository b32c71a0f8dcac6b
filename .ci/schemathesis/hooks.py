"""Schemathesis hooks for letterbox's OpenAPI document.

`mailbox` (a newsletter's From) is an RFC 5322 mailbox, `Name <address>` or `address`:
a grammar no JSON Schema pattern states exactly, so this says how to make valid ones.
Loaded through SCHEMATHESIS_HOOKS by .ci/schemathesis/run.
"""

import schemathesis
from hypothesis import strategies as st

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 ]{0,30}", fullmatch=True)
_addresses = st.emails()

schemathesis.openapi.format(
    "mailbox",
    st.one_of(
        _addresses,
        st.builds(lambda name, address: f"{name.strip() or 'News'} <{address}>", _names, _addresses),
    ),
)


@schemathesis.serializer("application/wasm")
def wasm(ctx, value):
    """Upload bodies: whatever bytes were generated. They are rarely a component, so
    the server answers 422 with the reason (expected in schemathesis.toml)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()
