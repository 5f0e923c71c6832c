"""The StateStore protocol: every job transition is one atomic, fenced store call.

Every backend passes the same contract suite (tests/test_store.py). Jobs are
returned as `jobs_pb2.Job` messages; times are Unix seconds (injected, never
read from a clock here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from jobwire.v1 import definition_pb2, jobs_pb2

FINAL_REASONS = frozenset(
    {
        jobs_pb2.FINISH_REASON_SUCCESS,
        jobs_pb2.FINISH_REASON_ERROR,
        jobs_pb2.FINISH_REASON_TIMED_OUT,
    }
)
"""Finished results that answer later identical submissions to the same queue."""

DEFAULT_NAMESPACE = "_"
ALL_NAMESPACES = "*"
POSITION_LIMIT = 1000
"""`waiting` counts no further: a job this far back reads as '1,000+ jobs ahead'."""


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job: the fencing token of a worker's assignment."""

    job_id: str
    attempt: int


@dataclass(frozen=True)
class Holder:
    """Who acts on an attempt: a worker, the session (its current stream connection) that holds the
    attempt, and the queue that session works (a job's run is its id in one queue); see
    `transitions` for the fencing rules."""

    worker_id: str
    session: str
    queue: str


class Capacity(NamedTuple):
    """What the live workers of a queue offer: how many there are, their slots, how many of those
    run a job, and the most GPU devices one of them has."""

    workers: int = 0
    slots: int = 0
    busy: int = 0
    most_gpus: int = 0


class LogTotals(NamedTuple):
    """How much of one log is stored: chunks, and characters of text of each stream."""

    chunks: int = 0
    stdout_chars: int = 0
    stderr_chars: int = 0

    @property
    def chars(self) -> int:
        return self.stdout_chars + self.stderr_chars

    def after(self, chunks: Sequence[jobs_pb2.LogChunk]) -> LogTotals:
        """These totals with `chunks` appended."""
        stderr = sum(len(chunk.text) for chunk in chunks if chunk.stream == jobs_pb2.LOG_STREAM_STDERR)
        stdout = sum(len(chunk.text) for chunk in chunks) - stderr
        return LogTotals(self.chunks + len(chunks), self.stdout_chars + stdout, self.stderr_chars + stderr)


@dataclass(frozen=True)
class Submission:
    """One job to add to a queue: its id, its definition, and the namespace submitting it."""

    job_id: str
    definition: definition_pb2.JobDefinition
    namespace: str


@dataclass(frozen=True)
class Room:
    """What a queue may hold, checked by `StateStore.submit` inside the submission: queued jobs
    (`--max-queued-jobs`) and bytes of job definitions, inline inputs included, of all its runs in
    the store (`--max-queue-bytes`); 0 is no limit."""

    max_jobs: int = 0
    max_bytes: int = 0

    def refusal(self, queued: int, held: int, jobs: int, size: int) -> QueueFull | None:
        """Why a submission that (re)queues `jobs` jobs and stores `size` bytes of new definitions does
        not fit a queue holding `queued` queued jobs and `held` bytes; None when it fits. Only what
        grows is refused: a submission adding no job (all already queued) passes a full queue."""
        if self.max_jobs and jobs and queued + jobs > self.max_jobs:
            return QueueFull(queued, held, jobs=True)
        if self.max_bytes and size and held + size > self.max_bytes:
            return QueueFull(queued, held, jobs=False)
        return None


NO_LIMITS = Room()


class QueueFull(Exception):
    """A submission refused whole by its queue's `Room`: the queued jobs and bytes the queue held,
    and which limit it would pass (`jobs`: the queued jobs, else the bytes; the jobs are checked first)."""

    def __init__(self, queued: int, held: int, *, jobs: bool) -> None:
        super().__init__(f"queue full: {queued} queued jobs, {held} bytes held")
        self.queued, self.held, self.jobs = queued, held, jobs


class Waiting(NamedTuple):
    """Why a queued job waits, read at once: what the queue's live workers offer, and how many
    queued jobs of the queue are ahead of it (counted up to POSITION_LIMIT)."""

    capacity: Capacity
    ahead: int


@dataclass(frozen=True)
class Cancelled:
    """What a cancel did: the job after it, and the attempt to stop on its worker, if any."""

    job: jobs_pb2.Job
    stop: Attempt | None
    worker_id: str


QUEUED_HOOK, FINISHED_HOOK = "queued", "finished"


@dataclass(frozen=True)
class Webhook:
    """A JSON POST owed to `url` when the job's run in `queue` reaches `event` (`queued` or `finished`)."""

    job_id: str
    queue: str
    event: str
    url: str
    body: bytes
    id: int = 0
    attempts: int = 0


