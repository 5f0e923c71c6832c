"""The worker's faults, on real Docker and the real server: no container outlives its attempt (a cancel
at any point, a worker that never returns), a worker cut off past the grace does not cost a re-run,
a failed upload is retried, and a full disk fails the job, not the worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2

from jobwire import errors
from jobwire.files import FileClient
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from jobwire.worker import staging
from jobwire.worker.errors import StagingError
from jobwire.worker.execution import DEADLINE_LABEL, JOB_LABEL, WORKER_LABEL
from jobwire.worker.runtime import LABEL
from tests.conftest import BUSYBOX, Stack, StartWorker, eventually, wait_finished

pytestmark = pytest.mark.docker


async def submit(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, command: str, **env: str) -> str:
    definition = definition_pb2.JobDefinition(image=BUSYBOX, command=command, env=env)
    return (await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))).job_id


def labelled(client: docker.DockerClient, label: str) -> list[str]:
    """Ids of the containers (all states, as `docker ps -a`) carrying `label`."""
    return [c.id for c in client.containers.list(all=True, sparse=True, filters={"label": label})]


async def test_a_cancel_at_any_point_of_an_attempt_leaves_no_container(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker, docker_client: docker.DockerClient
) -> None:
    """Cancels spread over the first 200 ms after submission land while inputs are written, the image is
    looked up, the container created, attached and started, and while it runs."""
    worker = await start_worker(queue, cpus=8)
    mine = f"{WORKER_LABEL}={worker.daemon.worker_id}"

    async def cancel_after(index: int) -> str:
        job_id = await submit(jobs, queue, "sleep 300", N=str(index))
        await asyncio.sleep(index * 0.008)
        await jobs.CancelJob(jobs_pb2.CancelJobRequest(queue=queue, job_id=job_id))
        return job_id

    async def none_left() -> bool:
        return not await asyncio.to_thread(labelled, docker_client, mine)

    try:
        ids = await asyncio.gather(*(cancel_after(index) for index in range(24)))
        finished = [await wait_finished(jobs, job_id, timeout=60) for job_id in ids]
        assert {job.result.reason for job in finished} == {jobs_pb2.FINISH_REASON_CANCELLED}
        await eventually(none_left, "no container of a cancelled job left", timeout=30)
        await asyncio.sleep(1)  # a create still in the engine when its attempt ended would show up now
        assert await none_left()
    finally:
        await worker.stop()
        for container_id in await asyncio.to_thread(labelled, docker_client, mine):
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(docker_client.api.remove_container, container_id, force=True)


async def test_containers_of_a_worker_that_never_returned_are_removed_past_their_deadline(
    queue: str, start_worker: StartWorker, docker_client: docker.DockerClient
) -> None:
    """Any worker starting on the machine removes another's containers past their deadline label,
    running or exited, and leaves those within it alone."""

    def left_behind(name: str, deadline: float, command: str) -> str:
        labels = {LABEL: "true", WORKER_LABEL: "w-gone", JOB_LABEL: name, DEADLINE_LABEL: str(int(deadline))}
        container = docker_client.containers.run(BUSYBOX, command, detach=True, labels=labels, name=None)
        return str(container.id)

    now = time.time()
    expired_running = await asyncio.to_thread(left_behind, "a", now - 120, "sleep 300")
    expired_exited = await asyncio.to_thread(left_behind, "b", now - 120, "true")
    within = await asyncio.to_thread(left_behind, "c", now + 600, "sleep 300")
    try:
        await start_worker(queue)
        left = set(await asyncio.to_thread(labelled, docker_client, f"{WORKER_LABEL}=w-gone"))
        assert expired_running not in left and expired_exited not in left
        assert within in left
    finally:
        for container_id in (expired_running, expired_exited, within):
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(docker_client.api.remove_container, container_id, force=True)


class Cut:
    """A TCP proxy to the server that can cut the worker off (closing its connections, refusing new
    ones) and let it through again."""

    def __init__(self, upstream: str) -> None:
        self.host, port = upstream.rsplit(":", 1)
        self.port = int(port)
        self.open = True
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.links |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self.links.discard(writer)

    def cut(self) -> None:
        self.open = False
        for writer in list(self.links):
            writer.close()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def cut(stack: Stack) -> AsyncIterator[Cut]:
    proxy = Cut(stack.grpc_target)
    yield proxy
    await proxy.close()


async def test_a_job_that_finished_while_its_worker_was_cut_off_past_the_grace_runs_once(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker, cut: Cut
) -> None:
    """The worker is cut off longer than the server's grace (5 s in tests): the server re-queues the
    job, which finishes meanwhile; when the worker is back, nobody has been given the job, and its
    attempt is taken back with its result instead of running again."""
    worker = await start_worker(queue, target=await cut.start())
    assert worker.daemon.reconnect_cap() <= 5 / 4  # learnt from the server: several tries within its grace
    job_id = await submit(jobs, queue, "sh -c 'sleep 2; echo ran'")

    async def state_is(state: int) -> bool:
        return (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id, queue=queue))).job.state == state

    await eventually(lambda: state_is(jobs_pb2.JOB_STATE_RUNNING), "the job running")
    cut.cut()
    await eventually(lambda: state_is(jobs_pb2.JOB_STATE_QUEUED), "the job re-queued past the grace", timeout=30)

    async def finished_here() -> bool:
        return any(attempt.result is not None for attempt in worker.daemon.attempts.values())

    await eventually(finished_here, "the job finished on the cut-off worker", timeout=30)
    cut.open = True
    job = await wait_finished(jobs, job_id, timeout=60, queue=queue)
    assert (job.result.reason, job.result.exit_code, job.attempt) == (jobs_pb2.FINISH_REASON_SUCCESS, 0, 1)
    kinds = [event.kind for event in job.history]
    assert jobs_pb2.JOB_EVENT_KIND_REQUEUED in kinds  # the grace did run out
    assert {event.attempt for event in job.history} == {0, 1}  # never given as attempt 2


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _fill(path: Path) -> None:
    """Write to `path` until its file system has no byte left."""
    with path.open("wb", buffering=0) as out:
        for block in (1024 * 1024, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"x" * block)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_a_full_worker_disk_fails_the_job_with_a_clear_message_and_the_worker_runs_the_next(
    jobs: jobs_pb2_grpc.JobServiceStub,
    channel: grpc.aio.Channel,
    queue: str,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    """The worker's data directory on a 4 MiB tmpfs: a job whose 5 MiB input cannot be written there
        finishes as an error saying the disk is full, and so does a job arriving when the disk was filled up
    by something else; the worker stays up and runs the next job once there is space."""
    data = tmp_path / "small-disk"
    if not _mount_tmpfs(data, "4m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        worker = await start_worker(queue, data_directory=data)
        key = await FileClient(channel).upload(os.urandom(5 * 1024 * 1024))
        big = definition_pb2.DataRef(type="key", value=struct_pb2.Value(string_value=key))
        definition = definition_pb2.JobDefinition(image=BUSYBOX, command="true", inputs={"big": big})
        request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition)
        failed = await wait_finished(jobs, (await jobs.SubmitJob(request)).job_id, queue=queue)
        assert failed.result.reason == jobs_pb2.FINISH_REASON_ERROR
        assert "No space left on device" in failed.result.message, failed.result.message
        # Filled up by something else: even the job's folder cannot be made.
        await asyncio.to_thread(_fill, data / "filler")
        full = await wait_finished(jobs, await submit(jobs, queue, "echo fine", N="1"), queue=queue)
        assert full.result.reason == jobs_pb2.FINISH_REASON_ERROR
        assert full.result.message.startswith("the worker's disk is full"), full.result.message
        (data / "filler").unlink()
        ok = await wait_finished(jobs, await submit(jobs, queue, "echo fine", N="2"), queue=queue)
        assert ok.result.reason == jobs_pb2.FINISH_REASON_SUCCESS, ok.result.message
        assert not worker.task.done()
        await worker.stop()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(data)], check=False)


async def test_an_output_upload_that_fails_while_the_server_is_unreachable_is_retried(
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
    cut: Cut,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server becomes unreachable while the job runs: its finished container's output upload fails,
    is tried again once the server is back, and the job succeeds with its output."""
    worker = await start_worker(queue, target=await cut.start())
    command = "sh -c 'sleep 1; head -c 2000000 /dev/urandom > /outputs/big'"
    job_id = await submit(jobs, queue, command)

    async def running() -> bool:
        job = (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id, queue=queue))).job
        return job.state == jobs_pb2.JOB_STATE_RUNNING and bool(worker.daemon.attempts)

    await eventually(running, "the job running")
    cut.cut()

    async def upload_failed() -> bool:
        return any(record.getMessage().startswith("upload of output big failed") for record in caplog.records)

    await eventually(upload_failed, "the output upload failing", timeout=30)
    cut.open = True
    job = await wait_finished(jobs, job_id, timeout=60, queue=queue)
    assert job.result.reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert job.result.outputs["big"].type == "key"


