"""Figure 5, file transfer: upload and download over gRPC and over REST through Envoy, vs a raw loopback HTTP copy."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from bench.runner import Context, Measurement
from bench.stack import Stack, free_port, rss_bytes, running_stack, spawn, wait_port
from jobwire.files import FileClient

MiB = 1024 * 1024


async def run(ctx: Context) -> list[Measurement]:
    size = ctx.sizes["file_mib"] * MiB
    folder = ctx.scratch / "transfer"
    folder.mkdir()
    sources = [folder / "grpc.bin", folder / "rest.bin"]
    keys = await asyncio.to_thread(_write_files, sources, size)
    raw = await _raw_copy(sources[0], folder)
    ctx.say(f"raw loopback copy (curl ← python -m http.server): {raw / MiB:.0f} MiB/s")
    async with running_stack(ctx.scratch, envoy=True) as stack:
        peak = _Peak(stack.server.pid)
        async with peak.sampling():
            rates = await _transfers(stack, sources, keys, folder)
    rows = []
    for name, rate in rates.items():
        ratio = rate / raw
        metric = f"{ctx.sizes['file_mib']} MiB {name}"
        rows.append(
            Measurement(
                "5 files", metric, rate / MiB, "MiB/s", "raw HTTP copy", raw / MiB, ratio, "≥ 0.5", ratio >= 0.5
            )
        )
    growth = (peak.peak - peak.before) / MiB
    rows.append(
        Measurement(
            "5 files",
            "server RSS growth during the transfers",
            growth,
            "MiB",
            "server RSS before",
            peak.before / MiB,
            peak.peak / peak.before,
            "flat",
            growth < 64,
        )
    )
    return rows


def _write_files(paths: list[Path], size: int) -> list[str]:
    """Files of `size` random-ish bytes, different per file (each a new blob); their SHA-256s."""
    block = os.urandom(MiB)
    keys = []
    for index, path in enumerate(paths):
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for n in range(size // MiB):
                piece = index.to_bytes(4, "big") + n.to_bytes(4, "big") + block[8:]
                out.write(piece)
                digest.update(piece)
        keys.append(digest.hexdigest())
    return keys


async def _transfers(stack: Stack, sources: list[Path], keys: list[str], folder: Path) -> dict[str, float]:
    size = sources[0].stat().st_size
    rates: dict[str, float] = {}
    async with grpc.aio.insecure_channel(stack.target) as channel:
        files = FileClient(channel)
        rates["upload, gRPC"] = size / await _timed(lambda: files.upload(sources[0], keys[0]))
        rates["download, gRPC"] = size / await _timed(lambda: files.download(keys[0], folder / "grpc.out"))
    url = f"{stack.rest}/f/{keys[1]}"
    rates["upload, REST via Envoy"] = size / await _timed(lambda: _curl("-T", str(sources[1]), url))
    rates["download, REST via Envoy"] = size / await _timed(lambda: _curl("-o", str(folder / "rest.out"), url))
    return rates


async def _raw_copy(source: Path, folder: Path) -> float:
    """Bytes/s of `curl` fetching the file from Python's http.server on loopback, written to disk."""
    port = free_port()
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(source.parent)]
    server = await spawn(args, folder / "http.server.log")
    try:
        await wait_port(port)
        url = f"http://127.0.0.1:{port}/{source.name}"
        return source.stat().st_size / await _timed(lambda: _curl("-o", str(folder / "raw.out"), url))
    finally:
        await server.stop()
        (folder / "raw.out").unlink(missing_ok=True)


async def _curl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, error = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {error.decode()[-300:]}")


async def _timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


class _Peak:
    """The server's resident memory before and at its highest while sampling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_bytes(pid)

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        async def sample() -> None:
            while True:
                self.peak = max(self.peak, rss_bytes(self.pid))
                await asyncio.sleep(0.1)

        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            task.cancel()
