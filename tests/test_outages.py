"""Servers that ride out their dependencies: PostgreSQL stopped under two replicas, a full disk.

Real `jobwire server` processes; PostgreSQL is a cluster of the test's own, stopped (fast shutdown,
as an operator would) and started again on its data; the full disk is a real tmpfs filled with a
file. Calls made while a dependency is down must fail fast with UNAVAILABLE or RESOURCE_EXHAUSTED,
the processes must stay up, and everything must work again, without a restart, once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import grpc
import pytest
from google.api.httpbody_pb2 import HttpBody
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.cli.services import free_port
from jobwire.server.blobs.s3 import S3BlobStore
from jobwire.server.errors import DiskFull, Unavailable, dependency_error
from jobwire.server.store.base import Submission
from jobwire.server.store.sqlite import SqliteStore
from jobwire.v1 import definition_pb2, files_pb2, files_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, Process, Processes, eventually
from tests.services import PostgresCluster, S3Server, running_cluster

pytestmark = pytest.mark.docker
CALL_BOUND = 15.0
"""A call made while a dependency is down must have failed by then (a bound, not a measurement)."""


def definition(command: str, **env: str) -> definition_pb2.JobDefinition:
    return json_format.ParseDict({"image": BUSYBOX, "command": command, "env": env}, definition_pb2.JobDefinition())


async def submit(channel: grpc.aio.Channel, queue: str, command: str, **env: str) -> str:
    request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(command, **env))
    response = await jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(request, timeout=CALL_BOUND)
    return response.job_id


async def get(channel: grpc.aio.Channel, job_id: str) -> jobs_pb2.Job:
    request = jobs_pb2.GetJobRequest(job_id=job_id)
    return (await jobs_pb2_grpc.JobServiceStub(channel).GetJob(request, timeout=CALL_BOUND)).job


async def failure(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error a call that must fail ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def serving(channel: grpc.aio.Channel) -> bool:
    try:
        await jobs_pb2_grpc.JobServiceStub(channel).GetQueueStatus(
            jobs_pb2.GetQueueStatusRequest(queue="probe"), timeout=2
        )
    except grpc.aio.AioRpcError:
        return False
    return True


def alive(process: Process) -> bool:
    assert process.process is not None
    return process.process.returncode is None


@contextlib.asynccontextmanager
async def server(processes: Processes, data: Path, *extra: str) -> AsyncIterator[tuple[Process, grpc.aio.Channel, str]]:
    """A `jobwire server` process on `data`, a channel to it and its target."""
    target = f"127.0.0.1:{free_port()}"
    process = await processes.server(int(target.rpartition(":")[2]), data, extra=extra)
    async with grpc.aio.insecure_channel(target) as channel:
        await eventually(lambda: serving(channel), f"the server on {data.name}", timeout=60)
        yield process, channel, target


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own: it is stopped and started again."""
    with running_cluster() as cluster:
        yield cluster


OUTAGE = 10.0


