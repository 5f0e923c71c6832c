"""Talking to people and scripts from the CLI: one-line errors with distinct exit codes, JSON, the client.

Exit codes (one table, `EXIT_CODES`):

    0    success
    1    any other error
    2    usage: unknown command, bad or missing option (cyclopts)
    3    the server cannot be reached (or did not answer in time)
    4    not found: unknown job, file, input or output
    5    invalid: a definition that cannot run, or a request the server rejects
    6    the job did not run to its end (error, timed out, cancelled, worker lost, deleted)
    130  interrupted (Ctrl-C)

With `--exit-code`, a job that ran to its end makes the CLI exit with the container's
exit code instead of 0.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

from cyclopts import Parameter
from google.protobuf import json_format
from google.protobuf.message import Message

from jobwire import Client, Retry
from jobwire.errors import InvalidRequest, JobFailed, NotFound, ServerUnavailable

EXIT_CODES: dict[type[BaseException], int] = {
    ServerUnavailable: 3,
    NotFound: 4,
    InvalidRequest: 5,
    JobFailed: 6,
}


class CliError(Exception):
    """A failure to report in one line; `code` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def exit_code(error: BaseException) -> int:
    """The exit code of `error` (the nearest class in EXIT_CODES; 1 otherwise)."""
    if isinstance(error, CliError):
        return error.code
    return next((EXIT_CODES[cls] for cls in type(error).__mro__ if cls in EXIT_CODES), 1)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` (one line) to stderr and exit."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


@Parameter(name="*")
@dataclass(frozen=True)
class Connection:
    """How to reach the server; shared by every command that talks to one."""

    server: Annotated[str, Parameter(name=["--server", "-s"])] = "localhost:8080"
    """The server: `host:port` (Envoy's port or the server's gRPC port), `http://…` or `https://…`."""
    tls: Annotated[bool | None, Parameter(negative="--no-tls")] = None
    """Use TLS (default: only for https:// addresses)."""
    ca_file: Path | None = None
    """PEM root certificates to trust instead of the system's."""
    timeout: float = 30.0
    """Seconds each call may take."""
    retries: int = 3
    """Retries of a call when the server is unavailable (with backoff)."""

    def client(self) -> Client:
        """A Client with these settings; a malformed address is a one-line error."""
        try:
            roots = self.ca_file.read_bytes() if self.ca_file else None
        except OSError as error:
            raise CliError(f"cannot read --ca-file {self.ca_file}: {error.strerror}", 2) from None
        try:
            return Client(
                self.server, tls=self.tls, root_certificates=roots, timeout=self.timeout, retry=Retry(self.retries + 1)
            )
        except ValueError as error:
            raise CliError(str(error), 2) from None


@asynccontextmanager
async def connect(connection: Connection) -> AsyncIterator[Client]:
    """An open Client, closed afterwards."""
    async with connection.client() as client:
        yield client


Json = Annotated[bool, Parameter(negative="")]
"""`--json`: print the proto's JSON mapping, exactly as the REST route answers."""


def print_json(message: Message) -> None:
    """`message` as the REST routes print it (camelCase, enums by name, every field)."""
    print(json_format.MessageToJson(message, indent=2, always_print_fields_with_no_presence=True))


def human_size(size: int) -> str:
    """`52.4 MB` for 52428800 bytes (powers of 1000)."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"
