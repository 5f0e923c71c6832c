"""Shared fixtures: a real grpc.aio server on a loopback port, real Envoy in front, real workers on dockerd.

One server and one Envoy serve the whole session; each test gets its own
unguessable queue (and its own worker where it needs one), so tests stay
independent without paying for a new stack each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import grpc
import httpx
import pytest
import pytest_asyncio

from jobwire.cli.services import start_local_envoy, stop_envoy
from jobwire.server.app import Server, build_server
from jobwire.server.settings import ServerSettings
from jobwire.server.store import StateStore
from jobwire.server.store.base import Submission
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc, workers_pb2
from jobwire.worker.daemon import Daemon
from jobwire.worker.docker_runtime import DockerRuntime
from jobwire.worker.settings import WorkerSettings
from tests.services import PostgresCluster, S3Server, running_cluster

S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "jobwire-test", "AWS_SECRET_ACCESS_KEY": "jobwire-test"}
BUSYBOX = "jobwire/busybox:latest"
PYTHON = "jobwire/python:3.11"


@dataclass
class Stack:
    """The running server (and its Envoy): addresses for gRPC and REST."""

    server: Server
    grpc_target: str
    envoy_port: int
    data_directory: Path

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the real Docker engine."""
    try:
        client = docker.from_env(version="auto")
    except docker.errors.DockerException as error:
        pytest.fail(f"no Docker engine ({error}); `make docker` starts one (as `make test` does)")
    yield client
    client.close()


@pytest.fixture(scope="session")
def docker_images(docker_client: docker.DockerClient) -> None:
    """The locally built test images (`make images`); a clear failure when they are missing."""
    for image in (BUSYBOX, PYTHON):
        try:
            docker_client.images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"test image {image} missing; run `make images` (as `make test` does)")


@pytest_asyncio.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A server on a free loopback port with a short lease, and a real Envoy in front of it."""
    data = tmp_path_factory.mktemp("server")
    settings = ServerSettings(data_directory=data, host="127.0.0.1", port=0, lease_seconds=5, heartbeat_seconds=1)
    server = await build_server(settings)
    started = asyncio.Event()
    task = asyncio.create_task(server.run(started))
    await started.wait()
    envoy, envoy_port = await start_local_envoy([("127.0.0.1", server.port)], data / "envoy.yaml")
    yield Stack(server, f"127.0.0.1:{server.port}", envoy_port, data)
    await stop_envoy(envoy)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the session (`make postgres` installs Debian's PostgreSQL)."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3-compatible server for the session (and dummy credentials, which it accepts)."""
    server = S3Server(tmp_path_factory.mktemp("moto"))
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3_ENVIRONMENT.items():
            patch.setenv(name, value)
        yield server
    server.stop()


@pytest.fixture
def key_pair(tmp_path: Path) -> tuple[bytes, bytes]:
    """A self-signed certificate for `localhost` and its key."""
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=DNS:localhost", "-keyout", "key.pem", "-out", "cert.pem"]
    subprocess.run(command, cwd=tmp_path, capture_output=True, check=True)
    return (tmp_path / "key.pem").read_bytes(), (tmp_path / "cert.pem").read_bytes()


@pytest.fixture
def queue() -> str:
    """A fresh, unguessable queue name."""
    return f"q-{uuid.uuid4().hex}"


@pytest_asyncio.fixture(loop_scope="session")
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC channel straight to the server."""
    async with grpc.aio.insecure_channel(stack.grpc_target) as opened:
        yield opened


@pytest_asyncio.fixture(loop_scope="session")
async def jobs(channel: grpc.aio.Channel) -> jobs_pb2_grpc.JobServiceStub:
    """The JobService stub."""
    return jobs_pb2_grpc.JobServiceStub(channel)


@pytest_asyncio.fixture(loop_scope="session")
async def rest(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the REST routes through Envoy."""
    async with httpx.AsyncClient(base_url=stack.rest, timeout=30) as client:
        yield client


@dataclass
class WorkerHandle:
    """A running worker daemon and its task."""

    daemon: Daemon
    runtime: DockerRuntime
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.runtime.close()


