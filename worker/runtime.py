"""The container-runtime seam, and running one attempt's container through it.

`ContainerRuntime` is what the worker needs of a container engine; `DockerRuntime`
(worker/docker_runtime.py) is the engine, `bench/fake_runtime.py` and the daemon's tests fake it.
`run_container` and `resume_container` decide, once for every runtime, when a container is killed: at its time limit,
or when the attempt is cancelled, without waiting for anything else the runtime is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeAlias

from jobwire.v1 import jobs_pb2

LABEL = "io.jobwire"
"""The label of every container and volume the worker makes; `LABEL.job` etc. say whose."""
STDOUT, STDERR = jobs_pb2.LOG_STREAM_STDOUT, jobs_pb2.LOG_STREAM_STDERR
Stream: TypeAlias = "jobs_pb2.LogStream.ValueType"
Piece: TypeAlias = "tuple[Stream, bytes, str]"
"""A piece of output: its stream, its bytes, and the engine's RFC 3339 time of it ("" for now)."""


class Pieces(Protocol):
    """A container's output, piece by piece (an async generator is one); `aclose` lets go of it,
    before the first piece too."""

    def __aiter__(self) -> AsyncIterator[Piece]: ...

    async def aclose(self) -> None: ...


Output = Callable[[Stream, bytes, str], Awaitable[None]]
"""Receives each piece of output, in order."""
Progress = Callable[[str], object]
"""Receives lines of a pull's or build's progress (called from any thread)."""
_DRAIN_SECONDS = 10
"""How long a cancelled attempt waits for its killed container's output to end."""


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a runtime needs to run one attempt of a job."""

    name: str
    image: str
    command: list[str] | None
    entrypoint: list[str] | None
    env: dict[str, str]
    workdir: str | None
    binds: list[tuple[str, str, bool]]
    labels: dict[str, str]
    timeout: float | None
    shm_size: int | None = None
    memory: int | None = None
    nano_cpus: int | None = None
    gpu_devices: list[str] = field(default_factory=list)
    user: str | None = None
    pids_limit: int = 4096
    capabilities: tuple[str, ...] = ()
    """The only capabilities the container keeps (every other one is dropped)."""
    log_size: int = 0
    """Most bytes of output the engine itself keeps of the container (0: the engine's default)."""
    disk_size: int = 0
    """Most bytes the container's writable layer may hold (0: no limit; some storage drivers only)."""
    engine_runtime: str = ""
    """The engine's OCI runtime to run it with (e.g. `runsc`; empty: the engine's default)."""
    network: str = "jobs"
    """`jobs` (the runtime's job network: no traffic between jobs) or `none` (no network)."""


@dataclass(frozen=True)
class BuildSpec:
    """An image build: a context folder, the Dockerfile's path inside it, the tag to give the image."""

    root: Path
    dockerfile: str
    tag: str
    args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    platform: str | None = None
    memory: int | None = None
    """Memory (and memory + swap) of each build step's container."""
    nano_cpus: int | None = None
    """CPUs of each build step's container, in billionths."""
    pids_limit: int = 4096
    """Most processes of each build step's container."""
    network: str = "jobs"
    """Each build step's network, as `ContainerSpec.network`."""


@dataclass(frozen=True)
class State:
    """What the runtime knows of a container (times in seconds since the epoch; 0 if not yet)."""

    status: str
    started_at: float
    finished_at: float
    oom_killed: bool = False


@dataclass(frozen=True)
class Outcome:
    """How a container ended."""

    exit_code: int
    timed_out: bool
    oom_killed: bool
    start_time: float
    end_time: float


class ContainerRuntime(Protocol):
    """A container engine as the worker uses it. `kill` and `remove` must never wait behind another
    container's `wait` or output: they are how time limits and cancels take effect."""

    async def prepare(self) -> None:
        """Create what every job's container uses (network, cache volume); idempotent."""

    async def ensure_image(self, image: str, progress: Progress) -> None:
        """Use the local image, else pull it; ImageError if neither works."""

    async def has_image(self, tag: str) -> bool:
        """Whether the image is here."""

    async def build(self, spec: BuildSpec, progress: Progress) -> None:
        """Build and tag an image in the job network, each step within the spec's limits; BuildError
        with the engine's reason if it fails. Cancelled, it stops the build and its step's container."""

    async def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the container; its id. ImageError if the engine refuses it. Cancelled
        while the engine makes it, it removes the container once made (else a cancel within the create
        would leave a `created` container behind for good)."""

    async def attach(self, container_id: str) -> Pieces:
        """The container's output from now on, until it ends; attached before this returns.
        Closing the iterator (`aclose`) lets go of the output early."""

    async def logs(self, container_id: str) -> Pieces:
        """The container's output from its first piece to its end (after a worker restart)."""

    async def start(self, container_id: str) -> None:
        """Start a created container; ImageError if the engine cannot."""

    async def wait(self, container_id: str) -> int:
        """Its exit code, once it has ended."""

    async def inspect(self, container_id: str) -> State:
        """Its state now."""

    async def kill(self, container_id: str) -> None:
        """Kill it if it runs (a container that ended already is no error)."""

    async def remove(self, container_id: str) -> None:
        """Kill and remove it, if it is still there."""

    async def ours(self, labels: dict[str, str]) -> list[dict[str, str]]:
        """Labels (and `id`) of every container, running or not, that carries all `labels`."""


async def run_container(
    runtime: ContainerRuntime, spec: ContainerSpec, output: Output, started: Callable[[], Awaitable[None]]
) -> Outcome:
    """Run the container to its end (or its time limit), streaming its output; always removes it.
    `started` is awaited once the runtime has started the container."""
    container_id = await runtime.create(spec)
    try:
        # Attached before it starts, so nothing it writes is missed however short the run.
        pieces = await runtime.attach(container_id)
        try:
            await runtime.start(container_id)
            await started()
        except BaseException:
            await pieces.aclose()  # else it closes when the output ends
            raise
        return await _follow(runtime, container_id, spec.timeout, output, pieces)
    finally:
        await asyncio.shield(runtime.remove(container_id))


async def resume_container(
    runtime: ContainerRuntime,
    container_id: str,
    timeout: float,
    output: Output,
    started: Callable[[], Awaitable[None]],
) -> Outcome:
    """Follow a container created earlier (by this worker before a restart) from its first output to
    its end, within `timeout` seconds of its start, starting it if it never was; always removes it."""
    try:
        state = await runtime.inspect(container_id)
        if state.status == "created":
            await runtime.start(container_id)
            await started()
            state = await runtime.inspect(container_id)
        left = max(timeout - (time.time() - state.started_at), 0.1)
        return await _follow(runtime, container_id, left, output, await runtime.logs(container_id))
    finally:
        await asyncio.shield(runtime.remove(container_id))


async def _follow(
    runtime: ContainerRuntime,
    container_id: str,
    timeout: float | None,
    output: Output,
    pieces: Pieces,
) -> Outcome:
    forwarder = asyncio.create_task(_forward(pieces, output))
    # The wait goes on while the container is killed: the kill must not wait for it, nor cancel it.
    ended = asyncio.create_task(runtime.wait(container_id))
    timed_out = False
    try:
        async with asyncio.timeout(timeout):
            exit_code = await asyncio.shield(ended)
    except TimeoutError:
        timed_out = True
        await runtime.kill(container_id)
        exit_code = await ended
    except asyncio.CancelledError:
        # Kill first; the output then ends by itself.
        await asyncio.shield(runtime.kill(container_id))
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(forwarder), _DRAIN_SECONDS)
        forwarder.cancel()
        ended.cancel()
        raise
    await forwarder
    state = await runtime.inspect(container_id)
    return Outcome(exit_code, timed_out, state.oom_killed, state.started_at, max(state.finished_at, state.started_at))


async def _forward(pieces: Pieces, output: Output) -> None:
    try:
        async for piece in pieces:
            await output(*piece)
    finally:
        await pieces.aclose()
