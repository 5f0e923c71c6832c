"""The worker daemon against a fake container runtime and the real server: cancels, time limits, dialing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

import jobwire
from bench.fake_runtime import FakeRuntime
from jobwire.server.servicers.server import ServerServicer
from jobwire.server.settings import ServerSettings
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc, server_pb2, server_pb2_grpc, workers_pb2
from jobwire.worker.daemon import UNKNOWN_GRACE, Daemon
from jobwire.worker.runtime import STDOUT, ContainerSpec, Piece, State
from jobwire.worker.settings import WorkerSettings
from tests.conftest import Stack, eventually, own_server, wait_finished

JOBS = 8
KILLED = 137


class Runtime(FakeRuntime):
    """Containers that run until killed: `wait` blocks (as the engine's does) until `kill` or `remove`.
    Records which kills were issued while the container's `wait` was still blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: dict[str, asyncio.Event] = {}
        self.waiting: set[str] = set()
        self.killed_while_waited: set[str] = set()
        self.removed: set[str] = set()

    async def create(self, spec: ContainerSpec) -> str:
        self.ended[spec.name] = asyncio.Event()
        return spec.name

    async def attach(self, container_id: str) -> AsyncGenerator[Piece, None]:
        return self._output(container_id)

    async def logs(self, container_id: str) -> AsyncGenerator[Piece, None]:
        return self._output(container_id)

    async def _output(self, container_id: str) -> AsyncGenerator[Piece, None]:
        yield STDOUT, b"running\n", ""
        await self.ended[container_id].wait()

    async def wait(self, container_id: str) -> int:
        self.waiting.add(container_id)
        try:
            await self.ended[container_id].wait()
        finally:
            self.waiting.discard(container_id)
        return KILLED

    async def inspect(self, container_id: str) -> State:
        now = time.time()
        return State("exited", now, now)

    async def kill(self, container_id: str) -> None:
        if container_id in self.waiting:
            self.killed_while_waited.add(container_id)
        self.ended[container_id].set()

    async def remove(self, container_id: str) -> None:
        self.ended[container_id].set()
        self.removed.add(container_id)


StartDaemon = Callable[..., Awaitable[Daemon]]


@pytest_asyncio.fixture(loop_scope="session")
async def start_daemon(stack: Stack, tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start a daemon on a fake runtime: `await start_daemon(queue, runtime, max_job_duration=…)`."""
    tasks: list[asyncio.Task[None]] = []

    async def start(queue: str, runtime: Runtime, max_job_duration: float = 600) -> Daemon:
        settings = WorkerSettings(
            queue=queue,
            server=stack.grpc_target,
            cpus=JOBS,
            data_directory=tmp_path / "worker",
            max_job_duration=max_job_duration,
        )
        daemon = Daemon(settings, runtime)
        tasks.append(asyncio.create_task(daemon.run()))
        await asyncio.wait_for(daemon.registered.wait(), 30)
        return daemon

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def submit_sleepers(jobs: jobs_pb2_grpc.JobServiceStub, queue: str) -> list[str]:
    """`JOBS` distinct long jobs."""
    ids = []
    for index in range(JOBS):
        definition = definition_pb2.JobDefinition(image="fake", command="sleep 300", env={"N": str(index)})
        submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
        ids.append(submitted.job_id)
    return ids


async def test_cancelling_every_running_job_kills_each_while_the_waits_block(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_daemon: StartDaemon
) -> None:
    runtime = Runtime()
    await start_daemon(queue, runtime)
    ids = await submit_sleepers(jobs, queue)

    async def all_waiting() -> bool:
        return len(runtime.waiting) == JOBS

    await eventually(all_waiting, f"{JOBS} containers running")
    for job_id in ids:
        await jobs.CancelJob(jobs_pb2.CancelJobRequest(queue=queue, job_id=job_id))
    finished = [await wait_finished(jobs, job_id, timeout=30, queue=queue) for job_id in ids]
    assert {job.result.reason for job in finished} == {jobs_pb2.FINISH_REASON_CANCELLED}
    assert len(runtime.killed_while_waited) == JOBS
    assert runtime.removed == set(runtime.ended)


async def test_a_time_limit_kills_every_job_that_reaches_it(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_daemon: StartDaemon
) -> None:
    runtime = Runtime()
    await start_daemon(queue, runtime, max_job_duration=0.5)
    ids = await submit_sleepers(jobs, queue)
    finished = [await wait_finished(jobs, job_id, timeout=30, queue=queue) for job_id in ids]
    assert {job.result.reason for job in finished} == {jobs_pb2.FINISH_REASON_TIMED_OUT}
    assert {job.result.exit_code for job in finished} == {KILLED}
    assert len(runtime.killed_while_waited) == JOBS
    assert runtime.removed == set(runtime.ended)


async def test_the_worker_obeys_the_limits_the_server_gives_at_registration(
    queue: str, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(queue, Runtime())
    assert (await daemon.server()).inline_limit == ServerSettings().inline_limit > 0  # the stack's default


@pytest.mark.parametrize(("server", "tls"), [("https://localhost:{port}", False), ("localhost:{port}", True)])
async def test_the_worker_dials_tls_with_the_given_ca_file(
    key_pair: tuple[bytes, bytes], tmp_path: Path, server: str, tls: bool
) -> None:
    listening = grpc.aio.server()
    server_pb2_grpc.add_ServerServiceServicer_to_server(ServerServicer(None, ServerSettings()), listening)  # type: ignore[arg-type]
    port = listening.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([key_pair]))
    await listening.start()
    (tmp_path / "ca.pem").write_bytes(key_pair[1])
    try:
        for ca_file, works in ((tmp_path / "ca.pem", True), (None, False)):
            settings = WorkerSettings(queue="q", server=server.format(port=port), tls=tls, ca_file=ca_file)
            async with Daemon(settings, Runtime()).channel() as channel:
                info = server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(server_pb2.GetServerInfoRequest())
                if works:
                    assert (await info).version == jobwire.__version__
                else:  # the system's roots do not trust a self-signed certificate
                    with pytest.raises(grpc.aio.AioRpcError):
                        await info
    finally:
        await listening.stop(None)


def test_reconnect_pauses_stay_within_a_quarter_of_the_servers_grace(tmp_path: Path) -> None:
    """Before the first registration a safe default bounds them; after it, the grace the server said.
    Whatever the outage, the worker tries several times within the grace, so it is back before its
    jobs are re-queued."""
    daemon = Daemon(WorkerSettings(queue="q", data_directory=tmp_path), Runtime())
    delays = daemon._reconnect_delays()
    before = [next(delays) for _ in range(20)]
    assert max(before) <= UNKNOWN_GRACE / 4 and before[0] <= 0.5
    daemon.answer.lease_duration.FromSeconds(8)  # a server with --worker-grace 8s
    after = [next(delays) for _ in range(20)]
    assert max(after) <= 2 and min(after) >= 0.5  # jitter: half to all of the pause
    daemon.answer.lease_duration.FromSeconds(600)
    assert 15 < max(next(delays) for _ in range(40)) <= 30  # a long grace: they grow, to 30 s at most


async def test_a_container_that_ends_at_once_has_its_start_reported_with_its_result(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_daemon: StartDaemon
) -> None:
    """One message for the start and the result of a short job; the history still says both, in order."""
    runtime = FakeRuntime()
    daemon = await start_daemon(queue, runtime)
    sent: list[workers_pb2.ConnectRequest] = []
    put = daemon.outbox.put

    async def spy(message: workers_pb2.ConnectRequest) -> None:
        sent.append(message)
        await put(message)

    daemon.outbox.put = spy  # type: ignore[method-assign]
    definition = definition_pb2.JobDefinition(image="fake", command="echo at once")
    submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
    job = await wait_finished(jobs, submitted.job_id, timeout=30, queue=queue)
    assert job.result.reason == jobs_pb2.FINISH_REASON_SUCCESS
    kinds = [event.kind for event in job.history]
    started, finished = kinds.index(jobs_pb2.JOB_EVENT_KIND_STARTED), kinds.index(jobs_pb2.JOB_EVENT_KIND_FINISHED)
    assert started < finished
    assert not [message for message in sent if message.HasField("started")]
    (result,) = [message for message in sent if message.HasField("finished")]
    assert result.finished.started.job_id == submitted.job_id


async def test_the_server_names_its_offered_queue_only_while_a_worker_serves_it(tmp_path: Path) -> None:
    settings = ServerSettings(data_directory=tmp_path / "server", host="127.0.0.1", port=0, offered_queue="local")
    async with own_server(settings) as target, grpc.aio.insecure_channel(target) as channel:
        server = server_pb2_grpc.ServerServiceStub(channel)
        assert (await server.GetServerInfo(server_pb2.GetServerInfoRequest())).offered_queue == ""
        worker = WorkerSettings(queue="local", server=target, cpus=1, data_directory=tmp_path / "worker")
        daemon = Daemon(worker, FakeRuntime())
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.registered.wait(), 30)
            assert (await server.GetServerInfo(server_pb2.GetServerInfoRequest())).offered_queue == "local"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert ServerSettings().offered_queue == ""  # a server offers no queue unless told to
