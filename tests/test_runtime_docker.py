"""The Docker runtime under a full worker: cancels and time limits kill every container, however many run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import docker
import pytest
import pytest_asyncio
from docker.models.containers import Container

from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from jobwire.worker.execution import WORKER_LABEL
from tests.conftest import BUSYBOX, StartWorker, WorkerHandle, eventually, wait_finished

pytestmark = pytest.mark.docker
JOBS = 8


async def submit(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, **fields: object) -> list[str]:
    """`JOBS` distinct jobs that sleep for 5 minutes."""
    ids = []
    for index in range(JOBS):
        definition = definition_pb2.JobDefinition(image=BUSYBOX, command="sleep 300", env={"N": str(index)}, **fields)
        ids.append((await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))).job_id)
    return ids


def containers(client: docker.DockerClient, worker_id: str, **filters: str) -> list[Container]:
    """The worker's containers (all states), as `docker ps -a` lists them."""
    filters: dict[str, str | list[str] | bool] = {"label": f"{WORKER_LABEL}={worker_id}", **filters}
    return list(client.containers.list(all=True, sparse=True, filters=filters))


@pytest_asyncio.fixture(loop_scope="session")
async def worker(
    queue: str, start_worker: StartWorker, docker_client: docker.DockerClient
) -> AsyncIterator[WorkerHandle]:
    """A worker with `JOBS` slots; whatever containers of it a failed test leaves are removed after."""
    handle = await start_worker(queue, cpus=JOBS)
    yield handle
    await handle.stop()
    for container in await asyncio.to_thread(containers, docker_client, handle.daemon.worker_id):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


async def test_cancelling_eight_running_jobs_leaves_none_of_their_containers(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, worker: WorkerHandle, docker_client: docker.DockerClient
) -> None:
    ids = await submit(jobs, queue)

    async def all_running() -> bool:
        running = await asyncio.to_thread(containers, docker_client, worker.daemon.worker_id, status="running")
        return len(running) == JOBS

    await eventually(all_running, f"{JOBS} containers running")
    for job_id in ids:
        await jobs.CancelJob(jobs_pb2.CancelJobRequest(queue=queue, job_id=job_id))

    async def none_left() -> bool:
        return not await asyncio.to_thread(containers, docker_client, worker.daemon.worker_id)

    await eventually(none_left, "every cancelled job's container gone", timeout=30)
    finished = [await wait_finished(jobs, job_id, timeout=30) for job_id in ids]
    assert {job.result.reason for job in finished} == {jobs_pb2.FINISH_REASON_CANCELLED}


async def test_eight_jobs_reaching_their_time_limit_all_time_out(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, worker: WorkerHandle, docker_client: docker.DockerClient
) -> None:
    ids = await submit(jobs, queue, max_duration="2s")
    finished = [await wait_finished(jobs, job_id, timeout=60) for job_id in ids]
    assert {job.result.reason for job in finished} == {jobs_pb2.FINISH_REASON_TIMED_OUT}
    assert not await asyncio.to_thread(containers, docker_client, worker.daemon.worker_id)
