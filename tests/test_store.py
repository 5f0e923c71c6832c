"""StateStore contract: every backend runs the same job lifecycle, fenced by attempt, with the same pages.

Times are injected (`now`), so leases expire without sleeping. A new backend is one more entry in the
`store` fixture's `params`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from google.protobuf import struct_pb2

from jobwire.core.definition import job_id
from jobwire.core.units import timestamp
from jobwire.server.store import StateStore, postgres_schema
from jobwire.server.store import sqlite as sqlite_store
from jobwire.server.store.base import (
    ALL_NAMESPACES,
    DEFAULT_NAMESPACE,
    FINAL_REASONS,
    FINISHED_HOOK,
    POSITION_LIMIT,
    QUEUED_HOOK,
    Attempt,
    Capacity,
    Holder,
    LogTotals,
    QueueFull,
    Room,
    Submission,
    Webhook,
)
from jobwire.server.store.postgres import PostgresStore
from jobwire.server.store.sqlite import SqliteStore
from jobwire.v1 import definition_pb2, jobs_pb2
from tests.conftest import submit_one
from tests.services import PostgresCluster

QUEUED, RUNNING, FINISHED = jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_FINISHED
RUN, BUILD = jobs_pb2.LOG_KIND_RUN, jobs_pb2.LOG_KIND_BUILD
T0 = 1_700_000_000.0
LEASE = 30.0


@asynccontextmanager
async def sqlite(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await SqliteStore.open(tmp_path / "jobwire.db")
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def postgres(tmp_path: Path, cluster: PostgresCluster) -> AsyncIterator[StateStore]:
    store = await PostgresStore.open(await cluster.create_database(), max_size=4)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    if request.param == "sqlite":
        opened = sqlite(tmp_path)
    else:
        opened = postgres(tmp_path, request.getfixturevalue("postgres_cluster"))
    async with opened as store:
        yield store


def definition(n: int) -> definition_pb2.JobDefinition:
    return definition_pb2.JobDefinition(image="busybox", command=f"echo {n}", tags=[f"tag-{n}"])


async def submit(
    store: StateStore, n: int, *, queue: str = "q", namespace: str = DEFAULT_NAMESPACE, now: float = T0
) -> jobs_pb2.Job:
    job, _ = await submit_one(
        store, job_id=job_id(definition(n)), definition=definition(n), queue=queue, namespace=namespace, now=now
    )
    return job


async def ahead(store: StateStore, queue: str, job: str) -> int:
    """How many queued jobs `StateStore.waiting` counts ahead of the job."""
    return (await store.waiting(queue, job, seen_since=0)).ahead


async def capacity(store: StateStore, queue: str, *, seen_since: float = 0) -> Capacity:
    """What `StateStore.waiting` finds the queue's workers offer."""
    return (await store.waiting(queue, "", seen_since=seen_since)).capacity


async def held(store: StateStore, queue: str) -> tuple[int, int]:
    """(queued jobs, bytes of definitions) the queue holds as a submission's room check finds them:
    those a probe that can never fit (a one-byte room) is refused with."""
    probe = Submission(job_id(definition(-1)), definition(-1), DEFAULT_NAMESPACE)
    with pytest.raises(QueueFull) as full:
        await store.submit(queue=queue, jobs=[probe], now=T0, room=Room(max_jobs=1, max_bytes=1))
    return full.value.queued, full.value.held


def holder(worker: str = "w1", session: str = "", queue: str = "q") -> Holder:
    """The worker's holder on `queue`: its first session unless another is named."""
    return Holder(worker, session or f"first session of {worker}", queue)


async def claim(store: StateStore, *, queue: str = "q", worker: str = "w1", now: float = T0) -> jobs_pb2.Job:
    jobs = await store.claim(queue=queue, holder=holder(worker, queue=queue), now=now, lease=LEASE)
    assert len(jobs) == 1, f"nothing to claim on {queue!r}"
    return jobs[0]


def attempt_of(job: jobs_pb2.Job) -> Attempt:
    return Attempt(job.id, job.attempt)


def result(
    reason: jobs_pb2.FinishReason.ValueType = jobs_pb2.FINISH_REASON_SUCCESS, *, exit_code: int = 0
) -> jobs_pb2.JobResult:
    return jobs_pb2.JobResult(reason=reason, exit_code=exit_code, worker_id="w1", message="done")


def chunks(*texts: str) -> list[jobs_pb2.LogChunk]:
    return [jobs_pb2.LogChunk(text=text, stream=jobs_pb2.LOG_STREAM_STDOUT) for text in texts]


async def log_texts(
    store: StateStore, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType = RUN, since: int = 0, limit: int = 100
) -> list[str]:
    return [chunk.text for chunk in await store.read_logs(attempt, kind, since, limit, queue="q")]


async def state(store: StateStore, job: jobs_pb2.Job, queue: str = "q") -> int:
    current = await store.get_job(job.id, queue=queue)
    assert current is not None
    return current.state


def event_kinds(job: jobs_pb2.Job) -> list[int]:
    return [event.kind for event in job.history]


# Submission and deduplication


async def test_submitting_many_queues_them_in_order_and_an_identical_one_joins(store: StateStore) -> None:
    definitions = [definition(n) for n in (3, 1, 2, 3)]
    jobs = [Submission(job_id(d), d, DEFAULT_NAMESPACE) for d in definitions]
    submitted = await store.submit(queue="q", jobs=jobs, now=T0)
    assert [job.id for job, _ in submitted] == [s.job_id for s in jobs]
    assert [queued for _, queued in submitted] == [True, True, True, False]  # the last is the first again
    assert await store.queue_counts("q") == {QUEUED: 3}
    assert [(await claim(store)).id for _ in range(3)] == [s.job_id for s in jobs[:3]]


async def test_submit_queues_a_new_job(store: StateStore) -> None:
    await store.ping()
    job, queued = await submit_one(
        store, job_id=job_id(definition(1)), definition=definition(1), queue="q", namespace="ns", now=T0
    )
    assert queued
    assert (job.id, job.state, job.queue, job.attempt, list(job.namespaces)) == (
        job_id(definition(1)),
        QUEUED,
        "q",
        0,
        ["ns"],
    )
    assert job.create_time == timestamp(T0)
    stored = await store.get_job(job.id)
    assert stored is not None
    assert stored.definition == definition(1)
    assert list(stored.tags) == ["tag-1"]
    assert event_kinds(stored) == [jobs_pb2.JOB_EVENT_KIND_QUEUED]


async def test_same_job_submitted_twice_is_one_job(store: StateStore) -> None:
    first = await submit(store, 1)
    again, queued = await submit_one(
        store, job_id=first.id, definition=definition(1), queue="q", namespace=DEFAULT_NAMESPACE, now=T0 + 5
    )
    assert not queued
    assert again.id == first.id
    assert again.create_time == timestamp(T0)
    jobs, _ = await store.list_jobs("q", state=0, after="", limit=10)
    assert [job.id for job in jobs] == [first.id]
    assert await store.queue_counts("q") == {QUEUED: 1}
    stored = await store.get_job(first.id)
    assert stored is not None
    assert event_kinds(stored) == [jobs_pb2.JOB_EVENT_KIND_QUEUED]


async def test_each_namespace_holds_the_same_job(store: StateStore) -> None:
    await submit(store, 1, namespace="b")
    job = await submit(store, 1, namespace="a")
    assert list(job.namespaces) == ["a", "b"]
    assert await store.queue_counts("q") == {QUEUED: 1}


async def test_running_job_is_not_requeued_by_resubmission(store: StateStore) -> None:
    await submit(store, 1)
    running = await claim(store)
    again, queued = await submit_one(
        store, job_id=running.id, definition=definition(1), queue="q", namespace=DEFAULT_NAMESPACE, now=T0 + 1
    )
    assert not queued
    assert (again.state, again.attempt, again.worker_id) == (RUNNING, 1, "w1")


@pytest.mark.parametrize("reason", sorted(FINAL_REASONS))
async def test_final_result_answers_later_submissions(
    store: StateStore, reason: jobs_pb2.FinishReason.ValueType
) -> None:
    await submit(store, 1)
    running = await claim(store)
    assert await store.finish(attempt_of(running), holder(), result(reason), T0 + 1) is not None
    again, queued = await submit_one(
        store, job_id=running.id, definition=definition(1), queue="q", namespace=DEFAULT_NAMESPACE, now=T0 + 2
    )
    assert not queued
    assert (again.state, again.finish_reason) == (FINISHED, reason)
    assert await store.claim(queue="q", holder=holder("w2"), now=T0 + 3, lease=LEASE) == []


async def test_cancelled_job_runs_again_as_a_new_attempt_when_resubmitted(store: StateStore) -> None:
    await submit(store, 1)
    first = await claim(store)
    await store.cancel(queue="q", job_id=first.id, namespace=DEFAULT_NAMESPACE, now=T0 + 1)
    again, queued = await submit_one(
        store, job_id=first.id, definition=definition(1), queue="q", namespace=DEFAULT_NAMESPACE, now=T0 + 2
    )
    assert queued
    assert (again.state, again.finish_reason, again.worker_id) == (QUEUED, jobs_pb2.FINISH_REASON_UNSPECIFIED, "")
    stored = await store.get_job(first.id)
    assert stored is not None and not stored.HasField("result")
    second = await claim(store, worker="w2", now=T0 + 3)
    assert second.attempt > first.attempt
    assert await store.finish(attempt_of(first), holder(), result(), T0 + 4) is None
    assert await store.finish(attempt_of(second), holder("w2"), result(), T0 + 4) is not None


