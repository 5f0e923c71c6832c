"""The processes a figure measures: a real `jobwire server`, Envoy, real workers, and their resource use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from jobwire.cli.services import free_port, start_local_envoy, stop_envoy

JOBWIRE = str(Path(sys.executable).parent / "jobwire")
BUSYBOX = "jobwire/busybox:latest"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def unique(prefix: str) -> str:
    """A name no other run (or agent) on this machine uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def machine_busy_seconds() -> float:
    """CPU time every process on this machine has used since boot (all cores: user, system, interrupts)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Service:
    """A subprocess of this benchmark, its output in a log file."""

    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def spawn(args: list[str], log: Path, cwd: Path | None = None) -> Service:
    """Start a subprocess (its own session, output to `log`)."""
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *args, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL, cwd=cwd, start_new_session=True
        )
    return Service(process, log)


async def wait_ready(target: str, service: Service, timeout: float = 60) -> None:
    """Until a gRPC channel to `target` connects; fails early if the process died."""
    async with grpc.aio.insecure_channel(target) as channel:
        async with asyncio.timeout(timeout):
            while True:
                if service.process.returncode is not None:
                    raise RuntimeError(f"{service.log.name} exited: {service.log.read_text()[-2000:]}")
                with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                    await asyncio.wait_for(channel.channel_ready(), 1)
                    return


@dataclass
class Stack:
    """A running server (subprocess) and, optionally, Envoy in front of it."""

    server: Service
    target: str
    directory: Path
    envoy_port: int = 0

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"


@contextlib.asynccontextmanager
async def running_stack(scratch: Path, *, envoy: bool = False) -> AsyncIterator[Stack]:
    """`jobwire server` on a free port with its own data folder (and Envoy); stopped after."""
    directory = scratch / unique("server")
    directory.mkdir(parents=True)
    port = free_port()
    args = [JOBWIRE, "server", "--host", "127.0.0.1", "--port", str(port), "--data-directory", str(directory)]
    # No cap on a queue's queued jobs: figure 6 queues 100,000 (more with JOBWIRE_BENCH_QUEUED_JOBS).
    args += ["--max-queued-jobs", "0"]
    server = await spawn(args, directory / "server.log")
    stack = Stack(server, f"127.0.0.1:{port}", directory)
    envoy_process = None
    try:
        await wait_ready(stack.target, server)
        if envoy:
            upstreams = [("127.0.0.1", port)]
            envoy_process, stack.envoy_port = await start_local_envoy(upstreams, directory / "envoy.yaml")
        yield stack
    finally:
        if envoy_process is not None:
            await stop_envoy(envoy_process)
        await server.stop()


@contextlib.asynccontextmanager
async def real_worker(stack: Stack, queue: str, cpus: int) -> AsyncIterator[Service]:
    """`jobwire worker` on the real Docker engine, serving `queue`; stopped (and its containers gone) after."""
    worker_id = unique("bench-w")
    directory = stack.directory / worker_id
    directory.mkdir()
    args = [JOBWIRE, "worker", queue, "--server", stack.target, "--cpus", str(cpus), "--id", worker_id]
    worker = await spawn([*args, "--data-directory", str(directory)], directory / "worker.log")
    try:
        yield worker
    finally:
        await worker.stop()
        await _remove_containers(worker_id)


async def _remove_containers(worker_id: str) -> None:
    listing = await asyncio.create_subprocess_exec(
        "docker", "ps", "-aq", "--filter", f"label=io.jobwire.worker={worker_id}", stdout=asyncio.subprocess.PIPE
    )
    ids = (await listing.communicate())[0].decode().split()
    if ids:
        removal = await asyncio.create_subprocess_exec("docker", "rm", "-f", *ids, stdout=asyncio.subprocess.DEVNULL)
        await removal.wait()


async def docker_run(*args: str) -> None:
    """`docker run --rm ARGS`, output discarded; raises if it fails."""
    process = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, error = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"docker run {' '.join(args)} failed: {error.decode()[-500:]}")


async def wait_port(port: int, timeout: float = 30) -> None:
    """Until something accepts connections on 127.0.0.1:`port`."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
