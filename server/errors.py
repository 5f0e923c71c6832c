"""The server's errors: one tree, one table to gRPC status codes, one wrapper.

    ServerError
     ├── InvalidArgument      bad input: definition, key, path, checksum   → INVALID_ARGUMENT (HTTP 400)
     ├── NotFound             unknown job, file, input or output           → NOT_FOUND (HTTP 404)
     ├── FailedPrecondition   the server's state forbids the action        → FAILED_PRECONDITION (HTTP 400)
     ├── Conflict             the job's or upload's state forbids it now   → ABORTED (HTTP 409)
     ├── AlreadyExists        a write-once file holding other bytes        → ALREADY_EXISTS (HTTP 409)
     ├── TooLarge             an upload or a queue past its limit          → RESOURCE_EXHAUSTED (HTTP 429)
     ├── DiskFull             the server's disk (or the database's) is full → RESOURCE_EXHAUSTED (HTTP 429)
     ├── Unauthenticated      a missing or wrong credential or secret      → UNAUTHENTICATED (HTTP 401)
     ├── PermissionDenied     the server lets nobody do it here            → PERMISSION_DENIED (HTTP 403)
     └── Unavailable          a backend (store, blobs) cannot be reached   → UNAVAILABLE (HTTP 503)

Envoy turns the status codes into HTTP codes with a JSON body
`{"code": …, "message": …}`. Messages are short, actionable and leak no internals.

A dependency that fails under a call (the database down or restarting, a full disk, a bucket that
times out) is not a bug of the call: `dependency_error` names it (`Unavailable` or `DiskFull`), and
`grpc_errors` reports it so, never as UNKNOWN. A call answers OK only once its commit returned, so a
client that sees one of these retries; nothing it was told was stored is lost.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from types import TracebackType
from typing import Any, TypeAlias

import asyncpg
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


class DiskFull(ServerError):
    """The server cannot store what the call brings: its disk (or the database's) is full."""


STATUS_CODES: dict[type[ServerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Conflict: grpc.StatusCode.ABORTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DiskFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
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


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_UNREACHABLE = (ConnectionError, TimeoutError)
_DISK_FULL = "the server's disk is full: nothing was stored; retry once space is freed"
_SQLITE_FULL = 13
_SQLITE_UNAVAILABLE = {5, 6, 8, 10, 14, 15}
"""SQLite's BUSY, LOCKED, READONLY, IOERR, CANTOPEN, PROTOCOL: the file, not the statement, failed."""


JOB_STORE = "the job store"


def dependency_error(error: BaseException, what: str = "") -> ServerError | None:
    """What `error` means to a client when it says a dependency failed: `DiskFull` for a full disk
    (ENOSPC, SQLite's "database or disk is full", PostgreSQL's disk full), `Unavailable` for the job
    store down or restarting (PostgreSQL connection errors, SQLite I/O errors), a bucket that fails or
    times out, or a connection refused or timed out (to `what`, when the caller knows which
    dependency it called); None for anything else (a bug: UNKNOWN). The message names the dependency
    and the kind of failure, never a path or a statement."""
    if isinstance(error, ServerError):
        return error
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return DiskFull(_DISK_FULL)
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF  # the primary result code
        if code == _SQLITE_FULL:
            return DiskFull(_DISK_FULL)
        if code in _SQLITE_UNAVAILABLE or (code == 0 and "disk I/O error" in str(error)):
            return Unavailable(f"the job store is unavailable ({error}); retry")
        return None  # a statement the store got wrong: a bug
    if isinstance(error, asyncpg.DiskFullError):
        return DiskFull("the database's disk is full: nothing was stored; retry once space is freed")
    if isinstance(
        error,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError  # a connection left broken by a restart of the database
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InsufficientResourcesError
        | asyncpg.exceptions.PostgresSystemError,
    ):
        return Unavailable(f"the job store is unavailable ({_summary(error)}); retry")
    if type(error).__module__.partition(".")[0] in ("botocore", "aiobotocore", "aiohttp"):
        return Unavailable(f"the file store is unavailable ({type(error).__name__}); retry")
    if isinstance(error, _UNREACHABLE):
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else type(error).__name__
        return Unavailable(f"{what or 'a service the server depends on'} is unavailable ({reason}); retry")
    return None


def raise_dependency_error(error: Exception, what: str) -> None:
    """Raise `dependency_error(error, what)` from `error` when it names one (call it in an `except`
    block of a call to `what`, then `raise` the original)."""
    failure = dependency_error(error, what)
    if failure is not None and failure is not error:
        raise failure from error


def _summary(error: BaseException) -> str:
    """The kind of a database error and its first line (no statement, no parameters)."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _first_failure(error: BaseException) -> ServerError | None:
    """`dependency_error` of `error`, or of the first exception of a group that has one."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _first_failure(inner)) is not None:
                return found
        return None
    return dependency_error(error)


def failure_status(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a call that raised `error` answers with (`abort_on_failure`), or None for a bug."""
    failure = _first_failure(error)
    return None if failure is None else (status_code(failure), str(failure))


async def abort_on_failure(context: Context, error: BaseException) -> None:
    """Abort the call with the status of the dependency failure (or ServerError) in `error` (an
    exception group too), if it holds one; return otherwise (the caller re-raises)."""
    if (status := failure_status(error)) is not None:
        await context.abort(*status)


class grpc_errors:
    """Turn ServerErrors raised in a handler body into gRPC status codes, and failures of the server's
    dependencies (`dependency_error`) into UNAVAILABLE or RESOURCE_EXHAUSTED (never swallows)."""

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
        if isinstance(error, Exception):
            await abort_on_failure(self.context, error)
