"""A job's life in SQL both stores share: each operation reads the rows it acts on, asks `transitions`
what may happen, and writes the answer (`SqlBase._apply`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from jobwire.server.store import transitions
from jobwire.server.store.base import ALL_NAMESPACES, NO_LIMITS, Attempt, Cancelled, Holder, Room, Submission
from jobwire.server.store.database import Database, SqlBase
from jobwire.server.store.rows import job_message
from jobwire.server.store.transitions import FINISHED, HOLDING, QUEUED, RUNNING, Holding
from jobwire.v1 import jobs_pb2

Reason: TypeAlias = jobs_pb2.FinishReason.ValueType
Lost = list[tuple[jobs_pb2.Job, Attempt]]
_NEXT_WAITING = (
    "SELECT j.id, j.attempt FROM waiting w JOIN jobs j ON j.queue = w.queue AND j.id = w.job_id"
    f" WHERE w.queue = ? AND j.state = {QUEUED} AND w.gpus <= ? ORDER BY w.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED"
)
"""(id, attempt) of the queue's oldest waiting job needing at most some GPU devices, or no row. The
state is a literal: bound, SQLite prepares the statement again on every run (~10 µs), since the
value could let it use a partial index on `state`."""


def _run_key(row: Sequence[Any]) -> tuple[str, str]:
    """(queue, id) of a row that starts with them: an operation changing runs of several queues
    changes them in this order, so that two such operations lock the queues' counters in one order."""
    return (str(row[0]), str(row[1]))


