"""The egress policy: which addresses jobwire itself may connect to when a job names a URL.

A job's `url` inputs and build contexts (fetched by the worker) and its webhooks (called by the
server) are URLs strangers wrote. Unless the operator allows them (`--egress-allow`), connections to
loopback, link-local, private, CGNAT, unique-local, site-local, multicast, unspecified, reserved and
documentation addresses are refused, including IPv4 addresses inside IPv6 ones (IPv4-mapped
`::ffff:127.0.0.1`, NAT64 `64:ff9b::/96`, 6to4) and any spelling that resolves to them (`2130706433`,
`0177.0.0.1`, `localhost`, a name whose DNS answer changes between two lookups).

The check is made where the connection is opened, not on the URL: `client()` is an httpx client
whose network backend resolves each host once, checks every address the answer holds, and connects
to exactly those addresses (TLS still verifies, and sends SNI for, the URL's host name; the Host header
is the URL's). Every redirect hop opens its connection through the same backend, so each is checked
again; redirects are bounded (`MAX_REDIRECTS`), and proxies from the environment are not used (a proxy
would connect on our behalf to what we never checked).

This is the one module of `jobwire.core` that opens connections: the worker and the server share it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

MAX_REDIRECTS = 5
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_REFUSED: list[tuple[str, str]] = [
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "reserved"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "reserved"),  # IPv4-compatible IPv6, deprecated
    ("64:ff9b:1::/48", "private"),  # local-use NAT64
    ("100::/64", "reserved"),  # discard-only
    ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo among them
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
]
REFUSED_NETWORKS: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(network), reason) for network, reason in _REFUSED
)
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
"""The private networks (not loopback, not link-local): what `jobwire up` allows by default."""
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EgressRefused(Exception):
    """A connection the policy refuses; the message names the address and why."""


def parse_allow(entries: Iterable[str]) -> tuple[str, ...]:
    """Allow-list entries from `10.0.0.0/8,files.lab.example` (commas or repeats), each checked:
    a network, an address or a host name."""
    parsed: list[str] = []
    for entry in (part.strip() for text in entries for part in text.split(",")):
        if not entry:
            continue
        if _network(entry) is None and not _is_host_name(entry):
            raise ValueError(f"expected a network (10.0.0.0/8), an address or a host name, not {entry!r}")
        parsed.append(entry)
    return tuple(parsed)


@dataclass(frozen=True)
class Policy:
    """Refuse what `refusal` names, except the hosts and networks of `allow`."""

    allow: Sequence[str] = ()
    networks: tuple[Network, ...] = field(init=False)
    hosts: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        entries = parse_allow(self.allow)
        networks = tuple(n for n in map(_network, entries) if n is not None)
        object.__setattr__(self, "networks", networks)
        object.__setattr__(self, "hosts", frozenset(_host(e) for e in entries if _network(e) is None))

    def check(self, host: str, address: str) -> None:
        """Raise `EgressRefused` unless `host` (as the URL names it) may be reached at `address`."""
        if _host(host) in self.hosts:
            return
        ip = ipaddress.ip_address(address.partition("%")[0])
        candidates = [ip, *([inner] if (inner := _embedded(ip)) is not None else [])]
        if any(candidate in network for candidate in candidates for network in self.networks):
            return
        for candidate in candidates:
            if reason := refusal(candidate):
                notes = [f"inside {ip}"] if candidate != ip else []
                notes += [f"the address of {host}"] if _host(host) not in (str(ip), str(candidate)) else []
                shown = f"{candidate} ({', '.join(notes)})" if notes else str(candidate)
                raise EgressRefused(
                    f"refused to connect to {shown}: a {reason} address; the operator can allow it with --egress-allow"
                )


def refusal(address: Address) -> str:
    """Why `address` is refused by default ('' when it is not)."""
    return next((reason for network, reason in REFUSED_NETWORKS if address in network), "")


def client(policy: Policy, timeout: float, **options: Any) -> httpx.AsyncClient:
    """An httpx client whose every connection (redirects included) obeys `policy`."""
    return httpx.AsyncClient(
        transport=_Transport(policy),
        timeout=timeout,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
        **options,
    )


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's own transport over a connection pool whose network backend is `_Backend`.

    httpx takes no network backend, so the pool it made is replaced by an equal one that has ours
    (the pool is httpx's `_pool`; tests/test_egress.py fails if that stops being where it lives)."""

    def __init__(self, policy: Policy) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),  # SSL_CERT_FILE and SSL_CERT_DIR still apply
            network_backend=_Backend(policy),
        )


class _Backend(httpcore.AsyncNetworkBackend):
    """Resolves a host once, checks every address of the answer, connects to those addresses only."""

    def __init__(self, policy: Policy) -> None:
        self.policy, self.inner = policy, httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                answer = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as error:
            raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from None
        addresses = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in answer))
        for address in addresses:
            self.policy.check(host, address)  # all of them, before connecting to any
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise EgressRefused("refused to connect to a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _embedded(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, NAT64, 6to4), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def _network(entry: str) -> Network | None:
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return None


def _host(name: str) -> str:
    return name.strip("[]").rstrip(".").lower()


def _is_host_name(entry: str) -> bool:
    labels = _host(entry).split(".")
    return all(label and len(label) < 64 and label.replace("-", "").isalnum() for label in labels)
