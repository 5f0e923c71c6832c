"""Bounded storage, against a real server (SQLite, filesystem blobs) and a real Envoy: queued jobs
expire after `--queued-ttl` and the data directory stops growing; a queue past `--max-queued-jobs`
refuses more with RESOURCE_EXHAUSTED (HTTP 429); Envoy closes half-sent requests and may open more
files than its connection cap."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
import yaml
from google.protobuf import struct_pb2

from jobwire import Client
from jobwire.cli.services import start_local_envoy, stop_envoy
from jobwire.core.definition import MAX_INLINE_BYTES, job_id
from jobwire.errors import TooLarge
from jobwire.server.settings import ServerSettings
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import eventually, own_server

LIMIT = 4
BYTES = 20 * 1024 * 1024
ROUNDS = 20


@dataclass
class Bounded:
    """A server with a short queued time-to-live and retention, a small queue limit, and its Envoy."""

    data: Path
    jobs: jobs_pb2_grpc.JobServiceStub
    rest: httpx.AsyncClient
    envoy: asyncio.subprocess.Process
    envoy_port: int


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def bounded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bounded]:
    data = tmp_path_factory.mktemp("bounded")
    settings = ServerSettings(
        data_directory=data,
        host="127.0.0.1",
        port=0,
        queued_ttl=0.5,
        retention_seconds=0.5,
        sweep_interval_seconds=0.2,
        max_queued_jobs=LIMIT,
    )
    async with own_server(settings) as target:
        envoy, port = await start_local_envoy([("127.0.0.1", int(target.rpartition(":")[2]))], data / "envoy.yaml")
        try:
            async with (
                grpc.aio.insecure_channel(target) as channel,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as rest,
            ):
                yield Bounded(data, jobs_pb2_grpc.JobServiceStub(channel), rest, envoy, port)
        finally:
            await stop_envoy(envoy)


def big_definition(tag: str, inputs: int = 1) -> definition_pb2.JobDefinition:
    """A definition of about `inputs` MiB: inline inputs just under the inline limit."""
    refs = {}
    for index in range(inputs):
        payload = base64.b64encode(os.urandom(MAX_INLINE_BYTES * 3 // 4 - 64)).decode()
        refs[f"blob-{index}.bin"] = definition_pb2.DataRef(type="base64", value=struct_pb2.Value(string_value=payload))
    return definition_pb2.JobDefinition(image="busybox", command=f"true {tag}", inputs=refs)


def data_bytes(folder: Path) -> int:
    """Bytes the data directory keeps: the database file and blobs. SQLite's WAL is left out: it is
    reused after each checkpoint, so it holds about a second of writes, not the store's history."""
    files = [path for path in folder.rglob("*") if path.is_file() and not path.name.endswith(("-wal", "-shm"))]
    return sum(path.stat().st_size for path in files)


async def test_queued_jobs_expire_and_the_data_directory_stops_growing(bounded: Bounded) -> None:
    queue = f"q-{uuid.uuid4().hex}"
    first = await bounded.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=big_definition("first")))

    async def expired() -> bool:
        job = (await bounded.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=first.job.id, queue=queue))).job
        return job.finish_reason == jobs_pb2.FINISH_REASON_EXPIRED

    await eventually(expired, "the queued job to expire", timeout=30)
    job = (await bounded.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=first.job.id, queue=queue))).job
    assert job.state == jobs_pb2.JOB_STATE_FINISHED
    assert "expired: waited in its queue longer than" in job.result.message
    assert job.history[-1].kind == jobs_pb2.JOB_EVENT_KIND_FINISHED
    assert job.history[-1].message == job.result.message

    # A stream of ~1 MiB submissions, LIMIT at a time as the queue allows, for 30 rounds: each
    # round's jobs expire and are forgotten, and the store reuses their space.
    # A round takes about a sweep interval and a time-to-live, ~1 s.
    sizes = []
    for round_ in range(ROUNDS):
        for index in range(LIMIT):
            definition = big_definition(f"{round_}-{index}")
            await bounded.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))

        async def drained() -> bool:
            status = await bounded.jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue=queue))
            return status.queued == 0

        await eventually(drained, "the round's jobs to expire", timeout=30)
        sizes.append(data_bytes(bounded.data))
    submitted = ROUNDS * LIMIT * MAX_INLINE_BYTES
    # without expiry and retention the data directory would hold every submission (~80 MiB)
    assert max(sizes) < submitted / 4, (sizes, submitted)
    assert sizes[-1] <= max(sizes[:5]) + 2 * LIMIT * MAX_INLINE_BYTES, sizes


