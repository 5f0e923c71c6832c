"""The server's side of a worker stream, isolated from the store: the order messages are handled in."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from jobwire.server.bus.memory import MemoryBus
from jobwire.server.logs import LogHub
from jobwire.server.scheduler import Attempt, Holder
from jobwire.server.sessions import ProtocolError, WorkerSession
from jobwire.server.waiting import Lines
from jobwire.v1 import jobs_pb2, workers_pb2


class _Scheduler:
    """Records what the session asks; a job's start waits until the test lets it through."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.finished_jobs: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)

    async def started(self, attempt: Attempt, holder: Holder) -> bool:
        self.calls.append(("started", attempt.job_id))
        if attempt.job_id in self.gates:
            await self.gates[attempt.job_id].wait()
        self.calls.append(("started done", attempt.job_id))
        return True

    async def finished(
        self, attempt: Attempt, holder: Holder, result: jobs_pb2.JobResult, *, started: bool = False
    ) -> jobs_pb2.Job:
        self.calls.append(("finished", attempt.job_id))
        self.finished_jobs[attempt.job_id].set()
        return jobs_pb2.Job(id=attempt.job_id)


def _session(scheduler: _Scheduler) -> WorkerSession:
    register = workers_pb2.RegisterWorker(worker_id="w", queue="q", cpus=2)
    lines = Lines(MemoryBus())
    return WorkerSession(scheduler, LogHub(None, None), lines, register, time.time)  # type: ignore[arg-type]


def _batch(*messages: workers_pb2.ConnectRequest) -> workers_pb2.ConnectRequest:
    return workers_pb2.ConnectRequest(batch=workers_pb2.ConnectRequestBatch(messages=messages))


def _started(job_id: str) -> workers_pb2.ConnectRequest:
    return workers_pb2.ConnectRequest(started=workers_pb2.JobStarted(job_id=job_id, attempt=1))


def _finished(job_id: str) -> workers_pb2.ConnectRequest:
    return workers_pb2.ConnectRequest(finished=workers_pb2.JobFinished(job_id=job_id, attempt=1))


async def test_a_jobs_messages_keep_their_order_while_another_jobs_go_past() -> None:
    scheduler = _Scheduler()
    scheduler.gates["a"] = asyncio.Event()
    session = _session(scheduler)
    async with asyncio.TaskGroup() as group:
        await session.receive(_batch(_started("a"), _finished("a"), _started("b"), _finished("b")), group)
        await scheduler.finished_jobs["b"].wait()
        assert ("finished", "a") not in scheduler.calls  # a's start is still being stored
        scheduler.gates["a"].set()
    assert scheduler.calls.index(("started done", "a")) < scheduler.calls.index(("finished", "a"))
    assert scheduler.calls.index(("started done", "b")) < scheduler.calls.index(("finished", "b"))
    acks = [session.outbox.get_nowait().finished_ack.job_id for _ in range(2)]
    assert acks == ["b", "a"]


async def test_a_batch_inside_a_batch_breaks_the_protocol() -> None:
    session = _session(_Scheduler())
    with pytest.raises(ProtocolError, match="batch may not hold another batch"):  # before any is handled
        await session.receive(_batch(_started("a"), _batch(_finished("a"))), asyncio.TaskGroup())
