"""The job state machine, once: which transition is allowed from which state, what the job row becomes,
what its history says, and who may make it.

Pure Python, no SQL: a store reads who holds a job (`Holding`), asks here, and writes the `Change`
it gets (its columns, and one history entry appended in the same statement). A new state or
transition is added in this file; a store learns no more than a column to persist.

Fencing: a worker acts on a running job only as the attempt it was given *and* from the worker
session (one stream connection) that holds it. A stream that registers with another worker id, or
with the same id beside the live session, is refused. A worker that reconnects and names the
attempts it still holds re-takes them into its new session (`may_retake`), so that a restart of
the server or a network blip keeps running jobs. A worker that comes back after its lease ran out
may still deliver the result of the attempt it lost, as long as nobody else was given the job since
(`may_finish`): the job then finishes once rather than running again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from jobwire.core.units import timestamp
from jobwire.server.store.base import FINAL_REASONS, Attempt, Holder
from jobwire.server.store.rows import finish_message, history_entry
from jobwire.v1 import jobs_pb2

QUEUED, RUNNING, FINISHED = (
    jobs_pb2.JOB_STATE_QUEUED,
    jobs_pb2.JOB_STATE_RUNNING,
    jobs_pb2.JOB_STATE_FINISHED,
)
Reason: TypeAlias = jobs_pb2.FinishReason.ValueType


class Holding(NamedTuple):
    """Who holds a job now: the job row's columns named by `HOLDING`."""

    state: int
    attempt: int
    worker_id: str
    session: str


HOLDING = "state, attempt, worker_id, session"
"""The columns of a job row that `Holding` reads, in its order."""


@dataclass(frozen=True)
class Change:
    """What a transition writes to one job row: `columns` set to their values and `entry` (the
    encoded history entry, see `rows.history_entry`) appended to its history."""

    entry: bytes = b""
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def finishes(self) -> bool:
        """The job ends here: its `finished` webhooks are armed in the same transaction."""
        return self.columns.get("state") == FINISHED


def holds(holding: Holding | None, attempt: Attempt, holder: Holder) -> bool:
    """True when `holder` may act on the job as `attempt` (start, log, renew, finish, release it)."""
    return may_retake(holding, attempt, holder) and holding is not None and holding.session == holder.session


def may_retake(holding: Holding | None, attempt: Attempt, holder: Holder) -> bool:
    """True when the worker of `holder` holds `attempt` in some session, or lost it when its lease ran
    out and nobody was given the job since (`lost_to`): a reconnecting worker takes the attempts it
    still runs, or finished while cut off, into its new session rather than the job running again."""
    return (
        holding is not None
        and holding.state == RUNNING
        and holding.attempt == attempt.attempt
        and holding.worker_id == holder.worker_id
    ) or lost_to(holding, attempt, holder)


def lost_to(holding: Holding | None, attempt: Attempt, holder: Holder) -> bool:
    """True when the job is queued again because the lease of `holder`'s worker on `attempt` ran out,
    and no worker has been given it since (see `lease_ran_out`)."""
    return (
        holding is not None
        and holding.state == QUEUED
        and holding.attempt == attempt.attempt
        and bool(holding.worker_id)
        and holding.worker_id == holder.worker_id
    )


def may_finish(holding: Holding | None, attempt: Attempt, holder: Holder, result: jobs_pb2.JobResult) -> bool:
    """True when `holder` may finish the job with `result`: it holds `attempt`, or its worker lost the
    attempt when its lease ran out (the job is queued again, still naming that worker and attempt:
    see `lease_ran_out`) and nobody was given the job since. A cancelled result is not taken that way:
    it is the worker obeying the server's stop of the lost attempt, not the attempt's own end."""
    return holds(holding, attempt, holder) or (
        lost_to(holding, attempt, holder) and result.reason != jobs_pb2.FINISH_REASON_CANCELLED
    )


def may_queue_again(state: int, reason: int) -> bool:
    """A submission of a known job queues it again unless it is queued, running, or has a final result."""
    return state == FINISHED and reason not in FINAL_REASONS


def queued(now: float) -> Change:
    """A job's run (new, or known and not final) waits in its queue. No history names a queue: a run
    belongs to one, and a job id's routes must not reveal it."""
    entry = history_entry(jobs_pb2.JOB_EVENT_KIND_QUEUED, now, message="queued")
    columns = dict(state=QUEUED, worker_id="", session="", update_time=now, finish_reason=0)
    return Change(entry, columns | dict(result=None, lease_expires=None))


def assigned(previous_attempt: int, holder: Holder, now: float, lease: float) -> Change:
    """A waiting job goes to the holder's worker and session as its next attempt."""
    attempt, worker_id = previous_attempt + 1, holder.worker_id
    message = f"assigned to worker {worker_id} as attempt {attempt}"
    entry = history_entry(jobs_pb2.JOB_EVENT_KIND_ASSIGNED, now, attempt=attempt, worker_id=worker_id, message=message)
    columns = dict(state=RUNNING, attempt=attempt, worker_id=worker_id, session=holder.session, update_time=now)
    return Change(entry, columns | dict(lease_expires=now + lease))


def started(attempt: Attempt, holder: Holder, now: float) -> Change:
    """The held attempt's container started (the job stays running)."""
    return Change(_started_entry(attempt, holder, now))