@pytest_asyncio.fixture(loop_scope="session")
async def start_worker(stack: Stack, docker_images: None, tmp_path: Path) -> AsyncIterator[object]:
    """Start workers on a queue: `await start_worker(queue, cpus=2)`; all are stopped after the test."""
    handles: list[WorkerHandle] = []

    async def start(
        queue: str,
        *,
        cpus: int = 2,
        max_job_duration: float = 600,
        target: str = "",
        gpus: tuple[str, ...] = (),
        egress_allow: tuple[str, ...] = (),
        data_directory: Path | None = None,
    ) -> WorkerHandle:
        settings = WorkerSettings(
            queue=queue,
            server=target or stack.grpc_target,
            cpus=cpus,
            gpus=gpus,
            data_directory=data_directory or tmp_path / f"worker-{len(handles)}",
            max_job_duration=max_job_duration,
            egress_allow=egress_allow,
        )
        runtime = DockerRuntime.from_env(cpus)
        daemon = Daemon(settings, runtime)
        handle = WorkerHandle(daemon, runtime, asyncio.create_task(daemon.run()))
        handles.append(handle)
        await asyncio.wait_for(daemon.registered.wait(), 30)
        return handle

    yield start
    for handle in handles:
        await handle.stop()


async def wait_finished(
    jobs: jobs_pb2_grpc.JobServiceStub, job_id: str, timeout: float = 60, queue: str = ""
) -> jobs_pb2.Job:
    """Follow the job (its run in `queue`, if given) until it finishes; returns it with its result."""

    async def follow() -> None:
        async for _ in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, queue=queue)):
            pass

    await asyncio.wait_for(follow(), timeout)
    return (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id, queue=queue))).job


class WorkerStream:
    """A hand-driven worker stream; the server's messages are read one at a time, batches taken apart."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        self.call, self.unread = call, list[workers_pb2.ConnectResponse]()

    async def write(self, message: workers_pb2.ConnectRequest) -> None:
        await self.call.write(message)

    async def read(self) -> workers_pb2.ConnectResponse:
        if not self.unread:
            message = await self.call.read()
            assert isinstance(message, workers_pb2.ConnectResponse)
            self.unread += message.batch.messages if message.HasField("batch") else [message]
        return self.unread.pop(0)


JOBWIRE = str(Path(sys.executable).parent / "jobwire")
StartWorker = Callable[..., Awaitable[WorkerHandle]]


@dataclass
class Process:
    """A `jobwire` subprocess whose output goes to a file."""

    args: list[str]
    log: Path
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                JOBWIRE, *self.args, stdout=out, stderr=out, cwd=self.log.parent, start_new_session=True
            )

    async def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def terminate(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Processes:
    """Spawns workers and servers; kills what is left and removes their containers after the test."""

    directory: Path
    docker_client: docker.DockerClient
    started: list[Process] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)

    async def worker(
        self, queue: str, target: str, *, worker_id: str = "", cpus: int = 1, extra: tuple[str, ...] = ()
    ) -> Process:
        worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}"
        data = self.directory / worker_id
        data.mkdir(exist_ok=True)
        args = ["worker", queue, "--server", target, "--id", worker_id, "-d", str(data), "--cpus", str(cpus), *extra]
        process = Process(args, data / "worker.log")
        self.worker_ids.append(worker_id)
        return await self._start(process)

    async def server(self, port: int, data: Path, *, extra: tuple[str, ...] = ()) -> Process:
        data.mkdir(exist_ok=True)
        args = ["server", "--host", "127.0.0.1", "--port", str(port), "--data-directory", str(data)]
        return await self._start(Process([*args, "--worker-grace", "15s", *extra], data / "server.log"))

    async def _start(self, process: Process) -> Process:
        await process.start()
        self.started.append(process)
        return process

    async def close(self) -> None:
        for process in self.started:
            await process.kill()
        for worker_id in self.worker_ids:
            for container in self.docker_client.containers.list(
                all=True, sparse=True, filters={"label": f"io.jobwire.worker={worker_id}"}
            ):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)


@pytest_asyncio.fixture(loop_scope="session")
async def processes(
    tmp_path: Path, docker_client: docker.DockerClient, docker_images: None
) -> AsyncIterator[Processes]:
    spawned = Processes(tmp_path, docker_client)
    yield spawned
    await spawned.close()


@contextlib.asynccontextmanager
async def own_server(settings: ServerSettings) -> AsyncIterator[str]:
    """A server of its own, for settings the session's server does not have; its gRPC address."""
    server = await build_server(settings)
    started = asyncio.Event()
    task = asyncio.create_task(server.run(started))
    await started.wait()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    """Poll `check` until true; fail with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def submit_one(
    store: StateStore, *, job_id: str, definition: definition_pb2.JobDefinition, queue: str, namespace: str, now: float
) -> tuple[jobs_pb2.Job, bool]:
    """`StateStore.submit` of one job: the job and whether it was (re)queued."""
    ((job, queued),) = await store.submit(queue=queue, jobs=[Submission(job_id, definition, namespace)], now=now)
    return job, queued
