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
from jobwire.core.memory import keep_freed_buffers
from jobwire.files import FileClient

MiB = 1024 * 1024


async def run(ctx: Context) -> list[Measurement]:
    keep_freed_buffers()  # this process is the SDK's client: tuned as every `jobwire` command is
    size, repeats = ctx.sizes["file_mib"] * MiB, ctx.sizes["file_repeats"]
    folder = ctx.scratch / "transfer"
    folder.mkdir()
    source = folder / "source.bin"
    await asyncio.to_thread(_write_file, source, size)  # written out to the disk before each run (`_seconds`)
    async with running_stack(ctx.scratch, envoy=True) as stack, _raw_server(source, folder) as raw_url:
        peak = _Peak(stack.server.pid)
        async with peak.sampling():
            rates = await _transfers(stack, raw_url, source, folder, repeats, ctx.say)
    raw = rates.pop(RAW)
    ctx.say(f"raw loopback copy (curl ← python -m http.server): {raw / MiB:.0f} MiB/s")
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


RAW = "raw"


async def _transfers(
    stack: Stack, raw_url: str, source: Path, folder: Path, repeats: int, say: Callable[[str], None]
) -> dict[str, float]:
    """Bytes/s of each way and of the raw copy (`RAW`), the median of `repeats` rounds; each round
    runs every way once, so the machine's drift reaches every way alike, and starts one way later than
    the round before."""
    size, download = source.stat().st_size, folder / "download.out"
    blobs = stack.directory / "blobs"  # the server's FileBlobStore: a file per key
    async with grpc.aio.insecure_channel(stack.target) as channel:
        files = FileClient(channel)
        checked = await files.upload(source)  # under its SHA-256 (the SDK's default key), once
        ways: list[tuple[str, Callable[[], Awaitable[object]], Path]] = [
            (RAW, lambda: _curl("-o", str(download), raw_url), download),
            ("upload, gRPC", lambda: files.upload(source, "bench-grpc"), blobs / "bench-grpc"),
            ("download, gRPC", lambda: files.download("bench-grpc", download), download),
            (
                "download, gRPC, checked against its SHA-256 key",
                lambda: files.download(checked, download),
                download,
            ),
            (
                "upload, REST via Envoy",
                lambda: _curl("-T", str(source), f"{stack.rest}/f/bench-rest"),
                blobs / "bench-rest",
            ),
            ("download, REST via Envoy", lambda: _curl("-o", str(download), f"{stack.rest}/f/bench-rest"), download),
        ]
        seconds: dict[str, list[float]] = {name: [] for name, _, _ in ways}
        for round in range(repeats):
            turn = round % len(ways)
            for name, way, written in ways[turn:] + ways[:turn]:
                seconds[name].append(await _seconds(way, written, size))
            say(f"round {round + 1}: " + ", ".join(f"{name} {size / MiB / s[-1]:.0f}" for name, s in seconds.items()))
    return {name: size / statistics.median(each) for name, each in seconds.items()}


@contextlib.asynccontextmanager
async def _raw_server(source: Path, folder: Path) -> AsyncIterator[str]:
    """The URL of `source` served by Python's http.server on loopback (the raw copy's other end)."""
    port = free_port()
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(source.parent)]
    server = await spawn(args, folder / "http.server.log")
    try:
        await wait_port(port)
        yield f"http://127.0.0.1:{port}/{source.name}"
    finally:
        await server.stop()


async def _curl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, error = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {error.decode()[-300:]}")


async def _seconds(action: Callable[[], Awaitable[object]], written: Path, size: int) -> float:
    """How long `action` took, started as every way (and the raw copy) is: with nothing waiting to
    be written to the disk, the file the run before wrote deleted, and `size` bytes of memory
    freed a moment ago.

    On our VMs memory freed more than ~2 s ago is handed back to the host (free page reporting)
    and filling it again costs ~2-3 CPU-s per GiB, against ~0.25 for memory freed just before: a
    way got one or the other depending on what ran before it (a download after a download ran at
    twice the rate of one after an upload). So each starts by writing and deleting a scratch file
    of `size` bytes, as a machine that is not a VM always has such memory to hand."""
    await asyncio.to_thread(_free_fresh_memory, written.with_name("fresh.scratch"), size)
    written.unlink(missing_ok=True)
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


def _free_fresh_memory(scratch: Path, size: int) -> None:
    os.sync()
    block = bytes(256 * 1024)
    with scratch.open("wb") as out:
        for _ in range(size // len(block)):
            out.write(block)
    scratch.unlink()


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
