"""Followers that resume anywhere, and log reads that cost what they return.

An SDK follower on a real in-process gRPC server that breaks its streams the ways proxies and
dying replicas do; SDK and CLI followers through the real Envoy in front of two replicas on
PostgreSQL, one of them killed mid-stream; the log hub on a real SQLite store with a log of many
batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from jobwire import Client
from jobwire.connection import Retry
from jobwire.core.definition import job_id
from jobwire.errors import JobNotFound
from jobwire.server import eventstream
from jobwire.server.bus.memory import MemoryBus
from jobwire.server.logs import TAIL_BYTES, LogHub
from jobwire.server.store.base import Attempt, Holder, StateStore
from jobwire.server.store.sqlite import SqliteDatabase, SqliteStore
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import JOBWIRE, Processes, eventually, submit_one
from tests.test_scale_out import Deployment, _serving, submit
from tests.test_scale_out import deployment as deployment  # the fixture: two replicas behind one Envoy
from tests.test_store import claim as claim_one
from tests.test_store import holder
from tests.test_store import store as store  # the fixture: each backend
from tests.test_store import submit as submit_n

RUN = jobs_pb2.LOG_KIND_RUN
RUNNING, FINISHED = jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_FINISHED


def _job(attempt: int, state: int = RUNNING) -> jobs_pb2.WatchJobResponse:
    return jobs_pb2.WatchJobResponse(job=jobs_pb2.Job(id="j", attempt=attempt, state=state))  # type: ignore[arg-type]


def _lines(attempt: int, start: int, end: int) -> jobs_pb2.WatchJobResponse:
    chunks = [jobs_pb2.LogChunk(text=f"{attempt}:{i}\n") for i in range(start, end)]
    return jobs_pb2.WatchJobResponse(logs=jobs_pb2.LogBatch(kind=RUN, start=start, chunks=chunks, attempt=attempt))


class Breaking(jobs_pb2_grpc.JobServiceServicer):
    """WatchJob played from a script: each call sends its messages, then ends with its status."""

    def __init__(self, script: Sequence[tuple[list[jobs_pb2.WatchJobResponse], grpc.StatusCode | None]]) -> None:
        self.script, self.asked = list(script), list[int]()

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        self.asked.append(request.run_logs_since)
        messages, status = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        for message in messages:
            yield message
        if status is not None:
            await context.abort(status, "broken on purpose")


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Breaking], Any]]:
    servers: list[grpc.aio.Server] = []

    async def start(servicer: Breaking) -> Client:
        server = grpc.aio.server()
        jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return Client(f"127.0.0.1:{port}", retry=Retry(initial_backoff=0.01, max_backoff=0.05, stream_failures=4))

    yield start
    for server in servers:
        await server.stop(None)


async def _follow(client: Client) -> list[str]:
    async with client:
        return [chunk.text async for chunk in client.job("j", "q").logs(follow=True)]


async def test_a_follower_resumes_from_its_cursor_after_statuses_that_are_no_answer(serve: Any) -> None:
    servicer = Breaking(
        [
            ([_job(1), _lines(1, 0, 4)], grpc.StatusCode.INTERNAL),  # Envoy's RST_STREAM of a dead replica
            ([_job(1), _lines(1, 2, 7)], grpc.StatusCode.UNKNOWN),  # a resend overlapping what was delivered
            ([_job(1)], grpc.StatusCode.CANCELLED),
            ([], grpc.StatusCode.DEADLINE_EXCEEDED),
            ([_job(2), _lines(2, 7, 9)], None),  # re-queued: a cursor of attempt 1 would skip attempt 2's start
            ([_job(2), _lines(2, 0, 3), _job(2, FINISHED)], None),
        ]
    )
    texts = await _follow(await serve(servicer))
    assert texts == [f"1:{i}\n" for i in range(7)] + [f"2:{i}\n" for i in range(3)]  # each line once, in order
    assert servicer.asked == [0, 4, 7, 7, 7, 0]  # resumed from the cursor; attempt 2 from its start


async def test_a_follower_gives_up_on_answers_and_after_its_bound_of_failures(serve: Any) -> None:
    refused = Breaking([([], grpc.StatusCode.NOT_FOUND)])
    with pytest.raises(JobNotFound):
        await _follow(await serve(refused))
    assert refused.asked == [0]  # an answer: no retry
    broken = Breaking([([], grpc.StatusCode.INTERNAL)])
    with pytest.raises(Exception, match="broken on purpose"):
        await _follow(await serve(broken))
    assert len(broken.asked) == 4  # Retry.stream_failures consecutive failures, then the error


class Counting:
    """A JobService stub that counts the WatchJob calls made through it."""

    def __init__(self, stub: jobs_pb2_grpc.JobServiceAsyncStub) -> None:
        self.stub, self.watches = stub, 0

    def WatchJob(self, request: jobs_pb2.WatchJobRequest) -> Any:
        self.watches += 1
        return self.stub.WatchJob(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


@pytest.mark.docker
@pytest.mark.timeout(300)
async def test_followers_through_envoy_outlive_the_replica_they_follow_on(
    deployment: Deployment, processes: Processes, queue: str
) -> None:
    a, b = deployment.a, deployment.b
    job_id = await submit(a, queue, "sh -c 'seq 1 3000; sleep 3; seq 3001 6000'")
    await b.process.kill()  # while b is down every follower attaches on a, the replica killed below
    clients = [Client(deployment.envoy_target) for _ in range(2)]
    stubs = [Counting(client.job_service) for client in clients]
    for client, stub in zip(clients, stubs, strict=True):
        client._jobs = stub  # type: ignore[assignment]
    texts, attached, first_half = ["", ""], [asyncio.Event(), asyncio.Event()], [asyncio.Event(), asyncio.Event()]

    async def follow(n: int) -> None:
        async for event in clients[n].job(job_id, queue).watch():
            attached[n].set()
            if isinstance(event, jobs_pb2.LogBatch):
                texts[n] += "".join(chunk.text for chunk in event.chunks)
                if "\n3000\n" in texts[n]:
                    first_half[n].set()

    cli = await asyncio.create_subprocess_exec(
        JOBWIRE, "job", "logs", "-f", job_id, "--server", deployment.envoy_target, stdout=asyncio.subprocess.PIPE
    )
    followers = [asyncio.create_task(follow(n)) for n in range(2)]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in attached)), 60)
    await b.process.start()
    await eventually(lambda: _serving(b), "replica b back", timeout=60)
    await processes.worker(queue, b.target, cpus=1)  # the job runs on b, beside the replica killed
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in first_half)), 120)
    await a.process.kill()  # kill -9 mid-stream: Envoy resets the followers' streams

    printed, _ = await asyncio.wait_for(cli.communicate(), 180)
    await asyncio.wait_for(asyncio.gather(*followers), 60)
    expected = "".join(f"{i}\n" for i in range(1, 6001))
    assert texts == [expected, expected] and printed.decode() == expected  # every line once, in order
    assert cli.returncode == 0
    assert all(stub.watches >= 2 for stub in stubs)  # each SDK follower was cut off and resumed
    for client in clients:
        await client.close()


# The log hub on a real SQLite store: a log of many batches, read in pieces.

BATCHES, CHUNKS, CHUNK = 48, 8, 64 * 1024  # 24 MiB of text in the worker's batch size (512 KiB)


@pytest_asyncio.fixture
async def big_log(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, jobs_pb2.Job]]:
    store = await SqliteStore.open(tmp_path / "jobs.db")
    definition = definition_pb2.JobDefinition(image="x")
    await submit_one(store, job_id=job_id(definition), definition=definition, queue="q", namespace="_", now=1)
    worker = Holder("w", "session", "q")
    (job,) = await store.claim(queue="q", holder=worker, now=1, lease=30)
    hub = LogHub(store, MemoryBus())
    for n in range(BATCHES):
        chunks = [jobs_pb2.LogChunk(text=f"{n * CHUNKS + i:08d}".ljust(CHUNK, ".")) for i in range(CHUNKS)]
        assert await hub.append(Attempt(job.id, job.attempt), worker, RUN, chunks, n * CHUNKS)
    yield store, job
    await store.close()


async def test_the_tail_of_a_long_log_reads_only_its_last_batches(
    big_log: tuple[SqliteStore, jobs_pb2.Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, job = big_log
    fetched = _count_fetched(monkeypatch)
    start, chunks = await LogHub(store, MemoryBus()).tail(job)
    assert sum(len(chunk.text) for chunk in chunks) <= TAIL_BYTES and len(chunks) == TAIL_BYTES // CHUNK
    assert start == BATCHES * CHUNKS - len(chunks)
    assert chunks[-1].text.startswith(f"{BATCHES * CHUNKS - 1:08d}") and chunks[0].text.startswith(f"{start:08d}")
    assert len(fetched) <= 4  # the last batches (3 hold 1 MiB), not the 45 before them
    fetched.clear()
    deep = await store.read_logs(Attempt(job.id, job.attempt), RUN, 300, 5, queue="q", max_chars=1)
    assert [chunk.text[:8] for chunk in deep] == [f"{i:08d}" for i in range(300, 304)]  # the rest of its batch
    assert len(fetched) == 1  # found by the key: a cursor deep in the log reads one batch


async def test_other_calls_run_while_a_follower_catches_up_on_a_long_log(
    big_log: tuple[SqliteStore, jobs_pb2.Job],
) -> None:
    store, job = big_log
    hub = LogHub(store, MemoryBus())
    pinged = asyncio.create_task(store.ping())
    received, pinged_at = 0, None
    async for message in hub.watch(job.id, 0, False, "q"):
        received += len(message.logs.chunks)
        if pinged.done() and pinged_at is None:
            pinged_at = received
        if received == BATCHES * CHUNKS:
            break
    # The ping ran between the pieces of the catch-up, not after the whole log was read.
    assert pinged_at is not None and pinged_at < BATCHES * CHUNKS


def _count_fetched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the log batches the store's statements return, from now on."""
    fetched: list[int] = []
    real = SqliteDatabase.all

    async def counting(self: SqliteDatabase, sql: str, *args: Any) -> Sequence[Any]:
        rows = await real(self, sql, *args)
        fetched.extend(len(row[1]) for row in rows if "FROM logs" in sql and len(row) > 1)
        return rows

    monkeypatch.setattr(SqliteDatabase, "all", counting)
    return fetched