@pytest.mark.timeout(300)
async def test_two_replicas_ride_out_postgresql_stopped_and_started_again(
    cluster: PostgresCluster, processes: Processes, tmp_path: Path, queue: str
) -> None:
    database = await cluster.create_database()
    async with (
        server(processes, tmp_path / "a", "--database", database) as (a, to_a, target_a),
        server(processes, tmp_path / "b", "--database", database) as (b, to_b, _),
    ):
        await processes.worker(queue, target_a, cpus=2)
        kept = await submit(to_a, f"{queue}-idle", "true")  # acknowledged before the outage
        follower = jobs_pb2_grpc.JobServiceStub(to_b).WatchJob(jobs_pb2.WatchJobRequest(job_id=kept))
        assert (await follower.read()).job.state == jobs_pb2.JOB_STATE_QUEUED

        await asyncio.to_thread(cluster.halt)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTAGE
        while loop.time() < deadline:
            for channel in (to_a, to_b):
                error = await failure(submit(channel, queue, "true"))
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert "job store is unavailable" in (error.details() or "") and "retry" in (error.details() or "")
                error = await failure(get(channel, kept))
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert alive(a) and alive(b), "a replica exited while PostgreSQL was down"
            await asyncio.sleep(1)
        # The follower heard the LISTEN connection drop and re-read the store: the database is down.
        error = await failure(_drain(follower))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error

        await asyncio.to_thread(cluster.launch)
        # No restart: both replicas answer again, and a job submitted on B runs on A's worker.
        for channel in (to_a, to_b):
            await eventually(lambda c=channel: serving(c), "a replica to answer again", timeout=60)
        job_id = await submit(to_b, queue, "echo back")
        await eventually(lambda: _finished(to_b, job_id), "the job submitted after the outage to finish", timeout=120)
        job = await get(to_a, job_id)
        assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
        assert (await get(to_b, kept)).state == jobs_pb2.JOB_STATE_QUEUED
        assert alive(a) and alive(b)

    for replica in (a, b):
        # One warning for the outage (not one per retry), and one when the loop recovered.
        await eventually(lambda r=replica: _logged(r, "Scheduler.reap: recovered"), "the reaper to recover", 30)
        assert replica.output().count("Scheduler.reap failed") == 1, replica.output()[-3000:]
        assert "Traceback" not in replica.output(), replica.output()[-3000:]


async def _drain(stream: grpc.aio.UnaryStreamCall[jobs_pb2.WatchJobRequest, jobs_pb2.WatchJobResponse]) -> None:
    while await stream.read() is not grpc.aio.EOF:
        pass


async def _logged(process: Process, text: str) -> bool:
    return text in process.output()


