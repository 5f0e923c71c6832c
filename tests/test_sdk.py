"""The Python SDK against a real server, Envoy and worker; and the README's examples, run and type-checked."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import pytest_asyncio
from google.api import httpbody_pb2

from jobwire import (
    Client,
    InvalidDefinition,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    RequestFailed,
    Retry,
    ServerUnavailable,
    Transfer,
)
from jobwire.cli.services import free_port
from jobwire.files import _Upload
from jobwire.server.app import build_server
from jobwire.server.settings import ServerSettings
from jobwire.v1 import files_pb2, files_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, Stack, WorkerHandle

pytestmark = pytest.mark.docker
StartWorker = Callable[..., Awaitable[WorkerHandle]]
REPO = Path(__file__).resolve().parent.parent
README_BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)


@pytest_asyncio.fixture(loop_scope="session")
async def client(stack: Stack) -> AsyncIterator[Client]:
    """A Client through Envoy (gRPC on the REST port)."""
    async with Client(f"127.0.0.1:{stack.envoy_port}") as opened:
        yield opened


def _module(code: str, path: Path) -> ModuleType:
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_has_the_sdk_examples() -> None:
    assert len(README_BLOCKS) == 2
    assert "from jobwire import Client" in README_BLOCKS[0]
    assert "from jobwire import SyncClient" in README_BLOCKS[1]


async def test_readme_async_example_runs(
    stack: Stack,
    queue: str,
    start_worker: StartWorker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await start_worker(queue)
    monkeypatch.chdir(tmp_path)
    example = _module(README_BLOCKS[0], tmp_path / "readme_async.py")
    assert await example.main(f"127.0.0.1:{stack.envoy_port}", queue) == 0
    printed = capsys.readouterr().out
    assert "log: 1000\n" in printed
    assert "outputs/lines.txt = 1000" in printed
    assert (tmp_path / "outputs" / "lines.txt").read_text().strip() == "1000"
    assert "0 queued, 0 running, 1 worker(s)" in printed


async def test_readme_sync_example_runs(
    stack: Stack,
    queue: str,
    start_worker: StartWorker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await start_worker(queue)
    example = _module(README_BLOCKS[1], tmp_path / "readme_sync.py")
    # The sync facade blocks its caller, so it runs in a thread while this loop serves the server.
    assert await asyncio.to_thread(example.main, stack.grpc_target, queue) == 0
    assert "hello from sync\n" in capsys.readouterr().out


def test_readme_examples_typecheck_strict(tmp_path: Path) -> None:
    root = tmp_path / "typecheck"
    (root / "jobwire").mkdir(parents=True)
    for folder in ("core", "server", "worker", "cli", "envoy"):
        (root / "jobwire" / folder).symlink_to(REPO / folder)
    (root / "jobwire" / "v1").symlink_to(REPO / "gen" / "jobwire" / "v1")
    for path in (REPO / "sdk").iterdir():
        (root / "jobwire" / path.name).symlink_to(path)
    names = []
    for index, code in enumerate(README_BLOCKS):
        (root / f"readme_example_{index}.py").write_text(code)
        names.append(f"readme_example_{index}.py")
    done = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "mypy"), "--strict", "--config-file", str(REPO / "pyproject.toml")),
            *("--cache-dir", str(REPO / ".mypy_cache" / "readme"), *names),
        ],
        cwd=root,
        env={**os.environ, "MYPYPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_submit_inlines_small_files_uploads_large_ones_once(
    client: Client, queue: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    await start_worker(queue)
    (tmp_path / "small.txt").write_text(f"small {uuid.uuid4().hex}")
    (tmp_path / "big.bin").write_bytes(os.urandom(300_000))
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "inner.txt").write_text("inner")
    transfers: list[Transfer] = []
    files = [tmp_path / "small.txt", tmp_path / "big.bin", tmp_path / "nested"]
    command = "sh -c 'cat /inputs/nested/inner.txt; wc -c < /inputs/big.bin; cp /inputs/big.bin /outputs/copy.bin'"
    job = await client.submit(queue, image=BUSYBOX, command=command, files=files, progress=transfers.append)
    definition = (await job.get()).definition
    assert definition.inputs["small.txt"].type == "base64"
    assert definition.inputs["big.bin"].type == "key"
    assert definition.inputs["nested/inner.txt"].type == "base64"
    assert [t.name for t in transfers if t.complete] == ["big.bin"]
    assert not transfers[-1].skipped and transfers[-1].done == 300_000
    result = await job.wait(timeout=60)
    assert "".join([chunk.text async for chunk in job.logs()]) == "inner300000\n"
    assert result.outputs["copy.bin"].type == "key"
    written = await job.download(tmp_path / "out")
    assert written == [tmp_path / "out" / "copy.bin"]
    assert written[0].read_bytes() == (tmp_path / "big.bin").read_bytes()

    transfers.clear()
    again = await client.submit(queue, image=BUSYBOX, command=command, files=files, progress=transfers.append)
    assert again.id == job.id
    assert [(t.name, t.skipped) for t in transfers] == [("big.bin", True)]


async def test_logs_follow_streams_until_the_end_and_exit_code_is_a_result(
    client: Client, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    command = "sh -c 'echo one; sleep 1; echo two >&2; exit 3'"
    job = await client.submit(queue, image=BUSYBOX, command=command, env={"Q": queue})
    chunks = [chunk async for chunk in job.logs(follow=True)]
    assert "".join(c.text for c in chunks) == "one\ntwo\n"
    assert [c.stream for c in chunks] == [jobs_pb2.LOG_STREAM_STDOUT, jobs_pb2.LOG_STREAM_STDERR]
    result = await job.wait()
    assert (result.reason, result.exit_code) == (jobs_pb2.FINISH_REASON_SUCCESS, 3)


async def test_cancel_and_failed_jobs_raise_job_failed(client: Client, queue: str, start_worker: StartWorker) -> None:
    await start_worker(queue)
    job = await client.submit(queue, image=BUSYBOX, command="sleep 600", env={"N": queue})
    async with contextlib.aclosing(job.watch(logs=False)) as events:
        async for event in events:
            if isinstance(event, jobs_pb2.Job) and event.state == jobs_pb2.JOB_STATE_RUNNING:
                break
    with pytest.raises(InvalidRequest, match=r"needs the job.s queue"):  # a job id names no queue's run
        await client.job(job.id).cancel()
    cancelled = await client.job(job.id, queue).cancel()
    assert cancelled.id == job.id
    with pytest.raises(JobFailed) as caught:
        await job.wait(timeout=30)
    assert caught.value.result.reason == jobs_pb2.FINISH_REASON_CANCELLED
    assert "cancelled" in str(caught.value)


async def test_jobs_iterates_every_page_oldest_first(client: Client, queue: str) -> None:
    submitted = [
        (await client.submit(queue, image=BUSYBOX, command=f"echo {n}", env={"Q": queue})).id for n in range(5)
    ]
    listed = [job.id async for job in client.jobs(queue, page_size=2)]
    assert listed == submitted
    queued = [job.id async for job in client.jobs(queue, state=jobs_pb2.JOB_STATE_QUEUED)]
    assert queued == submitted
    status = await client.queue_status(queue)
    assert (status.queued, status.running, list(status.workers)) == (5, 0, [])
    assert "queue_length 5" in await client.queue_metrics(queue)


async def test_submit_many_runs_a_sweep_in_order_all_or_nothing(
    client: Client, queue: str, start_worker: StartWorker
) -> None:
    sweep = [{"image": BUSYBOX, "command": f"sh -c 'echo {n} > /outputs/n.txt'", "env": {"Q": queue}} for n in range(5)]
    with pytest.raises(InvalidDefinition, match=r"definitions\[5\]: invalid definition: .*needs an `image`"):
        await client.submit_many(queue, [*sweep, {"command": "echo no image"}])
    assert (await client.queue_status(queue)).queued == 0  # checked before anything was sent
    jobs = await client.submit_many(queue, [*sweep, sweep[0]])
    assert [job.id for job in jobs[:5]] == [job.id async for job in client.jobs(queue)]  # queued in order
    assert jobs[5].id == jobs[0].id  # identical definitions are one job
    await start_worker(queue)
    for n, job in enumerate(jobs[:5]):
        assert (await job.wait(timeout=120)).reason == jobs_pb2.FINISH_REASON_SUCCESS
        assert base64.b64decode((await job.outputs())["n.txt"].value.string_value) == f"{n}\n".encode()
    # As when submitted one by one, a namespace's later job replaces its earlier ones.
    slot = [{"image": BUSYBOX, "command": f"echo slot {n}", "env": {"Q": queue}} for n in range(2)]
    first, second = await client.submit_many(f"{queue}-idle", slot, namespace="slot")
    assert (await first.get()).finish_reason == jobs_pb2.FINISH_REASON_REPLACED_BY_CLIENT
    assert (await second.get()).state == jobs_pb2.JOB_STATE_QUEUED
    raw = jobs_pb2_grpc.JobServiceStub(client.channel)
    request = jobs_pb2.SubmitJobsRequest(queue=queue, jobs=[jobs_pb2.SubmitJobRequest(queue="elsewhere")])
    with pytest.raises(grpc.aio.AioRpcError, match=r"jobs\[0\]: queue 'elsewhere' is not the call's queue"):
        await raw.SubmitJobs(request)


async def test_copy_and_delete(client: Client, queue: str) -> None:
    job = await client.submit(queue, image=BUSYBOX, command="echo copied", env={"Q": queue})
    other = f"{queue}-other"
    copied = await job.copy(other)
    assert (copied.id, copied.queue) == (job.id, other)
    assert [listed.id async for listed in client.jobs(other)] == [job.id]
    await job.delete()
    assert (await job.get()).finish_reason == jobs_pb2.FINISH_REASON_DELETED


async def test_errors_are_the_sdks_own(client: Client, queue: str, tmp_path: Path) -> None:
    with pytest.raises(JobNotFound, match="not found"):
        await client.job("0" * 64).get()
    with pytest.raises(JobNotFound):
        await client.job("0" * 64).wait()
    with pytest.raises(InvalidDefinition, match="needs an `image`"):
        await client.submit(queue, {"command": "echo no image"})
    big = os.urandom(1000)
    (tmp_path / "big.bin").write_bytes(big)
    with pytest.raises(InvalidDefinition, match="maxDuration"):
        await client.submit(queue, image=BUSYBOX, max_duration="soon", files=[tmp_path / "big.bin"])
    assert not await client.files.exists(hashlib.sha256(big).hexdigest())  # checked before any upload
    with pytest.raises(InvalidDefinition, match="cannot read input"):
        await client.submit(queue, image=BUSYBOX, files=[tmp_path / "missing.csv"])
    async with Client(f"127.0.0.1:{free_port()}", retry=Retry(attempts=2, initial_backoff=0.01)) as down:
        with pytest.raises(ServerUnavailable, match="cannot reach") as caught:
            await down.queue_status(queue)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_file_client_round_trip(client: Client, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    key = await client.files.upload(data)
    assert await client.files.size(key) == len(data)
    seen: list[Transfer] = []
    await client.files.download(key, tmp_path / "blob", progress=seen.append)
    assert (tmp_path / "blob").read_bytes() == data
    assert seen[-1] == Transfer("blob", len(data), len(data), complete=True)
    assert not (tmp_path / "blob.partial").exists()
    await client.files.upload(data, "named")  # a key that is no hash: downloaded without hashing
    await client.files.download("named", tmp_path / "named")
    assert (tmp_path / "named").read_bytes() == data


async def test_a_download_that_does_not_hash_to_its_key_is_refused(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    key = await client.files.upload(data)
    stored = stack.data_directory / "blobs" / key
    stored.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the disk flipped a bit
    with pytest.raises(RequestFailed, match=f"download of {key} is corrupt"):
        await client.files.download(key, tmp_path / "blob")
    assert not (tmp_path / "blob").exists() and not (tmp_path / "blob.partial").exists()


async def test_calls_and_watches_survive_a_server_restart(tmp_path: Path, queue: str) -> None:
    settings = ServerSettings(data_directory=tmp_path, host="127.0.0.1", port=free_port(), lease_seconds=3)

    async def serve() -> asyncio.Task[None]:
        server = await build_server(settings)
        started = asyncio.Event()
        task = asyncio.create_task(server.run(started))
        await started.wait()
        return task

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    running = await serve()
    retry = Retry(attempts=40, initial_backoff=0.05, max_backoff=0.25)
    try:
        async with Client(f"127.0.0.1:{settings.port}", retry=retry) as client:
            job = await client.submit(queue, image=BUSYBOX, command="echo restart", env={"Q": queue})
            states: list[jobs_pb2.JobState.ValueType] = []
            watching = asyncio.Event()

            async def follow() -> None:
                async for event in job.watch():
                    if isinstance(event, jobs_pb2.Job):
                        states.append(event.state)
                        watching.set()

            watcher = asyncio.create_task(follow())
            await watching.wait()
            await stop(running)
            restart = asyncio.create_task(serve())
            assert (await client.queue_status(queue)).queued == 1  # retried until the server is back
            running = await restart
            await job.cancel()
            await asyncio.wait_for(watcher, 10)  # the watch resumed and saw the end
            assert states[0] == jobs_pb2.JOB_STATE_QUEUED and states[-1] == jobs_pb2.JOB_STATE_FINISHED
    finally:
        await stop(running)


async def test_an_interrupted_upload_resumes_where_the_server_stopped(client: Client) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    key = hashlib.sha256(data).hexdigest()
    stub = files_pb2_grpc.FileServiceStub(client.channel)
    half, secret = 2 * 1024 * 1024, os.urandom(16).hex()

    async def cut_short() -> AsyncIterator[files_pb2.UploadFileRequest]:
        body = httpbody_pb2.HttpBody(data=data[:half])
        yield files_pb2.UploadFileRequest(key=key, size=len(data), body=body, resume_token=secret)
        await asyncio.Event().wait()  # the client hangs; it is then cancelled

    call = stub.UploadFile(cut_short())

    async def upload_state(done: Callable[[files_pb2.GetUploadResponse], bool]) -> files_pb2.GetUploadResponse:
        while True:
            state = await stub.GetUpload(files_pb2.GetUploadRequest(key=key, resume_token=secret))
            if done(state):
                return state
            await asyncio.sleep(0.05)

    await asyncio.wait_for(upload_state(lambda state: state.in_progress), 10)
    await asyncio.sleep(1)  # the server stores the first half, then the client goes away
    call.cancel()
    kept = await asyncio.wait_for(upload_state(lambda state: not state.in_progress), 10)
    assert (kept.offset, kept.complete) == (half, False)
    seen: list[Transfer] = []
    upload = _Upload(client.files, data, key, len(data), seen.append, key)
    upload.token = secret  # the SDK's own upload, as if it had been cut short: it holds the token
    await upload.run()
    assert seen[0].done == half + 1024 * 1024  # the first chunk sent went on from the kept half
    assert seen[-1] == Transfer(key, len(data), len(data))
    assert await client.files.size(key) == len(data)
