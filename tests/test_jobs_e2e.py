"""One job end to end on real components: REST through Envoy, gRPC, the CLI, a worker on dockerd."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import docker
import grpc
import httpx
import pytest
from google.protobuf import json_format

from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, PYTHON, Stack, StartWorker, wait_finished
from tests.test_definition import SEED_VECTORS

pytestmark = pytest.mark.docker
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def definition(**fields: object) -> definition_pb2.JobDefinition:
    return json_format.ParseDict(fields, definition_pb2.JobDefinition())


async def submit(rest: httpx.AsyncClient, queue: str, body: dict[str, object]) -> str:
    response = await rest.post(f"/q/{queue}", json=body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["jobId"]
    return job_id


async def test_healthz_through_envoy(rest: httpx.AsyncClient) -> None:
    response = await rest.get("/healthz")
    assert (response.status_code, response.text) == (200, "OK")


async def test_rest_submit_runs_and_result_shows_logs(
    rest: httpx.AsyncClient,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
) -> None:
    await start_worker(queue)
    job_id = await submit(rest, queue, {"definition": {"image": BUSYBOX, "command": "echo hello"}})
    await wait_finished(jobs, job_id)
    result = (await rest.get(f"/j/{job_id}/result.json")).json()
    assert result["state"] == "JOB_STATE_FINISHED"
    assert result["result"]["reason"] == "FINISH_REASON_SUCCESS"
    assert result["result"]["exitCode"] == 0
    assert "".join(chunk["text"] for chunk in result["result"]["logs"]) == "hello\n"
    job = (await rest.get(f"/j/{job_id}")).json()["job"]
    kinds = [event["kind"] for event in job["history"]]
    assert kinds == [
        "JOB_EVENT_KIND_QUEUED",
        "JOB_EVENT_KIND_ASSIGNED",
        "JOB_EVENT_KIND_STARTED",
        "JOB_EVENT_KIND_FINISHED",
    ]
    assert (job["definition"]["image"], job["definition"]["command"]) == (BUSYBOX, "echo hello")


@pytest.mark.parametrize(("body", "expected"), SEED_VECTORS)
async def test_seed_test_vectors_over_rest(
    rest: httpx.AsyncClient, queue: str, body: dict[str, object], expected: str
) -> None:
    assert await submit(rest, queue, {"definition": body}) == expected


async def test_cli_job_add_with_file_wait_and_outputs(
    stack: Stack, queue: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    await start_worker(queue)
    (tmp_path / "data.csv").write_text("".join(f"{i},x\n" for i in range(1234)))
    command = [
        sys.executable, "-m", "jobwire.cli", "job", "add", queue,
        "-f", "data.csv", "-m", BUSYBOX, "--wait", "-o", "out", "--server", f"127.0.0.1:{stack.envoy_port}",
        "-c", 'sh -c "wc -l /inputs/data.csv > /outputs/n.txt"',
    ]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "n.txt").read_text().split()[0] == "1234"


async def test_missing_image_finishes_with_a_readable_error(
    rest: httpx.AsyncClient,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
) -> None:
    await start_worker(queue)
    job_id = await submit(rest, queue, {"definition": {"image": "jobwire/does-not-exist:1", "command": "true"}})
    job = await wait_finished(jobs, job_id)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR
    assert "jobwire/does-not-exist:1" in job.result.message
    assert "could not be pulled" in job.result.message
    assert (await rest.get("/healthz")).status_code == 200


async def test_malformed_definitions_are_rejected(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str
) -> None:
    for body in (
        {"definition": {"command": "echo no image"}},
        {"definition": {"image": BUSYBOX, "inputs": {"../escape": {"type": "utf8", "value": "x"}}}},
        {"definition": {"image": BUSYBOX, "maxDuration": "soon"}},
    ):
        response = await rest.post(f"/q/{queue}", json=body)
        assert response.status_code == 400, response.text
        assert "invalid definition" in response.json()["message"]
    malformed = await rest.post(f"/q/{queue}", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(command="x")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await rest.get("/healthz")).status_code == 200


async def test_unknown_job_is_404(rest: httpx.AsyncClient) -> None:
    response = await rest.get(f"/j/{'0' * 64}/result.json")
    assert response.status_code == 404
    assert "not found" in response.json()["message"]


async def test_container_contract(
    rest: httpx.AsyncClient,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
) -> None:
    await start_worker(queue)
    script = (
        "import os, json, pathlib\n"
        "keys = ['JOB_ID', 'JOB_INPUTS', 'JOB_OUTPUTS', 'JOB_CACHE', 'JOB_URL_PREFIX', 'MY_VAR']\n"
        "env = {k: os.environ.get(k) for k in keys}\n"
        "listing = sorted(os.listdir('/'))\n"
        "nested = pathlib.Path('/inputs/a/b/c.txt').read_text()\n"
        "pathlib.Path('/outputs/deep/dir').mkdir(parents=True)\n"
        "pathlib.Path('/outputs/deep/dir/big.bin').write_bytes(bytes(range(256)) * 40)\n"
        "print(json.dumps({'env': env, 'root': listing, 'nested': nested}))\n"
    )
    body = {
        "definition": {
            "image": PYTHON,
            "command": "python3 /inputs/main.py",
            "env": {"MY_VAR": "value"},
            "inputs": {
                "main.py": {"type": "utf8", "value": script},
                "a/b/c.txt": {"type": "base64", "value": base64.b64encode(b"nested!").decode()},
            },
        }
    }
    job_id = await submit(rest, queue, body)
    job = await wait_finished(jobs, job_id)
    assert job.result.exit_code == 0, job.result
    import json

    report = json.loads("".join(chunk.text for chunk in job.result.logs))
    assert report["env"]["JOB_ID"] == job_id
    assert report["env"]["JOB_INPUTS"] == "/inputs" and report["env"]["JOB_OUTPUTS"] == "/outputs"
    assert report["env"]["JOB_CACHE"] == "/job-cache" and report["env"]["MY_VAR"] == "value"
    assert report["env"]["JOB_URL_PREFIX"].endswith(f"/j/{job_id}")
    assert report["nested"] == "nested!"
    assert {"inputs", "outputs", "job-cache"} <= set(report["root"])
    assert set(report["root"]) - {"inputs", "outputs", "job-cache", ".dockerenv"} <= {
        "bin", "dev", "etc", "home", "lib", "lib64", "media", "mnt", "opt", "proc", "root", "run", "sbin",
        "srv", "sys", "tmp", "usr", "var",
    }  # fmt: skip
    output = job.result.outputs["deep/dir/big.bin"]
    expected = bytes(range(256)) * 40
    assert (output.type, output.hash) == ("key", hashlib.sha256(expected).hexdigest())
    served = await rest.get(f"/j/{job_id}/outputs/deep/dir/big.bin")
    assert served.status_code == 200 and served.content == expected
    assert (await rest.get(f"/j/{job_id}/inputs/a/b/c.txt")).content == b"nested!"


async def test_stdout_stderr_and_exit_code(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    command = "sh -c 'echo out; echo err >&2; printf \"h\\303\\251\"; exit 3'"
    response = await jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
    )
    job = await wait_finished(jobs, response.job_id)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS
    assert job.result.exit_code == 3
    stdout = "".join(c.text for c in job.result.logs if c.stream == jobs_pb2.LOG_STREAM_STDOUT)
    stderr = "".join(c.text for c in job.result.logs if c.stream == jobs_pb2.LOG_STREAM_STDERR)
    assert (stdout, stderr) == ("out\nhé", "err\n")


async def test_each_jobs_folder_is_gone_once_its_result_is_in(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    """Small folders are removed on the worker's loop, others in a thread: both before the result."""
    worker = await start_worker(queue)
    commands = {
        "small": "sh -c 'echo hi > /outputs/a.txt'",
        "uploaded output": "sh -c 'head -c 5000 /dev/zero > /outputs/big.bin'",
        "many outputs": "sh -c 'for n in $(seq 100); do echo $n > /outputs/$n.txt; done'",
        "failed": "sh -c 'echo partial > /outputs/p.txt; exit 1'",
    }
    for name, command in commands.items():
        response = await jobs.SubmitJob(
            jobs_pb2.SubmitJobRequest(queue=queue, definition=definition(image=BUSYBOX, command=command))
        )
        job = await wait_finished(jobs, response.job_id)
        assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, name
        assert len(job.result.outputs) == {"many outputs": 100}.get(name, 1), name
        assert list((worker.daemon.settings.data_directory / "jobs").iterdir()) == [], name