async def test_a_full_queue_refuses_submissions_with_resource_exhausted(bounded: Bounded) -> None:
    queue = f"q-{uuid.uuid4().hex}"
    for index in range(LIMIT):
        definition = definition_pb2.JobDefinition(image="busybox", command=f"true {index}")
        await bounded.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
    extra = definition_pb2.JobDefinition(image="busybox", command="true extra")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await bounded.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=extra))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == (
        f"queue {queue!r} holds {LIMIT} queued jobs, the limit is {LIMIT} (max-queued-jobs):"
        " wait for workers to take some, or cancel some"
    )
    body = {"definition": {"image": "busybox", "command": "true rest"}}
    response = await bounded.rest.post(f"/q/{queue}", json=body)
    assert response.status_code == 429, response.text
    assert f"holds {LIMIT} queued jobs, the limit is {LIMIT}" in response.json()["message"]
    # another queue is not held back
    other = f"q-{uuid.uuid4().hex}"
    await bounded.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=other, definition=extra))


async def test_a_queue_holding_its_bytes_of_definitions_refuses_more(tmp_path: Path) -> None:
    settings = ServerSettings(data_directory=tmp_path, host="127.0.0.1", port=0, max_queue_bytes=BYTES)
    queue = f"q-{uuid.uuid4().hex}"
    first, second, third = (big_definition(tag, inputs=7) for tag in ("first", "second", "third"))
    large = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]  # a job's answer holds its definition
    async with own_server(settings) as target, grpc.aio.insecure_channel(target, options=large) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=first))
        await jobs.CancelJob(jobs_pb2.CancelJobRequest(queue=queue, job_id=job_id(first)))
        await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=second))
        held = first.ByteSize() + second.ByteSize()  # a finished job's definition counts until retention
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=third))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            f"queue {queue!r} holds {held:,} bytes of job definitions, the limit is {BYTES:,} (max-queue-bytes):"
            " put large inputs in files (by key) instead of inline"
        )
        other = f"q-{uuid.uuid4().hex}"  # another queue is not held back
        await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=other, definition=third))


async def test_envoy_closes_half_sent_requests_within_its_headers_timeout(bounded: Bounded) -> None:
    """A slowloris: 200 connections each send part of a request's headers, then nothing."""
    connections = [await asyncio.open_connection("127.0.0.1", bounded.envoy_port) for _ in range(200)]
    try:
        for _, writer in connections:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        await asyncio.gather(*(writer.drain() for _, writer in connections))

        async def closed(reader: asyncio.StreamReader) -> None:
            while await reader.read(65536):  # Envoy's 408, then the end of the connection
                pass

        # request_headers_timeout is 10 s; without it Envoy held such connections for minutes
        await asyncio.wait_for(asyncio.gather(*(closed(reader) for reader, _ in connections)), 40)
    finally:
        for _, writer in connections:
            writer.close()
    assert (await bounded.rest.get("/healthz")).status_code == 200


def test_envoy_may_open_more_files_than_its_connection_cap(bounded: Bounded) -> None:
    config = yaml.safe_load((bounded.data / "envoy.yaml").read_text())
    (monitor,) = config["overload_manager"]["resource_monitors"]
    cap = monitor["typed_config"]["max_active_downstream_connections"]
    limits = Path(f"/proc/{bounded.envoy.pid}/limits").read_text().splitlines()
    (files,) = [line for line in limits if line.startswith("Max open files")]
    soft = int(files.split()[3])
    assert cap >= 1024 and soft > cap + 1024, (soft, cap)


async def test_concurrent_submissions_to_a_queue_one_job_below_its_limit_admit_exactly_one(tmp_path: Path) -> None:
    """The limit is checked inside the submission's transaction: of many submissions racing for a
    queue's last place (unary calls and the SDK's stream, all in flight at once), one is stored and
    every other is refused, whatever the order the server takes them in."""
    settings = ServerSettings(data_directory=tmp_path, host="127.0.0.1", port=0, max_queued_jobs=LIMIT)
    queue = f"q-{uuid.uuid4().hex}"
    async with own_server(settings) as target, Client(target) as client, grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        await client.submit_many(queue, [{"image": "busybox", "command": f"true {n}"} for n in range(LIMIT - 1)])

        async def unary(n: int) -> str:
            definition = definition_pb2.JobDefinition(image="busybox", command=f"true unary {n}")
            try:
                await stub.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}: {error.details()}"
            return "admitted"

        async def streamed(n: int) -> str:
            try:
                await client.submit(queue, {"image": "busybox", "command": f"true stream {n}"})
            except TooLarge as error:
                return f"RESOURCE_EXHAUSTED: {error}"
            return "admitted"

        answers = await asyncio.gather(*(call(n) for n in range(16) for call in (unary, streamed)))
        assert answers.count("admitted") == 1, answers
        full = f"RESOURCE_EXHAUSTED: queue {queue!r} holds {LIMIT} queued jobs, the limit is {LIMIT}"
        assert all(answer == "admitted" or answer.startswith(full) for answer in answers), answers
        status = await client.queue_status(queue)
        assert status.queued == LIMIT
