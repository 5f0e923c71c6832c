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
from jobwire.memory import keep_freed_buffers

MiB = 1024 * 1024


async def run(ctx: Context) -> list[Measurement]:
    keep_freed_buffers()  # this process is the SDK's client: tuned as every `jobwire` command is
    size, repeats = ctx.sizes["file_mib"] * MiB, ctx.sizes["file_repeats"]
    folder = ctx.scratch / "transfer"
    folder.mkdir()
    source = folder / "source.bin"
    await asyncio.to_thread(_write_file, source, size)
    await asyncio.to_thread(os.sync)  # its writing out to the disk would otherwise overlap the first runs
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
    """Bytes/s of each way, the median of `repeats` runs."""
    size, download = source.stat().st_size, folder / "download.out"
    blobs = stack.directory / "blobs"  # the server's FileBlobStore: a file per key
    rates = {}
    async with grpc.aio.insecure_channel(stack.target) as channel:
        files = FileClient(channel)
        ways: list[tuple[str, Callable[[], Awaitable[object]], Path]] = [
            ("upload, gRPC", lambda: files.upload(source, "bench-grpc"), blobs / "bench-grpc"),
            ("download, gRPC", lambda: files.download("bench-grpc", download), download),
            (
                "upload, REST via Envoy",
                lambda: _curl("-T", str(source), f"{stack.rest}/f/bench-rest"),
                blobs / "bench-rest",
            ),
            ("download, REST via Envoy", lambda: _curl("-o", str(download), f"{stack.rest}/f/bench-rest"), download),
        ]
        for name, way, written in ways:
            rates[name] = size / await _median_seconds(way, repeats, written)
    return rates


async def _raw_copy(source: Path, folder: Path, repeats: int) -> float:
    """Bytes/s of `curl` fetching the file from Python's http.server on loopback, written to disk."""
    port = free_port()
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(source.parent)]
    server = await spawn(args, folder / "http.server.log")
    output = folder / "raw.out"
    try:
        await wait_port(port)
        url = f"http://127.0.0.1:{port}/{source.name}"
        return source.stat().st_size / await _median_seconds(lambda: _curl("-o", str(output), url), repeats, output)
    finally:
        await server.stop()
        output.unlink(missing_ok=True)


async def _curl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, error = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {error.decode()[-300:]}")


async def _median_seconds(action: Callable[[], Awaitable[object]], repeats: int, written: Path) -> float:
    """Median duration of `action` over the runs, each deleting first the file the run before wrote.

    Every way (and the raw copy) so writes into memory the kernel freed a moment ago: on a VM that
    memory is far cheaper to fill than memory not touched for a while (~3 CPU-s per GiB on ours),
    and each way gets the same."""
    durations = []
    for _ in range(repeats):
        written.unlink(missing_ok=True)
        start = time.perf_counter()
        await action()
        durations.append(time.perf_counter() - start)
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
