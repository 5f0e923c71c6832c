"""Workers and servers that fail: kill -9, cut streams, stale attempts, limits — real processes and dockerd.

Workers here are separate `jobwire worker` processes (so `kill -9` is real) unless a test needs to
look inside one; the session server has a 5 s grace period (`lease_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from pathlib import Path

import docker
import grpc
import httpx
import pytest
from google.protobuf import json_format

from jobwire.cli.services import free_port
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc, workers_pb2, workers_pb2_grpc
from jobwire.worker.docker_output import _Seen
from tests.conftest import (
    BUSYBOX,
    PYTHON,
    Processes,
    Stack,
    StartWorker,
    WorkerStream,
    eventually,
    wait_finished,
)

SECRET = "the-hand-driven-workers-secret"
"""What the hand-driven streams below prove their ids with (see `jobwire.server.trust`)."""

pytestmark = pytest.mark.docker


def definition(**fields: object) -> definition_pb2.JobDefinition:
    return json_format.ParseDict(fields, definition_pb2.JobDefinition())


async def workers_of(jobs: jobs_pb2_grpc.JobServiceStub, queue: str) -> set[str]:
    status = await jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue=queue))
    return {worker.id for worker in status.workers}


async def get(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> jobs_pb2.Job:
    return (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))).job


def kinds(job: jobs_pb2.Job, kind: int) -> list[jobs_pb2.JobEvent]:
    return [event for event in job.history if event.kind == kind]


def log_text(job: jobs_pb2.Job) -> str:
    return "".join(chunk.text for chunk in job.result.logs)


async def test_worker_killed_mid_job_is_replaced_after_the_grace_period(
    stack: Stack, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, processes: Processes
) -> None:
    lost = await processes.worker(queue, stack.grpc_target)
    await eventually(lambda: _has_workers(jobs, queue, 1), "the first worker")
    # Long enough that the dead worker's container still runs when the job's second attempt starts.
    command = f"sh -c 'echo {queue}; sleep 9; echo done'"
    job_id = (
        await jobs.SubmitJob(
            jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
        )
    ).job_id
    await eventually(lambda: _started(jobs, job_id), "the job to start on the first worker")
    await lost.kill()
    rescuer = await processes.worker(queue, stack.grpc_target)
    job = await wait_finished(jobs, job_id, timeout=60)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert log_text(job) == f"{queue}\ndone\n"
    assert job.result.attempt == 2
    assigned = kinds(job, jobs_pb2.JOB_EVENT_KIND_ASSIGNED)
    assert [(event.attempt, event.worker_id) for event in assigned] == [
        (1, processes.worker_ids[0]),
        (2, processes.worker_ids[1]),
    ]
    (requeued,) = kinds(job, jobs_pb2.JOB_EVENT_KIND_REQUEUED)
    assert "worker-lost" in requeued.message and requeued.attempt == 1
    assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_FINISHED)) == 1
    assert rescuer.process is not None and rescuer.process.returncode is None
    # The rescuer removed the container the dead worker left (else it would stay, exited, for good).
    left = docker.from_env().containers.list(all=True, filters={"label": f"io.jobwire.job={job_id}"})
    assert left == [], [(container.labels, container.status) for container in left]


async def _has_workers(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, count: int) -> bool:
    return len(await workers_of(jobs, queue)) >= count


async def _started(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> bool:
    return bool(kinds(await get(jobs, job_id), jobs_pb2.JOB_EVENT_KIND_STARTED))


async def test_worker_restarted_mid_job_goes_on_with_the_log_where_the_server_has_it(
    stack: Stack, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, processes: Processes
) -> None:
    """Killed (-9) after some output was stored and restarted (same id): the rest of the output follows,
    once, read again from the engine's log; stdout and stderr each skip what the server has."""
    worker = await processes.worker(queue, stack.grpc_target)
    command = "sh -c 'echo one; echo uno >&2; sleep 4; echo two; echo dos >&2'"
    request = jobs_pb2.SubmitJobRequest(
        queue=queue, definition=definition(image=BUSYBOX, command=command, env={"Q": queue})
    )
    job_id = (await jobs.SubmitJob(request)).job_id

    async def stored(text: str) -> bool:
        response = await jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job_id))
        return sorted("".join(chunk.text for chunk in response.chunks).split()) == sorted(text.split())

    await eventually(lambda: stored("one uno"), "the first output to be stored")
    await worker.kill()
    await worker.start()
    job = await wait_finished(jobs, job_id, timeout=60)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert job.result.attempt == 1
    by_stream = {
        stream: "".join(chunk.text for chunk in job.result.logs if chunk.stream == stream)
        for stream in (jobs_pb2.LOG_STREAM_STDOUT, jobs_pb2.LOG_STREAM_STDERR)
    }
    assert by_stream == {jobs_pb2.LOG_STREAM_STDOUT: "one\ntwo\n", jobs_pb2.LOG_STREAM_STDERR: "uno\ndos\n"}