async def test_an_event_stream_resumes_at_its_last_event_id_and_a_new_attempt_from_its_start(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "jobs.db")
    definition = definition_pb2.JobDefinition(image="x")
    await submit_one(store, job_id=job_id(definition), definition=definition, queue="q", namespace="_", now=1)
    worker, hub = Holder("w", "session", "q"), LogHub(store, MemoryBus())
    (first,) = await store.claim(queue="q", holder=worker, now=1, lease=30)
    texts = [jobs_pb2.LogChunk(text=f"a{i}\n") for i in range(5)]
    assert await hub.append(Attempt(first.id, 1), worker, RUN, texts, 0)

    async def sse(last_event_id: str, until: str) -> str:
        """The stream's text from `Last-Event-ID` up to the event with the id `until`."""
        start, out = eventstream.resume(last_event_id), ""
        async with asyncio.timeout(30):  # the job runs on: the stream would never end by itself
            async for body in eventstream.events(hub.watch(first.id, start.run, True, "q", resume=start), start):
                out += body.data.decode()
                if f"id: {until}\n" in out:
                    return out
        raise AssertionError(out)

    seen = await sse("1.3.0", until="1.5.0")  # an EventSource that had 3 chunks of attempt 1
    assert '"a3' in seen and '"a2' not in seen
    assert await store.release(Attempt(first.id, 1), worker, "test", now=2)  # re-queued: attempt 2
    (second,) = await store.claim(queue="q", holder=worker, now=3, lease=30)
    assert await hub.append(Attempt(second.id, 2), worker, RUN, [jobs_pb2.LogChunk(text="b0\n")] * 2, 0)
    resumed = await sse("1.5.0", until="2.2.0")  # its position in attempt 1 does not skip attempt 2's start
    assert resumed.count('"b0') == 2 and '"text":"a' not in resumed
    await store.close()


