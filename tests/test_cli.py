"""The `jobwire` CLI as people run it: a subprocess against the real server, Envoy and a worker on dockerd."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
import pytest_asyncio

from jobwire import (
    Client,
    FileNotFound,
    InvalidDefinition,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    RequestFailed,
    ServerUnavailable,
    Timeout,
)
from jobwire.cli.app import _stdin_marker, app
from jobwire.cli.console import CliError, exit_code
from jobwire.cli.services import free_port
from jobwire.inputs import pack_context
from jobwire.v1 import jobs_pb2
from jobwire.worker.builds import build_tag
from tests.conftest import BUSYBOX, Stack, WorkerHandle

pytestmark = pytest.mark.docker
StartWorker = Callable[..., Awaitable[WorkerHandle]]
BIG = 50 * 1024 * 1024


@dataclass
class Ran:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs `python -m jobwire.cli …` in a folder, with JOBWIRE_SERVER pointing at Envoy."""

    server: str
    cwd: Path

    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBWIRE_")}
        return {**clean, "JOBWIRE_SERVER": self.server, "COLUMNS": "200"}

    async def start(self, *args: str, stdin: bool = False) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jobwire.cli",
            *args,
            cwd=self.cwd,
            env=self.env(),
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def __call__(self, *args: str, stdin: str | None = None, timeout: float = 120) -> Ran:
        process = await self.start(*args, stdin=stdin is not None)
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin.encode() if stdin else None), timeout)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return Ran(process.returncode, out.decode(), err.decode())


@pytest.fixture
def cli(stack: Stack, tmp_path: Path) -> Cli:
    return Cli(f"127.0.0.1:{stack.envoy_port}", tmp_path)


@pytest_asyncio.fixture(loop_scope="session")
async def client(stack: Stack) -> AsyncIterator[Client]:
    async with Client(stack.grpc_target) as opened:
        yield opened