def test_reading_a_log_again_hands_on_only_what_the_first_read_missed() -> None:
    """The engine may write an entry of stdout after a later one of stderr, so a second read starts a
    little before the latest entry seen and skips what was handed on (repeats of a time included)."""
    seen = _Seen()
    out, err = jobs_pb2.LOG_STREAM_STDOUT, jobs_pb2.LOG_STREAM_STDERR
    for entry in (((99, 0), out), ((103, 1), out), ((103, 1), out), ((104, 0), err)):  # the first read
        seen.add(entry)
    assert seen.since() == "102.000000000"  # entries before it are not read again
    again = [((103, 1), out), ((103, 1), out), ((103, 1), out), ((103, 9), out), ((104, 0), err)]
    assert [entry for entry in again if not seen.take(entry)] == [((103, 1), out), ((103, 9), out)]


class CuttableProxy:
    """A TCP proxy whose live connections can be cut at once (new ones are accepted as usual)."""

    def __init__(self, upstream: str) -> None:
        self.host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def cut(self) -> int:
        cut = len(self.links)
        for writer in list(self.links):
            writer.transport.abort()
        return cut

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        self.links |= {writer, up_writer}
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(reader, up_writer))
                group.create_task(_pipe(up_reader, writer))
        except* (ConnectionError, OSError):
            pass
        finally:
            for end in (writer, up_writer):
                self.links.discard(end)
                end.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.transport.abort()


async def test_stream_cut_shorter_than_the_grace_period_keeps_the_job_running(
    stack: Stack,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
    docker_client: docker.DockerClient,
) -> None:
    proxy = CuttableProxy(stack.grpc_target)
    try:
        handle = await start_worker(queue, target=await proxy.start())
        command = f"sh -c 'echo {queue}; sleep 3; echo done'"
        request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
        job_id = (await jobs.SubmitJob(request)).job_id
        await eventually(lambda: _started(jobs, job_id), "the job to start")
        (container,) = docker_client.containers.list(sparse=True, filters={"label": f"io.jobwire.job={job_id}"})
        handle.daemon.registered.clear()
        assert proxy.cut() > 0
        await asyncio.wait_for(handle.daemon.registered.wait(), 10)  # reconnected and re-registered
        (same,) = docker_client.containers.list(sparse=True, filters={"label": f"io.jobwire.job={job_id}"})
        assert same.id == container.id  # the container was never restarted or re-created
        job = await wait_finished(jobs, job_id)
    finally:
        await proxy.close()
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert log_text(job) == f"{queue}\ndone\n"
    assert (job.result.attempt, job.result.worker_id) == (1, handle.daemon.worker_id)
    assert kinds(job, jobs_pb2.JOB_EVENT_KIND_REQUEUED) == []
    assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_STARTED)) == 1
    assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_FINISHED)) == 1
    assert docker_client.containers.list(all=True, sparse=True, filters={"label": f"io.jobwire.job={job_id}"}) == []


