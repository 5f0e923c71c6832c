"""Waking worker sessions for new work: as many as the work needs, not every session of the queue.

The sessions are real; the scheduler is a fake that hands out jobs from a list and counts claims,
isolating the wake-up logic from the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from jobwire.server import topics
from jobwire.server.bus import Subscription
from jobwire.server.bus.memory import MemoryBus
from jobwire.server.logs import LogHub
from jobwire.server.scheduler import Attempt, Holder
from jobwire.server.sessions import WorkerSession
from jobwire.server.waiting import Line, Lines
from jobwire.v1 import definition_pb2, jobs_pb2, workers_pb2

QUEUE = "q"


class _Scheduler:
    """Hands out the oldest waiting jobs that fit, as the store does; records who claimed when."""

    def __init__(self) -> None:
        self.bus = MemoryBus()
        self.waiting: list[jobs_pb2.Job] = []
        self.claims: list[tuple[str, int]] = []  # (worker, jobs it got)
        self.claimed = asyncio.Condition()

    async def claim(self, queue: str, holder: Holder, gpus: int, count: int) -> list[jobs_pb2.Job]:
        await asyncio.sleep(0)
        taken = []
        for job in list(self.waiting):
            if len(taken) < count and job.definition.requirements.gpus <= gpus:
                gpus -= job.definition.requirements.gpus
                taken.append(job)
                self.waiting.remove(job)
        async with self.claimed:
            self.claims.append((holder.worker_id, len(taken)))
            self.claimed.notify_all()
        return taken

    def worker_messages(self, worker_id: str) -> contextlib.AbstractAsyncContextManager[Subscription]:
        return self.bus.subscribe(topics.worker(worker_id))

    async def add(self, *jobs: jobs_pb2.Job) -> None:
        """Queue jobs and announce them, as `Scheduler.submit` does."""
        self.waiting.extend(jobs)
        await self.bus.publish(topics.queue(QUEUE), topics.work_notice(len(jobs)))

    async def until(self, claims: int) -> None:
        async with self.claimed:
            await asyncio.wait_for(self.claimed.wait_for(lambda: len(self.claims) >= claims), 5)
        await asyncio.sleep(0.05)  # room for claims that should not happen


def _job(name: str, gpus: int = 0) -> jobs_pb2.Job:
    definition = definition_pb2.JobDefinition(image="i", requirements=definition_pb2.Requirements(gpus=gpus))
    return jobs_pb2.Job(id=name, attempt=1, definition=definition)


@contextlib.asynccontextmanager
async def _sessions(scheduler: _Scheduler, *gpus: int, slots: int = 2) -> AsyncIterator[list[WorkerSession]]:
    """Sessions of one queue, one per entry of `gpus` (its GPU devices), each waiting once its first
    claim found nothing; started in order, so they wait in that order."""
    lines = Lines(scheduler.bus)  # type: ignore[arg-type]
    sessions, tasks = [], []
    for index, devices in enumerate(gpus):
        register = workers_pb2.RegisterWorker(
            worker_id=f"w{index}", queue=QUEUE, cpus=slots, gpus=[f"gpu{n}" for n in range(devices)]
        )
        session = WorkerSession(scheduler, LogHub(None, None), lines, register, time.time)  # type: ignore[arg-type]
        sessions.append(session)
        tasks.append(asyncio.create_task(session.run()))
        await scheduler.until(index + 1)
    scheduler.claims.clear()
    try:
        yield sessions
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _assigned(session: WorkerSession) -> list[str]:
    return list(session.running)


async def test_one_job_wakes_one_of_many_waiting_sessions() -> None:
    scheduler = _Scheduler()
    async with _sessions(scheduler, *[0] * 20) as sessions:
        await scheduler.add(_job("a"))
        await scheduler.until(1)
        assert scheduler.claims == [("w0", 1)]  # the one waiting longest; the 19 others slept on
        assert _assigned(sessions[0]) == ["a"]


async def test_many_jobs_wake_sessions_until_their_slots_cover_the_jobs() -> None:
    scheduler = _Scheduler()
    async with _sessions(scheduler, *[0] * 20) as sessions:
        await scheduler.add(*(_job(f"j{n}") for n in range(5)))
        await scheduler.until(3)
        assert sum(got for _, got in scheduler.claims) == 5
        assert len(scheduler.claims) <= 5  # three sessions cover the jobs; the full ones pass the wake on once
        assert sorted(job for session in sessions for job in _assigned(session)) == [f"j{n}" for n in range(5)]


async def test_a_claim_that_fills_the_session_passes_the_wake_on() -> None:
    scheduler = _Scheduler()
    async with _sessions(scheduler, 0, 0, 0) as sessions:
        scheduler.waiting.extend(_job(f"j{n}") for n in range(5))  # more than the one notice says
        await scheduler.bus.publish(topics.queue(QUEUE), topics.work_notice(1))
        await scheduler.until(3)
        assert [got for _, got in scheduler.claims] == [2, 2, 1]
        assert [len(session.running) for session in sessions] == [2, 2, 1]


async def test_a_job_needing_gpus_passes_the_waiting_sessions_without_them() -> None:
    scheduler = _Scheduler()
    async with _sessions(scheduler, 0, 0, 2, 4) as sessions:
        await scheduler.add(_job("gpu", gpus=2))
        await scheduler.until(3)
        # w1 has no more GPUs than w0, so it would find nothing either; w2's claim came short (of its 2
        # slots), with no GPU left, so w3 (4 devices) looks too: other waiting jobs might need them.
        assert scheduler.claims == [("w0", 0), ("w2", 1), ("w3", 0)]
        assert _assigned(sessions[2]) == ["gpu"]


async def test_work_announced_while_no_session_waits_is_claimed_by_the_next_that_frees_a_slot() -> None:
    scheduler = _Scheduler()
    async with _sessions(scheduler, 0, slots=1) as (session,):
        await scheduler.add(_job("a"))
        await scheduler.until(1)
        await scheduler.add(_job("b"))  # the only session is busy: nobody is woken
        await asyncio.sleep(0.05)
        assert [got for _, got in scheduler.claims] == [1]
        session._forget(Attempt("a", 1))  # "a" finished: the slot is free again
        await scheduler.until(2)
        assert _assigned(session) == ["b"]


def test_a_session_woken_and_gone_before_claiming_passes_the_wake_on() -> None:
    line, first, second = Line(), _Waiter(), _Waiter()
    assert line.park(first) and line.park(second)
    line.notify(1)
    assert first.wake.is_set() and not second.wake.is_set()
    assert line.leave(first)  # it owed a claim...
    line.pass_on()  # ...so its session, closing, hands the wake to the next
    assert second.wake.is_set()


def test_a_notice_with_nobody_waiting_is_kept_for_the_next_session_to_wait() -> None:
    line, waiter = Line(), _Waiter()
    line.notify(3)
    assert not line.park(waiter)  # claim at once instead of waiting
    assert line.park(waiter)  # only once


class _Waiter:
    def __init__(self, slots: int = 1, gpus: int = 0) -> None:
        self.wake = asyncio.Event()
        self.slots, self.gpus = slots, gpus

    def free_slots(self) -> int:
        return self.slots

    def free_gpus(self) -> int:
        return self.gpus