async def test_job_add_three_files_uploads_the_big_one_once_streams_logs_and_writes_outputs(
    cli: Cli, stack: Stack, queue: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    await start_worker(queue)
    (tmp_path / "note.txt").write_text(f"note {queue}\n")  # inline
    (tmp_path / "table.csv").write_text("".join(f"{i},{i * i}\n" for i in range(2000)))  # uploaded
    big = os.urandom(BIG)
    (tmp_path / "big.bin").write_bytes(big)
    digest = hashlib.sha256(big).hexdigest()
    command = (
        "sh -c 'cat /inputs/note.txt; wc -l < /inputs/table.csv; mkdir /outputs/deep;"
        " sha256sum /inputs/big.bin | cut -c1-64 > /outputs/big.sha256; wc -c < /inputs/big.bin > /outputs/deep/size'"
    )
    args = ["job", "add", queue, "-f", "note.txt", "-f", "table.csv", "-f", "big.bin", "-m", BUSYBOX, "-c", command]

    first = await cli(*args, "--wait", "-o", "out")
    assert first.code == 0, first.err
    assert first.out == f"note {queue}\n2000\n"  # the container's output, streamed to stdout
    assert "big.bin: uploaded 52.4 MB" in first.err and "table.csv: uploaded" in first.err
    assert "note.txt" not in first.err  # small files travel inline
    assert (tmp_path / "out" / "big.sha256").read_text().strip() == digest
    assert (tmp_path / "out" / "deep" / "size").read_text().strip() == str(BIG)
    assert "job " in first.err and "success, exit code 0" in first.err
    blob = stack.data_directory / "blobs" / digest
    stored = blob.stat().st_ino

    second = await cli(*args, "-w", "-o", "again")
    assert second.code == 0, second.err
    assert "big.bin: already on the server, not uploaded" in second.err
    assert "big.bin: uploaded" not in second.err
    assert blob.stat().st_ino == stored  # the server's blob was not written again
    assert _job_id(first.err) == _job_id(second.err)  # the same job, its result cached
    assert second.out == first.out
    assert (tmp_path / "again" / "big.sha256").read_text().strip() == digest


def _job_id(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if re.fullmatch(r"[0-9a-f]{64}", line))


async def test_job_logs_follow_prints_lines_as_they_come_and_exit_code(
    cli: Cli, client: Client, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    command = "sh -c 'echo one; sleep 3; echo two; sleep 1; exit 7'"
    job = await client.submit(queue, image=BUSYBOX, command=command, env={"Q": queue})
    async with contextlib.aclosing(job.watch(logs=False)) as events:
        async for event in events:
            if isinstance(event, jobs_pb2.Job) and event.state == jobs_pb2.JOB_STATE_RUNNING:
                break
    process = await cli.start("job", "logs", "-f", "--exit-code", job.id)
    assert process.stdout is not None and process.stderr is not None
    assert await asyncio.wait_for(process.stdout.readline(), 30) == b"one\n"
    assert (await job.get()).state == jobs_pb2.JOB_STATE_RUNNING  # printed while the job still runs
    assert await asyncio.wait_for(process.stdout.read(), 30) == b"two\n"
    assert await asyncio.wait_for(process.wait(), 30) == 7, await process.stderr.read()

    assert (await cli("job", "logs", job.id)).code == 0  # without --exit-code: 0
    after = await cli("job", "logs", "--exit-code", job.id)
    assert (after.code, after.out) == (7, "one\ntwo\n")
    chunks = [json.loads(line) for line in (await cli("job", "logs", "--json", job.id)).out.splitlines()]
    assert [(c["text"], c["stream"]) for c in chunks] == [
        ("one\n", "LOG_STREAM_STDOUT"),
        ("two\n", "LOG_STREAM_STDOUT"),
    ]


async def test_json_of_job_get_and_queue_status_matches_rest(
    cli: Cli, client: Client, rest: httpx.AsyncClient, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    job = await client.submit(queue, image=BUSYBOX, command="sh -c 'echo json; echo x > /outputs/x'", env={"Q": queue})
    await job.wait(timeout=60)

    got = await cli("job", "get", job.id, "--json")
    assert got.code == 0, got.err
    assert json.loads(got.out) == (await rest.get(f"/j/{job.id}")).json()

    status = await cli("queue", "status", queue, "--json")
    assert status.code == 0, status.err
    over_rest = (await rest.get(f"/q/{queue}/status")).json()
    printed = json.loads(status.out)
    for answer in (printed, over_rest):  # heartbeats move lastSeenTime between the two reads
        assert len(answer["workers"]) == 1
        del answer["workers"][0]["lastSeenTime"]
    assert printed == over_rest
    assert printed["finished"] == "1"


async def test_job_add_many_submits_a_sweep_from_json_lines_in_order(cli: Cli, client: Client, queue: str) -> None:
    lines = [json.dumps({"image": BUSYBOX, "command": f"echo {n}", "env": {"Q": queue}}) for n in range(3)]
    lines.insert(1, "")  # blank lines are skipped; a `{"definition": …}` line is the same as a bare one
    lines.append(json.dumps({"definition": {"image": BUSYBOX, "command": "echo 3", "env": {"Q": queue}}}))
    ran = await cli("job", "add-many", queue, stdin="\n".join(lines) + "\n")
    assert ran.code == 0, ran.err
    assert ran.out.split() == [job.id async for job in client.jobs(queue)] and len(ran.out.split()) == 4
    broken = await cli("job", "add-many", queue, stdin=lines[0] + "\n{broken\n")
    assert (broken.code, broken.out) == (5, "") and "line 2 of stdin" in broken.err
    missing = await cli("job", "add-many", queue, "missing.jsonl")
    assert missing.code == 2 and "cannot read missing.jsonl" in missing.err
    assert (await client.queue_status(queue)).queued == 4  # nothing of the refused ones


async def test_errors_are_one_line_with_distinct_exit_codes(cli: Cli, queue: str) -> None:
    unreachable = await cli("job", "get", "0" * 64, "--server", f"127.0.0.1:{free_port()}", "--retries", "0")
    unknown = await cli("job", "get", "0" * 64)
    body = {"definition": {"image": BUSYBOX, "inputs": {"../escape": {"type": "utf8", "value": "x"}}}}
    invalid = await cli("job", "add", queue, "-", stdin=json.dumps(body))
    not_json = await cli("job", "add", queue, "-", stdin="{not json")
    usage = await cli("job", "add", queue, "--gpus", "many")
    for ran in (unreachable, unknown, invalid, not_json, usage):
        assert len(ran.err.splitlines()) == 1, ran.err
        assert ran.err.startswith("error: ") and "Traceback" not in ran.err
        assert ran.out == ""
    assert unreachable.code == 3 and "cannot reach the jobwire server" in unreachable.err
    assert unknown.code == 4 and f"job {'0' * 64} not found" in unknown.err
    assert invalid.code == 5 and "invalid definition: inputs: invalid file name '../escape'" in invalid.err
    assert not_json.code == 5 and "invalid definition on stdin" in not_json.err
    assert usage.code == 2 and "--gpus" in usage.err
    assert len({unreachable.code, unknown.code, invalid.code, usage.code}) == 4


async def test_a_queue_made_with_a_worker_credential_is_rotated_and_revoked_by_its_holder(cli: Cli) -> None:
    created = await cli("queue", "new")
    assert created.code == 0, created.err
    exports = dict(line.removeprefix("export ").split("=", 1) for line in created.out.splitlines())
    queue, credential = exports["JOBWIRE_QUEUE"], exports["JOBWIRE_CREDENTIAL"]
    assert len(queue) == 32 and len(credential) >= 43
    assert (await cli("queue", "rotate", queue, "--credential", "a-guess")).code != 0
    rotated = await cli("queue", "rotate", queue, "--credential", credential)
    assert rotated.code == 0, rotated.err
    new = rotated.out.strip().removeprefix("export JOBWIRE_CREDENTIAL=")
    assert new and new != credential
    refused = await cli("queue", "revoke", queue, "--credential", credential)  # the old one died with the rotation
    assert refused.code != 0 and "credential" in refused.err
    assert (await cli("queue", "revoke", queue, "--credential", new)).code == 0
    assert (await cli("queue", "rotate", queue, "--credential", new)).code != 0


async def test_queue_file_and_job_commands(cli: Cli, client: Client, queue: str, tmp_path: Path) -> None:
    minted = (await cli("queue", "new", "--open")).out.strip()
    assert len(minted) == 32 and minted != (await cli("queue", "new", "--open")).out.strip()

    (tmp_path / "blob.bin").write_bytes(os.urandom(5000))
    digest = hashlib.sha256((tmp_path / "blob.bin").read_bytes()).hexdigest()
    put = await cli("file", "put", "blob.bin")
    assert (put.code, put.out.strip()) == (0, digest), put.err
    assert json.loads((await cli("file", "exists", digest, "--json")).out) == {"exists": True, "size": "5000"}
    assert (await cli("file", "exists", "f" * 64)).code == 4
    fetched = await cli("file", "get", digest, "-o", "copy.bin")
    assert fetched.code == 0 and (tmp_path / "copy.bin").read_bytes() == (tmp_path / "blob.bin").read_bytes()

    add = await cli("job", "add", queue, "-m", BUSYBOX, "-c", "sleep 600", "--env", f"Q={queue}", "--namespace", "me")
    assert add.code == 0, add.err
    job_id = add.out.strip()
    listed = await cli("job", "ls", queue, "--json")
    assert [job["id"] for job in json.loads(listed.out)["jobs"]] == [job_id]
    assert (await cli("job", "ls", queue, "--state", "running")).out == ""
    assert "no worker is connected" in (await cli("job", "get", job_id, "--queue", queue)).out
    cancelled = await cli("job", "cancel", job_id, "--queue", queue, "--namespace", "me")
    assert cancelled.code == 0 and "finished: cancelled" in cancelled.out, cancelled.err
    waited = await cli("job", "wait", job_id)
    assert waited.code == 6 and waited.err.startswith(f"error: job {job_id} finished: cancelled")
    status = await cli("queue", "status", queue)
    assert status.out.splitlines() == [f"queue {queue}: 0 queued, 0 running, 1 finished", "no worker connected"]
    assert "queue_length 0" in (await cli("queue", "metrics", queue)).out


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ServerUnavailable("down"), 3),
        (Timeout("slow"), 3),
        (JobNotFound("no job"), 4),
        (FileNotFound("no file"), 4),
        (InvalidDefinition("bad"), 5),
        (InvalidRequest("bad"), 5),
        (JobFailed("j", jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_TIMED_OUT)), 6),
        (RequestFailed("other"), 1),
        (CliError("usage", 2), 2),
    ],
)
def test_exit_codes(error: BaseException, code: int) -> None:
    assert exit_code(error) == code