class Lifecycle(SqlBase):
    """Submission, assignment, the worker's messages, re-queueing and a client's ends of a job's run
    (its id in one queue: rows are keyed by (queue, id))."""

    QUEUE_ENTRY = "INSERT INTO queue_jobs (queue, job_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
    """What gives a new run its place in the queue (`queue_jobs.seq`); empty where the run's own row
    holds it (SQLite)."""

    QUEUE_HELD = (
        "SELECT COALESCE((SELECT jobs FROM queue_waiting WHERE queue = ?), 0),"
        " COALESCE((SELECT bytes FROM queue_sizes WHERE queue = ?), 0)"
    )
    """The queue's queued jobs and bytes of definitions, from its counters (one row each, however
    long the queue): what `Room` is checked against."""

    async def submit(
        self, *, queue: str, jobs: Sequence[Submission], now: float, room: Room = NO_LIMITS
    ) -> list[tuple[jobs_pb2.Job, bool]]:
        async with self._transaction() as db:
            held = await self._queue_held(db, queue, room)
            stored = [await self._submit(db, job, queue, now) for job in jobs]
            self._fits(room, held, jobs, stored)
            return [(job, queued) for job, queued, _ in stored]

    async def _queue_held(self, db: Database, queue: str, room: Room) -> tuple[int, int]:
        """(queued jobs, bytes) the queue holds, read only when `room` limits something. Read first in
        the submission's transaction: the counters as they are before it adds anything (on
        PostgreSQL the triggers keeping them run at the commit)."""
        if not (room.max_jobs or room.max_bytes):
            return (0, 0)
        queued, held = await db.one(self.QUEUE_HELD, queue, queue)
        return int(queued), int(held)

    @staticmethod
    def _fits(
        room: Room, held: tuple[int, int], jobs: Sequence[Submission], stored: Sequence[tuple[Any, bool, bool]]
    ) -> None:
        """QueueFull (rolling the submission back) unless what it did fits `room`: the jobs it (re)queued
        and the definitions of the runs it created."""
        added = sum(queued for _, queued, _ in stored)
        size = sum(job.definition.ByteSize() for job, (_, _, new) in zip(jobs, stored, strict=True) if new)
        if (refusal := room.refusal(*held, added, size)) is not None:
            raise refusal

    async def _submit(
        self, db: Database, submission: Submission, queue: str, now: float
    ) -> tuple[jobs_pb2.Job, bool, bool]:
        """The job's run in the queue, whether this (re)queued it, and whether it created the run."""
        job_id, definition = submission.job_id, submission.definition
        change = transitions.queued(now)
        inserted = await db.one(
            "INSERT INTO jobs (id, state, queue, create_time, update_time, definition, gpus, history)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (queue, id) DO NOTHING RETURNING id",
            *(job_id, QUEUED, queue, now, now, definition.SerializeToString(), definition.requirements.gpus),
            change.entry,
        )
        queued = inserted is not None
        if not queued:
            state, reason = await db.one(
                "SELECT state, finish_reason FROM jobs WHERE queue = ? AND id = ? FOR UPDATE", queue, job_id
            )
            queued = transitions.may_queue_again(state, reason)
            if queued:
                await self._apply(db, queue, job_id, change, now)
        if self.QUEUE_ENTRY:  # after the job's row: the triggers of queue_jobs read its state
            await db.run(self.QUEUE_ENTRY, queue, job_id)
        await db.run(
            "INSERT INTO namespaces VALUES (?, ?, ?) ON CONFLICT DO NOTHING", queue, job_id, submission.namespace
        )
        if inserted is not None:  # a new job: its row is all there is to it, so it is not read back
            fields = (job_id, QUEUED, queue, 0, "", now, now, 0)
            return job_message(fields, namespaces=[submission.namespace]), True, True
        job = await self._job(db, queue, job_id)
        assert job is not None
        return job, queued, False

    async def claim(
        self, *, queue: str, holder: Holder, now: float, lease: float, gpus: int = 0, count: int = 1
    ) -> list[jobs_pb2.Job]:
        claimed: list[jobs_pb2.Job] = []
        async with self._transaction() as db:
            while len(claimed) < count and (row := await db.one(_NEXT_WAITING, queue, gpus)) is not None:
                job_id, attempt = row
                assigned = transitions.assigned(attempt, holder, now, lease)
                claimed.append(await self._changed(db, queue, job_id, assigned, now))
                gpus -= claimed[-1].definition.requirements.gpus
        return claimed

    async def start(self, attempt: Attempt, holder: Holder, now: float) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            if not transitions.holds(await self._held(db, attempt, holder), attempt, holder):
                return None
            return await self._changed(db, holder.queue, attempt.job_id, transitions.started(attempt, holder, now), now)

    async def finish(
        self, attempt: Attempt, holder: Holder, result: jobs_pb2.JobResult, now: float, *, started: bool = False
    ) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            if not transitions.may_finish(await self._held(db, attempt, holder), attempt, holder, result):
                return None
            change = transitions.finished(attempt, holder, result, now, started=started)
            return await self._changed(db, holder.queue, attempt.job_id, change, now, change.columns["result"])

    async def release(self, attempt: Attempt, holder: Holder, reason: str, now: float) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            holding = await self._held(db, attempt, holder)
            if holding is None or not transitions.holds(holding, attempt, holder):
                return None
            await self._apply(db, holder.queue, attempt.job_id, transitions.released(holding, reason, now), now)
            return await self._job(db, holder.queue, attempt.job_id)

    async def renew(self, holder: Holder, attempts: Sequence[Attempt], until: float, now: float) -> list[Attempt]:
        return await self._extend(holder, attempts, until, now, transitions.holds)

    async def retake(self, holder: Holder, attempts: Sequence[Attempt], until: float, now: float) -> list[Attempt]:
        return await self._extend(holder, attempts, until, now, transitions.may_retake)

    async def _extend(
        self,
        holder: Holder,
        attempts: Sequence[Attempt],
        until: float,
        now: float,
        may: Callable[[Holding | None, Attempt, Holder], bool],
    ) -> list[Attempt]:
        stale: list[Attempt] = []
        async with self._transaction() as db:
            for attempt in attempts:
                if may(holding := await self._held(db, attempt, holder), attempt, holder):
                    change = transitions.renewed(holder, until, holding, now)
                    await self._apply(db, holder.queue, attempt.job_id, change, now)
                else:
                    stale.append(attempt)
        return stale

    async def _held(self, db: Database, attempt: Attempt, holder: Holder) -> Holding | None:
        """Who holds the attempt's job in the holder's queue (a worker acts on its queue's run only)."""
        return await self._holding(db, holder.queue, attempt.job_id)

    async def extend_leases(self, until: float) -> None:
        async with self._transaction() as db:
            await db.run(
                "UPDATE jobs SET lease_expires = ? WHERE state = ? AND lease_expires < ?", until, RUNNING, until
            )

    async def requeue_expired(self, now: float) -> Lost:
        async with self._transaction() as db:
            rows = await db.all(
                f"SELECT queue, id, {HOLDING} FROM jobs WHERE state = ? AND lease_expires < ? FOR UPDATE SKIP LOCKED",
                RUNNING,
                now,
            )
            return await self._requeue(db, rows, now, transitions.lease_ran_out)

    async def requeue_worker(self, worker_id: str, keep: Sequence[Attempt], now: float, *, queue: str) -> Lost:
        async with self._transaction() as db:
            rows = await db.all(
                f"SELECT queue, id, {HOLDING} FROM jobs WHERE state = ? AND worker_id = ?"
                " ORDER BY queue, id FOR UPDATE",
                RUNNING,
                worker_id,
            )
            lost = [row for row in rows if row[0] != queue or Attempt(row[1], row[3]) not in keep]
            return await self._requeue(db, lost, now, transitions.left_behind)

    async def _requeue(
        self, db: Database, rows: Sequence[Any], now: float, why: Callable[[Holding, float], transitions.Change]
    ) -> Lost:
        """Put the runs of (queue, id, *HOLDING) rows back in their queues; returns them and the lost attempts."""
        lost: Lost = []
        for queue, job_id, *columns in sorted(rows, key=_run_key):  # queue order: see postgres, queue_waiting
            holding = Holding(*columns)
            await self._apply(db, queue, job_id, why(holding, now), now)
            job = await self._job(db, queue, job_id)
            assert job is not None
            lost.append((job, Attempt(job_id, holding.attempt)))
        return lost

    async def cancel(self, *, queue: str, job_id: str, namespace: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if await self._holding(db, queue, job_id) is None:  # also locks the run first, as every transition does
                return None
            if namespace == ALL_NAMESPACES:
                await db.run("DELETE FROM namespaces WHERE queue = ? AND job_id = ?", queue, job_id)
            else:
                await self._drop_namespace(db, queue, job_id, namespace)
            await self._apply(db, queue, job_id, transitions.cancel_requested(namespace, now), now)
            return await self._end_unheld(db, queue, job_id, jobs_pb2.FINISH_REASON_CANCELLED, "cancelled", now)

    async def replace_in_namespace(self, *, queue: str, namespace: str, keep: str, now: float) -> list[Cancelled]:
        replaced: list[Cancelled] = []
        async with self._transaction() as db:
            rows = await db.all(
                "SELECT n.job_id FROM namespaces n JOIN jobs j ON j.queue = n.queue AND j.id = n.job_id"
                " WHERE n.queue = ? AND n.namespace = ? AND n.job_id != ? AND j.state != ?"
                " ORDER BY n.job_id FOR UPDATE OF j",
                *(queue, namespace, keep, FINISHED),
            )
            for (job_id,) in rows:
                await self._drop_namespace(db, queue, job_id, namespace)
                await self._apply(db, queue, job_id, transitions.replaced(namespace, keep, now), now)
                reason = jobs_pb2.FINISH_REASON_REPLACED_BY_CLIENT
                replaced.append(await self._end_unheld(db, queue, job_id, reason, "replaced", now))
        return replaced

    async def _drop_namespace(self, db: Database, queue: str, job_id: str, namespace: str) -> None:
        await db.run(
            "DELETE FROM namespaces WHERE queue = ? AND job_id = ? AND namespace = ?", queue, job_id, namespace
        )

    async def _end_unheld(
        self, db: Database, queue: str, job_id: str, reason: Reason, words: str, now: float
    ) -> Cancelled:
        """End the run as `reason` if no namespace holds it any more; what was done, either way."""
        held = await db.one("SELECT 1 FROM namespaces WHERE queue = ? AND job_id = ? LIMIT 1", queue, job_id)
        return await self._end(db, queue, job_id, None if held else reason, words, now)

    async def delete(self, *, queue: str, job_id: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if await self._holding(db, queue, job_id) is None:
                return None
            await db.run("DELETE FROM namespaces WHERE queue = ? AND job_id = ?", queue, job_id)
            return await self._end(db, queue, job_id, jobs_pb2.FINISH_REASON_DELETED, "deleted", now, force=True)

    async def _end(
        self,
        db: Database,
        queue: str,
        job_id: str,
        reason: Reason | None,
        words: str,
        now: float,
        *,
        force: bool = False,
    ) -> Cancelled:
        """A client ends the run as `reason` (None: it does not end); the run after, and what to stop."""
        holding = await self._holding(db, queue, job_id)
        assert holding is not None
        change = None if reason is None else transitions.ended_by_client(holding, reason, words, now, force=force)
        if change is not None:
            await self._apply(db, queue, job_id, change, now)
        job = await self._details(db, queue, job_id)
        assert job is not None
        if change is None:
            return Cancelled(job=job, stop=None, worker_id="")
        return Cancelled(job=job, stop=transitions.to_stop(holding, job_id), worker_id=holding.worker_id)

    async def expire_queued(self, before: float, limit: int, ttl: str, now: float) -> list[jobs_pb2.Job]:
        ended: list[jobs_pb2.Job] = []
        async with self._transaction() as db:
            rows = await db.all(
                f"SELECT queue, id, {HOLDING} FROM jobs WHERE state = ? AND update_time < ?"
                " LIMIT ? FOR UPDATE SKIP LOCKED",
                *(QUEUED, before, limit),
            )
            for queue, job_id, *columns in sorted(rows, key=_run_key):  # queue order: see postgres, queue_waiting
                change = transitions.expired(Holding(*columns), ttl, now)
                if change is not None:
                    await self._apply(db, queue, job_id, change, now)
                    job = await self._job(db, queue, job_id)  # no definition: watchers need none
                    assert job is not None
                    ended.append(job)
        return ended

    async def expire(self, before: float, limit: int) -> list[str]:
        async with self._transaction() as db:
            rows = await db.all(
                "SELECT queue, id FROM jobs WHERE state = ? AND update_time < ? LIMIT ? FOR UPDATE SKIP LOCKED",
                *(FINISHED, before, limit),
            )
            runs = [(str(queue), str(job_id)) for queue, job_id in rows]
            for queue, job_id in runs:
                for table in ("queue_jobs", "namespaces", "logs", "webhooks"):
                    await db.run(f"DELETE FROM {table} WHERE queue = ? AND job_id = ?", queue, job_id)
                await db.run("DELETE FROM jobs WHERE queue = ? AND id = ?", queue, job_id)
        return [job_id for _, job_id in runs]
