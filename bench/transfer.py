"""Figure 5, file transfer: upload and download over gRPC and over REST through Envoy, vs a raw loopback HTTP copy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from bench.runner import Context, Measurement
from bench.stack import Stack, rss_bytes, running_stack, spawn, wait_port
from jobwire.cli.services import free_port
from jobwire.files import FileClient

MiB = 1024 * 1024


async def run(ctx: Context) -> list[Measurement]:
    size, repeats = ctx.sizes["file_mib"] * MiB, ctx.sizes["file_repeats"]
    folder = ctx.scratch / "transfer"
    folder.mkdir()
    source = folder / "source.bin"
    await asyncio.to_thread(_write_file, source, size)
    raw = await _raw_copy(source, folder, repeats)
    ctx.say(f"raw loopback copy (curl ← python -m http.server): {raw / MiB:.0f} MiB/s")
    async with running_stack(ctx.scratch, envoy=True) as stack:
        peak = _Peak(stack.server.pid)
        async with peak.sampling():
            rates = await _transfers(stack, source, folder, repeats)
    rows = []
    for name, rate in rates.items():
        ratio = rate / raw
        metric = f"{ctx.sizes['file_mib']} MiB {name}, median of {repeats}"
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


def _write_file(path: Path, size: int) -> None:
    """A file of `size` random-ish bytes."""
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for n in range(size // MiB):
            out.write(n.to_bytes(4, "big") + block[4:])


async def _transfers(stack: Stack, source: Path, folder: Path, repeats: int) -> dict[str, float]:
    """Bytes/s of each way, the median of `repeats` runs. Each upload stores a blob of its own (its
    key names the run), and each download's file is deleted before the next, as the raw copy's is:
    how fast a machine writes a file swings with what it wrote just before."""
    size, output = source.stat().st_size, folder / "download.out"
    keys = {way: [f"bench-{way}-{run}" for run in range(repeats)] for way in ("grpc", "rest")}
    ways: dict[str, Callable[[int], Awaitable[object]]] = {}
    async with grpc.aio.insecure_channel(stack.target) as channel:
        files = FileClient(channel)
        ways["upload, gRPC"] = lambda run: files.upload(source, keys["grpc"][run])
        ways["download, gRPC"] = lambda run: files.download(keys["grpc"][run], output)
        ways["upload, REST via Envoy"] = lambda run: _curl("-T", str(source), f"{stack.rest}/f/{keys['rest'][run]}")
        ways["download, REST via Envoy"] = lambda run: _curl("-o", str(output), f"{stack.rest}/f/{keys['rest'][run]}")
        return {name: size / await _median_seconds(way, repeats, output) for name, way in ways.items()}


async def _raw_copy(source: Path, folder: Path, repeats: int) -> float:
    """Bytes/s of `curl` fetching the file from Python's http.server on loopback, written to disk."""
    port = free_port()
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(source.parent)]
    server = await spawn(args, folder / "http.server.log")
    output = folder / "raw.out"
    try:
        await wait_port(port)
        url = f"http://127.0.0.1:{port}/{source.name}"
        return source.stat().st_size / await _median_seconds(lambda _: _curl("-o", str(output), url), repeats, output)
    finally:
        await server.stop()


async def _curl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, error = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {error.decode()[-300:]}")


async def _median_seconds(action: Callable[[int], Awaitable[object]], repeats: int, output: Path) -> float:
    """Median duration of `action(run)` over the runs; `output` (what a run writes) is deleted after each."""
    durations = []
    for run in range(repeats):
        start = time.perf_counter()
        await action(run)
        durations.append(time.perf_counter() - start)
        output.unlink(missing_ok=True)
    return statistics.median(durations)


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