async def test_time_limit_kills_the_container(
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
    docker_client: docker.DockerClient,
) -> None:
    await start_worker(queue)
    request = jobs_pb2.SubmitJobRequest(
        queue=queue, definition=definition(image=BUSYBOX, command="sleep 60", maxDuration="2s")
    )
    job = await wait_finished(jobs, (await jobs.SubmitJob(request)).job_id, timeout=30)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_TIMED_OUT
    assert "time limit of 2s" in job.result.message
    assert _containers(docker_client, job.id) == []


async def test_cancel_kills_a_running_container(
    rest: httpx.AsyncClient,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
    docker_client: docker.DockerClient,
) -> None:
    await start_worker(queue)
    job_id = await submit(rest, queue, {"definition": {"image": BUSYBOX, "command": "sleep 600", "env": {"N": queue}}})
    for _ in range(300):  # until the container exists
        if _containers(docker_client, job_id):
            break
        await asyncio.sleep(0.1)
    assert _containers(docker_client, job_id), "the container never started"
    response = await rest.post(f"/q/{queue}/j/{job_id}/cancel")
    assert response.status_code == 200, response.text
    job = await wait_finished(jobs, job_id)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_CANCELLED
    for _ in range(100):
        if not _containers(docker_client, job_id):
            break
        await asyncio.sleep(0.1)
    assert _containers(docker_client, job_id) == []


