"""Random names and secrets people type or paste: queue names and worker credentials."""

from __future__ import annotations

import secrets


def token(nbytes: int) -> str:
    """`secrets.token_urlsafe(nbytes)` that never starts with `-`: a queue name or a credential must
    stand as a command-line argument and after an option (`--credential TOKEN`) without being read
    as an option itself (one in 64 did)."""
    while (value := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return value
