"""A job's outputs are bounded (count, total size) and a job with many outputs is served by every route.

Real server, real Envoy for REST, a real worker on dockerd. Small limits where the point is the limit;
the 150,000-file job of issue 20 runs for real against the default limits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from jobwire.server.settings import ServerSettings
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc, workers_pb2, workers_pb2_grpc
from jobwire.worker.daemon import Daemon
from jobwire.worker.docker_runtime import DockerRuntime
from jobwire.worker.settings import WorkerSettings
from tests.conftest import BUSYBOX, Stack, WorkerStream, wait_finished

pytestmark = pytest.mark.docker
Start = Callable[..., Awaitable[Daemon]]


@pytest_asyncio.fixture(loop_scope="session")
async def worker(stack: Stack, docker_images: None, tmp_path: Path) -> AsyncIterator[Start]:
    """`await worker(queue, **settings)`: one real worker with these settings, stopped after the test."""
    running: list[tuple[asyncio.Task[None], DockerRuntime]] = []

    async def start(queue: str, **options: object) -> Daemon:
        settings = WorkerSettings(
            queue=queue, server=stack.grpc_target, data_directory=tmp_path / f"worker-{len(running)}", **options
        )  # type: ignore[arg-type]
        runtime = DockerRuntime.from_env(1)
        daemon = Daemon(settings, runtime)
        running.append((asyncio.create_task(daemon.run()), runtime))
        await asyncio.wait_for(daemon.registered.wait(), 30)
        return daemon

    yield start
    for task, runtime in running:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        runtime.close()


async def _run(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, script: str, timeout: float = 100) -> jobs_pb2.Job:
    definition = definition_pb2.JobDefinition(image=BUSYBOX, command=f"sh -c '{script}'")
    submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
    return await wait_finished(jobs, submitted.job_id, timeout)


async def _an_innocent_job_runs_once(jobs: jobs_pb2_grpc.JobServiceStub, queue: str) -> None:
    innocent = await _run(jobs, queue, "echo innocent > /outputs/ok")
    assert innocent.result.reason == jobs_pb2.FINISH_REASON_SUCCESS, innocent.result
    assert innocent.attempt == 1 and list(innocent.result.outputs) == ["ok"]


async def test_too_many_outputs_finish_as_error_once(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, worker: Start
) -> None:
    await worker(queue, max_outputs=100)
    job = await _run(jobs, queue, "cd /outputs && seq 101 | xargs touch")
    assert job.result.reason == jobs_pb2.FINISH_REASON_ERROR, job.result
    assert job.result.message == "too many outputs: more than 100 files (the limit, max-outputs)"
    assert job.attempt == 1 and not job.result.outputs
    await _an_innocent_job_runs_once(jobs, queue)


async def test_outputs_over_the_size_cap_finish_as_error_once(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, worker: Start
) -> None:
    await worker(queue, max_output_size=1024 * 1024)
    job = await _run(jobs, queue, "head -c 700000 /dev/zero > /outputs/a; head -c 700000 /dev/zero > /outputs/b")
    assert job.result.reason == jobs_pb2.FINISH_REASON_ERROR, job.result
    assert job.result.message == "outputs too big: more than 1 MiB in total (the limit, max-output-size)"
    assert job.attempt == 1 and not job.result.outputs
    await _an_innocent_job_runs_once(jobs, queue)


@pytest.mark.timeout(300)
async def test_150000_outputs_finish_as_error_and_the_worker_goes_on(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, worker: Start
) -> None:
    """Issue 20's attack, for real, against the default limits."""
    await worker(queue)
    job = await _run(jobs, queue, "cd /outputs && seq 150000 | xargs touch", timeout=240)
    assert job.result.reason == jobs_pb2.FINISH_REASON_ERROR, job.result
    limit = WorkerSettings(queue=queue).max_outputs
    assert job.result.message == f"too many outputs: more than {limit} files (the limit, max-outputs)"
    assert job.attempt == 1
    await _an_innocent_job_runs_once(jobs, queue)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("many", "write"),
    [(20_000, "echo $n"), (ServerSettings().max_outputs, 'printf "%0200d" $n')],
    ids=["20000-small", "at-the-limits"],
)
async def test_many_outputs_are_served_by_every_route(
    jobs: jobs_pb2_grpc.JobServiceStub,
    rest: httpx.AsyncClient,
    queue: str,
    worker: Start,
    many: int,
    write: str,
) -> None:
    """20,000 small outputs, and the most a result may hold by default (20,000 outputs of 200 bytes,
    the largest inlined: 1 MiB of them inline, the rest uploaded): every route serves them, GetJob
    to a gRPC client with the default 4 MiB message limit too."""
    await worker(queue)
    job = await _run(jobs, queue, f"cd /outputs && for n in $(seq {many}); do {write} > $n; done", 240)
    assert job.result.reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert len(job.result.outputs) == many
    got = await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
    assert len(got.job.result.outputs) == many
    kinds = {ref.type for ref in got.job.result.outputs.values()}
    assert kinds == ({"base64"} if write.startswith("echo") else {"base64", "key"}), kinds
    long = httpx.Timeout(120)
    for route in (f"/j/{job.id}", f"/q/{queue}/j/{job.id}"):
        response = await rest.get(route, timeout=long)
        assert response.status_code == 200, (route, response.status_code, response.text[:300])
        assert len(response.json()["job"]["result"]["outputs"]) == many, route
    for route in (f"/j/{job.id}/result.json", f"/q/{queue}/j/{job.id}/result.json"):
        response = await rest.get(route, timeout=long)
        assert response.status_code == 200, (route, response.status_code, response.text[:300])
        assert len(_outputs_of(response.json())) == many, route
    response = await rest.get(f"/j/{job.id}/outputs/12345", timeout=long)
    assert (response.status_code, response.text.strip().lstrip("0")) == (200, "12345")
    for route in (f"/j/{job.id}/stream", f"/q/{queue}/j/{job.id}/stream"):
        events = await _events(rest, route)
        assert events[-1][0] == "final", [name for name, _ in events]
        assert len(events[-1][1]["result"]["outputs"]) == many, route
    response = await rest.get(f"/j/{job.id}/watch", timeout=long)
    assert response.status_code == 200, (response.status_code, response.text[:300])
    assert f'"{many}"' in response.text


