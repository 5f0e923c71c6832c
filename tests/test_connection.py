"""Targets, retries and error translation of the SDK, without a server."""

from __future__ import annotations

import grpc
import pytest

import jobwire
from jobwire import Client, ServerUnavailable
from jobwire.connection import Retry, Target
from jobwire.server.servicers.server import ServerServicer
from jobwire.server.settings import ServerSettings
from jobwire.v1 import server_pb2_grpc


@pytest.mark.parametrize(
    ("text", "tls", "expected"),
    [
        ("localhost:8080", None, Target("localhost", 8080, False)),
        ("localhost", None, Target("localhost", 8080, False)),
        ("example.org:443", True, Target("example.org", 443, True)),
        ("example.org", True, Target("example.org", 443, True)),
        ("http://example.org", None, Target("example.org", 80, False)),
        ("http://example.org:8080/", None, Target("example.org", 8080, False)),
        ("https://example.org", None, Target("example.org", 443, True)),
        ("https://example.org:8443", True, Target("example.org", 8443, True)),
        ("[::1]:50051", None, Target("::1", 50051, False)),
    ],
)
def test_targets(text: str, tls: bool | None, expected: Target) -> None:
    assert Target.parse(text, tls) == expected


def test_target_addresses_and_urls() -> None:
    assert Target.parse("[::1]:50051").address == "[::1]:50051"
    assert Target.parse("https://example.org").url == "https://example.org:443"
    assert Target.parse("localhost:8080").url == "http://localhost:8080"


@pytest.mark.parametrize(
    ("text", "tls", "message"),
    [
        ("ftp://example.org", None, "use host:port"),
        ("https://example.org/prefix", None, "no path"),
        ("http://example.org", True, "contradicts"),
        ("localhost:http", None, "invalid port"),
        ("", None, "give a host"),
    ],
)
def test_bad_targets(text: str, tls: bool | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Target.parse(text, tls)


def test_retry_backs_off_exponentially_with_jitter_and_a_cap() -> None:
    delays = list(Retry(attempts=6, initial_backoff=1, max_backoff=4, multiplier=2).delays())
    assert len(delays) == 5
    for delay, ceiling in zip(delays, [1, 2, 4, 4, 4], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert list(Retry(attempts=1).delays()) == []


async def test_tls_with_given_root_certificates(key_pair: tuple[bytes, bytes]) -> None:
    certificate = key_pair[1]
    server = grpc.aio.server()
    server_pb2_grpc.add_ServerServiceServicer_to_server(ServerServicer(None, ServerSettings()), server)  # type: ignore[arg-type]
    credentials = grpc.ssl_server_credentials([key_pair])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        async with Client(f"https://localhost:{port}", root_certificates=certificate) as secure:
            assert (await secure.server_info()).version == jobwire.__version__
        async with Client(f"localhost:{port}", tls=True, retry=Retry(attempts=1)) as untrusted:
            with pytest.raises(ServerUnavailable):
                await untrusted.server_info()
        async with Client(f"localhost:{port}", retry=Retry(attempts=1)) as plain:
            with pytest.raises(ServerUnavailable):
                await plain.server_info()
    finally:
        await server.stop(None)
