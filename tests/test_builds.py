"""Image builds on the worker's real dockerd: Dockerfiles with build args, uploaded contexts, failures."""

from __future__ import annotations

import hashlib
import io
import tarfile

import httpx
import pytest
from google.protobuf import json_format

from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, StartWorker, wait_finished

pytestmark = pytest.mark.docker


async def run(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, **fields: object) -> jobs_pb2.Job:
    definition = json_format.ParseDict(fields, definition_pb2.JobDefinition())
    submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
    return await wait_finished(jobs, submitted.job_id, timeout=120)


def run_log(job: jobs_pb2.Job) -> str:
    return "".join(chunk.text for chunk in job.result.logs)


async def build_log(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> str:
    response = await jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job_id, kind=jobs_pb2.LOG_KIND_BUILD))
    return "".join(chunk.text for chunk in response.chunks)


async def test_dockerfile_with_a_build_arg(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    dockerfile = f'FROM {BUSYBOX}\nARG GREETING\nRUN echo "$GREETING" > /greeting\nCMD ["cat", "/greeting"]\n'
    job = await run(jobs, queue, build={"dockerfile": dockerfile, "buildArgs": [f"GREETING=hello {queue}"]})
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert run_log(job) == f"hello {queue}\n"
    assert "Step 3/4" in await build_log(jobs, job.id)


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def test_build_from_an_uploaded_context_archive(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    archive = tar_gz(
        {
            "project/docker/Dockerfile": f"FROM {BUSYBOX}\nCOPY message.txt /message.txt\n".encode(),
            "project/docker/message.txt": f"from the context {queue}\n".encode(),
        }
    )
    key = hashlib.sha256(archive).hexdigest()
    response = await rest.put(f"/f/{key}", content=archive)
    assert response.status_code == 200, response.text
    job = await run(jobs, queue, build={"context": f"/f/{key}", "buildContext": "docker"}, command="cat /message.txt")
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert run_log(job) == f"from the context {queue}\n"


async def test_a_broken_dockerfile_finishes_as_error_with_its_build_log(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    job = await run(jobs, queue, build={"dockerfile": f"FROM {BUSYBOX}\nRUN exit 3 # {queue}\n"})
    assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR
    assert "the image build failed" in job.result.message
    log = await build_log(jobs, job.id)
    assert "exit 3" in log and "returned a non-zero code: 3" in log


@pytest.mark.parametrize("field", ["buildContext", "filename"])
async def test_build_paths_leaving_the_context_are_refused_at_submission(
    rest: httpx.AsyncClient, queue: str, field: str
) -> None:
    body = {"definition": {"build": {"dockerfile": f"FROM {BUSYBOX}\n", field: "../../etc"}}}
    response = await rest.post(f"/q/{queue}", json=body)
    assert response.status_code == 400
    assert f"build.{field}: invalid file name '../../etc'" in response.json()["message"]