async def test_get_job_unknown_or_in_another_queue(store: StateStore) -> None:
    job = await submit(store, 1, queue="q")
    assert await store.get_job(job_id(definition(2))) is None
    assert await store.get_job(job.id, queue="other") is None
    in_queue = await store.get_job(job.id, queue="q")
    assert in_queue is not None and in_queue.id == job.id


# Claiming


async def test_claim_takes_jobs_in_submission_order(store: StateStore) -> None:
    submitted = [await submit(store, n, now=T0 + n) for n in range(4)]
    claimed = [await claim(store, now=T0 + 10) for _ in submitted]
    assert [job.id for job in claimed] == [job.id for job in submitted]
    assert await store.claim(queue="q", holder=holder("w1"), now=T0 + 10, lease=LEASE) == []


async def test_claim_makes_a_running_attempt_for_the_worker(store: StateStore) -> None:
    submitted = await submit(store, 1)
    job = await claim(store, worker="w7", now=T0 + 2)
    assert (job.id, job.state, job.attempt, job.worker_id) == (submitted.id, RUNNING, 1, "w7")
    assert job.update_time == timestamp(T0 + 2)
    assert job.definition == definition(1) and not job.history  # enough to assign; the history is stored
    stored = await store.get_job(job.id)
    assert stored is not None
    assigned = stored.history[-1]
    assert (assigned.kind, assigned.attempt, assigned.worker_id) == (jobs_pb2.JOB_EVENT_KIND_ASSIGNED, 1, "w7")
    assert await store.queue_counts("q") == {RUNNING: 1}


async def test_claim_on_empty_or_other_queue_returns_nothing(store: StateStore) -> None:
    assert await store.claim(queue="q", holder=holder("w1"), now=T0, lease=LEASE) == []
    job = await submit(store, 1, queue="q")
    assert await store.claim(queue="other", holder=holder("w1"), now=T0, lease=LEASE) == []
    assert await state(store, job) == QUEUED


async def test_concurrent_claims_assign_a_job_once(store: StateStore) -> None:
    await submit(store, 1)
    claims = await asyncio.gather(
        *(store.claim(queue="q", holder=holder(f"w{n}"), now=T0, lease=LEASE) for n in range(5))
    )
    assert sorted(len(jobs) for jobs in claims) == [0, 0, 0, 0, 1]


# Attempt fencing


async def appended(
    store: StateStore, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, start: int, *texts: str, worker: str = "w1"
) -> tuple[int, list[str]] | None:
    """`append_logs` of chunks of these texts from the worker's first session: the index the first stored
    one got and the texts stored."""
    stored = await store.append_logs(attempt, holder(worker), kind, chunks(*texts), start)
    return None if stored is None else (stored[0], [chunk.text for chunk in stored[1]])


async def assert_stale(store: StateStore, attempt: Attempt, worker: str = "w1", session: str = "") -> None:
    """Every write of the attempt from the worker's session is refused and changes nothing."""
    by = holder(worker, session)
    before = await store.get_job(attempt.job_id)
    assert await store.start(attempt, by, T0 + 50) is None
    assert await store.renew(by, [attempt], T0 + 500, T0 + 50) == [attempt]
    assert await store.append_logs(attempt, by, RUN, chunks("late"), 0) is None
    assert await store.release(attempt, by, "giving up", T0 + 50) is None
    assert await store.finish(attempt, by, result(), T0 + 50) is None
    assert await log_texts(store, attempt) == []
    assert await store.get_job(attempt.job_id) == before


async def test_attempt_is_stale_after_its_lease_expired(store: StateStore) -> None:
    await submit(store, 1)
    lost = attempt_of(await claim(store))
    assert len(await store.requeue_expired(T0 + LEASE + 1)) == 1
    await assert_stale(store, lost, worker="w2")
    # Its own worker, back, may still deliver its result while nobody else has the job: it runs once.
    finished = await store.finish(lost, holder("w1", "back"), result(exit_code=0), T0 + LEASE + 5)
    assert finished is not None and finished.state == jobs_pb2.JOB_STATE_FINISHED and finished.attempt == lost.attempt


async def test_a_worker_back_past_its_lease_retakes_its_attempt_unless_given_again(store: StateStore) -> None:
    await submit(store, 1)
    lost = attempt_of(await claim(store, worker="w1"))
    await store.requeue_expired(T0 + LEASE + 1)
    assert await store.retake(holder("w1", "back"), [lost], T0 + 2 * LEASE, T0 + LEASE + 2) == []
    job = await store.get_job(lost.job_id)
    assert (job.state, job.attempt, job.worker_id) == (jobs_pb2.JOB_STATE_RUNNING, lost.attempt, "w1")
    (back,) = [event for event in job.history if "came back" in event.message]
    assert back.time.ToSeconds() == int(T0 + LEASE + 2)  # the scheduler's clock, as every transition's
    assert await store.claim(queue="q", holder=holder("w2"), now=T0 + LEASE + 3, lease=LEASE) == []  # not waiting


async def test_attempt_is_stale_once_another_attempt_claimed_the_job(store: StateStore) -> None:
    await submit(store, 1)
    lost = attempt_of(await claim(store, worker="w1"))
    await store.requeue_expired(T0 + LEASE + 1)
    current = attempt_of(await claim(store, worker="w2", now=T0 + LEASE + 2))
    assert current.attempt == lost.attempt + 1
    await assert_stale(store, lost, worker="w1")
    assert await appended(store, current, RUN, 0, "mine", worker="w2") == (0, ["mine"])
    finished = await store.finish(current, holder("w2"), result(exit_code=3), T0 + 60)
    assert finished is not None and finished.result.exit_code == 3


async def test_another_session_cannot_act_on_an_attempt_it_does_not_hold(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store, worker="w1"))
    await assert_stale(store, running, worker="w1", session="a stream registered beside the first")
    await assert_stale(store, running, worker="w2", session="first session of w1")  # another worker's stream
    assert await appended(store, running, RUN, 0, "mine") == (0, ["mine"])  # the holder still may


async def test_a_reconnecting_worker_retakes_its_attempts_and_its_old_session_is_refused(store: StateStore) -> None:
    await submit(store, 1)
    await submit(store, 2)
    running = attempt_of(await claim(store, worker="w1"))
    other = attempt_of(await claim(store, worker="w2"))
    again = holder("w1", "second session of w1")
    unknown = Attempt(running.job_id, running.attempt + 1)
    assert await store.retake(again, [running, other, unknown], T0 + 500, T0 + 50) == [other, unknown]
    lost = await store.requeue_expired(T0 + LEASE + 1)
    assert [attempt for _, attempt in lost] == [other]  # the re-take renewed w1's lease, and only w1's
    await assert_stale(store, running, worker="w1")  # the first session, gone
    assert await appended(store, running, RUN, 0, "still running", worker="w1") is None
    assert await store.start(running, again, T0 + 2) is not None
    finished = await store.finish(running, again, result(), T0 + 3)
    assert finished is not None and finished.state == FINISHED


async def test_a_released_attempt_goes_back_to_its_queue_and_is_stale(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store, worker="w1"))
    assert await store.release(running, holder("w1", "another session"), "no", T0 + 1) is None
    released = await store.release(running, holder("w1"), "draining", T0 + 1)
    assert released is not None and (released.state, released.worker_id) == (QUEUED, "")
    await assert_stale(store, running)
    job = await store.get_job(running.job_id)
    assert job is not None and job.history[-1].message == "re-queued: released by worker w1: draining"


async def test_renew_refuses_another_workers_or_unknown_attempt(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store, worker="w1"))
    wrong_attempt = Attempt(running.job_id, running.attempt + 1)
    unknown = Attempt(job_id(definition(9)), 1)
    assert await store.renew(holder("w2"), [running], T0 + 500, T0 + 50) == [running]
    assert await store.renew(holder("w1"), [wrong_attempt, running, unknown], T0 + 500, T0 + 50) == [
        wrong_attempt,
        unknown,
    ]


async def test_start_records_that_the_container_started(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store, worker="w3"))
    returned = await store.start(running, holder("w3"), T0 + 1)
    assert returned is not None and (returned.state, list(returned.tags)) == (RUNNING, ["tag-1"])
    job = await store.get_job(running.job_id)
    assert job is not None
    started = job.history[-1]
    assert (started.kind, started.attempt, started.worker_id) == (jobs_pb2.JOB_EVENT_KIND_STARTED, 1, "w3")
    assert job.state == RUNNING


