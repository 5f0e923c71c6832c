"""A private Redis (Debian's redis-server) on a free port in a temporary folder, for the peers' baselines."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from bench.stack import spawn, wait_port
from jobwire.cli.services import free_port


@contextlib.asynccontextmanager
async def private_redis(scratch: Path) -> AsyncIterator[str]:
    """Yields the URL of a fresh redis-server (no persistence) that is stopped after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: `make bench` installs Debian's redis-server as root")
    directory = scratch / f"redis-{free_port()}"
    directory.mkdir()
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""]
    service = await spawn([*args, "--appendonly", "no"], directory / "redis.log")
    try:
        await wait_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        await service.stop()