async def test_server_killed_with_jobs_queued_and_running_finishes_each_once(
    tmp_path: Path, queue: str, processes: Processes
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    data = tmp_path / "server"
    server = await processes.server(port, data)
    async with grpc.aio.insecure_channel(target) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        await eventually(lambda: _serving(jobs, queue), "the server", timeout=30)
        await processes.worker(queue, target, cpus=2)
        await eventually(lambda: _has_workers(jobs, queue, 1), "the worker")
        ids = []
        for n in range(4):
            command = f"sh -c 'echo {queue}-{n}; sleep 2; echo done'"
            request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
            ids.append((await jobs.SubmitJob(request)).job_id)
        await eventually(lambda: _count_started(jobs, ids, 2), "two jobs to start")
        await server.kill()
        await asyncio.sleep(1)
        await server.start()
        await eventually(lambda: _all_finished(jobs, ids), "every job to finish after the restart", timeout=90)
        for n, job_id in enumerate(ids):
            job = await get(jobs, job_id)
            assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
            assert log_text(job) == f"{queue}-{n}\ndone\n"
            assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_FINISHED)) == 1
            assert kinds(job, jobs_pb2.JOB_EVENT_KIND_REQUEUED) == [], "a running job lost its worker"


async def _serving(jobs: jobs_pb2_grpc.JobServiceStub, queue: str) -> bool:
    try:
        await jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue=queue), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return True


async def _count_started(jobs: jobs_pb2_grpc.JobServiceStub, ids: list[str], count: int) -> bool:
    return sum([await _started(jobs, job_id) for job_id in ids]) >= count


async def _all_finished(jobs: jobs_pb2_grpc.JobServiceStub, ids: list[str]) -> bool:
    try:
        states = [(await get(jobs, job_id)).state for job_id in ids]
    except grpc.aio.AioRpcError:
        return False  # the server is still coming back
    return all(state == jobs_pb2.JOB_STATE_FINISHED for state in states)


