"""What `jobwire up`'s front door admits: which pages may call it (origins), by which names it may be
reached (hosts), and whether it speaks TLS (the certificate and key Envoy serves)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jobwire.cli.console import CliError
from jobwire.envoy import config as envoy_config
from jobwire.envoy import tls


def tls_secret(certificate: Path | None, key: Path | None, secret_file: Path) -> Path | None:
    """Write Envoy's secret file naming `certificate` and `key` (both given) and return its path; None
    when neither is given."""
    if certificate is None and key is None:
        return None
    if certificate is None or key is None:
        raise CliError("--tls-cert and --tls-key go together: give both (or neither, for plain HTTP)", 2)
    for flag, path in (("--tls-cert", certificate), ("--tls-key", key)):
        if not path.is_file():
            raise CliError(f"{flag} {path}: no such file", 2)
    return envoy_config.write(tls.secret(certificate, key), secret_file)


def browser_origins(port: int, listed: Sequence[str], scheme: str = "http") -> list[str] | None:
    """The origins whose pages may call `jobwire up` on `port`: the web UI's own (browsers send an
    Origin on its gRPC-Web POSTs) and `listed`; None (any origin) when `listed` holds `*`."""
    if "*" in listed:
        return None
    own = [f"{scheme}://localhost:{port}", f"{scheme}://127.0.0.1:{port}"]
    return [*own, *(origin.rstrip("/") for origin in listed)]


WILDCARDS = ("0.0.0.0", "::", "")
"""Listen addresses meaning every interface."""
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def private_hosts(listen: str, port: int) -> list[str] | None:
    """The `Host`s `jobwire up` answers when it listens on `listen`: loopback names and the listen
    address, bare or with `port`; None (any) when it listens on every interface, where the machine
    may be reached by any of its names."""
    if listen in WILDCARDS:
        return None
    own = f"[{listen}]" if ":" in listen else listen
    names = dict.fromkeys([*_LOOPBACK_NAMES, own])
    return [form for name in names for form in (name, f"{name}:{port}")]