def test_a_lone_dash_reads_the_definition_from_stdin() -> None:
    assert _stdin_marker(["job", "add", "q", "-", "-w"]) == ["job", "add", "q", "--definition=-", "-w"]
    assert _stdin_marker(["job", "get", "-"]) == ["job", "get", "-"]


def test_shell_completion_covers_the_commands() -> None:
    script = app.generate_completion(prog_name="jobwire", shell="bash")
    assert all(name in script for name in ("job", "queue", "file", "logs", "--exit-code"))


async def test_job_add_builds_from_a_dockerfile_and_a_packed_context(
    cli: Cli, client: Client, queue: str, start_worker: StartWorker, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    await start_worker(queue)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "hello.txt").write_text(f"built {queue}\n")
    (tmp_path / "Dockerfile").write_text(f"FROM {BUSYBOX}\nCOPY hello.txt /hello.txt\n")
    ran = await cli("job", "add", queue, "--build-file", "Dockerfile", "--context", "ctx", "-c", "cat /hello.txt", "-w")
    job = await client.job(_job_id(ran.err)).get()
    try:
        assert ran.code == 0, ran.err
        assert ran.out == f"built {queue}\n"
        assert "build context: uploaded" in ran.err
        key = hashlib.sha256(pack_context(tmp_path / "ctx")).hexdigest()
        assert job.definition.build.context == f"/f/{key}"  # no host in it: the same folder is the same job
        assert job.definition.build.dockerfile.startswith(f"FROM {BUSYBOX}")
        assert not job.definition.HasField("image")
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(build_tag(job.definition.build), force=True)