async def test_a_stale_attempts_result_is_rejected_and_the_newer_one_stands(
    channel: grpc.aio.Channel,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two hand-driven worker streams: the first holds attempt 1 and goes silent past the grace period."""
    stub = workers_pb2_grpc.WorkerServiceStub(channel)
    first = WorkerStream(stub.Connect())
    await first.write(
        workers_pb2.ConnectRequest(
            register=workers_pb2.RegisterWorker(worker_id="w-old", queue=queue, cpus=1, secret=SECRET)
        )
    )
    assert (await first.read()).HasField("registered")
    request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=f"echo {queue}"))
    job_id = (await jobs.SubmitJob(request)).job_id
    old = await first.read()
    assert (old.assignment.job_id, old.assignment.attempt) == (job_id, 1)
    await eventually(lambda: _requeued(jobs, job_id), "the silent worker's job to be re-queued", timeout=30)

    second = WorkerStream(stub.Connect())
    await second.write(
        workers_pb2.ConnectRequest(
            register=workers_pb2.RegisterWorker(worker_id="w-new", queue=queue, cpus=1, secret=SECRET)
        )
    )
    assert (await second.read()).HasField("registered")
    new = await second.read()
    assert (new.assignment.job_id, new.assignment.attempt) == (job_id, 2)

    with caplog.at_level(logging.WARNING, logger="jobwire.server.scheduler"):
        stale_result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS, exit_code=7)
        await first.write(
            workers_pb2.ConnectRequest(finished=workers_pb2.JobFinished(job_id=job_id, attempt=1, result=stale_result))
        )
        replies = [await first.read(), await first.read()]
    assert {reply.WhichOneof("message") for reply in replies} == {"stale", "finished_ack"}
    assert any("stale attempt 1" in record.getMessage() for record in caplog.records)
    assert (await get(jobs, job_id)).state == jobs_pb2.JOB_STATE_RUNNING

    result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS, exit_code=0)
    await second.write(
        workers_pb2.ConnectRequest(finished=workers_pb2.JobFinished(job_id=job_id, attempt=2, result=result))
    )
    assert (await second.read()).HasField("finished_ack")
    job = await get(jobs, job_id)
    assert (job.state, job.result.attempt, job.result.exit_code, job.result.worker_id) == (
        jobs_pb2.JOB_STATE_FINISHED,
        2,
        0,
        "w-new",
    )
    for stream in (first, second):
        stream.call.cancel()


async def _requeued(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> bool:
    return bool(kinds(await get(jobs, job_id), jobs_pb2.JOB_EVENT_KIND_REQUEUED))


async def test_memory_hog_is_reported_out_of_memory(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    hog = definition(
        image=PYTHON,
        command="python3 -c 'b = bytearray(b\"x\") * (512 * 1024 * 1024); print(len(b))'",
        requirements={"memory": "64m"},
        env={"Q": queue},
    )
    job = await wait_finished(
        jobs, (await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=hog))).job_id
    )
    assert job.result.oom_killed, job.result
    assert job.result.exit_code == 137
    assert "out of memory" in job.result.message and "64" in job.result.message


@pytest.mark.timeout(480)
async def test_jobs_survive_random_worker_kills_and_restarts(
    stack: Stack, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, processes: Processes
) -> None:
    """200 jobs over 3 workers, each killed with -9 and restarted (same id) at random: each finishes once."""
    count = 200
    workers = [await processes.worker(queue, stack.grpc_target, cpus=2) for _ in range(3)]
    ids = []
    for n in range(count):
        command = f"sh -c 'echo {n}; echo {n}-end'"
        request = jobs_pb2.SubmitJobRequest(
            queue=queue, definition=definition(image=BUSYBOX, command=command, env={"Q": queue})
        )
        ids.append((await jobs.SubmitJob(request)).job_id)

    async def chaos() -> None:
        chaos_random = random.Random(os.getpid())
        while True:
            await asyncio.sleep(chaos_random.uniform(2.0, 5.0))
            victim = chaos_random.choice(workers)
            await victim.kill()
            await asyncio.sleep(chaos_random.uniform(0.0, 1.0))
            await victim.start()  # same id, same data directory: it re-attaches to its containers

    began = asyncio.get_running_loop().time()
    monkey = asyncio.create_task(chaos())
    try:
        await eventually(lambda: _all_finished(jobs, ids), f"all {count} jobs to finish", timeout=420)
        print("chaos finished after", asyncio.get_running_loop().time() - began)
    finally:
        monkey.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monkey
    for n, job_id in enumerate(ids):
        job = await get(jobs, job_id)
        assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, (n, job.result.message)
        assert log_text(job) == f"{n}\n{n}-end\n", (n, [(e.kind, e.message) for e in job.history])
        assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_FINISHED)) == 1


async def test_namespaces_one_live_job_each_and_scoped_cancel(
    rest: httpx.AsyncClient,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
    docker_client: docker.DockerClient,
) -> None:
    await start_worker(queue, cpus=2)

    async def submit(command: str, namespace: str) -> str:
        body = {"definition": {"image": BUSYBOX, "command": command}, "control": {"namespace": namespace}}
        response = await rest.post(f"/q/{queue}", json=body)
        assert response.status_code == 200, response.text
        job_id: str = response.json()["jobId"]
        return job_id

    older = await submit(f"sh -c 'echo {queue}; sleep 600'", "editor")
    await eventually(lambda: _started(jobs, older), "the first job to start")
    newer = await submit(f"sh -c 'echo {queue}-2; sleep 600'", "editor")
    replaced = await wait_finished(jobs, older)
    assert replaced.finish_reason == jobs_pb2.FINISH_REASON_REPLACED_BY_CLIENT
    await eventually(lambda: _gone(docker_client, older), "the replaced job's container to go")

    # `newer` is also held by a second namespace: cancelling for one namespace leaves it running.
    assert await submit(f"sh -c 'echo {queue}-2; sleep 600'", "viewer") == newer
    response = await rest.post(f"/q/{queue}/j/{newer}/cancel", params={"namespace": "editor"})
    assert response.status_code == 200, response.text
    assert (await get(jobs, newer)).state != jobs_pb2.JOB_STATE_FINISHED
    response = await rest.post(f"/q/{queue}/j/{newer}/cancel", params={"namespace": "*"})
    assert response.status_code == 200, response.text
    assert (await wait_finished(jobs, newer)).finish_reason == jobs_pb2.FINISH_REASON_CANCELLED
    await eventually(lambda: _gone(docker_client, newer), "the cancelled job's container to go")


async def _gone(docker_client: docker.DockerClient, job_id: str) -> bool:
    filters = {"label": f"io.jobwire.job={job_id}"}
    return not await asyncio.to_thread(docker_client.containers.list, all=True, sparse=True, filters=filters)


async def test_sigterm_drains_finishing_short_jobs_and_handing_back_long_ones(
    stack: Stack,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    processes: Processes,
    docker_client: docker.DockerClient,
) -> None:
    worker = await processes.worker(queue, stack.grpc_target, cpus=2, extra=("--drain-timeout", "4s"))
    ids = []
    for command in (f"sh -c 'sleep 2; echo {queue}'", f"sh -c 'echo {queue}; sleep 600'"):
        request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
        ids.append((await jobs.SubmitJob(request)).job_id)
    short, long = ids
    await eventually(lambda: _count_started(jobs, ids, 2), "both jobs to start")
    assert await worker.terminate() == 0
    finished = await get(jobs, short)
    assert finished.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS
    assert log_text(finished) == f"{queue}\n"
    handed_back = await get(jobs, long)
    assert handed_back.state == jobs_pb2.JOB_STATE_QUEUED
    (requeued,) = kinds(handed_back, jobs_pb2.JOB_EVENT_KIND_REQUEUED)
    assert "shutting down" in requeued.message
    assert await _gone(docker_client, long)
    assert "draining" in worker.output()


async def test_gpu_jobs_wait_for_a_worker_with_gpus_without_blocking_the_queue(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)  # offers no GPUs
    gpu_body = {"definition": {"image": BUSYBOX, "command": "nvidia-smi", "requirements": {"gpus": 1}}}
    submitted = (await rest.post(f"/q/{queue}", json=gpu_body)).json()
    assert "needs 1 GPU(s) but no worker" in submitted["job"]["waitingReason"]  # in the submit's answer too
    gpu_job = submitted["jobId"]
    cpu_body = {"definition": {"image": BUSYBOX, "command": f"echo {queue}"}}
    cpu_job = (await rest.post(f"/q/{queue}", json=cpu_body)).json()["jobId"]
    assert log_text(await wait_finished(jobs, cpu_job)) == f"{queue}\n"
    waiting = (await rest.get(f"/q/{queue}/j/{gpu_job}")).json()["job"]  # a waiting reason names the queue
    assert waiting["state"] == "JOB_STATE_QUEUED"
    assert "needs 1 GPU(s) but no worker" in waiting["waitingReason"]
    assert "--gpus 1" in waiting["waitingReason"]


async def test_a_chatty_job_does_not_cost_its_worker_the_lease(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    """50,000 one-line log entries on the 5 s test grace period: heartbeats still get through."""
    await start_worker(queue)
    command = f"sh -c 'seq 1 50000; echo {queue}'"
    submitted = await jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
    )
    job = await wait_finished(jobs, submitted.job_id, timeout=110)
    assert kinds(job, jobs_pb2.JOB_EVENT_KIND_REQUEUED) == []
    assert job.result.attempt == 1
    response = await jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job.id, kind=jobs_pb2.LOG_KIND_RUN))
    text = "".join(chunk.text for chunk in response.chunks)
    assert text.startswith("1\n2\n3\n") and response.slice_start == 0