async def test_identical_submissions_are_one_job_and_results_are_cached(
    rest: httpx.AsyncClient,
    jobs: jobs_pb2_grpc.JobServiceStub,
    queue: str,
    start_worker: StartWorker,
) -> None:
    await start_worker(queue)
    body = {"definition": {"image": BUSYBOX, "command": f"echo {os.urandom(4).hex()}"}}
    first, second = await asyncio.gather(submit(rest, queue, body), submit(rest, queue, body))
    assert first == second
    job = await wait_finished(jobs, first)
    again = await rest.post(f"/q/{queue}", json=body)
    assert again.json()["job"]["state"] == "JOB_STATE_FINISHED"
    assert (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=first))).job.attempt == job.attempt == 1


async def test_queued_job_says_why_it_waits(rest: httpx.AsyncClient, queue: str) -> None:
    job_id = await submit(rest, queue, {"definition": {"image": BUSYBOX, "command": "echo nobody"}})
    job = (await rest.get(f"/q/{queue}/j/{job_id}")).json()["job"]
    assert job["state"] == "JOB_STATE_QUEUED"
    assert "no worker is connected" in job["waitingReason"]
    listed = (await rest.get(f"/q/{queue}")).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    status = (await rest.get(f"/q/{queue}/status")).json()
    assert status["queued"] == "1"
    metrics = await rest.get(f"/q/{queue}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "queue_length 1" in metrics.text


def _containers(client: docker.DockerClient, job_id: str) -> list[str]:
    return [c.id for c in client.containers.list(all=True, sparse=True, filters={"label": f"io.jobwire.job={job_id}"})]


async def test_grpcurl_lists_services_and_health(stack: Stack) -> None:
    target = f"127.0.0.1:{stack.envoy_port}"

    async def grpcurl(*args: str) -> str:
        done = await asyncio.to_thread(
            subprocess.run,
            [GRPCURL, "-plaintext", target, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    listing = (await grpcurl("list")).split()
    assert {"jobwire.v1.JobService", "jobwire.v1.FileService", "jobwire.v1.WorkerService"} <= set(listing)
    assert '"SERVING"' in await grpcurl("grpc.health.v1.Health/Check")