class CredentialStore(Protocol):
    """Who may work a queue and who a worker is (`credentials`): the part of the `StateStore` that
    keeps digests of queue credentials and worker secrets."""

    async def add_queue_credential(self, queue: str, digest: str, now: float) -> bool:
        """Protect `queue` with the credential whose digest is `digest`; False (and no change) if the
        queue has, or had, a credential."""

    async def queue_credential(self, queue: str) -> str | None:
        """The digest of the queue's worker credential: None for a queue without one (open), "" once
        revoked."""

    async def replace_queue_credential(self, queue: str, current: str, new: str, now: float) -> bool:
        """Swap the queue's credential digest `current` for `new` ("" revokes) in one step; False (and
        no change) if `current` is not the queue's live credential."""

    async def trust_worker(self, worker_id: str, digest: str, now: float) -> bool:
        """Trust on first use: keep `digest` (of the worker's secret) the first time `worker_id` is seen;
        True if `digest` is the one kept for the id."""


class StateStore(CredentialStore, Protocol):
    """Jobs, queues, logs and workers, shared by every server replica.

    A job's *run* is its id in one queue: the same definition submitted to two queues is two runs,
    each with its own state, attempts, logs and result; nothing one queue's run does (wait, run,
    finish) answers or holds back another queue's submission. A worker acts on the run of its
    holder's queue."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """Raise when the store cannot be reached."""

    async def submit(
        self, *, queue: str, jobs: Sequence[Submission], now: float, room: Room = NO_LIMITS
    ) -> list[tuple[jobs_pb2.Job, bool]]:
        """Add the jobs to the queue in order, in one transaction; returns each job's run in the queue and
        whether this call (re)queued it (not when that run was queued or running already, or has a
        final result: only a result earned in this queue answers).

        QueueFull (and nothing stored) when what the call adds does not fit `room` beside what the
        queue holds: the jobs it (re)queues and the definitions of the runs it creates (a job already
        queued, or a known run queued again, adds no bytes). Checked inside the submission: on SQLite
        (one writer) exactly; on PostgreSQL against the counters as committed when the submission
        reads them, so submissions committing at the same time (READ COMMITTED, any replicas) may
        pass a limit together by at most what they add at once."""

    async def get_job(self, job_id: str, *, queue: str = "") -> jobs_pb2.Job | None:
        """The job's run in `queue` with definition, result and history; None if unknown. Without a
        queue: the run most recently finished, else the one most recently changed (`JOB_RUN_ORDER`)."""

    async def list_jobs(self, queue: str, *, state: int, after: str, limit: int) -> tuple[list[jobs_pb2.Job], str]:
        """A page of the queue's runs after cursor `after` ('' first) with their namespaces: the live
        ones (queued, running) in queue order, then the finished ones, the most recently finished
        first; the next cursor, or '' after the last page. ValueError for a cursor it never gave."""

    async def claim(
        self, *, queue: str, holder: Holder, now: float, lease: float, gpus: int = 0, count: int = 1
    ) -> list[jobs_pb2.Job]:
        """Assign up to `count` of the oldest queued jobs of `queue` to the holder as new attempts, in
        one transaction, each needing at most the GPU devices the ones before it left of `gpus`;
        returns them in queue order with their definitions, without their histories."""

    async def start(self, attempt: Attempt, holder: Holder, now: float) -> jobs_pb2.Job | None:
        """Record that the attempt's container started: the job without its history; None if the holder
        does not hold the attempt (it is stale)."""

    async def renew(self, holder: Holder, attempts: Sequence[Attempt], until: float, now: float) -> list[Attempt]:
        """Extend the leases of the holder's attempts; returns those it does not hold (stale)."""

    async def retake(self, holder: Holder, attempts: Sequence[Attempt], until: float, now: float) -> list[Attempt]:
        """A worker registered again: move the attempts its worker holds, in whichever session, into
        the holder's session and extend their leases; returns those it does not hold (stale)."""

    async def finish(
        self, attempt: Attempt, holder: Holder, result: jobs_pb2.JobResult, now: float, *, started: bool = False
    ) -> jobs_pb2.Job | None:
        """Finish the job with `result` (recording its container's start first, when `started`: the
        worker reported it with the result); returns it with its result, without its history; None
        (and no change) if the holder does not hold the attempt."""

    async def requeue_expired(self, now: float) -> list[tuple[jobs_pb2.Job, Attempt]]:
        """Put running jobs whose lease ran out back in their queue; returns them and the lost attempts."""

    async def release(self, attempt: Attempt, holder: Holder, reason: str, now: float) -> jobs_pb2.Job | None:
        """Put the attempt's job back in its queue (its holder gave it back); None if not held."""

    async def add_webhook(self, hook: Webhook, *, armed: bool, now: float) -> None:
        """Keep a webhook: due at once when `armed` (or its job has finished), else when the job finishes
        (the store arms it in the same transaction as the finish)."""

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[Webhook]:
        """Due webhooks, oldest first; each is hidden from other claims until `until`."""

    async def settle_webhook(self, hook_id: int, retry_at: float | None) -> None:
        """Forget a delivered (or abandoned) webhook, or count a failed try and retry it at `retry_at`."""

    async def expire_queued(self, before: float, limit: int, ttl: str, now: float) -> list[jobs_pb2.Job]:
        """End up to `limit` jobs queued (last put in their queue) before `before` as expired (see
        `transitions.expired`; `ttl` names the time-to-live in words); returns their runs."""

    async def expire(self, before: float, limit: int) -> list[str]:
        """Forget up to `limit` jobs finished before `before`, with their logs, history and webhooks;
        returns their ids."""

    async def blob_references(self) -> set[str]:
        """Blob keys that jobs in the store refer to (inputs, config files, build contexts, outputs)."""

    async def extend_leases(self, until: float) -> None:
        """Let every running job's lease last at least until `until`."""

    async def requeue_worker(
        self, worker_id: str, keep: Sequence[Attempt], now: float, *, queue: str
    ) -> list[tuple[jobs_pb2.Job, Attempt]]:
        """Put the worker's running jobs back in their queues, except the attempts in `keep` of runs in
        `queue` (it came back there without the others, e.g. after a restart); returns them and the
        lost attempts."""

    async def cancel(self, *, queue: str, job_id: str, namespace: str, now: float) -> Cancelled | None:
        """Drop the namespace's hold on the job; finish it as cancelled when none is left."""

    async def replace_in_namespace(self, *, queue: str, namespace: str, keep: str, now: float) -> list[Cancelled]:
        """One live job per namespace: drop the namespace's hold on its other unfinished jobs in the
        queue, finishing as replaced those no namespace holds any more."""

    async def delete(self, *, queue: str, job_id: str, now: float) -> Cancelled | None:
        """Finish the job's run in `queue` as deleted and forget its result, so it can run there again."""

    async def append_logs(
        self,
        attempt: Attempt,
        holder: Holder,
        kind: jobs_pb2.LogKind.ValueType,
        chunks: Sequence[jobs_pb2.LogChunk],
        start: int,
        max_chars: int = 0,
    ) -> tuple[int, list[jobs_pb2.LogChunk]] | None:
        """Store chunks of the attempt's log that the worker numbers from `start`, skipping any already
        stored and cutting the log at `max_chars` characters of text (`rows.within_limit`); returns
        (the index the first stored chunk got, the chunks stored), None if the holder does not hold the
        attempt. A batch starting past the stored end (a gap) is skipped whole: the worker resends from
        `log_totals` when it registers again."""

    async def log_totals(self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, *, queue: str) -> LogTotals:
        """How much of the log of the attempt of the job's run in `queue` is stored (read from its last
        batch: constant time)."""

    async def read_logs(
        self,
        attempt: Attempt,
        kind: jobs_pb2.LogKind.ValueType,
        since: int,
        limit: int,
        *,
        queue: str,
        max_chars: int = 0,
    ) -> list[jobs_pb2.LogChunk]:
        """Chunks of the log of the attempt of the job's run in `queue`, from index `since`: up to
        `limit`, stopping after the batch that reaches `max_chars` characters of text (0: no bound).
        Costs what it returns, wherever `since` is."""

    async def read_log_tail(
        self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, chunks: int, chars: int, *, queue: str
    ) -> tuple[int, list[jobs_pb2.LogChunk]]:
        """The end of that log, read from its last batch backwards until it holds `chunks` chunks or
        more than `chars` characters (or the whole log), and the index of its first chunk: costs what
        it returns, however long the log."""

    async def upsert_worker(self, info: jobs_pb2.WorkerInfo, *, queue: str, session: str) -> None:
        """Record a connected worker (or refresh its heartbeat)."""

    async def remove_worker(self, worker_id: str, *, session: str) -> None:
        """Forget the worker if `session` is still its current connection."""

    async def list_workers(self, queue: str, *, seen_since: float) -> list[jobs_pb2.WorkerInfo]:
        """Workers of the queue heard from since `seen_since`, each with the jobs the store holds running
        for it (`running_job_ids` of the stored records is not kept)."""

    async def queue_counts(self, queue: str) -> dict[int, int]:
        """Number of the queue's jobs by state."""

    async def waiting(self, queue: str, job_id: str, *, seen_since: float) -> Waiting:
        """What the workers of the queue heard from since `seen_since` offer, counted by the store (a
        queue's thousand workers are not read one by one to say why a job waits), and how many queued
        jobs of the queue are ahead of this one, counted up to POSITION_LIMIT (so that the answer costs
        the same at the back of a queue of millions): one read, one round trip on PostgreSQL."""


def is_postgres(url: str) -> bool:
    """True for a PostgreSQL URL (`postgresql://…` or `postgres://…`)."""
    return url.startswith(("postgresql://", "postgres://"))


async def open_store(url: str, data_directory: Path) -> StateStore:
    """The store for `url`: `postgresql://…`, `sqlite:///path`, or empty for `<data>/jobwire.db`."""
    from jobwire.server.store.sqlite import SqliteStore

    if not url:
        return await SqliteStore.open(data_directory / "jobwire.db")
    if url.startswith("sqlite:///"):
        return await SqliteStore.open(Path(url.removeprefix("sqlite:///")))
    if is_postgres(url):
        from jobwire.server.store.postgres import PostgresStore

        return await PostgresStore.open(url)
    raise ValueError(f"unsupported database URL {url!r} (use postgresql://… or sqlite:///PATH)")
