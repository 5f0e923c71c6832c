"""Several replicas on one PostgreSQL and one bucket: real `jobwire server` processes, real workers.

Each test gets two server processes sharing a fresh database and a fresh bucket (on the
session's PostgreSQL cluster and moto server), one Envoy in front of both, and workers
that are `jobwire worker` processes on the real dockerd.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format

from jobwire.cli.services import free_port, start_local_envoy, stop_envoy
from jobwire.v1 import definition_pb2, files_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, Process, Processes, eventually
from tests.services import PostgresCluster, S3Server

pytestmark = pytest.mark.docker


@dataclass
class Replica:
    """One `jobwire server` process and a channel to it."""

    process: Process
    target: str
    channel: grpc.aio.Channel

    @property
    def jobs(self) -> jobs_pb2_grpc.JobServiceStub:
        return jobs_pb2_grpc.JobServiceStub(self.channel)

    @property
    def files(self) -> files_pb2_grpc.FileServiceStub:
        return files_pb2_grpc.FileServiceStub(self.channel)


@dataclass
class Deployment:
    """Two replicas, the Envoy in front of both, and the shared bucket."""

    a: Replica
    b: Replica
    envoy_port: int
    s3: S3Server
    bucket: str

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def envoy_target(self) -> str:
        return f"127.0.0.1:{self.envoy_port}"


@pytest_asyncio.fixture(loop_scope="session")
async def deployment(
    tmp_path: Path, processes: Processes, postgres_cluster: PostgresCluster, s3_server: S3Server
) -> AsyncIterator[Deployment]:
    database = await postgres_cluster.create_database()
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    extra = ("--database", database, "--blobs", f"s3://{bucket}/jobwire", "--s3-endpoint", s3_server.endpoint)
    replicas = []
    for name in ("a", "b"):
        port = free_port()
        process = await processes.server(port, tmp_path / f"server-{name}", extra=extra)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        replicas.append(Replica(process, f"127.0.0.1:{port}", channel))
    for replica in replicas:
        await eventually(lambda r=replica: _serving(r), f"replica {replica.target}", timeout=60)
    upstreams = [("127.0.0.1", int(r.target.rpartition(":")[2])) for r in replicas]
    envoy, envoy_port = await start_local_envoy(upstreams, tmp_path / "envoy.yaml")
    try:
        yield Deployment(replicas[0], replicas[1], envoy_port, s3_server, bucket)
    finally:
        await stop_envoy(envoy)
        for replica in replicas:
            await replica.channel.close()


async def _serving(replica: Replica) -> bool:
    try:
        await replica.jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue="probe"), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return True


def definition(**fields: object) -> definition_pb2.JobDefinition:
    return json_format.ParseDict(fields, definition_pb2.JobDefinition())


async def submit(replica: Replica, queue: str, command: str) -> str:
    request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
    return (await replica.jobs.SubmitJob(request)).job_id


async def get(replica: Replica, job_id: str) -> jobs_pb2.Job:
    return (await replica.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))).job


async def workers(replica: Replica, queue: str) -> int:
    status = await replica.jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue=queue))
    return len(status.workers)


def kinds(job: jobs_pb2.Job, kind: int) -> list[jobs_pb2.JobEvent]:
    return [event for event in job.history if event.kind == kind]


async def test_worker_on_one_replica_serves_a_client_of_the_other(
    deployment: Deployment, processes: Processes, queue: str
) -> None:
    a, b = deployment.a, deployment.b
    await processes.worker(queue, a.target, cpus=2)
    await eventually(lambda: _has(b, queue, 1), "the worker (connected to A) to show on B")

    # Submit on B; follow the logs live on B while the worker streams them to A.
    command = (
        "sh -c 'for i in 1 2 3; do echo line$i; sleep 1; done;"
        f' head -c 3000 /dev/zero | tr "\\0" x > /outputs/big.txt; echo {queue}\''
    )
    job_id = await submit(b, queue, command)
    text, batches_before_finish = "", 0
    async for message in b.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=90):
        if message.HasField("logs"):
            text += "".join(chunk.text for chunk in message.logs.chunks)
        elif message.job.state == jobs_pb2.JOB_STATE_FINISHED:
            break
        elif text:
            batches_before_finish += 1
    assert text == f"line1\nline2\nline3\n{queue}\n"
    job = await get(b, job_id)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert "line1" in text and kinds(job, jobs_pb2.JOB_EVENT_KIND_STARTED)
    started = kinds(job, jobs_pb2.JOB_EVENT_KIND_STARTED)[0].time.ToSeconds()
    finished = kinds(job, jobs_pb2.JOB_EVENT_KIND_FINISHED)[0].time.ToSeconds()
    assert finished - started >= 2  # the logs above arrived while it ran, not in one piece at the end

    # The output went to the bucket (3000 bytes: by key); B serves it over gRPC and REST.
    ref = job.result.outputs["big.txt"]
    assert ref.type == "key"
    expected = b"x" * 3000
    output = b""
    async for body in b.jobs.GetJobOutput(jobs_pb2.GetJobOutputRequest(job_id=job_id, path="big.txt")):
        output += body.data
    assert output == expected
    async with httpx.AsyncClient(base_url=deployment.rest, follow_redirects=True, timeout=30) as client:
        assert (await client.get(f"/j/{job_id}/outputs/big.txt")).content == expected

    # Cancel, on B, a job running on A's worker: the container goes away.
    long_id = await submit(b, queue, f"sh -c 'echo {queue}-long; sleep 300'")
    await eventually(lambda: _started(b, long_id), "the long job to start")
    await b.jobs.CancelJob(jobs_pb2.CancelJobRequest(queue=queue, job_id=long_id, namespace="*"))
    cancelled = await get(b, long_id)
    assert cancelled.finish_reason == jobs_pb2.FINISH_REASON_CANCELLED
    await eventually(lambda: _no_container(processes, long_id), "the cancelled job's container to go", timeout=30)


async def _has(replica: Replica, queue: str, count: int) -> bool:
    return await workers(replica, queue) >= count


async def _started(replica: Replica, job_id: str) -> bool:
    return bool(kinds(await get(replica, job_id), jobs_pb2.JOB_EVENT_KIND_STARTED))


async def _no_container(processes: Processes, job_id: str) -> bool:
    containers = await asyncio.to_thread(
        processes.docker_client.containers.list, filters={"label": f"io.jobwire.job={job_id}"}
    )
    return not containers


JOBS, WORKERS = 1000, 4


@pytest.mark.timeout(1200)
async def test_a_thousand_jobs_through_both_replicas_each_run_exactly_once(
    deployment: Deployment, processes: Processes, queue: str
) -> None:
    a, b = deployment.a, deployment.b
    for n in range(WORKERS):
        await processes.worker(queue, (a if n % 2 else b).target, cpus=2)
    await eventually(lambda: _has(a, queue, WORKERS), "four workers")
    limit = asyncio.Semaphore(32)

    async def one(n: int) -> str:
        async with limit:
            return await submit(a if n % 2 else b, queue, f"echo {queue} {n}")

    ids = await asyncio.gather(*(one(n) for n in range(JOBS)))
    assert len(set(ids)) == JOBS
    await eventually(lambda: _finished(a, queue, JOBS), f"{JOBS} jobs to finish", timeout=1100)
    for n, job_id in enumerate(ids):
        job = await get(b if n % 3 else a, job_id)
        assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
        assert job.attempt == 1
        assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_ASSIGNED)) == 1
        assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_STARTED)) == 1
        assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_FINISHED)) == 1
        assert "".join(chunk.text for chunk in job.result.logs) == f"{queue} {n}\n"


async def _finished(replica: Replica, queue: str, count: int) -> bool:
    status = await replica.jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue=queue))
    return status.finished >= count


async def test_killing_the_replica_holding_the_worker_moves_it_to_the_other_and_the_job_finishes_once(
    deployment: Deployment, processes: Processes, queue: str
) -> None:
    a, b = deployment.a, deployment.b
    worker = await processes.worker(queue, deployment.envoy_target, cpus=1)  # through Envoy: either replica
    await eventually(lambda: _has(a, queue, 1), "the worker")
    worker_id = worker.args[worker.args.index("--id") + 1]
    holder, other = (a, b) if f"worker {worker_id} connected" in a.process.output() else (b, a)
    assert f"worker {worker_id} connected" in holder.process.output()
    job_id = await submit(other, queue, f"sh -c 'echo {queue}-start; sleep 8; echo {queue}-end'")
    await eventually(lambda: _started(other, job_id), "the job to start")
    await holder.process.kill()
    await eventually(
        lambda: _output_has(other.process, f"worker {worker_id} connected"), "the worker on the other replica"
    )
    await eventually(lambda: _is_finished(other, job_id), "the job to finish", timeout=90)
    job = await get(other, job_id)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert job.attempt == 1
    assert kinds(job, jobs_pb2.JOB_EVENT_KIND_REQUEUED) == []
    assert len(kinds(job, jobs_pb2.JOB_EVENT_KIND_FINISHED)) == 1
    assert "".join(chunk.text for chunk in job.result.logs) == f"{queue}-start\n{queue}-end\n"


async def _output_has(process: Process, text: str) -> bool:
    return text in process.output()


async def _is_finished(replica: Replica, job_id: str) -> bool:
    return (await get(replica, job_id)).state == jobs_pb2.JOB_STATE_FINISHED


def curl(*args: str) -> tuple[str, bytes]:
    """Run curl; returns (the response headers of every hop, the body)."""
    result = subprocess.run(["curl", "-sS", "-D", "/dev/stderr", *args], capture_output=True, check=True, timeout=60)
    return result.stderr.decode(errors="replace"), result.stdout


async def test_s3_mode_redirects_rest_downloads_to_presigned_urls(
    deployment: Deployment, processes: Processes, queue: str
) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    key = hashlib.sha256(data).hexdigest()
    rest = deployment.rest
    async with httpx.AsyncClient(base_url=rest, timeout=30) as client:
        # Upload straight to the bucket with a presigned PUT the server hands out.
        url = (await client.get(f"/f/{key}/url", params={"method": "FILE_URL_METHOD_PUT"})).json()
        assert url["url"].startswith(deployment.s3.endpoint)
        put = await client.put(url["url"], content=data, headers=url["headers"])
        assert put.status_code == 200, put.text
        assert (await client.get(f"/f/{key}/exists")).json() == {"exists": True, "size": str(len(data))}
        metrics_before = (await client.get(f"/q/{queue}/metrics")).text

    headers, body = await asyncio.to_thread(curl, "-L", f"{rest}/f/{key}")
    assert body == data
    first, _, second = headers.partition("\r\n\r\n")
    assert first.startswith("HTTP/1.1 302"), first
    assert f"location: {deployment.s3.endpoint}/{deployment.bucket}/jobwire/{key}?" in first.lower()
    assert "HTTP/1.1 200" in second
    headers, body = await asyncio.to_thread(curl, "-L", "-r", "10-19", f"{rest}/f/{key}")
    assert body == data[10:20]

    # A job reads the blob as an input (the worker fetches it from the bucket with a presigned
    # GET) and writes an output by key: the same redirect, with the file's name for the download.
    await processes.worker(queue, deployment.a.target, cpus=1)
    report = 'head -c 5000 /dev/zero | tr "\\0" y > /outputs/report.txt'
    command = f"sh -c ': {queue}; wc -c < /inputs/data.bin; {report}'"
    spec = definition(image=BUSYBOX, command=command, inputs={"data.bin": {"type": "key", "value": key}})
    request = jobs_pb2.SubmitJobRequest(queue=queue, definition=spec)
    job_id = (await deployment.b.jobs.SubmitJob(request)).job_id
    await eventually(lambda: _is_finished(deployment.b, job_id), "the job", timeout=90)
    job = await get(deployment.b, job_id)
    assert "".join(chunk.text for chunk in job.result.logs).strip() == str(len(data)), job.result.message
    headers, body = await asyncio.to_thread(curl, "-L", f"{rest}/j/{job_id}/outputs/report.txt")
    assert body == b"y" * 5000
    assert headers.startswith("HTTP/1.1 302")
    assert 'filename="report.txt"' in headers.partition("\r\n\r\n")[2]

    # The server never read the file's bytes: nothing was downloaded through it.
    async with httpx.AsyncClient(base_url=rest, timeout=30) as client:
        metrics_after = (await client.get(f"/q/{queue}/metrics")).text
    assert _downloaded(metrics_after) == _downloaded(metrics_before) == 0


def _downloaded(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("jobwire_file_bytes_total") and 'direction="downloaded"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