async def test_a_result_is_recorded_once(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    outcomes = await asyncio.gather(
        store.finish(running, holder(), result(exit_code=1), T0 + 1),
        store.finish(running, holder(), result(exit_code=2), T0 + 1),
    )
    assert len([job for job in outcomes if job is not None]) == 1
    assert await store.finish(running, holder(), result(exit_code=5), T0 + 2) is None
    job = await store.get_job(running.job_id)
    assert job is not None and job.result.exit_code in (1, 2)
    assert event_kinds(job).count(jobs_pb2.JOB_EVENT_KIND_FINISHED) == 1


# Finishing


async def test_finish_records_the_result(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    sent = jobs_pb2.JobResult(
        reason=jobs_pb2.FINISH_REASON_SUCCESS, exit_code=3, message="exit 3", worker_id="w1", attempt=1
    )
    sent.outputs["out.txt"].CopyFrom(definition_pb2.DataRef(type="utf8"))
    finished = await store.finish(running, holder(), sent, T0 + 9)
    assert finished is not None
    assert (finished.state, finished.finish_reason, finished.update_time) == (
        FINISHED,
        jobs_pb2.FINISH_REASON_SUCCESS,
        timestamp(T0 + 9),
    )
    stored = await store.get_job(running.job_id)
    assert stored is not None
    assert stored.result == sent
    last = stored.history[-1]
    assert (last.kind, last.attempt) == (jobs_pb2.JOB_EVENT_KIND_FINISHED, 1)
    assert await store.queue_counts("q") == {FINISHED: 1}


# Leases


async def test_requeue_expired_puts_only_expired_leases_back(store: StateStore) -> None:
    await submit(store, 1)
    await submit(store, 2)
    early = await claim(store, worker="w1", now=T0)
    late = await claim(store, worker="w2", now=T0 + 20)
    assert await store.requeue_expired(T0 + LEASE - 1) == []
    requeued = await store.requeue_expired(T0 + LEASE + 1)
    assert [(job.id, attempt) for job, attempt in requeued] == [(early.id, attempt_of(early))]
    job, _ = requeued[0]
    # still naming the worker it was lost from, whose result is taken until another claims it
    assert (job.state, job.worker_id, job.queue) == (QUEUED, "w1", "q")
    stored = await store.get_job(early.id)
    assert stored is not None
    assert stored.history[-1].kind == jobs_pb2.JOB_EVENT_KIND_REQUEUED
    assert await state(store, late) == RUNNING
    again = await claim(store, worker="w3", now=T0 + LEASE + 2)
    assert (again.id, again.attempt) == (early.id, early.attempt + 1)


async def test_requeue_worker_gives_up_only_the_attempts_it_came_back_without(store: StateStore) -> None:
    for n in (1, 2, 3):
        await submit(store, n)
    kept = await claim(store, worker="w1")
    lost = await claim(store, worker="w1")
    other = await claim(store, worker="w2")
    requeued = await store.requeue_worker("w1", [attempt_of(kept)], T0 + 5, queue="q")
    assert [(job.id, attempt) for job, attempt in requeued] == [(lost.id, attempt_of(lost))]
    stored = await store.get_job(lost.id)
    assert stored is not None
    assert stored.history[-1].kind == jobs_pb2.JOB_EVENT_KIND_REQUEUED
    assert "worker-lost" in stored.history[-1].message
    assert await state(store, lost) == QUEUED
    assert await state(store, kept) == RUNNING
    assert await state(store, other) == RUNNING
    await assert_stale(store, attempt_of(lost))


async def test_extend_leases_gives_running_jobs_a_new_lease(store: StateStore) -> None:
    await submit(store, 1)
    running = await claim(store, worker="w1")
    await store.extend_leases(T0 + LEASE + 100)
    assert await store.requeue_expired(T0 + LEASE + 50) == []
    assert await state(store, running) == RUNNING
    assert len(await store.requeue_expired(T0 + LEASE + 101)) == 1


async def test_a_log_batch_past_a_gap_is_not_stored(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    assert await appended(store, running, RUN, 0, "a", "b") == (0, ["a", "b"])
    assert await appended(store, running, RUN, 3, "d") == (2, [])
    assert (await store.log_totals(running, RUN, queue="q")).chunks == 2
    assert await appended(store, running, RUN, 1, "b", "c", "d") == (2, ["c", "d"])
    assert (await store.log_totals(running, RUN, queue="q")).chunks == 4
    assert await log_texts(store, running) == ["a", "b", "c", "d"]


async def test_a_newer_job_replaces_older_live_jobs_of_its_namespace(store: StateStore) -> None:
    await submit(store, 1, namespace="ns")
    running = await claim(store, worker="w1")
    shared = await submit(store, 2, namespace="ns")
    await submit(store, 2, namespace="other")
    default = await submit(store, 3)
    newest = await submit(store, 4, namespace="ns")
    replaced = await store.replace_in_namespace(queue="q", namespace="ns", keep=newest.id, now=T0 + 9)
    by_id = {ended.job.id: ended for ended in replaced}
    assert set(by_id) == {running.id, shared.id}
    assert by_id[running.id].stop == attempt_of(running) and by_id[running.id].worker_id == "w1"
    assert by_id[running.id].job.finish_reason == jobs_pb2.FINISH_REASON_REPLACED_BY_CLIENT
    assert by_id[shared.id].stop is None and by_id[shared.id].job.state == QUEUED  # "other" still holds it
    assert await state(store, default) == QUEUED
    assert await state(store, newest) == QUEUED
    assert await store.replace_in_namespace(queue="q", namespace="ns", keep=newest.id, now=T0 + 10) == []


async def test_claim_skips_jobs_needing_more_gpus_than_the_worker_has_free(store: StateStore) -> None:
    gpu_job = definition(1)
    gpu_job.requirements.gpus = 2
    gpu, _ = await submit_one(store, job_id=job_id(gpu_job), definition=gpu_job, queue="q", namespace="_", now=T0)
    cpu = await submit(store, 2)
    taken = await store.claim(queue="q", holder=holder("w1"), now=T0, lease=LEASE, gpus=1)
    assert [job.id for job in taken] == [cpu.id]
    assert await store.claim(queue="q", holder=holder("w1"), now=T0, lease=LEASE, gpus=1) == []
    taken = await store.claim(queue="q", holder=holder("w2"), now=T0, lease=LEASE, gpus=2)
    assert [job.id for job in taken] == [gpu.id]


async def test_one_claim_takes_several_jobs_in_queue_order_within_the_gpus_it_has(store: StateStore) -> None:
    needs = [1, 0, 2, 1, 0]  # GPUs of each job, in submission order
    submitted = []
    for n, gpus in enumerate(needs):
        each = definition(n)
        each.requirements.gpus = gpus
        job, _ = await submit_one(store, job_id=job_id(each), definition=each, queue="q", namespace="_", now=T0 + n)
        submitted.append(job.id)
    taken = await store.claim(queue="q", holder=holder("w1"), now=T0 + 9, lease=LEASE, gpus=2, count=4)
    # 1 GPU, none, then the 2-GPU job does not fit in the one left, the next 1-GPU job does
    assert [job.id for job in taken] == [submitted[0], submitted[1], submitted[3], submitted[4]]
    assert {(job.state, job.attempt, job.worker_id) for job in taken} == {(RUNNING, 1, "w1")}
    assert all(job.definition.image for job in taken)
    assert await store.claim(queue="q", holder=holder("w2"), now=T0 + 9, lease=LEASE, gpus=1, count=3) == []
    assert [job.id for job in await store.claim(queue="q", holder=holder("w2"), now=T0 + 9, lease=LEASE, gpus=2)] == [
        submitted[2]
    ]
    assert await store.queue_counts("q") == {RUNNING: 5}


async def test_renew_extends_the_lease(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store, worker="w1"))
    assert await store.renew(holder("w1"), [running], T0 + 100, T0 + 10) == []
    assert await store.requeue_expired(T0 + 60) == []
    assert [attempt for _, attempt in await store.requeue_expired(T0 + 101)] == [running]


async def test_requeue_expired_leaves_queued_and_finished_jobs_alone(store: StateStore) -> None:
    await submit(store, 1)
    done = attempt_of(await claim(store))
    await store.finish(done, holder(), result(), T0 + 1)
    waiting = await submit(store, 2)
    assert await store.requeue_expired(T0 + 10_000) == []
    assert await state(store, waiting) == QUEUED
    assert await store.queue_counts("q") == {QUEUED: 1, FINISHED: 1}


# Cancel and delete


async def test_cancel_queued_job(store: StateStore) -> None:
    job = await submit(store, 1)
    cancelled = await store.cancel(queue="q", job_id=job.id, namespace=DEFAULT_NAMESPACE, now=T0 + 1)
    assert cancelled is not None
    assert (cancelled.job.state, cancelled.job.finish_reason) == (FINISHED, jobs_pb2.FINISH_REASON_CANCELLED)
    assert (cancelled.stop, cancelled.worker_id) == (None, "")
    assert jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED in event_kinds(cancelled.job)
    assert await store.claim(queue="q", holder=holder("w1"), now=T0 + 2, lease=LEASE) == []


async def test_cancel_running_job_names_the_attempt_to_stop_and_fences_it(store: StateStore) -> None:
    await submit(store, 1)
    running = await claim(store, worker="w4")
    cancelled = await store.cancel(queue="q", job_id=running.id, namespace=DEFAULT_NAMESPACE, now=T0 + 1)
    assert cancelled is not None
    assert (cancelled.stop, cancelled.worker_id) == (attempt_of(running), "w4")
    assert (cancelled.job.state, cancelled.job.finish_reason) == (FINISHED, jobs_pb2.FINISH_REASON_CANCELLED)
    await assert_stale(store, attempt_of(running), worker="w4")


async def test_cancel_finishes_the_job_only_when_no_namespace_holds_it(store: StateStore) -> None:
    await submit(store, 1, namespace="a")
    job = await submit(store, 1, namespace="b")
    first = await store.cancel(queue="q", job_id=job.id, namespace="a", now=T0 + 1)
    assert first is not None
    assert (first.job.state, list(first.job.namespaces), first.stop) == (QUEUED, ["b"], None)
    second = await store.cancel(queue="q", job_id=job.id, namespace="b", now=T0 + 2)
    assert second is not None
    assert (second.job.state, second.job.finish_reason) == (FINISHED, jobs_pb2.FINISH_REASON_CANCELLED)


async def test_cancel_for_all_namespaces(store: StateStore) -> None:
    await submit(store, 1, namespace="a")
    job = await submit(store, 1, namespace="b")
    cancelled = await store.cancel(queue="q", job_id=job.id, namespace=ALL_NAMESPACES, now=T0 + 1)
    assert cancelled is not None
    assert (cancelled.job.state, list(cancelled.job.namespaces)) == (FINISHED, [])


async def test_cancel_unknown_job_or_wrong_queue(store: StateStore) -> None:
    job = await submit(store, 1, queue="q")
    assert await store.cancel(queue="other", job_id=job.id, namespace=ALL_NAMESPACES, now=T0) is None
    assert await store.cancel(queue="q", job_id=job_id(definition(2)), namespace=ALL_NAMESPACES, now=T0) is None
    assert await state(store, job) == QUEUED


async def test_cancel_keeps_a_finished_result(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    await store.finish(running, holder(), result(exit_code=7), T0 + 1)
    cancelled = await store.cancel(queue="q", job_id=running.job_id, namespace=ALL_NAMESPACES, now=T0 + 2)
    assert cancelled is not None
    assert cancelled.stop is None
    assert (cancelled.job.finish_reason, cancelled.job.result.exit_code) == (jobs_pb2.FINISH_REASON_SUCCESS, 7)


async def test_delete_running_job_stops_it_and_fences_the_attempt(store: StateStore) -> None:
    await submit(store, 1)
    running = await claim(store, worker="w5")
    deleted = await store.delete(queue="q", job_id=running.id, now=T0 + 1)
    assert deleted is not None
    assert (deleted.stop, deleted.worker_id) == (attempt_of(running), "w5")
    assert (deleted.job.state, deleted.job.finish_reason) == (FINISHED, jobs_pb2.FINISH_REASON_DELETED)
    assert list(deleted.job.namespaces) == []
    await assert_stale(store, attempt_of(running), worker="w5")


async def test_delete_queued_job(store: StateStore) -> None:
    job = await submit(store, 1)
    deleted = await store.delete(queue="q", job_id=job.id, now=T0 + 1)
    assert deleted is not None
    assert (deleted.stop, deleted.job.finish_reason) == (None, jobs_pb2.FINISH_REASON_DELETED)
    assert await store.claim(queue="q", holder=holder("w1"), now=T0 + 2, lease=LEASE) == []


async def test_delete_forgets_the_result_so_the_job_runs_again(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    await store.finish(running, holder(), result(exit_code=4), T0 + 1)
    await store.delete(queue="q", job_id=running.job_id, now=T0 + 2)
    stored = await store.get_job(running.job_id)
    assert stored is not None and stored.result.exit_code != 4
    again, queued = await submit_one(
        store, job_id=running.job_id, definition=definition(1), queue="q", namespace=DEFAULT_NAMESPACE, now=T0 + 3
    )
    assert queued and again.state == QUEUED


async def test_delete_unknown_job(store: StateStore) -> None:
    assert await store.delete(queue="q", job_id=job_id(definition(1)), now=T0) is None
    other = await submit(store, 1, queue="other")
    assert await store.delete(queue="q", job_id=other.id, now=T0) is None  # another queue's run
    assert await state(store, other, "other") == QUEUED


# Logs


async def test_logs_read_back_in_order(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    assert await appended(store, running, RUN, 0, "a", "b", "c") == (0, ["a", "b", "c"])
    assert await appended(store, running, RUN, 3, "d") == (3, ["d"])
    assert await log_texts(store, running) == ["a", "b", "c", "d"]


async def test_a_log_is_cut_where_it_passes_its_limit_and_nothing_is_stored_after(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))

    async def texts(start: int, *given: str) -> tuple[int, list[str]]:
        stored = await store.append_logs(running, holder(), RUN, chunks(*given), start, max_chars=8)
        assert stored is not None
        return stored[0], [chunk.text for chunk in stored[1]]

    assert await texts(0, "abc", "def") == (0, ["abc", "def"])
    first, cut = await texts(2, "ghi", "jkl")
    assert first == 2 and cut[0] == "gh" and len(cut) == 2 and "log cut at 8 characters" in cut[1]
    assert await texts(4, "mno") == (4, [])
    assert (await log_texts(store, running))[:3] == ["abc", "def", "gh"]


async def test_resent_log_chunks_are_stored_once(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    assert await appended(store, running, RUN, 0, "a", "b") == (0, ["a", "b"])
    # The worker re-sends from index 1 (it missed the acknowledgement): "b" is skipped, "c", "d" stored at 2.
    assert await appended(store, running, RUN, 1, "b", "c", "d") == (2, ["c", "d"])
    assert await appended(store, running, RUN, 0, "a", "b", "c", "d") == (4, [])
    assert await appended(store, running, RUN, 3, "d") == (4, [])
    assert await log_texts(store, running) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("since", "limit", "expected"),
    [(0, 10, "abcde"), (1, 2, "bc"), (2, 3, "cde"), (3, 1, "d"), (4, 10, "e"), (5, 10, ""), (0, 0, "")],
)
async def test_read_logs_from_an_index(store: StateStore, since: int, limit: int, expected: str) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    await store.append_logs(running, holder(), RUN, chunks("a", "b", "c"), 0)
    await store.append_logs(running, holder(), RUN, chunks("d", "e"), 3)
    assert "".join(await log_texts(store, running, since=since, limit=limit)) == expected


async def test_log_totals_count_chunks_and_the_characters_of_each_stream(store: StateStore) -> None:
    running = attempt_of(await submit(store, 1) and await claim(store))
    assert await store.log_totals(running, RUN, queue="q") == LogTotals()
    out, err = jobs_pb2.LOG_STREAM_STDOUT, jobs_pb2.LOG_STREAM_STDERR
    first = [jobs_pb2.LogChunk(text="héllo\n", stream=out), jobs_pb2.LogChunk(text="oops\n", stream=err)]
    await store.append_logs(running, holder(), RUN, first, 0)
    await store.append_logs(running, holder(), RUN, [*first, jobs_pb2.LogChunk(text="more", stream=out)], 0)  # a resend
    assert await store.log_totals(running, RUN, queue="q") == LogTotals(chunks=3, stdout_chars=10, stderr_chars=5)
    assert await store.log_totals(running, BUILD, queue="q") == LogTotals()


async def test_chunk_fields_survive_the_store(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store))
    sent = jobs_pb2.LogChunk(text="oops\n", stream=jobs_pb2.LOG_STREAM_STDERR, time=timestamp(T0 + 0.25))
    await store.append_logs(running, holder(), RUN, [sent], 0)
    assert await store.read_logs(running, RUN, 0, 10, queue="q") == [sent]


async def test_logs_are_kept_per_kind_and_per_attempt(store: StateStore) -> None:
    await submit(store, 1)
    first = attempt_of(await claim(store))
    await store.append_logs(first, holder(), BUILD, chunks("pull"), 0)
    await store.append_logs(first, holder(), RUN, chunks("run 1"), 0)
    await store.requeue_expired(T0 + LEASE + 1)
    second = attempt_of(await claim(store, now=T0 + LEASE + 2))
    # Each attempt's log starts at index 0.
    assert await appended(store, second, RUN, 0, "run 2") == (0, ["run 2"])
    assert await log_texts(store, first, BUILD) == ["pull"]
    assert await log_texts(store, first, RUN) == ["run 1"]
    assert await log_texts(store, second, RUN) == ["run 2"]
    assert await log_texts(store, second, BUILD) == []


# Listing


async def walk(store: StateStore, queue: str, *, state: int = 0, limit: int) -> list[list[str]]:
    """Every page of the listing, following cursors until the store returns ''."""
    pages: list[list[str]] = []
    after = ""
    while True:
        jobs, after = await store.list_jobs(queue, state=state, after=after, limit=limit)
        pages.append([job.id for job in jobs])
        assert len(pages) < 100, "the cursor never ends"
        if not after:
            return pages


@pytest.mark.parametrize(("count", "limit"), [(0, 2), (1, 1), (4, 2), (5, 2), (5, 1), (3, 10)])
async def test_list_pages_cover_the_queue_in_submission_order(store: StateStore, count: int, limit: int) -> None:
    submitted = [(await submit(store, n, now=T0 + n)).id for n in range(count)]
    await submit(store, 99, queue="other")
    pages = await walk(store, "q", limit=limit)
    assert [job for page in pages for job in page] == submitted
    assert all(0 < len(page) <= limit for page in pages) or pages == [[]]
    assert len(pages) == max(1, -(-count // limit))


async def test_list_filters_by_state_across_pages(store: StateStore) -> None:
    ids = [(await submit(store, n, now=T0 + n)).id for n in range(5)]
    taken = [await claim(store) for _ in range(2)]
    await store.finish(attempt_of(taken[0]), holder(), result(), T0 + 10)
    assert await walk(store, "q", state=QUEUED, limit=2) == [ids[2:4], ids[4:]]
    assert await walk(store, "q", state=RUNNING, limit=2) == [[ids[1]]]
    assert await walk(store, "q", state=FINISHED, limit=2) == [[ids[0]]]


async def test_list_live_jobs_in_queue_order_then_the_most_recently_finished(store: StateStore) -> None:
    ids = [(await submit(store, n, now=T0 + n, namespace=f"ns{n}")).id for n in range(5)]
    first, second = await claim(store), await claim(store)
    await store.finish(attempt_of(second), holder(), result(), T0 + 10)
    await store.finish(attempt_of(first), holder(), result(), T0 + 20)
    third = await claim(store)  # running, behind nothing: queue order holds running and queued alike
    assert third.id == ids[2]
    pages = await walk(store, "q", limit=2)
    assert pages == [[ids[2], ids[3]], [ids[4], ids[0]], [ids[1]]]
    (listed, *_), _ = await store.list_jobs("q", state=0, after="", limit=10)
    assert list(listed.namespaces) == ["ns2"]
    with pytest.raises(ValueError, match="not a listing cursor"):
        await store.list_jobs("q", state=0, after="nonsense", limit=10)


async def test_listed_jobs_are_summaries(store: StateStore) -> None:
    await submit(store, 1)
    running = attempt_of(await claim(store, worker="w6"))
    await store.finish(running, holder("w6"), result(exit_code=2), T0 + 1)
    (job,), _ = await store.list_jobs("q", state=0, after="", limit=10)
    assert (job.id, job.state, job.finish_reason, job.worker_id, job.attempt) == (
        running.job_id,
        FINISHED,
        jobs_pb2.FINISH_REASON_SUCCESS,
        "w6",
        1,
    )
    assert not job.HasField("definition")
    assert not job.HasField("result")
    assert len(job.history) == 0


async def test_queue_position_counts_queued_jobs_ahead(store: StateStore) -> None:
    ids = [(await submit(store, n, now=T0 + n)).id for n in range(3)]
    assert [await ahead(store, "q", job) for job in ids] == [0, 1, 2]
    await claim(store)
    assert [await ahead(store, "q", job) for job in ids[1:]] == [0, 1]
    assert await store.queue_counts("q") == {QUEUED: 2, RUNNING: 1}
    assert await store.queue_counts("other") == {}


async def test_queue_position_stops_counting_at_the_limit(store: StateStore) -> None:
    ids = [(await submit(store, n, now=T0 + n)).id for n in range(POSITION_LIMIT + 2)]
    assert await ahead(store, "q", ids[-1]) == POSITION_LIMIT
    assert await ahead(store, "q", ids[POSITION_LIMIT - 1]) == POSITION_LIMIT - 1


async def recount(store: StateStore, queue: str) -> dict[int, int]:
    """The queue's jobs by state, counted one by one from its listing."""
    counts: dict[int, int] = {}
    for page in await walk(store, queue, limit=50):
        for listed in page:
            current = await state(store, jobs_pb2.Job(id=listed), queue)
            counts[current] = counts.get(current, 0) + 1
    return counts


async def test_queue_counts_and_claims_agree_with_the_jobs_through_every_transition(store: StateStore) -> None:
    async def check() -> None:
        for queue in ("q", "q2"):
            assert await store.queue_counts(queue) == await recount(store, queue)

    shared = await submit(store, 0)
    await submit(store, 0, queue="q2")  # one definition, a run waiting in each queue
    ids = [shared.id] + [(await submit(store, n, now=T0 + n)).id for n in range(1, 5)]
    await check()
    taken = await claim(store, queue="q2")  # q2's run: q's stays in its line
    assert taken.id == shared.id
    await store.finish(attempt_of(taken), holder(queue="q2"), result(), T0 + 10)
    await check()
    assert await state(store, shared) == QUEUED and await state(store, shared, "q2") == FINISHED
    await store.cancel(queue="q", job_id=shared.id, namespace=ALL_NAMESPACES, now=T0 + 11)
    await check()
    await submit(store, 0, queue="q2", now=T0 + 12)  # q2's result answers q2: nothing queued
    await submit(store, 0, queue="q", now=T0 + 12)  # q's cancelled run runs again, in its place
    assert (await claim(store)).id == shared.id
    await check()
    await store.cancel(queue="q", job_id=ids[2], namespace=DEFAULT_NAMESPACE, now=T0 + 13)
    await store.delete(queue="q", job_id=ids[3], now=T0 + 14)
    await check()
    assert await store.requeue_expired(T0 + 100) != []
    await check()
    assert len(await store.expire(T0 + 50, 10)) == 3
    await check()
    assert await ahead(store, "q", ids[4]) == 2  # q's re-queued run of the shared job, and ids[1]


async def test_a_failed_operation_is_undone_alone_when_its_turn_commits_together(tmp_path: Path) -> None:
    """SQLite: the operations of one loop turn share a commit; each is a savepoint of its own."""
    async with sqlite(tmp_path) as store:
        assert isinstance(store, SqliteStore)
        broken = job_id(definition(2))
        store._db.execute(  # fails the operation after its job and queue rows are written
            f"CREATE TEMP TRIGGER fail AFTER INSERT ON namespaces WHEN NEW.job_id = '{broken}'"
            " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
        outcomes = await asyncio.gather(*(submit(store, n) for n in (1, 2, 3)), return_exceptions=True)
        assert isinstance(outcomes[1], sqlite3.IntegrityError) and "disk on fire" in str(outcomes[1])
        assert await store.get_job(broken) is None
        assert await store.queue_counts("q") == {QUEUED: 2}
        assert [(await claim(store)).id for _ in range(2)] == [job_id(definition(1)), job_id(definition(3))]


async def test_a_failed_commit_fails_every_operation_in_it_and_the_store_goes_on(tmp_path: Path) -> None:
    """SQLite: a COMMIT that fails (here a deferred foreign key, checked only then) rolls back the
    whole group; its callers get the error, and the next operations commit as usual."""
    async with sqlite(tmp_path) as store:
        assert isinstance(store, SqliteStore)
        broken = job_id(definition(2))
        store._db.executescript(
            "CREATE TEMP TABLE parent (id TEXT PRIMARY KEY);"
            " CREATE TEMP TABLE child (parent TEXT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"
            f" CREATE TEMP TRIGGER dangling AFTER INSERT ON namespaces WHEN NEW.job_id = '{broken}'"
            " BEGIN INSERT INTO child VALUES ('nobody'); END"
        )
        outcomes = await asyncio.gather(*(submit(store, n) for n in (1, 2, 3)), return_exceptions=True)
        assert all(isinstance(outcome, sqlite3.IntegrityError) for outcome in outcomes)
        assert await store.queue_counts("q") == {}
        await submit(store, 4)
        assert await store.queue_counts("q") == {QUEUED: 1}


async def test_a_burst_of_operations_over_several_loop_turns_shares_one_commit(tmp_path: Path) -> None:
    """SQLite: the group commit waits while every loop turn brings a new operation (up to
    GROUP_SECONDS), and a lone operation commits after one quiet turn."""
    async with sqlite(tmp_path) as store:
        assert isinstance(store, SqliteStore)
        commits: list[str] = []
        store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)

        async def later(turns: int, n: int) -> jobs_pb2.Job:
            for _ in range(turns):
                await asyncio.sleep(0)  # one loop turn each
            return await submit(store, n)

        await asyncio.gather(*(later(turn, n) for turn, n in enumerate((1, 2, 3, 4))))
        assert len(commits) == 1
        await submit(store, 5)
        assert len(commits) == 2
        assert await store.queue_counts("q") == {QUEUED: 5}


# Workers


def worker(worker_id: str, seen: float, running: Sequence[str] = ()) -> jobs_pb2.WorkerInfo:
    return jobs_pb2.WorkerInfo(
        id=worker_id, cpus=2, running_job_ids=running, last_seen_time=timestamp(seen), hostname="h", version="1"
    )


async def test_workers_are_listed_by_queue_and_last_seen(store: StateStore) -> None:
    await store.upsert_worker(worker("w2", T0), queue="q", session="s2")
    await store.upsert_worker(worker("w1", T0 - 100), queue="q", session="s1")
    await store.upsert_worker(worker("w3", T0), queue="other", session="s3")
    assert await store.list_workers("q", seen_since=T0 - 200) == [worker("w1", T0 - 100), worker("w2", T0)]
    assert await store.list_workers("q", seen_since=T0 - 50) == [worker("w2", T0)]
    assert await store.list_workers("q", seen_since=T0 + 1) == []
    assert await store.list_workers("none", seen_since=0) == []


async def test_upsert_refreshes_the_worker(store: StateStore) -> None:
    await store.upsert_worker(worker("w1", T0), queue="q", session="s1")
    await store.upsert_worker(worker("w1", T0 + 5), queue="q", session="s1")
    assert await store.list_workers("q", seen_since=0) == [worker("w1", T0 + 5)]


async def test_listed_workers_show_the_jobs_running_for_them_now(store: StateStore) -> None:
    await store.upsert_worker(worker("w1", T0, ["stale-record"]), queue="q", session="s1")
    await store.upsert_worker(worker("w2", T0), queue="q", session="s2")
    ids = [(await submit(store, n, now=T0 + n)).id for n in range(3)]
    first, second = await claim(store, worker="w1"), await claim(store, worker="w1")
    await claim(store, worker="w2")
    assert await store.list_workers("q", seen_since=0) == [
        worker("w1", T0, sorted(ids[:2])),
        worker("w2", T0, [ids[2]]),
    ]
    await store.finish(attempt_of(first), holder(), result(), T0 + 10)
    assert await store.list_workers("q", seen_since=0) == [worker("w1", T0, [second.id]), worker("w2", T0, [ids[2]])]


async def test_capacity_counts_the_live_workers_slots_busy_slots_and_most_gpus(store: StateStore) -> None:
    assert await capacity(store, "q") == Capacity()
    await store.upsert_worker(worker("w1", T0), queue="q", session="s1")
    gpu_worker = jobs_pb2.WorkerInfo(id="w2", cpus=4, gpus=["0", "1", "2"], last_seen_time=timestamp(T0 - 100))
    await store.upsert_worker(gpu_worker, queue="q", session="s2")
    await store.upsert_worker(worker("w3", T0), queue="other", session="s3")
    for n in range(3):
        await submit(store, n)
    await claim(store, worker="w1")
    await claim(store, worker="w2")
    assert await capacity(store, "q") == Capacity(workers=2, slots=6, busy=2, most_gpus=3)
    assert await capacity(store, "q", seen_since=T0 - 50) == Capacity(workers=1, slots=2, busy=1, most_gpus=0)
    assert await capacity(store, "other") == Capacity(workers=1, slots=2, busy=0, most_gpus=0)


async def test_remove_worker_only_for_its_current_session(store: StateStore) -> None:
    await store.upsert_worker(worker("w1", T0), queue="q", session="old")
    await store.upsert_worker(worker("w1", T0 + 1), queue="q", session="new")
    # The old connection's cleanup arrives after the worker reconnected: it must not remove it.
    await store.remove_worker("w1", session="old")
    assert [info.id for info in await store.list_workers("q", seen_since=0)] == ["w1"]
    await store.remove_worker("w1", session="new")
    assert await store.list_workers("q", seen_since=0) == []


# Webhooks


async def test_finished_webhooks_are_armed_by_the_finish_and_claimed_once(store: StateStore) -> None:
    job = await submit(store, 1)
    await store.add_webhook(Webhook(job.id, "q", QUEUED_HOOK, "http://q", b"{}"), armed=True, now=T0)
    await store.add_webhook(Webhook(job.id, "q", FINISHED_HOOK, "http://f", b"{}"), armed=False, now=T0)
    (due,) = await store.claim_webhooks(T0 + 1, T0 + 30, 10)
    assert (due.event, due.url, due.attempts) == (QUEUED_HOOK, "http://q", 0)
    assert await store.claim_webhooks(T0 + 2, T0 + 30, 10) == []  # hidden while tried
    await store.settle_webhook(due.id, T0 + 5)
    (again,) = await store.claim_webhooks(T0 + 5, T0 + 30, 10)
    assert (again.id, again.attempts) == (due.id, 1)
    await store.settle_webhook(again.id, None)
    running = attempt_of(await claim(store))
    assert await store.claim_webhooks(T0 + 50, T0 + 80, 10) == []  # finished hook waits for the finish
    await store.finish(running, holder(), result(), T0 + 60)
    (finished,) = await store.claim_webhooks(T0 + 60, T0 + 90, 10)
    assert (finished.event, finished.url) == (FINISHED_HOOK, "http://f")


async def test_a_finished_webhook_for_a_finished_job_is_due_at_once(store: StateStore) -> None:
    job = await submit(store, 1)
    await store.finish(attempt_of(await claim(store)), holder(), result(), T0 + 1)
    await store.add_webhook(Webhook(job.id, "q", FINISHED_HOOK, "http://f", b"{}"), armed=False, now=T0 + 2)
    assert len(await store.claim_webhooks(T0 + 2, T0 + 30, 10)) == 1


async def test_expire_forgets_only_jobs_finished_before_the_cutoff(store: StateStore) -> None:
    old = await submit(store, 1)
    running = attempt_of(await claim(store))
    await store.append_logs(running, holder(), RUN, chunks("a"), 0)
    await store.finish(running, holder(), result(), T0 + 10)
    young = await submit(store, 2)
    await store.finish(attempt_of(await claim(store)), holder(), result(), T0 + 100)
    live = await submit(store, 3)
    assert await store.expire(T0 + 50, 10) == [old.id]
    assert await store.get_job(old.id) is None
    assert await store.read_logs(running, RUN, 0, 10, queue="q") == []
    assert await store.get_job(young.id) is not None and await store.get_job(live.id) is not None
    assert await store.expire(T0 + 10_000, 10) == [young.id]  # never a live job


async def test_expire_queued_ends_only_jobs_queued_before_the_cutoff_as_expired(store: StateStore) -> None:
    await submit(store, 1)
    waiting = await submit(store, 2, now=T0 + 1)
    await store.add_webhook(Webhook(waiting.id, "q", FINISHED_HOOK, "http://hook", b"{}"), armed=False, now=T0)
    await claim(store)  # the oldest waiting job: old
    young = await submit(store, 3, now=T0 + 100)
    assert waiting.id != young.id
    (expired,) = await store.expire_queued(T0 + 50, 10, "1m", T0 + 60)
    assert expired.id == waiting.id  # job 2: queued before the cutoff; job 1 runs, job 3 is younger
    job = await store.get_job(waiting.id, queue="q")
    assert job is not None and (job.state, job.finish_reason) == (FINISHED, jobs_pb2.FINISH_REASON_EXPIRED)
    assert job.result.message == "expired: waited in its queue longer than 1m without a worker taking it"
    assert job.history[-1].kind == jobs_pb2.JOB_EVENT_KIND_FINISHED
    (hook,) = await store.claim_webhooks(T0 + 60, T0 + 70, 10)  # its finished webhook fires
    assert (hook.job_id, hook.event) == (waiting.id, FINISHED_HOOK)
    assert await store.expire_queued(T0 + 50, 10, "1m", T0 + 60) == []
    _, queued = await submit_one(
        store, job_id=waiting.id, definition=definition(2), queue="q", namespace=DEFAULT_NAMESPACE, now=T0 + 70
    )
    assert queued  # expired is no result: submitting it again queues it again


async def test_a_submission_that_does_not_fit_its_queues_room_is_refused_whole(store: StateStore) -> None:
    """Only what a submission adds counts: jobs it (re)queues, bytes of runs it creates; a refused one
    stores nothing, whether all its jobs are new (PostgreSQL: one statement) or some are known."""

    def submission(n: int) -> Submission:
        return Submission(job_id(definition(n)), definition(n), DEFAULT_NAMESPACE)

    size = definition(1).ByteSize()  # every definition(n) for n < 10 has as many bytes
    await store.submit(queue="q", jobs=[submission(n) for n in range(3)], now=T0)
    await submit(store, 9, queue="other")
    finished = await claim(store)
    await store.finish(attempt_of(finished), holder(), result(jobs_pb2.FINISH_REASON_CANCELLED), T0)
    assert await held(store, "q") == (2, 3 * size)
    for room, jobs in ((Room(max_jobs=3), [3, 4]), (Room(max_jobs=3), [1, 3, 4]), (Room(max_bytes=4 * size), [3, 4])):
        with pytest.raises(QueueFull) as full:
            await store.submit(queue="q", jobs=[submission(n) for n in jobs], now=T0 + 1, room=room)
        assert (full.value.queued, full.value.held, full.value.jobs) == (2, 3 * size, bool(room.max_jobs))
        assert await store.get_job(job_id(definition(3)), queue="q") is None  # all or none
    assert await held(store, "q") == (2, 3 * size)
    full_room = Room(max_jobs=2, max_bytes=3 * size)  # the queue holds as much as it may
    stored = await store.submit(queue="q", jobs=[submission(1), submission(2)], now=T0 + 2, room=full_room)
    assert [queued for _, queued in stored] == [False, False]  # already queued: answered, not refused
    with pytest.raises(QueueFull):  # queued again, so it counts, though its run holds its bytes already
        await store.submit(queue="q", jobs=[submission(0)], now=T0 + 2, room=full_room)
    stored = await store.submit(queue="q", jobs=[submission(0)], now=T0 + 2, room=Room(3, 3 * size))
    assert [queued for _, queued in stored] == [True]
    stored = await store.submit(queue="q", jobs=[submission(1), submission(3)], now=T0 + 3, room=Room(4, 4 * size))
    assert [queued for _, queued in stored] == [False, True]  # a known job and a new one: exactly what fits
    assert await held(store, "q") == (4, 4 * size)
    assert await held(store, "other") == (1, size)


async def test_queued_count_stays_exact_through_every_way_a_job_enters_or_leaves_its_queue(store: StateStore) -> None:
    """The count --max-queued-jobs reads (a counter on both backends) agrees with the jobs counted
    by state after batched submissions, batched claims, a release, leases running out, a delete,
    expiry and a batch resubmitting a known job."""

    async def counted(expected: int, queue: str = "q") -> None:
        truth = (await store.queue_counts(queue)).get(jobs_pb2.JOB_STATE_QUEUED, 0)
        assert ((await held(store, queue))[0], truth) == (expected, expected)

    def submission(n: int) -> Submission:
        return Submission(job_id(definition(n)), definition(n), DEFAULT_NAMESPACE)

    await store.submit(queue="q", jobs=[submission(n) for n in range(5)], now=T0)
    await store.submit(queue="other", jobs=[submission(n) for n in range(2)], now=T0)
    await counted(5)
    await counted(2, "other")
    taken = await store.claim(queue="q", holder=holder(), now=T0, lease=LEASE, count=3)
    assert len(taken) == 3
    await claim(store, queue="other")
    await counted(2)
    await counted(1, "other")
    assert await store.release(attempt_of(taken[0]), holder(), "bye", T0 + 1) is not None
    await counted(3)
    assert len(await store.requeue_expired(T0 + LEASE + 1)) == 3  # two in q, one in other
    await counted(5)
    await counted(2, "other")
    assert await store.delete(queue="q", job_id=taken[1].id, now=T0 + 40) is not None
    await counted(4)
    assert len(await store.expire_queued(T0 + 50, 100, "1m", T0 + 60)) == 6
    await counted(0)
    await counted(0, "other")
    await store.submit(queue="q", jobs=[submission(0), submission(7)], now=T0 + 70)  # known (expired), new
    await counted(2)


async def test_queue_bytes_count_the_definitions_of_a_queues_runs(store: StateStore) -> None:
    assert await held(store, "q") == (0, 0)
    await submit(store, 1)
    await submit(store, 2, queue="other")
    await submit(store, 1)  # the same run again: no new bytes
    assert (await held(store, "q"))[1] == definition(1).ByteSize()
    await store.finish(attempt_of(await claim(store)), holder(), result(), T0)
    await submit(store, 3)
    assert (await held(store, "q"))[1] == definition(1).ByteSize() + definition(3).ByteSize()
    await store.expire(T0 + 1, 10)  # retention forgets the finished run
    assert (await held(store, "q"))[1] == definition(3).ByteSize()
    assert (await held(store, "other"))[1] == definition(2).ByteSize()


async def test_blob_references_are_the_keys_of_inputs_build_contexts_and_outputs(store: StateStore) -> None:
    def ref(key: str) -> definition_pb2.DataRef:
        return definition_pb2.DataRef(type="key", value=struct_pb2.Value(string_value=key))

    inputs, context, output = "1" * 64, "2" * 64, "3" * 64
    first = definition_pb2.JobDefinition(image="x", inputs={"a": ref(inputs), "b": definition_pb2.DataRef()})
    second = definition_pb2.JobDefinition(image="x", build=definition_pb2.ImageBuild(context=f"/f/{context}"))
    for spec in (first, second):
        await submit_one(store, job_id=job_id(spec), definition=spec, queue="q", namespace=DEFAULT_NAMESPACE, now=T0)
    running = attempt_of(await claim(store))
    await store.finish(
        running, holder(), jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS, outputs={"o": ref(output)}), T0
    )
    assert await store.blob_references() == {inputs, context, output}


# Upgrades


def _old_history() -> list[jobs_pb2.JobEvent]:
    """Entries as the `events` table held them, one with a message long enough for a 3-byte length."""
    return [
        jobs_pb2.JobEvent(time=timestamp(T0), kind=jobs_pb2.JOB_EVENT_KIND_QUEUED, message="queued on 'q'"),
        jobs_pb2.JobEvent(time=timestamp(T0 + 1), kind=jobs_pb2.JOB_EVENT_KIND_ASSIGNED, attempt=1, worker_id="w1"),
        jobs_pb2.JobEvent(time=timestamp(T0 + 2), kind=jobs_pb2.JOB_EVENT_KIND_FINISHED, message="é" * 20_000),
    ]


async def test_sqlite_histories_move_from_the_events_table_into_the_job_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobwire.db"
    with monkeypatch.context() as old_version:  # the schema as migration 6 left it
        old_version.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:6])
        await (await SqliteStore.open(path)).close()
    old = definition(1)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE events (job_id TEXT NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB)")
        db.execute(
            "INSERT INTO jobs (id, state, queue, create_time, update_time, definition) VALUES (?, ?, 'q', ?, ?, ?)",
            (job_id(old), FINISHED, T0, T0 + 2, old.SerializeToString()),
        )
        for entry in _old_history():
            db.execute("INSERT INTO events (job_id, data) VALUES (?, ?)", (job_id(old), entry.SerializeToString()))
    async with sqlite(tmp_path) as store:
        job = await store.get_job(job_id(old))
        assert job is not None and list(job.history) == _old_history()
        await submit(store, 2)  # and new entries go where the moved ones are
        assert event_kinds(await store.get_job(job_id(definition(2)))) == [jobs_pb2.JOB_EVENT_KIND_QUEUED]


_OLD_WORKER = jobs_pb2.WorkerInfo(id="w1", cpus=3, gpus=["0", "1"], last_seen_time=timestamp(T0))


async def test_sqlite_workers_get_their_slots_and_gpus_beside_their_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobwire.db"
    with monkeypatch.context() as old_version:  # the schema as migration 7 left it
        old_version.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:7])
        await (await SqliteStore.open(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO workers VALUES ('w1', 'q', 's1', ?, ?)", (T0, _OLD_WORKER.SerializeToString()))
    async with sqlite(tmp_path) as store:
        assert await capacity(store, "q") == Capacity(workers=1, slots=3, most_gpus=2)
        assert await store.list_workers("q", seen_since=0) == [_OLD_WORKER]


async def test_postgres_workers_get_their_slots_and_gpus_beside_their_records(
    postgres_cluster: PostgresCluster,
) -> None:
    url = await postgres_cluster.create_database()
    connection = await asyncpg.connect(url)
    try:  # the schema as migration 4 left it, as `migrate` would have
        await connection.execute(
            "CREATE TABLE jobwire_schema (version INTEGER NOT NULL); INSERT INTO jobwire_schema VALUES (4)"
        )
        for migration in postgres_schema.MIGRATIONS[:4]:
            assert isinstance(migration, str)
            await connection.execute(migration)
        await connection.execute(
            "INSERT INTO workers VALUES ('w1', 'q', 's1', $1, $2)", T0, _OLD_WORKER.SerializeToString()
        )
    finally:
        await connection.close()
    store = await PostgresStore.open(url, max_size=2)
    try:
        assert await capacity(store, "q") == Capacity(workers=1, slots=3, most_gpus=2)
    finally:
        await store.close()


async def test_postgres_histories_move_from_the_events_table_into_the_job_rows(
    postgres_cluster: PostgresCluster,
) -> None:
    url, old = await postgres_cluster.create_database(), definition(1)
    connection = await asyncpg.connect(url)
    try:  # the schema as migration 3 left it, as `migrate` would have
        await connection.execute(
            "CREATE TABLE jobwire_schema (version INTEGER NOT NULL); INSERT INTO jobwire_schema VALUES (3)"
        )
        for migration in postgres_schema.MIGRATIONS[:3]:
            assert isinstance(migration, str)
            await connection.execute(migration)
        await connection.execute(
            "INSERT INTO jobs (id, state, queue, create_time, update_time, definition)"
            " VALUES ($1, $2, 'q', $3, $4, $5)",
            job_id(old),
            FINISHED,
            T0,
            T0 + 2,
            old.SerializeToString(),
        )
        for entry in _old_history():
            await connection.execute(
                "INSERT INTO events (job_id, data) VALUES ($1, $2)", job_id(old), entry.SerializeToString()
            )
    finally:
        await connection.close()
    store = await PostgresStore.open(url, max_size=2)
    try:
        job = await store.get_job(job_id(old))
        assert job is not None and list(job.history) == _old_history()
    finally:
        await store.close()


_RUNNING_ROW = (
    "INSERT INTO jobs (id, state, queue, attempt, worker_id, create_time, update_time, lease_expires, definition)"
)


async def assert_retaken_after_migration(store: StateStore) -> None:
    """A job running for w1 before jobs had sessions is re-taken when w1 registers again, then finishes."""
    running, again = Attempt(job_id(definition(1)), 1), holder("w1", "after the upgrade")
    assert await store.finish(running, again, result(), T0 + 2) is None  # not before the worker re-takes it
    assert await store.retake(again, [running], T0 + 100, T0 + 10) == []
    finished = await store.finish(running, again, result(), T0 + 2)
    assert finished is not None and finished.state == FINISHED


async def test_sqlite_running_jobs_get_a_session_and_are_retaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobwire.db"
    with monkeypatch.context() as old_version:  # the schema as migration 8 left it
        old_version.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:8])
        await (await SqliteStore.open(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        row = (job_id(definition(1)), RUNNING, T0, T0, T0 + LEASE, definition(1).SerializeToString())
        db.execute(f"{_RUNNING_ROW} VALUES (?, ?, 'q', 1, 'w1', ?, ?, ?, ?)", row)
    async with sqlite(tmp_path) as store:
        await assert_retaken_after_migration(store)


async def test_postgres_running_jobs_get_a_session_and_are_retaken(
    postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await postgres_cluster.create_database()
    with monkeypatch.context() as old_version:  # the schema as migration 5 left it
        old_version.setattr(postgres_schema, "MIGRATIONS", postgres_schema.MIGRATIONS[:5])
        await (await PostgresStore.open(url, max_size=2)).close()
    connection = await asyncpg.connect(url)
    try:
        row = (job_id(definition(1)), RUNNING, T0, T0, T0 + LEASE, definition(1).SerializeToString())
        await connection.execute(f"{_RUNNING_ROW} VALUES ($1, $2, 'q', 1, 'w1', $3, $4, $5, $6)", *row)
    finally:
        await connection.close()
    store = await PostgresStore.open(url, max_size=2)
    try:
        await assert_retaken_after_migration(store)
    finally:
        await store.close()


async def test_a_queue_credential_is_added_once_and_replaced_only_by_who_holds_it(store: StateStore) -> None:
    assert await store.queue_credential("q") is None  # a queue that exists only by name is open
    assert await store.add_queue_credential("q", "one", T0)
    assert not await store.add_queue_credential("q", "other", T0)  # nobody takes over a protected queue
    assert await store.queue_credential("q") == "one"
    assert not await store.replace_queue_credential("q", "wrong", "mine", T0)
    assert not await store.replace_queue_credential("unknown", "", "mine", T0)
    assert await store.replace_queue_credential("q", "one", "two", T0)
    assert await store.queue_credential("q") == "two"
    assert await store.replace_queue_credential("q", "two", "", T0)  # revoked
    assert await store.queue_credential("q") == ""
    assert not await store.replace_queue_credential("q", "", "three", T0)  # a revoked queue stays closed
    assert not await store.add_queue_credential("q", "three", T0)


async def test_a_worker_id_trusts_the_first_secret_it_was_seen_with(store: StateStore) -> None:
    assert await store.trust_worker("w1", "secret", T0)
    assert await store.trust_worker("w1", "secret", T0 + 1)
    assert not await store.trust_worker("w1", "forged", T0 + 2)
    assert await store.trust_worker("w2", "forged", T0 + 2)  # another id is another worker
    assert await store.trust_worker("w1", "secret", T0 + 3)


# Runs: a job's id in one queue


async def test_a_result_answers_only_submissions_to_the_queue_where_it_ran(store: StateStore) -> None:
    await submit(store, 1, queue="attacker")
    forged = await claim(store, queue="attacker", worker="fake")
    await store.finish(attempt_of(forged), holder("fake", queue="attacker"), result(exit_code=66), T0 + 1)
    victim, queued = await submit_one(
        store, job_id=forged.id, definition=definition(1), queue="victim", namespace=DEFAULT_NAMESPACE, now=T0 + 2
    )
    assert queued and (victim.state, victim.queue, victim.attempt) == (QUEUED, "victim", 0)
    assert not victim.HasField("result")
    honest = await claim(store, queue="victim", worker="honest", now=T0 + 3)
    assert (honest.id, honest.attempt) == (forged.id, 1)  # its own attempts
    assert await store.finish(attempt_of(honest), holder("fake", queue="attacker"), result(), T0 + 4) is None
    done = await store.finish(attempt_of(honest), holder("honest", queue="victim"), result(exit_code=0), T0 + 4)
    assert done is not None and done.result.exit_code == 0
    again, queued = await submit_one(
        store, job_id=forged.id, definition=definition(1), queue="victim", namespace=DEFAULT_NAMESPACE, now=T0 + 5
    )
    assert not queued and again.result.exit_code == 0  # its own queue's result answers
    attacker = await store.get_job(forged.id, queue="attacker")
    assert attacker is not None and attacker.result.exit_code == 66


async def test_a_run_waiting_in_one_queue_does_not_hold_back_another(store: StateStore) -> None:
    await submit(store, 1, queue="nobody-works-here")
    await submit(store, 1, queue="victim")
    taken = await claim(store, queue="victim", worker="honest")
    assert taken.id == job_id(definition(1))
    assert await state(store, taken, "nobody-works-here") == QUEUED
    assert await store.queue_counts("nobody-works-here") == {QUEUED: 1}
    assert await store.queue_counts("victim") == {RUNNING: 1}


async def test_logs_and_webhooks_belong_to_one_run(store: StateStore) -> None:
    for queue in ("a", "b"):
        await submit(store, 1, queue=queue)
        await store.add_webhook(
            Webhook(job_id(definition(1)), queue, FINISHED_HOOK, f"http://{queue}", b"{}"), armed=False, now=T0
        )
    in_a, in_b = await claim(store, queue="a"), await claim(store, queue="b", worker="w2")
    await store.append_logs(attempt_of(in_a), holder(queue="a"), RUN, chunks("from a"), 0)
    await store.append_logs(attempt_of(in_b), holder("w2", queue="b"), RUN, chunks("from b"), 0)
    assert [c.text for c in await store.read_logs(attempt_of(in_a), RUN, 0, 10, queue="a")] == ["from a"]
    await store.finish(attempt_of(in_b), holder("w2", queue="b"), result(), T0 + 1)
    (due,) = await store.claim_webhooks(T0 + 1, T0 + 30, 10)
    assert (due.url, due.queue) == ("http://b", "b")


async def test_an_id_only_read_shows_the_run_finished_last(store: StateStore) -> None:
    assert await store.get_job(job_id(definition(1))) is None
    await submit(store, 1, queue="a")
    await submit(store, 1, queue="b", now=T0 + 1)
    shown = await store.get_job(job_id(definition(1)))
    assert shown is not None and shown.queue == "b"  # none finished: the one changed last
    running = await claim(store, queue="a", now=T0 + 2)
    await store.finish(attempt_of(running), holder(queue="a"), result(), T0 + 3)
    await submit(store, 1, queue="c", now=T0 + 4)
    shown = await store.get_job(job_id(definition(1)))
    assert shown is not None and shown.queue == "a" and shown.state == FINISHED


def _split_rows(execute: Callable[..., Any], marks: Callable[[int], str]) -> list[Any]:
    """A finished job first queued on 'a' and listed by 'b' too, as one row held them before runs."""
    old = definition(1)
    finished = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS, exit_code=66, attempt=1)
    return [
        execute(
            "INSERT INTO jobs (id, state, queue, attempt, worker_id, create_time, update_time, finish_reason,"
            f" definition, result) VALUES ({marks(10)})",
            *(job_id(old), FINISHED, "a", 1, "fake", T0, T0 + 1, jobs_pb2.FINISH_REASON_SUCCESS),
            *(old.SerializeToString(), finished.SerializeToString()),
        ),
        *(execute(f"INSERT INTO queue_jobs (queue, job_id) VALUES ({marks(2)})", q, job_id(old)) for q in "ab"),
        *(execute(f"INSERT INTO namespaces VALUES ({marks(3)})", q, job_id(old), "_") for q in "ab"),
        execute(
            f"INSERT INTO logs (job_id, attempt, kind, start, count, data) VALUES ({marks(6)})",
            *(job_id(old), 1, RUN, 0, 1, jobs_pb2.LogBatch(chunks=chunks("forged")).SerializeToString()),
        ),
    ]


async def assert_split_per_queue(store: StateStore) -> None:
    """After the migration: 'a' keeps the run and its logs, 'b' has a fresh queued run of its own."""
    old = job_id(definition(1))
    kept, fresh = await store.get_job(old, queue="a"), await store.get_job(old, queue="b")
    assert kept is not None and (kept.state, kept.result.exit_code) == (FINISHED, 66)
    assert fresh is not None and (fresh.state, fresh.attempt, fresh.namespaces) == (QUEUED, 0, ["_"])
    assert not fresh.HasField("result") and "a run of its own" in fresh.history[-1].message
    assert [c.text for c in await store.read_logs(Attempt(old, 1), RUN, 0, 10, queue="a")] == ["forged"]
    assert await store.queue_counts("b") == {QUEUED: 1} and await store.queue_counts("a") == {FINISHED: 1}
    assert (await claim(store, queue="b")).id == old


async def test_sqlite_a_job_listed_by_several_queues_becomes_a_run_per_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobwire.db"
    with monkeypatch.context() as old_version:  # the schema as migration 9 left it
        old_version.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:9])
        await (await SqliteStore.open(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        _split_rows(lambda sql, *args: db.execute(sql, args), lambda count: ", ".join("?" * count))
    async with sqlite(tmp_path) as store:
        await assert_split_per_queue(store)


async def test_postgres_a_job_listed_by_several_queues_becomes_a_run_per_queue(
    postgres_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await postgres_cluster.create_database()
    with monkeypatch.context() as old_version:  # the schema as migration 6 left it
        old_version.setattr(postgres_schema, "MIGRATIONS", postgres_schema.MIGRATIONS[:6])
        await (await PostgresStore.open(url, max_size=2)).close()
    connection = await asyncpg.connect(url)
    try:
        for statement in _split_rows(connection.execute, lambda count: ", ".join(f"${n}" for n in range(1, count + 1))):
            await statement
    finally:
        await connection.close()
    store = await PostgresStore.open(url, max_size=2)
    try:
        await assert_split_per_queue(store)
    finally:
        await store.close()
