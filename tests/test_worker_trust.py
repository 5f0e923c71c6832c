"""Who may work a queue, and workers that prove who they are: attackers as hand-driven worker streams
(raw `WorkerService.Connect`) against the real server, and real worker daemons on dockerd."""

from __future__ import annotations

import asyncio
import logging
import stat
import uuid
from pathlib import Path

import grpc
import pytest

from jobwire.server.settings import ServerSettings
from jobwire.v1 import (
    definition_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    queues_pb2,
    queues_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
)
from jobwire.worker.daemon import Daemon
from jobwire.worker.docker_runtime import DockerRuntime
from jobwire.worker.errors import Refused
from jobwire.worker.settings import WorkerSettings
from tests.conftest import (
    BUSYBOX,
    Processes,
    Stack,
    StartWorker,
    WorkerStream,
    eventually,
    own_server,
    wait_finished,
)

pytestmark = pytest.mark.docker


def _secret() -> str:
    return uuid.uuid4().hex


def _id() -> str:
    return f"w-{uuid.uuid4().hex[:12]}"


async def _connect(
    channel: grpc.aio.Channel, queue: str, *, worker_id: str = "", secret: str = "", credential: str = "", cpus: int = 1
) -> WorkerStream:
    """A stream that sent its registration (nothing read yet)."""
    stream = WorkerStream(workers_pb2_grpc.WorkerServiceStub(channel).Connect())
    register = workers_pb2.RegisterWorker(
        worker_id=worker_id or _id(), queue=queue, cpus=cpus, secret=secret, credential=credential
    )
    await stream.write(workers_pb2.ConnectRequest(register=register))
    return stream


