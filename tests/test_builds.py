"""Image builds on the worker's real dockerd: Dockerfiles with build args, uploaded contexts, failures."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from google.protobuf import json_format

from jobwire.core.definition import job_id
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, Processes, Stack, StartWorker, wait_finished

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


async def test_an_empty_build_runs_the_image_with_the_seeds_id(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    definition = {"image": BUSYBOX, "command": f"echo empty build {queue}"}
    response = await rest.post(f"/q/{queue}", json={"definition": {**definition, "build": {}}})
    assert response.status_code == 200, response.text
    assert response.json()["jobId"] == job_id(json_format.ParseDict(definition, definition_pb2.JobDefinition()))
    job = await wait_finished(jobs, response.json()["jobId"], timeout=120)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert run_log(job) == f"empty build {queue}\n"


class GitHost:
    """A Git host serving one repository's archives, and only to a client with its token."""

    def __init__(self, archives: dict[str, bytes], token: str) -> None:
        self.requests: list[tuple[str, str]] = []
        expected = "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                authorization = self.headers.get("authorization", "")
                host.requests.append((self.path, authorization))
                body = archives.get(self.path) if authorization == expected else None
                self.send_response(200 if body is not None else 404)  # GitHub hides private repositories
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def git_host(queue: str) -> Iterator[GitHost]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("repo-1.2.3/Dockerfile", f"FROM {BUSYBOX}\nCOPY ref.txt /ref.txt\n")
        archive.writestr("repo-1.2.3/ref.txt", f"the v1.2.3 tag of owner/repo {queue}\n")
    host = GitHost({"/owner/repo/archive/v1.2.3.zip": buffer.getvalue()}, token=f"ghp_{queue}")
    yield host
    host.server.shutdown()
    host.server.server_close()


async def test_build_from_a_git_repository_ref_with_a_token_shows_the_token_nowhere(
    rest: httpx.AsyncClient,
    stack: Stack,
    queue: str,
    processes: Processes,
    git_host: GitHost,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = f"ghp_{queue}"
    extra = ("--git-archive-base", git_host.base, "--egress-allow", "127.0.0.1")
    worker = await processes.worker(queue, stack.grpc_target, extra=extra)
    repository = "https://github.com/owner/repo/tree/v1.2.3"
    definition = {
        "build": {"context": repository.replace("//", f"//x-access-token:{token}@")},
        "command": "cat /ref.txt",
    }
    submitted = await rest.post(f"/q/{queue}", json={"definition": definition, "control": {"namespace": "n1"}})
    assert submitted.status_code == 200, submitted.text
    job_id_ = submitted.json()["jobId"]
    answers = [submitted.text]
    async with rest.stream("GET", f"/q/{queue}/j/{job_id_}/stream") as stream:  # until it finishes
        answers.append("".join([chunk async for chunk in stream.aiter_text()]))
    for path in (
        f"/q/{queue}/j/{job_id_}",
        f"/j/{job_id_}",
        f"/j/{job_id_}/definition.json",
        f"/q/{queue}/j/{job_id_}/result.json",
        f"/j/{job_id_}/build-logs.json",
        f"/j/{job_id_}/run-logs.json",
        f"/q/{queue}",
        f"/q/{queue}/status",
    ):
        response = await rest.get(path)
        assert response.status_code == 200, (path, response.text)
        answers.append(response.text)
    job = (await rest.get(f"/q/{queue}/j/{job_id_}")).json()["job"]
    assert job["finishReason"] == "FINISH_REASON_SUCCESS", job
    assert job["definition"]["build"]["context"] == repository
    run_logs = (await rest.get(f"/j/{job_id_}/run-logs.json")).json()
    assert "".join(chunk["text"] for chunk in run_logs["chunks"]) == f"the v1.2.3 tag of owner/repo {queue}\n"
    # The seed's order: the branch's archive first, then the tag's; the token went with both.
    assert [path for path, _ in git_host.requests] == [
        "/owner/repo/archive/refs/heads/v1.2.3.zip",
        "/owner/repo/archive/v1.2.3.zip",
    ]
    assert all(authorization for _, authorization in git_host.requests)
    # The same URL without the token is the same job (answered by its result, not run again).
    again = await rest.post(f"/q/{queue}", json={"definition": {**definition, "build": {"context": repository}}})
    assert again.json()["jobId"] == job_id_
    answers.append(again.text)
    logs = [worker.output(), caplog.text]
    build_logs = (await rest.get(f"/j/{job_id_}/build-logs.json")).json()["chunks"]
    assert f"downloading the build context {repository}\n" in "".join(chunk["text"] for chunk in build_logs)
    for text in answers + logs:
        assert token not in text
