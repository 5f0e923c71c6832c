"""Running containers with the Docker SDK; the only place that blocks on Docker.

Every Docker SDK call runs in a thread (`asyncio.to_thread`); output is read
in a thread too and handed to the event loop chunk by chunk, exactly as the
container wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import docker
import docker.errors
from docker.types import DeviceRequest, Mount

from jobwire.v1 import jobs_pb2

log = logging.getLogger(__name__)
LABEL = "io.jobwire"
NETWORK = "jobwire-jobs"
CACHE_VOLUME = "jobwire-job-cache"
STDOUT, STDERR = jobs_pb2.LOG_STREAM_STDOUT, jobs_pb2.LOG_STREAM_STDERR
Stream: TypeAlias = "jobs_pb2.LogStream.ValueType"

Output = Callable[[Stream, bytes], Awaitable[None]]
"""Receives (stream, bytes) as the container writes them."""


class ImageError(Exception):
    """The image is not available locally and could not be pulled."""


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

    async def run(self, spec: ContainerSpec, output: Output) -> Outcome:
        """Run the container to its end (or its timeout), streaming output; always removes it."""
        container = await asyncio.to_thread(self._create, spec)
        try:
            return await self._run(container, spec, output)
        finally:
            await asyncio.shield(asyncio.to_thread(_remove, container))

    def _create(self, spec: ContainerSpec) -> Any:
        devices = [DeviceRequest(driver="nvidia", device_ids=spec.gpu_devices, capabilities=[["gpu"]])]
        return self.client.containers.create(
            spec.image,
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
            nano_cpus=spec.nano_cpus,
            device_requests=devices if spec.gpu_devices else None,
            security_opt=["no-new-privileges"],
            tty=False,
            stdin_open=False,
        )

    async def _run(self, container: Any, spec: ContainerSpec, output: Output) -> Outcome:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[Stream, bytes] | None] = asyncio.Queue(1024)
        # Attach before starting, as `docker run` does: no output is missed, however short the run.
        stream = await asyncio.to_thread(container.attach, stdout=True, stderr=True, stream=True, demux=True)
        await asyncio.to_thread(container.start)
        started = time.time()
        reader = asyncio.create_task(asyncio.to_thread(_read_output, stream, chunks, loop))
        forwarder = asyncio.create_task(_forward(chunks, output))
        timed_out = False
        try:
            exit_code = await asyncio.wait_for(_wait(container), spec.timeout)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(_kill, container)
            exit_code = await _wait(container)
        except asyncio.CancelledError:
            # Kill first; the output stream then ends by itself, which frees the reader thread.
            await asyncio.shield(asyncio.to_thread(_kill, container))
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(asyncio.gather(reader, forwarder)), 10)
            raise
        ended = time.time()
        await reader
        await forwarder
        state = (await asyncio.to_thread(_inspect, container))["State"]
        return Outcome(exit_code, timed_out, bool(state.get("OOMKilled")), started, ended)

    async def remove_labelled(self, labels: dict[str, str]) -> int:
        """Kill and remove containers carrying all `labels`; returns how many."""
        return await asyncio.to_thread(self._remove_labelled, labels)

    def _remove_labelled(self, labels: dict[str, str]) -> int:
        filters: dict[str, str | list[str] | bool] = {"label": [f"{k}={v}" for k, v in labels.items()]}
        containers = self.client.containers.list(all=True, filters=filters)
        for container in containers:
            _remove(container)
        return len(containers)


async def _wait(container: Any) -> int:
    result = await asyncio.to_thread(container.wait)
    return int(result.get("StatusCode", -1))


def _read_output(
    stream: Any, chunks: asyncio.Queue[tuple[Stream, bytes] | None], loop: asyncio.AbstractEventLoop
) -> None:
    def put(item: tuple[Stream, bytes] | None) -> None:
        asyncio.run_coroutine_threadsafe(chunks.put(item), loop).result()

    try:
        for stdout, stderr in stream:
            if stdout:
                put((STDOUT, stdout))
            if stderr:
                put((STDERR, stderr))
    finally:
        stream.close()
        put(None)


async def _forward(chunks: asyncio.Queue[tuple[Stream, bytes] | None], output: Output) -> None:
    while (item := await chunks.get()) is not None:
        await output(*item)


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