async def _refusal(stream: WorkerStream) -> grpc.aio.AioRpcError:
    """The error that ends a refused stream (fails if the server sent it anything instead)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.read()
    return refused.value


async def _registered(channel: grpc.aio.Channel, queue: str, **fields: str) -> WorkerStream:
    stream = await _connect(channel, queue, secret=fields.pop("secret", _secret()), **fields)
    assert (await stream.read()).HasField("registered")
    return stream


async def _create_queue(channel: grpc.aio.Channel) -> queues_pb2.CreateQueueResponse:
    return await queues_pb2_grpc.QueueServiceStub(channel).CreateQueue(queues_pb2.CreateQueueRequest())


async def _submit(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, command: str) -> str:
    definition = definition_pb2.JobDefinition(image=BUSYBOX, command=command, env={"TOKEN": f"secret-of-{command}"})
    return (await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))).job_id


async def _get(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> jobs_pb2.Job:
    return (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))).job


def _finished(job_id: str, attempt: int, exit_code: int) -> workers_pb2.ConnectRequest:
    result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS, exit_code=exit_code)
    return workers_pb2.ConnectRequest(finished=workers_pb2.JobFinished(job_id=job_id, attempt=attempt, result=result))


async def test_a_stream_without_the_queues_credential_gets_no_job_and_learns_nothing(
    channel: grpc.aio.Channel, jobs: jobs_pb2_grpc.JobServiceStub
) -> None:
    created = await _create_queue(channel)
    job_id = await _submit(jobs, created.queue, "echo waiting")
    for credential in ("", "a-guess", created.queue):
        refused = await _refusal(await _connect(channel, created.queue, secret=_secret(), credential=credential))
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "credential" in (refused.details() or "")
        assert job_id not in (refused.details() or "") and "secret-of" not in (refused.details() or "")
    assert (await _get(jobs, job_id)).state == jobs_pb2.JOB_STATE_QUEUED  # nobody took it
    honest = await _registered(channel, created.queue, credential=created.credential)
    assignment = (await honest.read()).assignment
    assert (assignment.job_id, assignment.attempt, assignment.definition.env["TOKEN"]) == (
        job_id,
        1,
        "secret-of-echo waiting",
    )
    honest.call.cancel()


async def test_a_credential_revoked_mid_run_stops_new_assignments(
    channel: grpc.aio.Channel, jobs: jobs_pb2_grpc.JobServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    created = await _create_queue(channel)
    old = await _registered(channel, created.queue, credential=created.credential, cpus=2)
    first = await _submit(jobs, created.queue, "echo first")
    assert (await old.read()).assignment.job_id == first
    queues = queues_pb2_grpc.QueueServiceStub(channel)
    request = queues_pb2.RotateQueueCredentialRequest(queue=created.queue, credential=created.credential)
    rotated = await queues.RotateQueueCredential(request)
    with caplog.at_level(logging.WARNING, logger="jobwire.server.sessions"):
        second = await _submit(jobs, created.queue, "echo second")  # wakes the old session: it has a free slot
        await eventually(lambda: _logged(caplog, "was revoked; no new jobs"), "the old session to refuse new work")
    new = await _registered(channel, created.queue, credential=rotated.credential)
    assert ((await new.read()).assignment.job_id, (await _get(jobs, second)).attempt) == (second, 1)
    await old.write(_finished(first, 1, 0))  # what it ran before the revocation still counts
    assert (await old.read()).HasField("finished_ack")
    assert (await _get(jobs, first)).result.exit_code == 0
    refused = await _refusal(await _connect(channel, created.queue, secret=_secret(), credential=created.credential))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    revoke = queues_pb2.RevokeQueueCredentialRequest(queue=created.queue, credential=rotated.credential)
    await queues.RevokeQueueCredential(revoke)
    refused = await _refusal(await _connect(channel, created.queue, secret=_secret(), credential=rotated.credential))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as again:  # a revoked credential cannot be rotated back to life
        await queues.RotateQueueCredential(
            queues_pb2.RotateQueueCredentialRequest(queue=created.queue, credential=rotated.credential)
        )
    assert again.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for stream in (old, new):
        stream.call.cancel()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def test_a_stream_cannot_change_an_attempt_another_session_holds(
    channel: grpc.aio.Channel, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    honest_id = _id()
    honest = await _registered(channel, queue, worker_id=honest_id)
    job_id = await _submit(jobs, queue, "echo honest")
    assert (await honest.read()).assignment.attempt == 1
    attacker = await _registered(channel, f"q-{uuid.uuid4().hex}")  # registered on a queue of its own
    chunk = jobs_pb2.LogChunk(text="forged\n", stream=jobs_pb2.LOG_STREAM_STDOUT)
    forgeries = [
        workers_pb2.ConnectRequest(started=workers_pb2.JobStarted(job_id=job_id, attempt=1)),
        workers_pb2.ConnectRequest(
            logs=workers_pb2.JobLogs(job_id=job_id, attempt=1, kind=jobs_pb2.LOG_KIND_RUN, chunks=[chunk])
        ),
        _finished(job_id, 1, 99),
        workers_pb2.ConnectRequest(released=workers_pb2.JobReleased(job_id=job_id, attempt=1, reason="forged")),
    ]
    with caplog.at_level(logging.WARNING, logger="jobwire.server"):
        for forgery in forgeries:
            await attacker.write(forgery)
        replies = [(await attacker.read()).WhichOneof("message") for _ in range(6)]
    assert sorted(replies) == ["finished_ack"] * 2 + ["stale"] * 4
    refusals = [record.getMessage() for record in caplog.records if job_id in record.getMessage()]
    assert len(refusals) >= 4, refusals
    job = await _get(jobs, job_id)
    assert (job.state, job.worker_id, job.attempt) == (jobs_pb2.JOB_STATE_RUNNING, honest_id, 1)
    await honest.write(_finished(job_id, 1, 0))
    assert (await honest.read()).HasField("finished_ack")
    job = await _get(jobs, job_id)
    assert (job.state, job.result.exit_code, job.result.worker_id) == (jobs_pb2.JOB_STATE_FINISHED, 0, honest_id)
    logs = await jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job_id, kind=jobs_pb2.LOG_KIND_RUN))
    assert not logs.chunks
    for stream in (honest, attacker):
        stream.call.cancel()


async def test_a_connected_workers_id_cannot_be_taken_and_its_secret_resumes_it(
    stack: Stack, channel: grpc.aio.Channel, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, processes: Processes
) -> None:
    worker = await processes.worker(queue, stack.grpc_target)
    worker_id = processes.worker_ids[-1]
    job_id = await _submit(jobs, queue, f"sh -c 'echo started {queue}; sleep 5; echo resumed'")
    await eventually(lambda: _stored(jobs, job_id), "the job to run on the real worker")
    running = workers_pb2.AttemptRef(job_id=job_id, attempt=1)
    for secret in ("", "a-guessed-secret-long-enough"):  # a second stream, a "reconnect": without the secret
        register = workers_pb2.RegisterWorker(
            worker_id=worker_id, queue=queue, cpus=1, running=[running], secret=secret
        )
        stream = WorkerStream(workers_pb2_grpc.WorkerServiceStub(channel).Connect())
        await stream.write(workers_pb2.ConnectRequest(register=register))
        assert (await _refusal(stream)).code() == grpc.StatusCode.UNAUTHENTICATED
    job = await _get(jobs, job_id)
    assert (job.state, job.worker_id, job.attempt) == (jobs_pb2.JOB_STATE_RUNNING, worker_id, 1)
    secret_file = processes.directory / worker_id / "worker-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    await worker.kill()  # kill -9, then the same worker (id and data directory: its secret) again
    await worker.start()
    job = await wait_finished(jobs, job_id)
    assert (job.finish_reason, job.result.attempt, job.result.worker_id) == (
        jobs_pb2.FINISH_REASON_SUCCESS,
        1,
        worker_id,
    )
    assert "re-attaching to job" in worker.output()
    assert "resumed" in "".join(chunk.text for chunk in job.result.logs)


async def _stored(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> bool:
    return bool((await jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job_id))).chunks)


async def test_a_worker_with_another_workers_id_stops_with_the_servers_reason(
    stack: Stack, queue: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    """The worker's side: a daemon whose id is known with another secret (another data directory) is
    refused and stops, instead of reconnecting forever."""
    first = await start_worker(queue, cpus=1)
    settings = WorkerSettings(
        queue=queue, server=stack.grpc_target, worker_id=first.daemon.worker_id, data_directory=tmp_path / "impostor"
    )
    runtime = DockerRuntime.from_env(1)
    try:
        with pytest.raises(Refused, match="another worker's"):
            await asyncio.wait_for(Daemon(settings, runtime).run(), 30)
    finally:
        runtime.close()
    assert first.daemon.registered.is_set() and not first.task.done()


async def test_a_server_that_requires_credentials_refuses_workers_on_queues_known_only_by_name(
    tmp_path: Path, queue: str
) -> None:
    settings = ServerSettings(data_directory=tmp_path, host="127.0.0.1", port=0, require_worker_credential=True)
    async with own_server(settings) as target, grpc.aio.insecure_channel(target) as channel:
        refused = await _refusal(await _connect(channel, queue, secret=_secret()))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "jobwire queue new" in (refused.details() or "")
        created = await _create_queue(channel)
        stream = await _registered(channel, created.queue, credential=created.credential)
        stream.call.cancel()


async def test_jobwire_worker_with_a_wrong_credential_exits_saying_why(
    stack: Stack, channel: grpc.aio.Channel, processes: Processes
) -> None:
    created = await _create_queue(channel)
    worker = await processes.worker(created.queue, stack.grpc_target, extra=("--credential", "a-guess"))
    assert worker.process is not None
    assert await asyncio.wait_for(worker.process.wait(), 60) != 0
    assert "refused this worker: the queue's worker credential is missing, wrong or revoked" in worker.output()
