"""HTTP details that reach servicers as gRPC metadata (Envoy forwards request headers so)."""

from __future__ import annotations

from jobwire.server.errors import Context

REST = "x-jobwire-rest"
"""Set to `1` by Envoy's Lua filter on requests from REST clients (and stripped from all others)."""


def is_rest(context: Context) -> bool:
    """True for a REST request transcoded by Envoy, which may be answered with an HTTP redirect."""
    return header(context, REST) == "1"


def header(context: Context, name: str) -> str | None:
    """The first value of request metadata `name` (a lowercase HTTP header name)."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None