def _started_entry(attempt: Attempt, holder: Holder, now: float) -> bytes:
    kind = jobs_pb2.JOB_EVENT_KIND_STARTED
    return history_entry(kind, now, attempt=attempt.attempt, worker_id=holder.worker_id, message="container started")


def finished(
    attempt: Attempt, holder: Holder, result: jobs_pb2.JobResult, now: float, *, started: bool = False
) -> Change:
    """The held attempt ended with `result` (and, when `started`, its container's start is reported
    with it: the history records both, as `started` then this would)."""
    message = finish_message(result)
    entry = history_entry(
        jobs_pb2.JOB_EVENT_KIND_FINISHED, now, attempt=attempt.attempt, worker_id=holder.worker_id, message=message
    )
    if started:
        entry = _started_entry(attempt, holder, now) + entry
    return Change(entry, _final(result.reason, now, result.SerializeToString()))


def released(holding: Holding, reason: str, now: float) -> Change:
    """The holder gave its attempt back unfinished."""
    return _requeued(holding, now, f"released by worker {holding.worker_id}: {reason}")


def lease_ran_out(holding: Holding, now: float) -> Change:
    """The job's worker went silent past its lease. The queued job keeps naming that worker (not its
    session) until it is assigned again, so a result the worker sends when it comes back is still
    taken (`may_finish`)."""
    change = _requeued(holding, now, f"worker-lost: no word from worker {holding.worker_id} within its lease")
    return Change(change.entry, change.columns | dict(worker_id=holding.worker_id))


def left_behind(holding: Holding, now: float) -> Change:
    """The job's worker registered again without this attempt (e.g. after a restart)."""
    return _requeued(holding, now, f"worker-lost: worker {holding.worker_id} came back without this attempt")


def _requeued(holding: Holding, now: float, why: str) -> Change:
    entry = history_entry(
        jobs_pb2.JOB_EVENT_KIND_REQUEUED,
        now,
        attempt=holding.attempt,
        worker_id=holding.worker_id,
        message=f"re-queued: {why}",
    )
    columns = dict(state=QUEUED, worker_id="", session="", update_time=now, lease_expires=None)
    return Change(entry, columns)


def cancel_requested(namespace: str, now: float) -> Change:
    """A namespace dropped its hold on the job's run (it ends only when no namespace holds it)."""
    message = f"cancel requested for namespace {namespace!r}"
    return Change(history_entry(jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED, now, message=message))


def replaced(namespace: str, keep: str, now: float) -> Change:
    """A namespace's newer job replaces this one in their queue (the namespace drops its hold)."""
    message = f"replaced by job {keep} in namespace {namespace!r}"
    return Change(history_entry(jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED, now, message=message))


def ended_by_client(holding: Holding, reason: Reason, words: str, now: float, *, force: bool = False) -> Change | None:
    """A client ends a queued or running job (any job with `force`, as a delete does); None if it
    has ended already."""
    if holding.state == FINISHED and not force:
        return None
    result = jobs_pb2.JobResult(reason=reason, message=f"{words} by a client", attempt=holding.attempt)
    result.finish_time.CopyFrom(timestamp(now))
    entry = history_entry(jobs_pb2.JOB_EVENT_KIND_FINISHED, now, attempt=holding.attempt, message=result.message)
    return Change(entry, _final(reason, now, result.SerializeToString()))


def renewed(holder: Holder, until: float, holding: Holding | None = None, now: float = 0.0) -> Change:
    """The holder's lease on a job it holds (or re-takes) lasts until `until`; no history, unless the
    job was queued again after the worker's lease ran out (`lost_to`): it is running again, the same
    attempt on the same worker."""
    columns: dict[str, Any] = dict(lease_expires=until, session=holder.session)
    if holding is None or holding.state != QUEUED:
        return Change(columns=columns)
    message = f"worker {holder.worker_id} came back with this attempt after its lease ran out; it runs on"
    entry = history_entry(
        jobs_pb2.JOB_EVENT_KIND_ASSIGNED, now, attempt=holding.attempt, worker_id=holder.worker_id, message=message
    )
    return Change(entry, columns | dict(state=RUNNING, worker_id=holder.worker_id, update_time=now))


def expired(holding: Holding, ttl: str, now: float) -> Change | None:
    """A queued job waited past the queued time-to-live (`ttl` in words) and ends as expired; None
    unless it is still queued."""
    if holding.state != QUEUED:
        return None
    message = f"expired: waited in its queue longer than {ttl} without a worker taking it"
    result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_EXPIRED, message=message, attempt=holding.attempt)
    result.finish_time.CopyFrom(timestamp(now))
    entry = history_entry(jobs_pb2.JOB_EVENT_KIND_FINISHED, now, attempt=holding.attempt, message=message)
    return Change(entry, _final(jobs_pb2.FINISH_REASON_EXPIRED, now, result.SerializeToString()))


def to_stop(holding: Holding, job_id: str) -> Attempt | None:
    """The attempt a worker must stop when a client ends the job: its running one, if any."""
    return Attempt(job_id, holding.attempt) if holding.state == RUNNING else None


def _final(reason: int, now: float, result: bytes) -> dict[str, Any]:
    return dict(state=FINISHED, finish_reason=reason, update_time=now, lease_expires=None, result=result)
