"""The PostgreSQL store's short paths (see postgres, "A job's life in fewer round trips"): a log append
from the log end the store remembers, finishes that arrive together written by one statement, and
claims as a read and a compare-and-set. Each
must decide as the locked path does, whatever happened behind the store's back; round trips are
counted at the store's `Database` (one statement each)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from jobwire.server.errors import Unavailable
from jobwire.server.store.base import FINISHED_HOOK, LogTotals, Webhook
from jobwire.server.store.postgres import PostgresDatabase, PostgresStore
from jobwire.server.store.postgres_batches import LogEnds
from jobwire.v1 import jobs_pb2
from tests.services import PostgresCluster, running_cluster
from tests.test_store import (
    FINISHED,
    LEASE,
    RUN,
    T0,
    attempt_of,
    chunks,
    claim,
    holder,
    log_texts,
    result,
    submit,
)


@pytest.fixture
async def store(postgres_cluster: PostgresCluster) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(await postgres_cluster.create_database(), max_size=4)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements the stores send through their `Database` (BEGIN and COMMIT are not counted)."""
    sent: list[str] = []
    for name in ("one", "all", "run"):
        method = getattr(PostgresDatabase, name)

        async def counted(self: PostgresDatabase, sql: str, *args: Any, _method: Any = method) -> Any:
            sent.append(sql)
            return await _method(self, sql, *args)

        monkeypatch.setattr(PostgresDatabase, name, counted)
    return sent


async def test_a_log_behind_the_stores_memory_is_appended_where_it_ends(
    store: PostgresStore, postgres_cluster: PostgresCluster, round_trips: list[str]
) -> None:
    """The store appends a claimed attempt's log without reading its end; another replica's append
    leaves that memory behind, and the next append is still stored at the log's real end, once."""
    await submit(store, 1)
    attempt = attempt_of(await claim(store))
    round_trips.clear()
    assert await store.append_logs(attempt, holder(), RUN, chunks("a", "b"), 0) == (0, chunks("a", "b"))
    assert await store.append_logs(attempt, holder(), RUN, chunks("c"), 2) == (2, chunks("c"))
    assert len(round_trips) == 2  # no read of the log's end
    other = PostgresStore(store.pool)  # another replica: the same database, its own memory
    assert await other.append_logs(attempt, holder(), RUN, chunks("d"), 3) == (3, chunks("d"))
    # the worker resends "d" with "e" (it had no answer yet): "d" is stored once, "e" after it
    assert await store.append_logs(attempt, holder(), RUN, chunks("d", "e"), 3) == (4, chunks("e"))
    assert await store.append_logs(attempt, holder(), RUN, chunks("f"), 5) == (5, chunks("f"))
    assert await log_texts(store, attempt) == ["a", "b", "c", "d", "e", "f"]
    assert await store.log_totals(attempt, RUN, queue="q") == LogTotals(6, 6, 0)
    # a session that no longer holds the attempt is refused, memory or not
    assert await store.append_logs(attempt, holder(session="another"), RUN, chunks("g"), 6) is None
    await store.finish(attempt, holder(), result(), T0 + 1)
    assert await store.append_logs(attempt, holder(), RUN, chunks("g"), 6) is None
    assert await log_texts(store, attempt) == ["a", "b", "c", "d", "e", "f"]


def test_the_log_memory_keeps_the_most_recently_used_runs() -> None:
    ends = LogEnds(kept=2)
    ends.claimed(("q", "a", 1), "s")
    ends.stored(("q", "b", 1), "s", RUN, LogTotals(3, 3, 0))
    assert ends.known(("q", "a", 1), "s", RUN) == LogTotals()  # claimed: empty; and used last
    ends.claimed(("q", "c", 1), "s")
    assert ends.known(("q", "b", 1), "s", RUN) is None  # the least recently used went
    assert ends.known(("q", "a", 1), "other session", RUN) is None
    ends.forget(("q", "a", 1))
    assert list(ends.runs) == [("q", "c", 1)]


async def test_finishes_arriving_together_are_written_by_one_statement_and_stale_ones_refused(
    store: PostgresStore, round_trips: list[str]
) -> None:
    jobs = [await submit(store, n) for n in range(12)]
    for job in jobs:
        await store.add_webhook(Webhook(job.id, "q", FINISHED_HOOK, f"http://{job.id}", b"{}"), armed=False, now=T0)
    claimed = [await claim(store) for _ in jobs]
    attempts = [attempt_of(job) for job in claimed]
    # stale: a session of w1 that does not hold it; an attempt lost and given to w2 since; and a lease
    # that ran out with nobody given the job since (w1's result is still taken, as on the locked path)
    stale_session, given_again, lost = attempts[:3]
    assert len(await store.requeue_expired(T0 + LEASE + 1)) == len(jobs)
    await store.retake(holder(), attempts[3:], T0 + 100, T0 + LEASE + 2)
    await store.retake(holder(), [stale_session], T0 + 100, T0 + LEASE + 2)
    assert (await claim(store, worker="w2", now=T0 + LEASE + 3)).id == given_again.job_id
    round_trips.clear()
    finishes = [  # the session that does not hold its attempt last: one of those written together
        *(store.finish(attempt, holder(), result(exit_code=n), T0 + 60) for n, attempt in enumerate(attempts[1:])),
        store.finish(stale_session, holder(session="another"), result(), T0 + 60),
    ]
    *answers, refused = await asyncio.gather(*finishes)
    assert refused is None and answers[0] is None  # refused
    assert answers[1].id == lost.job_id and answers[1].attempt == lost.attempt  # taken back, then finished
    assert [(job.id, job.state) for job in answers[1:]] == [(a.job_id, FINISHED) for a in attempts[2:]]
    assert [job.result.exit_code for job in answers[1:]] == list(range(1, 11))
    # the first finish alone, the other 11 in one statement; then the three not written as they said
    # each read their run, locked, and the one whose lease ran out (nobody given it since) is written
    assert len(round_trips) == 2 + 3 + 1
    for attempt in attempts:
        job = await store.get_job(attempt.job_id, queue="q")
        assert job is not None
        finishes_recorded = sum(event.kind == jobs_pb2.JOB_EVENT_KIND_FINISHED for event in job.history)
        assert (job.state, finishes_recorded) == (
            (jobs_pb2.JOB_STATE_RUNNING, 0) if attempt in (given_again, stale_session) else (FINISHED, 1)
        )
    armed = await store.claim_webhooks(T0 + 61, T0 + 90, 100)
    assert sorted(hook.job_id for hook in armed) == sorted(attempt.job_id for attempt in attempts[2:])


