"""The worker against a fake server that lies: it refuses what it should not act on and touches nothing.

The fake is a real grpc.aio server implementing `WorkerService.Connect`; the worker is the real daemon
on real Docker. The victim is a folder outside the worker's data directory that a path-like job id
would name (`jobs/{job_id}-{attempt}` is removed whole after an attempt).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest_asyncio

from jobwire.v1 import definition_pb2, jobs_pb2, workers_pb2, workers_pb2_grpc
from jobwire.worker.daemon import Daemon
from jobwire.worker.docker_runtime import DockerRuntime
from jobwire.worker.settings import WorkerSettings
from tests.conftest import BUSYBOX

QUEUE = "q-fake-server"
Start = Callable[[list[workers_pb2.ConnectResponse]], Awaitable["FakeServer"]]


class FakeServer(workers_pb2_grpc.WorkerServiceServicer):
    """Accepts the registration, sends `script` (the lies, then one honest assignment), and records
    every message the worker sends."""

    def __init__(self, script: list[workers_pb2.ConnectResponse]) -> None:
        self.script = script
        self.received: list[workers_pb2.ConnectRequest] = []
        self.finished: dict[str, workers_pb2.JobFinished] = {}
        self.got_finished = asyncio.Event()

    async def Connect(
        self, request_iterator: AsyncIterator[workers_pb2.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workers_pb2.ConnectResponse]:
        requests = aiter(request_iterator)
        await anext(requests)
        yield workers_pb2.ConnectResponse(registered=workers_pb2.WorkerRegistered(worker_id="w-fake", inline_limit=200))
        for message in self.script:
            yield message
        async for envelope in requests:
            for request in envelope.batch.messages if envelope.HasField("batch") else [envelope]:
                async for answer in self._receive(request):
                    yield answer

    async def _receive(self, request: workers_pb2.ConnectRequest) -> AsyncIterator[workers_pb2.ConnectResponse]:
        self.received.append(request)
        if request.HasField("finished"):
            self.finished[request.finished.job_id] = request.finished
            self.got_finished.set()
            ack = workers_pb2.AttemptRef(job_id=request.finished.job_id, attempt=request.finished.attempt)
            yield workers_pb2.ConnectResponse(finished_ack=ack)


def _definition(**inputs: str) -> definition_pb2.JobDefinition:
    definition = definition_pb2.JobDefinition(image=BUSYBOX, command="true")
    for name, text in inputs.items():
        definition.inputs[name].type = "utf8"
        definition.inputs[name].value.string_value = text
    return definition


def _assign(job_id: str, definition: definition_pb2.JobDefinition, attempt: int = 1) -> workers_pb2.ConnectResponse:
    assignment = workers_pb2.JobAssignment(job_id=job_id, attempt=attempt, definition=definition, queue=QUEUE)
    return workers_pb2.ConnectResponse(assignment=assignment)


def _id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest_asyncio.fixture(loop_scope="session")
async def fake_worker(tmp_path: Path, docker_images: None) -> AsyncIterator[tuple[Path, Start]]:
    """`(data directory, start(script) -> FakeServer)`: the worker runs until the test ends."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    fakes: list[FakeServer] = []
    servicer = _Relay(fakes)
    workers_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    await server.start()
    data = tmp_path / "home" / "worker"
    settings = WorkerSettings(queue=QUEUE, server=f"127.0.0.1:{port}", data_directory=data, worker_id="w-fake")
    runtime = DockerRuntime.from_env(1)
    daemon: Daemon | None = None
    task: asyncio.Task[None] | None = None

    async def start(script: list[workers_pb2.ConnectResponse]) -> FakeServer:
        nonlocal daemon, task
        fakes.append(FakeServer(script))
        daemon = Daemon(settings, runtime)
        task = asyncio.create_task(daemon.run())
        return fakes[-1]

    yield data, start
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    runtime.close()
    await server.stop(None)


class _Relay(workers_pb2_grpc.WorkerServiceServicer):
    def __init__(self, fakes: list[FakeServer]) -> None:
        self.fakes = fakes

    async def Connect(
        self, request_iterator: AsyncIterator[workers_pb2.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workers_pb2.ConnectResponse]:
        async for answer in self.fakes[-1].Connect(request_iterator, context):
            yield answer


async def test_a_path_like_job_id_is_refused_and_touches_nothing(fake_worker: tuple[Path, Start]) -> None:
    data, start = fake_worker
    victim = data.parent / "victim-1"  # what jobs/../../victim-1 names from the worker's data directory
    victim.mkdir(parents=True)
    (victim / "precious").write_text("keep me")
    honest = _id("honest")
    script = [
        _assign("../../victim", _definition()),
        workers_pb2.ConnectResponse(cancel=workers_pb2.JobCancel(job_id="../../victim", attempt=1, reason="lie")),
        workers_pb2.ConnectResponse(stale=workers_pb2.StaleAttempt(job_id="../../victim", attempt=1)),
        _assign(_id("attempt zero"), _definition(), attempt=0),
        _assign(honest, _definition()),
    ]
    fake: FakeServer = await start(script)
    await asyncio.wait_for(_finished(fake, honest), 60)
    assert fake.finished[honest].result.reason == jobs_pb2.FINISH_REASON_SUCCESS, fake.finished[honest]
    assert (victim / "precious").read_text() == "keep me"
    sent_ids = {
        getattr(request, request.WhichOneof("message")).job_id for request in fake.received if _about_job(request)
    }
    assert sent_ids == {honest}, sent_ids  # nothing started, finished or logged for the lies


async def test_an_assignment_with_escaping_names_finishes_as_refused(fake_worker: tuple[Path, Start]) -> None:
    data, start = fake_worker
    escaping = _id("escaping")
    script = [_assign(escaping, _definition(**{"../../../outside": "written by the server"}))]
    fake: FakeServer = await start(script)
    await asyncio.wait_for(_finished(fake, escaping), 60)
    result = fake.finished[escaping].result
    assert result.reason == jobs_pb2.FINISH_REASON_ERROR and "refused this assignment" in result.message, result
    assert "invalid file name" in result.message
    assert not (data / "outside").exists() and not (data.parent / "outside").exists()
    assert not any(request.HasField("started") for request in fake.received)


async def test_an_assignment_of_another_queue_is_refused(fake_worker: tuple[Path, Start]) -> None:
    _, start = fake_worker
    other = _id("other queue")
    message = _assign(other, _definition())
    message.assignment.queue = "someone-else"
    fake: FakeServer = await start([message])
    await asyncio.wait_for(_finished(fake, other), 60)
    assert "not of the queue this worker serves" in fake.finished[other].result.message
    assert not any(request.HasField("started") for request in fake.received)


def _about_job(request: workers_pb2.ConnectRequest) -> bool:
    return request.WhichOneof("message") in ("started", "finished", "released", "logs")


async def _finished(fake: FakeServer, job_id: str) -> None:
    while job_id not in fake.finished:
        fake.got_finished.clear()
        await fake.got_finished.wait()