async def test_log_reads_by_position_on_every_backend(store: StateStore) -> None:
    """The tail and a read past the end, in the SQL both backends share (PostgreSQL's INTEGER index)."""
    await submit_n(store, 1)
    job = await claim_one(store)
    attempt, worker = Attempt(job.id, job.attempt), holder()
    for n in range(6):  # batches of 3 chunks of 4 characters
        texts = [jobs_pb2.LogChunk(text=f"{3 * n + i:03d}.") for i in range(3)]
        assert await store.append_logs(attempt, worker, RUN, texts, 3 * n) is not None
    start, tail = await store.read_log_tail(attempt, RUN, 4, 1000, queue="q")
    assert (start, [c.text for c in tail]) == (12, ["012.", "013.", "014.", "015.", "016.", "017."])
    start, tail = await store.read_log_tail(attempt, RUN, 100, 9, queue="q")  # past 9 characters: the last batch
    assert start == 15 and len(tail) == 3
    assert await store.read_log_tail(Attempt(job.id, job.attempt + 1), RUN, 4, 9, queue="q") == (0, [])
    assert await store.read_logs(attempt, RUN, 2**62, 10, queue="q") == []  # WatchJob's "no run log" cursor
    assert [c.text for c in await store.read_logs(attempt, RUN, 7, 100, queue="q", max_chars=5)] == ["007.", "008."]
    assert await store.read_logs(attempt, RUN, 18, 10, queue="q") == []  # at the end
    assert [c.text for c in await store.read_logs(attempt, RUN, 15, 10, queue="q")] == ["015.", "016.", "017."]
