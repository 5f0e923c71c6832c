"""Running containers with the Docker SDK; the only place that blocks on Docker.

Every Docker SDK call runs in a thread (`asyncio.to_thread`); output is read
in a thread too and handed to the event loop piece by piece, exactly as the
container wrote it. A new container's output comes from an attach made before
it starts (the engine forwards it as it reads its pipes, many lines a piece);
a container followed again after a worker restart is read from the engine's
log (one entry a line, far slower to serve: the engine flushes every entry).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import docker
import docker.errors
from docker.models.containers import _create_container_args  # type: ignore[attr-defined]
from docker.types import DeviceRequest, Mount
from docker.utils.socket import frames_iter
from google.protobuf import timestamp_pb2

from jobwire.v1 import jobs_pb2
from jobwire.worker.errors import ImageError

log = logging.getLogger(__name__)
LABEL = "io.jobwire"
NETWORK = "jobwire-jobs"
CACHE_VOLUME = "jobwire-job-cache"
STDOUT, STDERR = jobs_pb2.LOG_STREAM_STDOUT, jobs_pb2.LOG_STREAM_STDERR
Stream: TypeAlias = "jobs_pb2.LogStream.ValueType"

_HANDOFF = 512
"""Pieces of output the reader thread hands to the event loop between two waits for it."""

Output = Callable[[Stream, bytes, str], Awaitable[None]]
"""Receives (stream, bytes, the engine's RFC 3339 timestamp or "" for now) per piece of output, in order."""
Put = Callable[[Stream, bytes, str], None]


@dataclass(frozen=True)
class ContainerSpec:
    """Everything Docker needs to run one attempt of a job."""

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


@dataclass(frozen=True)
class Outcome:
    """How a container ended."""

    exit_code: int
    timed_out: bool
    oom_killed: bool
    start_time: float
    end_time: float


class DockerRuntime:
    """Runs ContainerSpecs on a Docker engine."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    def from_env(cls) -> DockerRuntime:
        """Connect to the engine named by DOCKER_HOST (default: the local socket)."""
        return cls(docker.from_env(version="auto", timeout=120))

    async def prepare(self) -> None:
        """Create the job network (no container-to-container traffic) and the shared cache volume."""
        await asyncio.to_thread(self._prepare)

    def _prepare(self) -> None:
        if not self.client.networks.list(names=[NETWORK]):
            self.client.networks.create(
                NETWORK,
                driver="bridge",
                options={"com.docker.network.bridge.enable_icc": "false"},
                labels={LABEL: "true"},
            )
        with contextlib.suppress(docker.errors.APIError):
            self.client.volumes.create(CACHE_VOLUME, labels={LABEL: "true"})

    async def ensure_image(self, image: str, progress: Callable[[str], object]) -> None:
        """Use the local image, else pull it (progress lines to `progress`); ImageError if neither works."""
        await asyncio.to_thread(self._ensure_image, image, progress)

    def _ensure_image(self, image: str, progress: Callable[[str], object]) -> None:
        try:
            self.client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as error:
            raise ImageError(f"invalid image name {image!r}: {error.explanation}") from None
        progress(f"pulling {image}\n")
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
        # The raw response (private APIClient helpers), so its socket is closed however the pull ends.
        api: Any = self.client.api
        params = {"fromImage": repository, "tag": tag or "latest"}
        try:
            with api._post(api._url("/images/create"), params=params, stream=True, timeout=None) as response:
                api._raise_for_status(response)
                for line in response.iter_lines():
                    event = json.loads(line) if line else {}
                    if "error" in event:
                        raise ImageError(
                            f"image {image!r} is not available locally and the pull failed: {event['error']}"
                        )
                    if event:
                        progress(_progress_line(event))
            self.client.images.get(image)
        except docker.errors.APIError as error:
            raise ImageError(
                f"image {image!r} is not available locally and could not be pulled: {error.explanation}"
            ) from None

    async def run(self, spec: ContainerSpec, output: Output, started: Callable[[], Awaitable[None]]) -> Outcome:
        """Run the container to its end (or its timeout), streaming output; always removes it.
        `started` is awaited once the engine has started the container."""
        try:
            container = await asyncio.to_thread(self._create, spec)
        except docker.errors.APIError as error:
            raise ImageError(f"the Docker engine refused the container: {error.explanation}") from None
        try:
            # Attached before it starts, so nothing it writes is missed however short the run.
            attached = await asyncio.to_thread(self._attach, container.id)
            try:
                await asyncio.to_thread(container.start)
                await started()
            except BaseException as error:
                _close(attached)  # else the reader closes it when the output ends
                if isinstance(error, docker.errors.APIError):
                    raise ImageError(f"the Docker engine could not start the container: {error.explanation}") from None
                raise
            return await self._follow(container, spec.timeout, output, lambda put: _read_attached(attached, put))
        finally:
            await asyncio.shield(asyncio.to_thread(_remove, container))

    async def resume(
        self, container_id: str, timeout: float, output: Output, started: Callable[[], Awaitable[None]]
    ) -> Outcome:
        """Follow a container created earlier (by this worker before a restart) from its first output
        to its end, within `timeout` seconds of its start, starting it if it never was; always removes it."""
        container = await asyncio.to_thread(self.client.containers.get, container_id)
        try:
            state = (await asyncio.to_thread(_inspect, container))["State"]
            if state["Status"] == "created":
                await asyncio.to_thread(container.start)
                await started()
                state = (await asyncio.to_thread(_inspect, container))["State"]
            begun = _docker_time(state["StartedAt"])
            read = functools.partial(_read_log, self.client, container_id)
            return await self._follow(container, max(timeout - (time.time() - begun), 0.1), output, read)
        finally:
            await asyncio.shield(asyncio.to_thread(_remove, container))

    async def ours(self, labels: dict[str, str]) -> list[dict[str, str]]:
        """Labels (and `id`) of every container, running or not, that carries all `labels`."""
        filters: dict[str, str | list[str] | bool] = {"label": [f"{k}={v}" for k, v in labels.items()]}
        # Sparse: no inspect per container, so one removed meanwhile cannot fail the listing.
        containers = await asyncio.to_thread(self.client.containers.list, all=True, sparse=True, filters=filters)
        return [{**(container.attrs.get("Labels") or {}), "id": str(container.id)} for container in containers]

    def _create(self, spec: ContainerSpec) -> Any:
        devices = [DeviceRequest(driver="nvidia", device_ids=spec.gpu_devices, capabilities=[["gpu"]])]
        # What `containers.create` does, but without the inspect it makes after: one call less per job.
        arguments = _create_container_args(
            dict(
                version=self.client.api.api_version,
                image=spec.image,
                command=spec.command,
                entrypoint=spec.entrypoint,
                environment=spec.env,
                working_dir=spec.workdir,
                labels=spec.labels,
                name=spec.name,
                user=spec.user,
                mounts=[Mount(target, source, type="bind", read_only=ro) for source, target, ro in spec.binds]
                + [Mount("/job-cache", CACHE_VOLUME, type="volume")],
                network=NETWORK,
                shm_size=spec.shm_size,
                mem_limit=spec.memory,
                memswap_limit=spec.memory,  # the limit is of memory, not memory + swap
                nano_cpus=spec.nano_cpus,
                device_requests=devices if spec.gpu_devices else None,
                security_opt=["no-new-privileges"],
                pids_limit=spec.pids_limit,
                privileged=False,
                tty=False,
                stdin_open=False,
            )
        )
        created = self.client.api.create_container(**arguments)
        return self.client.containers.prepare_model({"Id": created["Id"]})

    def _attach(self, container_id: str) -> tuple[Any, Any]:
        """The container's stdout and stderr from now on, as the engine's multiplexed frames."""
        api: Any = self.client.api  # the SDK's own attach inspects the container first: one call more
        url = api._url("/containers/{0}/attach", container_id)
        params = {"stdout": 1, "stderr": 1, "stream": 1}
        response = api._post(url, headers={"Connection": "Upgrade", "Upgrade": "tcp"}, params=params, stream=True)
        return response, api._get_raw_response_socket(response)

    async def _follow(
        self, container: Any, timeout: float | None, output: Output, read: Callable[[Put], None]
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[Stream, bytes, str] | None] = asyncio.Queue()  # bounded by _HANDOFF
        handed = 0

        def put(stream: Stream, data: bytes, stamp: str) -> None:
            nonlocal handed
            loop.call_soon_threadsafe(chunks.put_nowait, (stream, data, stamp))
            handed += 1
            if handed % _HANDOFF == 0:  # let the loop catch up: at most _HANDOFF pieces wait in memory
                asyncio.run_coroutine_threadsafe(chunks.join(), loop).result()

        reader = asyncio.create_task(asyncio.to_thread(read, put))
        forwarder = asyncio.create_task(_forward(chunks, output))
        timed_out = False
        try:
            exit_code = await asyncio.wait_for(_wait(container), timeout)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(_kill, container)
            exit_code = await _wait(container)
        except asyncio.CancelledError:
            # Kill first; the output then ends by itself, which frees the reader thread.
            await asyncio.shield(asyncio.to_thread(_kill, container))
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), 10)
            forwarder.cancel()
            raise
        await reader
        await chunks.put(None)
        await forwarder
        state = (await asyncio.to_thread(_inspect, container))["State"]
        started, ended = _docker_time(state["StartedAt"]), _docker_time(state["FinishedAt"])
        return Outcome(exit_code, timed_out, bool(state.get("OOMKilled")), started, max(ended, started))

    async def remove(self, container_id: str) -> None:
        """Kill and remove the container, if it is still there."""
        with contextlib.suppress(docker.errors.NotFound):
            _remove(await asyncio.to_thread(self.client.containers.get, container_id))


async def _wait(container: Any) -> int:
    result = await asyncio.to_thread(container.wait)
    return int(result.get("StatusCode", -1))


def _read_attached(attached: tuple[Any, Any], put: Put) -> None:
    """Hand on the frames of an attach until the container's output ends."""
    try:
        for stream, data in frames_iter(attached[1], tty=False):  # type: ignore[no-untyped-call]
            put(STDERR if stream == 2 else STDOUT, data, "")
    finally:
        _close(attached)


def _close(attached: tuple[Any, Any]) -> None:
    response, socket = attached
    response.close()  # first: it flushes the buffered reader over the socket
    socket.close()


_REORDER_SECONDS = 2
"""How much earlier than the latest entry seen a late entry of the other stream may be stamped: the
engine copies stdout and stderr in a goroutine each, so it can write an entry of one after a later
one of the other."""


def _read_log(client: docker.DockerClient, container_id: str, put: Put) -> None:
    """Hand on the container's log from its first entry to its end."""
    seen = _Seen()
    _read_logs(client, container_id, put, True, seen)
    # A follower may end before the engine wrote the last entries (an unterminated last line is
    # flushed when the output closes): read on, without following, from a little before the latest
    # entry seen, skipping what was handed on.
    _read_logs(client, container_id, put, False, seen)


class _Seen:
    """The entries handed on lately, by (time, stream), to skip when a log is read again."""

    def __init__(self) -> None:
        self.latest = (0, 0)
        self.recent: collections.deque[tuple[tuple[int, int], int]] = collections.deque()
        self.counts: collections.Counter[tuple[tuple[int, int], int]] = collections.Counter()

    def since(self) -> str:
        """The `since` of a read that overlaps the entries kept (empty: none seen, read all)."""
        seconds, nanos = self.latest
        return f"{max(seconds - _REORDER_SECONDS, 0)}.{nanos:09d}" if self.latest > (0, 0) else ""

    def add(self, entry: tuple[tuple[int, int], int]) -> None:
        self.latest = max(self.latest, entry[0])
        self.recent.append(entry)
        self.counts[entry] += 1
        while self.recent[0][0] < (self.latest[0] - _REORDER_SECONDS, self.latest[1]):
            self.counts[self.recent.popleft()] -= 1

    def take(self, entry: tuple[tuple[int, int], int]) -> bool:
        """True (and forgotten) when the entry was handed on already."""
        if self.counts[entry] <= 0:
            return False
        self.counts[entry] -= 1
        return True


def _read_logs(client: docker.DockerClient, container_id: str, put: Put, follow: bool, seen: _Seen) -> None:
    """Read the container's log (frames of an 8-byte header, stream and size, then a timestamped entry),
    handing each entry on and adding it to `seen`; a read not following skips what `seen` holds."""
    params: dict[str, Any] = {"follow": int(follow), "stdout": 1, "stderr": 1, "timestamps": 1}
    if since := seen.since():
        params["since"] = since
    api: Any = client.api  # the raw response: the SDK's helpers drop the stream ids of timestamped logs
    url = api._url("/containers/{0}/logs", container_id)
    with api._get(url, params=params, stream=True, timeout=None) as response:
        api._raise_for_status(response)
        while len(header := _read_exactly(response.raw, 8)) == 8:
            stream = STDERR if header[0] == 2 else STDOUT
            stamp_bytes, _, data = _read_exactly(response.raw, int.from_bytes(header[4:8], "big")).partition(b" ")
            stamp = stamp_bytes.decode()
            entry = (_stamp_key(stamp), stream)
            if not follow and seen.take(entry):  # a read again: the entries handed on already
                continue
            seen.add(entry)
            put(stream, data, stamp)


def _stamp_key(stamp: str) -> tuple[int, int]:
    parsed = timestamp_pb2.Timestamp()
    parsed.FromJsonString(stamp)
    return parsed.seconds, parsed.nanos


def _read_exactly(raw: Any, size: int) -> bytes:
    data = b""
    while len(data) < size and (piece := raw.read(size - len(data))):
        data += piece
    return data


async def _forward(chunks: asyncio.Queue[tuple[Stream, bytes, str] | None], output: Output) -> None:
    while (item := await chunks.get()) is not None:
        await output(*item)
        chunks.task_done()


def _docker_time(text: str) -> float:
    """Seconds since the epoch of an engine timestamp (RFC 3339 with nanoseconds)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp.seconds + stamp.nanos / 1e9


def _inspect(container: Any) -> dict[str, Any]:
    container.reload()
    return dict(container.attrs)


def _kill(container: Any) -> None:
    with contextlib.suppress(docker.errors.APIError):
        container.kill()


def _remove(container: Any) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


def _progress_line(event: dict[str, Any]) -> str:
    parts = [event.get("id", ""), event.get("status", ""), event.get("progress", "")]
    return " ".join(p for p in parts if p).rstrip() + "\n"
