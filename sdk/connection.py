"""Reaching a server: target addresses, channels (plain or TLS), deadlines, retries with backoff."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import grpc

from jobwire.errors import NotFound, translate

Request = TypeVar("Request")
Response = TypeVar("Response")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """Where the server is: `localhost:8080`, `http://host:8080` or `https://host` (TLS)."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, text: str, tls: bool | None = None) -> Target:
        """Read a target; a bare `host:port` is plain unless `tls` says otherwise. ValueError if malformed."""
        parts = urlsplit(text if "://" in text else f"//{text}")
        scheme = parts.scheme.lower()
        if scheme and scheme not in _DEFAULT_PORTS:
            raise ValueError(f"invalid server address {text!r}: use host:port, http://host:port or https://host")
        if parts.path.strip("/") or parts.query or parts.fragment or not parts.hostname:
            raise ValueError(f"invalid server address {text!r}: give a host and port, no path")
        if scheme and tls is not None and tls != (scheme == "https"):
            raise ValueError(f"server address {text!r} contradicts the TLS setting")
        secure = scheme == "https" if scheme else bool(tls)
        try:
            port = parts.port or _DEFAULT_PORTS.get(scheme, 443 if secure else 8080)
        except ValueError:
            raise ValueError(f"invalid port in server address {text!r}") from None
        return cls(parts.hostname, port, secure)

    @property
    def address(self) -> str:
        """`host:port`, as gRPC dials it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL of the REST routes when the target is Envoy (`http://host:port`)."""
        return f"{'https' if self.tls else 'http'}://{self.address}"


def open_channel(
    target: Target, root_certificates: bytes | None = None, options: Sequence[tuple[str, int]] = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target` (TLS with the system's or the given root certificates), with
    `options` besides the SDK's own."""
    every = [*CHANNEL_OPTIONS, *options]
    if target.tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.aio.secure_channel(target.address, credentials, options=every)
    return grpc.aio.insecure_channel(target.address, options=every)


RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,  # Envoy's answer when the replica behind a stream dies (RST_STREAM)
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,  # a proxy that gave up the stream; the SDK's own cancels never retry
        grpc.StatusCode.DEADLINE_EXCEEDED,  # of a proxy's stream timeout: followers set no deadline
    }
)
"""Statuses that end a follower's stream without answering its request: it resumes from its cursor."""


@dataclass(frozen=True)
class Retry:
    """Retries of idempotent calls that failed with UNAVAILABLE, and of followers' streams that broke
    (`RESUMABLE`): exponential backoff with jitter."""

    attempts: int = 4
    """Tries in all (1: no retry)."""
    initial_backoff: float = 0.25
    max_backoff: float = 5.0
    multiplier: float = 2.0
    stream_failures: int = 20
    """Consecutive failures after which a follower gives up (`attempts` if that is more): about
    50-95 s of backoff in all, longer than a replica's or a database's restart; any message received
    resets the count."""

    def delays(self) -> Iterator[float]:
        """The pauses before each retry."""
        return self._delays(self.attempts)

    def stream_delays(self) -> Iterator[float]:
        """The pauses before each time a follower resumes its stream, from its last message on."""
        return self._delays(max(self.attempts, self.stream_failures))

    def _delays(self, attempts: int) -> Iterator[float]:
        delay = self.initial_backoff
        for _ in range(attempts - 1):
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * self.multiplier, self.max_backoff)


@dataclass(frozen=True)
class Calls:
    """How calls are made: per-call deadline, retries, and the target named in error messages."""

    target: str = ""
    timeout: float | None = 30.0
    """Deadline of each unary call in seconds (streams have none)."""
    retry: Retry = field(default_factory=Retry)

    async def unary(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        idempotent: bool = True,
        not_found: type[NotFound] = NotFound,
    ) -> Response:
        """Call `rpc`, retrying UNAVAILABLE when `idempotent`; failures become SDK errors."""
        delays = self.retry.delays() if idempotent else iter(())
        while True:
            try:
                return await rpc(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as error:
                delay = next(delays, None) if error.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise translate(error, target=self.target, not_found=not_found) from None
            await asyncio.sleep(delay)