def _outputs_of(body: dict[str, object]) -> dict[str, object]:
    result = body.get("result", body)
    assert isinstance(result, dict)
    outputs = result["outputs"] if "outputs" in result else result["result"]["outputs"]
    assert isinstance(outputs, dict)
    return outputs


async def _events(rest: httpx.AsyncClient, route: str) -> list[tuple[str, dict[str, object]]]:
    events: list[tuple[str, dict[str, object]]] = []
    async with rest.stream("GET", route, timeout=httpx.Timeout(120)) as response:
        assert response.status_code == 200, (route, response.status_code, await response.aread())
        name = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


async def test_the_server_turns_a_result_over_its_limits_into_an_error(
    channel: grpc.aio.Channel, jobs: jobs_pb2_grpc.JobServiceStub, queue: str
) -> None:
    """A worker that ignores the limits it learnt at registration (a hand-driven stream)."""
    stream = WorkerStream(workers_pb2_grpc.WorkerServiceStub(channel).Connect())
    register = workers_pb2.RegisterWorker(worker_id=f"w-{queue[-12:]}", queue=queue, cpus=1, secret=f"s-{queue}")
    await stream.write(workers_pb2.ConnectRequest(register=register))
    registered = (await stream.read()).registered
    assert registered.max_outputs == ServerSettings().max_outputs
    assert registered.max_output_size == ServerSettings().max_output_size
    for too_many in (registered.max_outputs + 1, 2):
        definition = definition_pb2.JobDefinition(image=BUSYBOX, command=f"echo {too_many}")
        job_id = (await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))).job_id
        assignment = await _assignment(stream)
        result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS)
        for index in range(too_many):  # tiny, or (2 of them) 5 MiB each: over the bytes a result may hold
            size = 5 * 1024 * 1024 if too_many == 2 else 1
            result.outputs[str(index)].value.string_value = "x" * size
        finished = workers_pb2.JobFinished(job_id=job_id, attempt=assignment.attempt, result=result)
        await stream.write(workers_pb2.ConnectRequest(finished=finished))
        job = await wait_finished(jobs, job_id)
        assert job.result.reason == jobs_pb2.FINISH_REASON_ERROR and not job.result.outputs, job.result.message
        if too_many == 2:
            assert job.result.message.startswith("outputs too big for a result"), job.result.message
        else:
            assert job.result.message == (
                f"too many outputs: more than {too_many - 1} files (the server's limit, max-outputs)"
            )


async def _assignment(stream: WorkerStream) -> workers_pb2.JobAssignment:
    while not (message := await stream.read()).HasField("assignment"):
        pass  # acknowledgements of earlier results
    return message.assignment