async def test_finishes_written_together_never_wait_for_a_run_another_transaction_locked(
    store: PostgresStore,
) -> None:
    """A run locked elsewhere (e.g. by a renewal holding several) is left to the one-run path, which
    waits for it alone: the others of its statement are written meanwhile, and no lock is held while
    waiting, so no deadlock with a transaction locking runs in another order."""
    for n in range(3):
        await submit(store, n)
    attempts = [attempt_of(job) for job in await store.claim(queue="q", holder=holder(), now=T0, lease=LEASE, count=3)]
    async with store.pool.acquire() as connection, connection.transaction():
        await connection.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", attempts[2].job_id)
        finishes = [asyncio.ensure_future(store.finish(attempt, holder(), result(), T0 + 1)) for attempt in attempts]
        done, _ = await asyncio.wait(finishes[:2], timeout=30)
        assert done == set(finishes[:2]) and not finishes[2].done()  # the third waits for the lock
    jobs = [task.result() for task in finishes[:2]] + [await finishes[2]]
    assert all(job is not None and job.state == FINISHED for job in jobs)


async def test_claims_of_workers_woken_together_take_different_runs_in_two_statements_each(
    store: PostgresStore, round_trips: list[str]
) -> None:
    """Claims of one queue on one store read past the runs the others chose (`Claims`), so none of
    them contends for a run and falls back to the locked path: a read and a compare-and-set each."""
    jobs = [await submit(store, n) for n in range(12)]
    round_trips.clear()
    claims = await asyncio.gather(
        *(store.claim(queue="q", holder=holder(f"w{n}"), now=T0, lease=LEASE, count=3) for n in range(4))
    )
    assert sorted(job.id for claimed in claims for job in claimed) == sorted(job.id for job in jobs)
    assert [len(claimed) for claimed in claims] == [3, 3, 3, 3]
    assert all(job.worker_id == f"w{n}" and job.attempt == 1 for n, claimed in enumerate(claims) for job in claimed)
    assert len(round_trips) == 2 * 4
    assert await store.claim(queue="q", holder=holder("w9"), now=T0, lease=LEASE, count=3) == []


async def test_a_claim_makes_up_for_runs_held_elsewhere_or_taken_by_another_replica(store: PostgresStore) -> None:
    """A run another transaction holds is skipped (not waited for) and the locked path takes the next
    waiting ones instead; claims of two replicas at once assign every run once."""
    jobs = [await submit(store, n) for n in range(3)]
    async with store.pool.acquire() as connection, connection.transaction():
        await connection.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", jobs[0].id)
        claimed = await store.claim(queue="q", holder=holder(), now=T0, lease=LEASE, count=2)
        assert [job.id for job in claimed] == [jobs[1].id, jobs[2].id]
    assert [job.id for job in await store.claim(queue="q", holder=holder(), now=T0, lease=LEASE, count=2)] == [
        jobs[0].id
    ]
    more = [await submit(store, n) for n in range(3, 43)]
    other = PostgresStore(store.pool)  # another replica: the same database, its own claims
    claims = await asyncio.gather(
        *(
            replica.claim(queue="q", holder=holder(f"w{n}"), now=T0, lease=LEASE, count=3)
            for n, replica in enumerate([store, other] * 8)
        )
    )
    taken = [job.id for claimed in claims for job in claimed]
    assert sorted(taken) == sorted(job.id for job in more)  # each once
    for job in more:
        run = await store.get_job(job.id, queue="q")
        assert run is not None and run.state == jobs_pb2.JOB_STATE_RUNNING and run.attempt == 1


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of the test's own, to stop."""
    with running_cluster() as cluster:
        yield cluster


async def test_every_finish_of_a_statement_hit_by_postgresql_stopping_is_unavailable(
    own_cluster: PostgresCluster,
) -> None:
    store = await PostgresStore.open(await own_cluster.create_database(), max_size=4)
    try:
        for n in range(8):
            await submit(store, n)
        attempts = [
            attempt_of(job) for job in await store.claim(queue="q", holder=holder(), now=T0, lease=LEASE, count=8)
        ]
        own_cluster.halt()
        answers = await asyncio.gather(
            *(store.finish(attempt, holder(), result(), T0 + 1) for attempt in attempts), return_exceptions=True
        )
        assert all(isinstance(answer, Unavailable) for answer in answers), answers
        own_cluster.resume()
        answers = await asyncio.gather(*(store.finish(attempt, holder(), result(), T0 + 2) for attempt in attempts))
        assert all(job is not None and job.state == FINISHED for job in answers)
    finally:
        await store.close()
