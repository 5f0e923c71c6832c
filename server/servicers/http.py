"""HTTP details that reach servicers as gRPC metadata (Envoy forwards request headers so)."""

from __future__ import annotations

from jobwire.server.errors import Context


def header(context: Context, name: str) -> str | None:
    """The first value of request metadata `name` (a lowercase HTTP header name)."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None
