"""The Docker engine behind the container-runtime seam; the only place that blocks on Docker.

Every docker-py call runs in a thread of one of three pools, by kind of call, so that no call waits
behind another kind. Each running job holds two threads for its whole life (its `wait` and the
reader of its output): those, pulls and builds take the `streams` pool, sized for every job at once.
Short calls (create, start, inspect, list) take `calls`; kills and removes take `kills`, a thread
per job, which nothing long-lived ever occupies: a time limit or a cancel is a kill that waits for
nobody. (With asyncio's one default pool, 6 threads on 2 cores, 3 jobs held it all and no kill got
through; tests/test_runtime_docker.py fails that way when the three pools are made one of 6.)

docker-py with pools, not aiodocker 0.27 (an asyncio client), measured on this 2-core machine when
quiet (load < 2; medians of 10, two rounds): a job's create, attach, start, wait, inspect and remove
of `true` took 302 and 317 ms with pools, 308 and 304 ms with aiodocker; killing 8 containers at
once while 8 jobs stream output and wait, 506 and 533 ms against 495 and 619 ms. (Under the load of
other work, 5 to 14, single runs varied 2-4x either way; a kill pool of 2 threads took 2.9 s for 8
kills, hence a thread per job.) Neither is faster beyond noise, and pools are simpler here:
docker-py is already the client of the raw attach, of the engine log with stream ids that exact log
capture and its resume need, and of builds (it tars the context); aiodocker would be a second
client and dependency for the same behaviour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import docker
import docker.errors
import requests
from docker import utils as docker_utils
from docker.api.build import process_dockerfile
from docker.models.containers import _create_container_args  # type: ignore[attr-defined]
from docker.types import DeviceRequest, LogConfig, Mount
from google.protobuf import timestamp_pb2

from jobwire.worker import docker_output
from jobwire.worker.errors import BuildError, ImageError
from jobwire.worker.runtime import LABEL, BuildSpec, ContainerSpec, Pieces, Progress, State

NETWORK = "jobwire-jobs"
CACHE_VOLUME = "jobwire-job-cache"
_CALL_THREADS = 4
_STEP = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})$", re.MULTILINE)
"""The classic builder's line naming a step's container."""
_DRAIN_SECONDS = 10
"""How long a stopped build may take to let go of its connection."""
P = ParamSpec("P")
T = TypeVar("T")


class DockerRuntime:
    """Runs containers on a Docker engine, for up to `slots` jobs at once without their calls queueing."""

    def __init__(self, client: docker.DockerClient, slots: int) -> None:
        self.client = client
        self._streams = concurrent.futures.ThreadPoolExecutor(2 * slots + 2, "docker-stream")
        self._calls = concurrent.futures.ThreadPoolExecutor(_CALL_THREADS, "docker-call")
        # A thread per job: cancelling them all at once kills them all at once.
        self._kills = concurrent.futures.ThreadPoolExecutor(max(slots, 2), "docker-kill")

    @classmethod
    def from_env(cls, slots: int) -> DockerRuntime:
        """Connect to the engine named by DOCKER_HOST (default: the local socket)."""
        # A connection per thread, so that no call waits for one either.
        connections = 2 * slots + 2 + _CALL_THREADS + max(slots, 2)
        return cls(docker.from_env(version="auto", timeout=120, max_pool_size=connections), slots)

    def close(self) -> None:
        """Let go of the engine connection and the threads (calls still running finish first)."""
        for pool in (self._kills, self._calls, self._streams):
            pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    async def _in(self, pool: concurrent.futures.Executor, call: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(call, *args, **kw))

    async def prepare(self) -> None:
        """Create the job network (no container-to-container traffic) and the shared cache volume."""
        await self._in(self._calls, self._prepare)

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

    async def has_image(self, tag: str) -> bool:
        try:
            await self._in(self._calls, self.client.images.get, tag)
        except docker.errors.ImageNotFound:
            return False
        return True

    async def ensure_image(self, image: str, progress: Progress) -> None:
        """Use the local image, else pull it (progress lines to `progress`); ImageError if neither works."""
        try:
            if await self.has_image(image):
                return
        except docker.errors.APIError as error:
            raise ImageError(f"invalid image name {image!r}: {error.explanation}") from None
        await self._in(self._streams, self._pull, image, progress)

    def _pull(self, image: str, progress: Progress) -> None:
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

    async def build(self, spec: BuildSpec, progress: Progress) -> None:
        """Build with the classic builder; cancelled, it closes the build's connection, which makes
        the engine stop the build and remove its step's container (measured: gone within 0.5 s)."""
        stream = _BuildStream()
        call = asyncio.ensure_future(self._in(self._streams, self._build, spec, progress, stream))
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            await self._in(self._kills, stream.stop)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(call, _DRAIN_SECONDS)
            raise

    def _build(self, spec: BuildSpec, progress: Progress, stream: _BuildStream) -> None:
        progress(f"building {spec.tag}\n")
        api: Any = self.client.api  # the raw response, so that a cancel can close its socket
        try:
            with (
                _context_tar(spec) as context,
                api._post(
                    api._url("/build"),
                    data=context,
                    params=_build_params(spec),
                    headers={"Content-Type": "application/tar"},
                    stream=True,
                    timeout=None,
                ) as response,
            ):
                api._raise_for_status(response)
                stream.started(api._get_raw_response_socket(response))
                for line in response.iter_lines():
                    if step := _build_event(json.loads(line) if line else {}, progress):
                        self._limit_step(step, spec.pids_limit)
        except docker.errors.APIError as error:
            raise BuildError(f"the image build failed: {error.explanation}") from None
        except requests.RequestException:
            if not stream.stopped:
                raise
            raise BuildError("the image build was stopped") from None

    def _limit_step(self, container_id: str, pids_limit: int) -> None:
        """Give a build step's container the job's pids limit, which the build API cannot set: the
        engine names the container as it starts it, so a step may fork for a few ms before."""
        api: Any = self.client.api
        with contextlib.suppress(docker.errors.APIError):  # the step ended already
            api._post_json(api._url("/containers/{0}/update", container_id), data={"PidsLimit": pids_limit})

    async def create(self, spec: ContainerSpec) -> str:
        # A future, not a task: shielding it costs no task on the way every job takes.
        made = asyncio.get_running_loop().run_in_executor(self._calls, self._create, spec)
        try:
            return await asyncio.shield(made)
        except docker.errors.APIError as error:
            raise ImageError(f"the Docker engine refused the container: {error.explanation}") from None
        except asyncio.CancelledError:
            await asyncio.shield(self._remove_once_made(made))
            raise

    async def _remove_once_made(self, made: asyncio.Future[str]) -> None:
        with contextlib.suppress(Exception):
            await self.remove(await made)

    def _create(self, spec: ContainerSpec) -> str:
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
                network=_network(spec.network),
                shm_size=spec.shm_size,
                mem_limit=spec.memory,
                memswap_limit=spec.memory,  # the limit is of memory, not memory + swap
                nano_cpus=spec.nano_cpus,
                device_requests=devices if spec.gpu_devices else None,
                cap_drop=["ALL"],
                cap_add=list(spec.capabilities) or None,
                log_config=_log_config(spec.log_size),
                storage_opt={"size": str(spec.disk_size)} if spec.disk_size else None,
                runtime=spec.engine_runtime or None,
                security_opt=["no-new-privileges"],
                pids_limit=spec.pids_limit,
                privileged=False,
                tty=False,
                stdin_open=False,
            )
        )
        return str(self.client.api.create_container(**arguments)["Id"])

    async def attach(self, container_id: str) -> Pieces:
        call = asyncio.ensure_future(self._in(self._calls, self._attach, container_id))
        try:
            attached = await asyncio.shield(call)
        except asyncio.CancelledError:  # the attach goes on in its thread: let go of it when it is made
            call.add_done_callback(_let_go)
            raise
        read = functools.partial(docker_output.read_attached, attached)
        return docker_output.Pieces(self._streams, read, functools.partial(docker_output.close_attached, attached))

    def _attach(self, container_id: str) -> tuple[Any, Any]:
        """The container's stdout and stderr from now on, as the engine's multiplexed frames."""
        api: Any = self.client.api  # the SDK's own attach inspects the container first: one call more
        url = api._url("/containers/{0}/attach", container_id)
        params = {"stdout": 1, "stderr": 1, "stream": 1}
        response = api._post(url, headers={"Connection": "Upgrade", "Upgrade": "tcp"}, params=params, stream=True)
        return response, api._get_raw_response_socket(response)

    async def logs(self, container_id: str) -> Pieces:
        read = functools.partial(docker_output.read_log, self.client, container_id)
        return docker_output.Pieces(self._streams, read, lambda: None)  # ends when the container does

    async def start(self, container_id: str) -> None:
        try:
            await self._in(self._calls, self.client.api.start, container_id)
        except docker.errors.APIError as error:
            raise ImageError(f"the Docker engine could not start the container: {error.explanation}") from None

    async def wait(self, container_id: str) -> int:
        result = await self._in(self._streams, self.client.api.wait, container_id)
        return int(result.get("StatusCode", -1))

    async def inspect(self, container_id: str) -> State:
        state = (await self._in(self._calls, self.client.api.inspect_container, container_id))["State"]
        started, finished = _docker_time(state["StartedAt"]), _docker_time(state["FinishedAt"])
        return State(state["Status"], started, finished, bool(state.get("OOMKilled")))

    async def kill(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.APIError):  # it ended already
            await self._in(self._kills, self.client.api.kill, container_id)

    async def remove(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await self._in(self._kills, self.client.api.remove_container, container_id, force=True)

    async def ours(self, labels: dict[str, str]) -> list[dict[str, str]]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        # The raw listing: no inspect per container, so one removed meanwhile cannot fail it.
        listed = await self._in(self._calls, self.client.api.containers, all=True, filters=filters)
        return [{**(container.get("Labels") or {}), "id": str(container["Id"])} for container in listed]


def _let_go(attach: asyncio.Future[tuple[Any, Any]]) -> None:
    """Close an attach nobody waits for any more, once it is made."""
    if not attach.cancelled() and attach.exception() is None:
        docker_output.close_attached(attach.result())


def _docker_time(text: str) -> float:
    """Seconds since the epoch of an engine timestamp (RFC 3339 with nanoseconds; 0 for the zero time)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return max(stamp.seconds + stamp.nanos / 1e9, 0.0)


def _progress_line(event: dict[str, Any]) -> str:
    parts = [event.get("id", ""), event.get("status", ""), event.get("progress", "")]
    return " ".join(p for p in parts if p).rstrip() + "\n"


class _BuildStream:
    """A build's connection, which `stop` closes from another thread, before or after it is made."""

    def __init__(self) -> None:
        self._lock, self.stopped = threading.Lock(), False
        self._socket: socket.socket | None = None

    def started(self, raw: Any) -> None:
        with self._lock:
            self._socket = getattr(raw, "_sock", raw)
        if self.stopped:
            self.stop()

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _context_tar(spec: BuildSpec) -> Iterator[Any]:
    """The context folder as a tar, without what its `.dockerignore` names (as `docker build`)."""
    ignore = spec.root / ".dockerignore"
    exclude = None
    if ignore.is_file():
        lines = (line.strip() for line in ignore.read_text().splitlines())
        exclude = [line for line in lines if line and not line.startswith("#")]
    # (its name, and its text when it lies outside the folder: never here, builds.py checks)
    dockerfile = process_dockerfile(spec.dockerfile, str(spec.root))
    context = docker_utils.tar(spec.root, exclude=exclude, dockerfile=dockerfile)
    try:
        yield context
    finally:
        context.close()


def _network(name: str) -> str:
    """The engine's network for a spec's: the job network, or Docker's `none` (a loopback device only)."""
    return "none" if name == "none" else NETWORK


def _build_params(spec: BuildSpec) -> dict[str, Any]:
    """The build's query: its image, and each step's container in the job network within the limits."""
    params: dict[str, Any] = {
        "t": spec.tag,
        "dockerfile": spec.dockerfile,
        "buildargs": json.dumps(spec.args),
        "rm": 1,
        "forcerm": 1,
        "networkmode": _network(spec.network),
    }
    if spec.target:
        params["target"] = spec.target
    if spec.platform:
        params["platform"] = spec.platform
    if spec.memory:
        params |= {"memory": spec.memory, "memswap": spec.memory}
    if spec.nano_cpus:
        params |= {"cpuperiod": 100_000, "cpuquota": spec.nano_cpus // 10_000}
    return params


def _build_event(event: dict[str, Any], progress: Progress) -> str:
    """Hand on a build's event; the id of the step's container when it says one is made."""
    if "error" in event:
        progress(f"{event['error'].rstrip()}\n")
        raise BuildError(f"the image build failed: {event['error'].strip()}")
    if text := event.get("stream") or event.get("status"):
        progress(text if text.endswith("\n") else text + "\n")
        if step := _STEP.match(text):
            return step[1]
    return ""


def _log_config(size: int) -> LogConfig | None:
    """The engine's own log of a container, kept to `size` bytes in two files (0: the engine's default)."""
    if not size:
        return None
    return LogConfig(type="json-file", config={"max-size": str(max(size // 2, 1024)), "max-file": "2"})
