"""The server's errors: one tree, one table to gRPC status codes, one wrapper.

    ServerError
     ├── InvalidArgument      bad input: definition, key, path, checksum   → INVALID_ARGUMENT (HTTP 400)
     ├── NotFound             unknown job, file, input or output           → NOT_FOUND (HTTP 404)
     ├── FailedPrecondition   the server's state forbids the action        → FAILED_PRECONDITION (HTTP 400)
     ├── Conflict             the job's or upload's state forbids it now   → ABORTED (HTTP 409)
     ├── AlreadyExists        a write-once file holding other bytes        → ALREADY_EXISTS (HTTP 409)
     ├── TooLarge             an upload or a queue past its limit          → RESOURCE_EXHAUSTED (HTTP 429)
     ├── Unauthenticated      a missing or wrong credential or secret      → UNAUTHENTICATED (HTTP 401)
     ├── PermissionDenied     the server lets nobody do it here            → PERMISSION_DENIED (HTTP 403)
     └── Unavailable          a backend (store, blobs) cannot be reached   → UNAVAILABLE (HTTP 503)

Envoy turns the status codes into HTTP codes with a JSON body
`{"code": …, "message": …}`. Messages are short, actionable and leak no internals.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeAlias

import grpc

# A gRPC handler's context, whatever its request and response types.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class ServerError(Exception):
    """Base of every error the server reports to clients."""


class InvalidArgument(ServerError):
    """The request is malformed; the message says what to fix."""


class NotFound(ServerError):
    """The job, file, input or output does not exist."""


class FailedPrecondition(ServerError):
    """The job's state forbids the action."""


class Conflict(ServerError):
    """The job's or upload's current state forbids the action; it may succeed later.

    ABORTED rather than FAILED_PRECONDITION because Envoy (like the gRPC-HTTP mapping in
    google/rpc/code.proto) turns ABORTED into HTTP 409 and FAILED_PRECONDITION into 400."""


class AlreadyExists(ServerError):
    """A file that is written once (its key is not a SHA-256) exists with other bytes."""


class TooLarge(ServerError):
    """An upload, or a queue, exceeds one of the server's limits."""


class Unauthenticated(ServerError):
    """A credential or secret the call needs is missing or wrong; the message says which, never why."""


class PermissionDenied(ServerError):
    """The server's configuration forbids the action to anyone presenting what the caller presents."""


class Unavailable(ServerError):
    """A backend cannot be reached; retrying later may work."""


STATUS_CODES: dict[type[ServerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Conflict: grpc.StatusCode.ABORTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: ServerError) -> grpc.StatusCode:
    """The gRPC status code of `error` (the nearest class in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


class grpc_errors:
    """Turn JobwireErrors raised in a handler body into gRPC status codes (never swallows)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if isinstance(error, ServerError):
            await self.context.abort(status_code(error), str(error))