class FlakyFiles:
    """A file client whose uploads fail with the given errors, in turn, then succeed."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.tries = list(errors), 0

    async def upload(self, source: Path, key: str) -> str:
        self.tries += 1
        if self.errors:
            raise self.errors.pop(0)
        return key


async def test_an_upload_refused_for_good_is_the_jobs_error_and_a_passing_failure_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "UPLOAD_RETRY", dataclasses.replace(staging.UPLOAD_RETRY, initial_backoff=0.01))
    output = tmp_path / "out"
    output.mkdir()
    (output / "big").write_bytes(b"x" * 4096)
    limits = staging.OutputLimits(inline=10, count=10, size=10**6)
    full = errors.TooLarge("the server's disk is full", grpc.StatusCode.RESOURCE_EXHAUSTED)
    down = errors.ServerUnavailable("cannot reach the jobwire server", grpc.StatusCode.UNAVAILABLE)
    flaky = FlakyFiles(down, full, httpx.ReadTimeout("slow bucket"))
    collected = await staging.Staging(flaky, tmp_path / "cache").collect_outputs(output, limits)  # type: ignore[arg-type]
    assert (flaky.tries, collected["big"].type) == (4, "key")

    too_big = errors.TooLarge("upload exceeds the limit of 100 bytes", grpc.StatusCode.RESOURCE_EXHAUSTED)
    refusing = FlakyFiles(too_big)
    with pytest.raises(StagingError, match="output big could not be stored: the server refused it: upload exceeds"):
        await staging.Staging(refusing, tmp_path / "cache").collect_outputs(output, limits)  # type: ignore[arg-type]
    assert refusing.tries == 1

    patience = staging.Staging(FlakyFiles(*[down] * 100), tmp_path / "cache", upload_patience=0.05)  # type: ignore[arg-type]
    with pytest.raises(StagingError, match=r"could not be stored within .* \(upload-patience\)"):
        await patience.collect_outputs(output, limits)