async def _finished(channel: grpc.aio.Channel, job_id: str) -> bool:
    return (await get(channel, job_id)).state == jobs_pb2.JOB_STATE_FINISHED


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 32 MiB tmpfs (mounting one needs root: skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


async def upload(channel: grpc.aio.Channel, data: bytes) -> files_pb2.UploadFileResponse:
    key = hashlib.sha256(data).hexdigest()
    step = 1024 * 1024
    requests = [files_pb2.UploadFileRequest(key=key, size=len(data), body=HttpBody(data=data[:step]))]
    requests += [
        files_pb2.UploadFileRequest(body=HttpBody(data=data[i : i + step])) for i in range(step, len(data), step)
    ]
    return await files_pb2_grpc.FileServiceStub(channel).UploadFile(iter(requests), timeout=CALL_BOUND)


def fill(path: Path) -> None:
    """Write `path` until the disk has no room left."""
    with path.open("wb", buffering=0) as out:
        for size in (1024 * 1024, 4096):  # then the last pages that fit
            with contextlib.suppress(OSError):
                while out.write(b"\0" * size):
                    pass


@pytest.mark.timeout(180)
async def test_a_full_disk_refuses_what_it_cannot_store_and_recovers_when_space_is_freed(
    small_disk: Path, processes: Processes, queue: str
) -> None:
    async with server(processes, small_disk / "data") as (process, channel, _):
        before = await submit(channel, queue, "true")
        health = health_pb2_grpc.HealthStub(channel)

        filler = small_disk / "filler"
        await asyncio.to_thread(fill, filler)
        error = await failure(upload(channel, os.urandom(3 * 1024 * 1024)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "disk is full" in (error.details() or ""), error

        # Submissions: each is acknowledged only once stored; past the room left, each is refused.
        # Concurrent ones share a commit (SQLite's group commit): a failed commit fails each of them.
        acknowledged, refused = [], []
        for batch in range(3):
            calls = [submit(channel, queue, f"echo {batch}-{n}", PAD=f"{n}" * 300_000) for n in range(8)]
            for outcome in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(outcome, grpc.aio.AioRpcError):
                    refused.append(outcome)
                else:
                    assert isinstance(outcome, str), outcome
                    acknowledged.append(outcome)
        assert refused, "every submission was stored on a full disk?"
        for rpc_error in refused:
            assert rpc_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, rpc_error
            assert "disk is full" in (rpc_error.details() or ""), rpc_error
        # Reads still work, the server stays up and says it is serving (it refuses only writes).
        assert (await get(channel, before)).state == jobs_pb2.JOB_STATE_QUEUED
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_BOUND)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert alive(process)

        filler.unlink()
        # No restart: uploads and submissions work again, and nothing acknowledged was lost.
        data = os.urandom(3 * 1024 * 1024)
        assert (await upload(channel, data)).size == len(data)
        after = await submit(channel, queue, "echo after", PAD="z" * 300_000)
        for job_id in [before, *acknowledged, after]:
            assert (await get(channel, job_id)).state == jobs_pb2.JOB_STATE_QUEUED
        assert alive(process)


async def test_a_full_sqlite_database_fails_the_commit_group_it_hits_and_takes_the_next(tmp_path: Path) -> None:
    """SQLite may roll the whole transaction back when a statement finds the database full: every
    operation of that group commit then fails as "disk full" (none answers OK unstored), and the
    operations after it start a group of their own (before, they ran outside any transaction and
    were stored while answered with an error). `max_page_count` makes "full" exact and immediate."""
    store = await SqliteStore.open(tmp_path / "jobwire.db")
    try:
        store._db.execute("CREATE TABLE scratch (data BLOB)")
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count = {pages + 20}")

        def job(name: str) -> Submission:
            return Submission(hashlib.sha256(name.encode()).hexdigest(), definition(f"echo {name}"), "default")

        async def too_big() -> None:
            async with store._transaction() as db:
                await db.run("INSERT INTO scratch VALUES (?)", b"x" * 200_000)

        # One loop turn: A and the write that does not fit share a commit; C comes after.
        a, c = job("a"), job("c")
        outcomes = await asyncio.gather(
            store.submit(queue="q", jobs=[a], now=1.0),
            too_big(),
            store.submit(queue="q", jobs=[c], now=1.0),
            return_exceptions=True,
        )
        for outcome in outcomes[:2]:
            assert isinstance(outcome, Exception), outcome
            assert isinstance(dependency_error(outcome), DiskFull), repr(outcome)
        assert await store.get_job(a.job_id, queue="q") is None  # answered with an error, not stored
        assert not isinstance(outcomes[2], BaseException), repr(outcomes[2])
        assert await store.get_job(c.job_id, queue="q") is not None  # answered OK, stored
    finally:
        await store.close()


class StallingProxy:
    """A TCP proxy that, once stalled, keeps every connection open and passes no byte either way
    (a bucket that hangs, not one that refuses), until resumed."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        with contextlib.suppress(Exception):
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, up_writer))
                group.create_task(self._pipe(up_reader, writer))
        for end in (writer, up_writer):
            end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self.flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.transport.abort()

    async def close(self) -> None:
        self.flowing.set()
        if self.server is not None:
            self.server.close()


async def test_a_bucket_that_hangs_fails_calls_as_unavailable_and_they_work_once_it_answers(
    s3_server: S3Server,
) -> None:
    proxy = StallingProxy(s3_server.port)
    endpoint = await proxy.start()
    blobs = await S3BlobStore.open(f"s3://hang-{os.getpid()}/p", endpoint=endpoint, read_seconds=1.0)
    try:
        data = b"stored before the bucket hung"
        key = hashlib.sha256(data).hexdigest()
        writer = await blobs.writer(key)
        await writer.write(data)
        await writer.commit()
        proxy.flowing.clear()
        raised: Exception | None = None
        try:
            async with asyncio.timeout(CALL_BOUND):  # a bound: botocore's defaults took minutes
                await blobs.size(key)
        except Exception as error:
            raised = error
        assert raised is not None, "a read from a bucket that hangs succeeded"
        failure = dependency_error(raised)
        assert isinstance(failure, Unavailable) and "file store is unavailable" in str(failure), repr(raised)
        proxy.flowing.set()
        assert await blobs.size(key) == len(data)
    finally:
        await blobs.close()
        await proxy.close()
