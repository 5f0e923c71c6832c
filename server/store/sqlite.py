"""The SQLite StateStore: one file in the data directory, WAL mode, one writer at a time.

Statements run on the event loop's own thread. Each takes microseconds, far less than a hop to
another thread and back (aiosqlite's way, which bounded the server at ~100 jobs/s), and no
operation awaits between its statements, so operations cannot interleave and need no lock.
Operations that arrive together share one commit (see `_commit_when_quiet`). What could
block the loop runs in a thread on a connection of its own: WAL checkpoints (the only writes
that fsync, see `_checkpoint_forever`) and whole-table scans (`blob_references`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import operator
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from jobwire.core.units import timestamp
from jobwire.server.store.base import (
    ALL_NAMESPACES,
    FINAL_REASONS,
    FINISHED_HOOK,
    POSITION_LIMIT,
    Attempt,
    Cancelled,
    Capacity,
    LogTotals,
    Submission,
    Webhook,
)
from jobwire.server.store.rows import (
    already_stored,
    blob_keys,
    finish_message,
    history_entry,
    job_message,
    with_details,
    within_limit,
    worker_columns,
    workers_with_jobs,
)
from jobwire.v1 import definition_pb2, jobs_pb2

QUEUED, RUNNING, FINISHED = (
    jobs_pb2.JOB_STATE_QUEUED,
    jobs_pb2.JOB_STATE_RUNNING,
    jobs_pb2.JOB_STATE_FINISHED,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, state INTEGER NOT NULL, queue TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
  worker_id TEXT NOT NULL DEFAULT '', create_time REAL NOT NULL, update_time REAL NOT NULL,
  lease_expires REAL, finish_reason INTEGER NOT NULL DEFAULT 0, definition BLOB NOT NULL, result BLOB
);
CREATE INDEX IF NOT EXISTS jobs_running_lease ON jobs (lease_expires) WHERE state = 2;
CREATE TABLE IF NOT EXISTS queue_jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, job_id TEXT NOT NULL, UNIQUE (queue, job_id)
);
CREATE INDEX IF NOT EXISTS queue_jobs_job ON queue_jobs (job_id);
CREATE TABLE IF NOT EXISTS namespaces (
  queue TEXT NOT NULL, job_id TEXT NOT NULL, namespace TEXT NOT NULL, PRIMARY KEY (queue, job_id, namespace)
);
CREATE TABLE IF NOT EXISTS logs (
  job_id TEXT NOT NULL, attempt INTEGER NOT NULL, kind INTEGER NOT NULL, start INTEGER NOT NULL,
  count INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, attempt, kind, start)
);
CREATE TABLE IF NOT EXISTS workers (
  id TEXT PRIMARY KEY, queue TEXT NOT NULL, session TEXT NOT NULL, last_seen REAL NOT NULL, info BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS workers_queue ON workers (queue, last_seen);
"""


def _worker_columns(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE workers ADD COLUMN slots INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE workers ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0")
    for worker_id, info in db.execute("SELECT id, info FROM workers").fetchall():
        columns = worker_columns(jobs_pb2.WorkerInfo.FromString(info))
        db.execute("UPDATE workers SET slots = ?, gpus = ? WHERE id = ?", (*columns, worker_id))


def _history_into_jobs(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE jobs ADD COLUMN history BLOB NOT NULL DEFAULT x''")
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is None:
        return  # a database made after SCHEMA stopped making the table
    entries = db.execute("SELECT job_id, data FROM events ORDER BY job_id, seq")
    for job_id, rows in itertools.groupby(entries, key=operator.itemgetter(0)):
        history = jobs_pb2.Job(history=[jobs_pb2.JobEvent.FromString(data) for _, data in rows])
        db.execute("UPDATE jobs SET history = ? WHERE id = ?", (history.SerializeToString(), job_id))
    db.execute("DROP TABLE events")


MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    # 1: GPU devices a job needs, so claims can skip jobs a worker has no room for.
    "ALTER TABLE jobs ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0",
    # 2: webhooks: waiting for their event (armed = 0) or due at next_time.
    "CREATE TABLE webhooks (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, event TEXT NOT NULL,"
    " url TEXT NOT NULL, body BLOB NOT NULL, armed INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    " next_time REAL NOT NULL); CREATE INDEX webhooks_due ON webhooks (armed, next_time);"
    " CREATE INDEX webhooks_job ON webhooks (job_id, event)",
    # 3: claims and listings walk a queue in submission order.
    "CREATE INDEX queue_jobs_order ON queue_jobs (queue, seq)",
    # 4: what claims, positions and queue status read, kept by triggers so every write path agrees:
    # `waiting` holds the queue_jobs rows of queued jobs (a claim takes its first row instead of
    # walking past every finished job), `queue_states` the number of a queue's jobs in each state.
    """
    CREATE TABLE waiting (
      queue TEXT NOT NULL, seq INTEGER NOT NULL, job_id TEXT NOT NULL, gpus INTEGER NOT NULL, PRIMARY KEY (queue, seq)
    );
    CREATE INDEX waiting_job ON waiting (job_id);
    CREATE TABLE queue_states (
      queue TEXT NOT NULL, state INTEGER NOT NULL, jobs INTEGER NOT NULL, PRIMARY KEY (queue, state)
    );
    CREATE TRIGGER queue_job_added AFTER INSERT ON queue_jobs BEGIN
      INSERT INTO queue_states SELECT NEW.queue, state, 1 FROM jobs WHERE id = NEW.job_id
        ON CONFLICT (queue, state) DO UPDATE SET jobs = jobs + 1;
      INSERT INTO waiting SELECT NEW.queue, NEW.seq, id, gpus FROM jobs WHERE id = NEW.job_id AND state = 1;
    END;
    CREATE TRIGGER queue_job_removed AFTER DELETE ON queue_jobs BEGIN
      UPDATE queue_states SET jobs = jobs - 1
        WHERE queue = OLD.queue AND state = (SELECT state FROM jobs WHERE id = OLD.job_id);
      DELETE FROM waiting WHERE queue = OLD.queue AND seq = OLD.seq;
    END;
    CREATE TRIGGER job_state_changed AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
      UPDATE queue_states SET jobs = jobs - 1
        WHERE state = OLD.state AND queue IN (SELECT queue FROM queue_jobs WHERE job_id = NEW.id);
      INSERT INTO queue_states SELECT queue, NEW.state, 1 FROM queue_jobs WHERE job_id = NEW.id
        ON CONFLICT (queue, state) DO UPDATE SET jobs = jobs + 1;
      DELETE FROM waiting WHERE job_id = NEW.id;
      INSERT INTO waiting SELECT queue, seq, job_id, NEW.gpus FROM queue_jobs WHERE job_id = NEW.id AND NEW.state = 1;
    END;
    CREATE TRIGGER job_removed AFTER DELETE ON jobs BEGIN
      UPDATE queue_states SET jobs = jobs - 1
        WHERE state = OLD.state AND queue IN (SELECT queue FROM queue_jobs WHERE job_id = OLD.id);
      DELETE FROM waiting WHERE job_id = OLD.id;
    END;
    INSERT INTO queue_states SELECT q.queue, j.state, COUNT(*) FROM queue_jobs q JOIN jobs j ON j.id = q.job_id
      GROUP BY q.queue, j.state;
    INSERT INTO waiting SELECT q.queue, q.seq, q.job_id, j.gpus FROM queue_jobs q JOIN jobs j ON j.id = q.job_id
      WHERE j.state = 1
    """,
    # 5: each batch records the characters of each stream stored up to its end (its log's totals
    # when it is the last), so registration and the size cap need not read the whole log.
    "ALTER TABLE logs ADD COLUMN stdout_chars INTEGER NOT NULL DEFAULT 0;"
    " ALTER TABLE logs ADD COLUMN stderr_chars INTEGER NOT NULL DEFAULT 0",
    # 6: the running jobs of a worker, for listings of workers.
    "CREATE INDEX jobs_worker ON jobs (worker_id) WHERE state = 2",
    # 7: a job's history lives in its row (see rows.history_entry) instead of an `events` table
    # with an index by job: a transition appends to the row it writes anyway.
    _history_into_jobs,
    # 8: each worker's slots and GPU devices beside its record, so a queue's capacity is one query.
    _worker_columns,
]
"""Applied in order after SCHEMA, each in a transaction of its own (SQL, or a function given the
connection); `PRAGMA user_version` counts those applied."""


CHECKPOINT_SECONDS = 1.0
GROUP_SECONDS = 0.002
"""How long a group commit may wait for more operations while every loop turn brings new ones."""
_JOB_COLUMNS = "id, state, queue, attempt, worker_id, create_time, update_time, finish_reason"
_APPEND_HISTORY = "history = CAST(history || ? AS BLOB)"
"""Appends an encoded entry (`rows.history_entry`) to a job's history; `||` makes text of blobs, the
cast keeps the bytes a blob."""


class SqliteStore:
    """StateStore on one SQLite file; see the module's docstring for how it stays off the loop's way."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db, self._path = db, path
        self._commit: asyncio.Future[None] | None = None  # of the open transaction, if one is
        self._operations = 0  # begun in the open transaction
        self._checkpoints = asyncio.create_task(self._checkpoint_forever())

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (creating) the database file and apply the schema."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = _connect(path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in a thread: they fsync
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            if isinstance(migration, str):
                db.executescript(f"BEGIN; {migration}; PRAGMA user_version = {number}; COMMIT;")
                continue
            db.execute("BEGIN")
            migration(db)
            db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        return cls(db, path)

    async def close(self) -> None:
        self._checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._checkpoints
        await asyncio.to_thread(self._checkpoint)
        self._db.close()

    async def ping(self) -> None:
        self._fetchone("SELECT 1")

    async def _checkpoint_forever(self) -> None:
        """Copy the WAL into the database file every second there were writes, off the loop."""
        written = self._db.total_changes
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            if self._db.total_changes != written:
                written = self._db.total_changes
                await asyncio.to_thread(self._checkpoint)

    def _checkpoint(self) -> None:
        with contextlib.closing(_connect(self._path)) as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[sqlite3.Connection]:
        """One store operation: a savepoint inside a transaction shared by the operations that arrive
        together (group commit, see `_commit_when_quiet`); the operation returns after that commit, so
        nothing is acknowledged before it is stored. The body must not await."""
        if self._commit is None:
            loop = asyncio.get_running_loop()
            self._db.execute("BEGIN IMMEDIATE")
            self._commit, self._operations = loop.create_future(), 0
            loop.call_soon(self._commit_when_quiet, 0, loop.time() + GROUP_SECONDS)
        commit = self._commit
        self._operations += 1
        self._db.execute("SAVEPOINT operation")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK TO operation")
            self._db.execute("RELEASE operation")
            raise
        self._db.execute("RELEASE operation")
        await asyncio.shield(commit)

    def _commit_when_quiet(self, seen: int, deadline: float) -> None:
        """Commit once a loop turn began no new operation (a lone request waits one turn), or at
        `deadline`: under load one commit, and one write of the pages it touched, serves many."""
        loop = asyncio.get_running_loop()
        if self._operations != seen and loop.time() < deadline:
            loop.call_soon(self._commit_when_quiet, self._operations, deadline)
            return
        commit, self._commit = self._commit, None
        assert commit is not None
        try:
            self._db.execute("COMMIT")
        except Exception as error:  # every operation in it fails; the store takes the next ones
            if self._db.in_transaction:
                self._db.rollback()
            commit.set_exception(error)
        else:
            commit.set_result(None)

    def _fetchone(self, sql: str, *args: Any) -> Any:
        return self._db.execute(sql, args).fetchone()

    def _fetchall(self, sql: str, *args: Any) -> list[Any]:
        return self._db.execute(sql, args).fetchall()

    def _event(self, job_id: str, kind: jobs_pb2.JobEventKind.ValueType, now: float, **fields: Any) -> None:
        entry = history_entry(kind, now, **fields)
        self._db.execute(f"UPDATE jobs SET {_APPEND_HISTORY} WHERE id = ?", (entry, job_id))
        if kind == jobs_pb2.JOB_EVENT_KIND_FINISHED:
            self._arm_finished_hooks(job_id, now)

    def _arm_finished_hooks(self, job_id: str, now: float) -> None:
        """In the transaction that finishes the job."""
        self._db.execute(
            "UPDATE webhooks SET armed = 1, next_time = ? WHERE job_id = ? AND event = ? AND armed = 0",
            (now, job_id, FINISHED_HOOK),
        )

    async def add_webhook(self, hook: Webhook, *, armed: bool, now: float) -> None:
        async with self._transaction() as db:
            finished = self._fetchone("SELECT 1 FROM jobs WHERE id = ? AND state = ?", hook.job_id, FINISHED)
            db.execute(
                "INSERT INTO webhooks (job_id, event, url, body, armed, next_time) VALUES (?, ?, ?, ?, ?, ?)",
                (hook.job_id, hook.event, hook.url, hook.body, int(armed or bool(finished)), now),
            )

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[Webhook]:
        async with self._transaction() as db:
            rows = self._fetchall(
                "SELECT id, job_id, event, url, body, attempts FROM webhooks WHERE armed = 1 AND next_time <= ?"
                " ORDER BY next_time LIMIT ?",
                now,
                limit,
            )
            for row in rows:
                db.execute("UPDATE webhooks SET next_time = ? WHERE id = ?", (until, row[0]))
        return [
            Webhook(job_id, event, url, bytes(body), id, attempts) for id, job_id, event, url, body, attempts in rows
        ]

    async def settle_webhook(self, hook_id: int, retry_at: float | None) -> None:
        async with self._transaction() as db:
            if retry_at is None:
                db.execute("DELETE FROM webhooks WHERE id = ?", (hook_id,))
            else:
                db.execute(
                    "UPDATE webhooks SET attempts = attempts + 1, next_time = ? WHERE id = ?", (retry_at, hook_id)
                )

    def _job_row(self, job_id: str) -> Any:
        return self._fetchone(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", job_id)

    def _job(self, job_id: str, queue: str = "") -> jobs_pb2.Job | None:
        row = self._job_row(job_id)
        if row is None:
            return None
        rows = self._fetchall(
            "SELECT namespace FROM namespaces WHERE queue = ? AND job_id = ? ORDER BY namespace",
            queue or row[2],
            job_id,
        )
        return job_message(row, namespaces=[r[0] for r in rows])

    def _current(self, job_id: str, result: bytes | None = None) -> jobs_pb2.Job:
        """The job as a transition left it: its definition (and `result`) but no history, which is
        enough to assign it and to tell watchers."""
        job = self._job(job_id)
        assert job is not None
        (definition,) = self._fetchone("SELECT definition FROM jobs WHERE id = ?", job_id)
        return with_details(job, definition, result, b"")

    async def submit(self, *, queue: str, jobs: Sequence[Submission], now: float) -> list[tuple[jobs_pb2.Job, bool]]:
        async with self._transaction():
            return [self._submit(job, queue, now) for job in jobs]

    def _submit(self, submission: Submission, queue: str, now: float) -> tuple[jobs_pb2.Job, bool]:
        job_id, definition, db = submission.job_id, submission.definition, self._db
        row = self._job_row(job_id)
        queued = row is None or (row[1] == FINISHED and row[7] not in FINAL_REASONS)
        words = f"queued on {queue!r}"
        if row is None:  # a new job: its row is all there is to it, so it is not read back
            db.execute(
                "INSERT INTO jobs (id, state, queue, create_time, update_time, definition, gpus, history)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    QUEUED,
                    queue,
                    now,
                    now,
                    definition.SerializeToString(),
                    definition.requirements.gpus,
                    history_entry(jobs_pb2.JOB_EVENT_KIND_QUEUED, now, message=words),
                ),
            )
        elif queued:
            db.execute(
                "UPDATE jobs SET state = ?, queue = ?, worker_id = '', update_time = ?, finish_reason = 0,"
                " result = NULL, lease_expires = NULL WHERE id = ?",
                (QUEUED, queue, now, job_id),
            )
            self._event(job_id, jobs_pb2.JOB_EVENT_KIND_QUEUED, now, message=words)
        # after the job's row: the triggers of queue_jobs read its state
        db.execute("INSERT OR IGNORE INTO queue_jobs (queue, job_id) VALUES (?, ?)", (queue, job_id))
        db.execute("INSERT OR IGNORE INTO namespaces VALUES (?, ?, ?)", (queue, job_id, submission.namespace))
        if row is None:
            return job_message((job_id, QUEUED, queue, 0, "", now, now, 0), namespaces=[submission.namespace]), True
        job = self._job(job_id, queue)
        assert job is not None
        return job, queued

    async def get_job(self, job_id: str, *, queue: str = "") -> jobs_pb2.Job | None:
        return self._details(job_id, queue)

    def _details(self, job_id: str, queue: str = "") -> jobs_pb2.Job | None:
        if queue and not self._fetchone("SELECT 1 FROM queue_jobs WHERE queue = ? AND job_id = ?", queue, job_id):
            return None
        job = self._job(job_id, queue)
        if job is None:
            return None
        definition, result, history = self._fetchone(
            "SELECT definition, result, history FROM jobs WHERE id = ?", job_id
        )
        return with_details(job, definition, result, history)

    async def list_jobs(self, queue: str, *, state: int, after: int, limit: int) -> tuple[list[jobs_pb2.Job], int]:
        where = "q.queue = ? AND q.seq > ?" + (" AND j.state = ?" if state else "")
        args: list[Any] = [queue, after] + ([state] if state else [])
        rows = self._fetchall(
            f"SELECT q.seq, {', '.join('j.' + c for c in _JOB_COLUMNS.split(', '))}"
            f" FROM queue_jobs q JOIN jobs j ON j.id = q.job_id WHERE {where} ORDER BY q.seq LIMIT ?",
            *args,
            limit + 1,
        )
        jobs = [job_message(row[1:], namespaces=[]) for row in rows[:limit]]
        return jobs, (rows[limit - 1][0] if len(rows) > limit else 0)

    async def claim(
        self, *, queue: str, worker_id: str, now: float, lease: float, gpus: int = 0, count: int = 1
    ) -> list[jobs_pb2.Job]:
        claimed: list[jobs_pb2.Job] = []
        row = self._next_waiting(queue, gpus)
        if row is None:  # as most claims are when several workers wake for one job: no commit to wait for
            return claimed
        async with self._transaction() as db:
            while row is not None and len(claimed) < count:
                job_id, attempt = row[0], row[1] + 1
                entry = history_entry(
                    jobs_pb2.JOB_EVENT_KIND_ASSIGNED,
                    now,
                    attempt=attempt,
                    worker_id=worker_id,
                    message=f"assigned to worker {worker_id} as attempt {attempt}",
                )
                db.execute(  # the row and its history in one write
                    "UPDATE jobs SET state = ?, attempt = ?, worker_id = ?, update_time = ?, lease_expires = ?,"
                    f" queue = ?, {_APPEND_HISTORY} WHERE id = ?",
                    (RUNNING, attempt, worker_id, now, now + lease, queue, entry, job_id),
                )
                claimed.append(self._current(job_id))
                gpus -= claimed[-1].definition.requirements.gpus
                row = self._next_waiting(queue, gpus) if len(claimed) < count else None
        return claimed

    def _next_waiting(self, queue: str, gpus: int) -> Any:
        """(id, attempt) of the queue's oldest waiting job needing at most `gpus` devices, or None."""
        return self._fetchone(
            "SELECT j.id, j.attempt FROM waiting w JOIN jobs j ON j.id = w.job_id"
            " WHERE w.queue = ? AND w.gpus <= ? ORDER BY w.seq LIMIT 1",
            queue,
            gpus,
        )

    def _holds(self, attempt: Attempt) -> bool:
        row = self._fetchone("SELECT state, attempt FROM jobs WHERE id = ?", attempt.job_id)
        return row is not None and row[0] == RUNNING and row[1] == attempt.attempt

    async def start(self, attempt: Attempt, now: float) -> jobs_pb2.Job | None:
        async with self._transaction():
            if not self._holds(attempt):
                return None
            job = self._current(attempt.job_id)
            self._event(
                attempt.job_id,
                jobs_pb2.JOB_EVENT_KIND_STARTED,
                now,
                attempt=attempt.attempt,
                worker_id=job.worker_id,
                message="container started",
            )
            return job

    async def renew(self, worker_id: str, attempts: Sequence[Attempt], until: float) -> list[Attempt]:
        stale: list[Attempt] = []
        async with self._transaction() as db:
            for attempt in attempts:
                cursor = db.execute(
                    "UPDATE jobs SET lease_expires = ? WHERE id = ? AND attempt = ? AND state = ? AND worker_id = ?",
                    (until, attempt.job_id, attempt.attempt, RUNNING, worker_id),
                )
                if cursor.rowcount == 0:
                    stale.append(attempt)
        return stale

    async def finish(self, attempt: Attempt, result: jobs_pb2.JobResult, now: float) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            if not self._holds(attempt):
                return None
            stored = result.SerializeToString()
            entry = history_entry(
                jobs_pb2.JOB_EVENT_KIND_FINISHED,
                now,
                attempt=attempt.attempt,
                worker_id=result.worker_id,
                message=finish_message(result),
            )
            db.execute(  # the row and its history in one write
                "UPDATE jobs SET state = ?, finish_reason = ?, update_time = ?, lease_expires = NULL, result = ?,"
                f" {_APPEND_HISTORY} WHERE id = ?",
                (FINISHED, result.reason, now, stored, entry, attempt.job_id),
            )
            self._arm_finished_hooks(attempt.job_id, now)
            return self._current(attempt.job_id, stored)

    async def requeue_expired(self, now: float) -> list[tuple[jobs_pb2.Job, Attempt]]:
        async with self._transaction():
            rows = self._fetchall(
                "SELECT id, attempt, worker_id FROM jobs WHERE state = ? AND lease_expires < ?", RUNNING, now
            )
            for job_id, attempt, worker_id in rows:
                self._requeue(
                    Attempt(job_id, attempt),
                    worker_id,
                    now,
                    f"worker-lost: no word from worker {worker_id} within its lease",
                )
        return self._jobs_of([Attempt(job_id, attempt) for job_id, attempt, _ in rows])

    async def expire(self, before: float, limit: int) -> list[str]:
        async with self._transaction() as db:
            rows = self._fetchall(
                "SELECT id FROM jobs WHERE state = ? AND update_time < ? LIMIT ?", FINISHED, before, limit
            )
            for (job_id,) in rows:
                for table, column in (
                    ("jobs", "id"),
                    ("queue_jobs", "job_id"),
                    ("namespaces", "job_id"),
                    ("logs", "job_id"),
                    ("webhooks", "job_id"),
                ):
                    db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))
        return [job_id for (job_id,) in rows]

    async def blob_references(self) -> set[str]:
        return await asyncio.to_thread(self._scan_blob_references)

    def _scan_blob_references(self) -> set[str]:
        keys: set[str] = set()
        with contextlib.closing(_connect(self._path)) as db:
            for definition, result in db.execute("SELECT definition, result FROM jobs"):
                keys |= blob_keys(definition_pb2.JobDefinition.FromString(definition))
                if result is not None:
                    outputs = jobs_pb2.JobResult.FromString(result).outputs.values()
                    keys |= {ref.value.string_value for ref in outputs if ref.type == "key"}
        return keys

    async def extend_leases(self, until: float) -> None:
        async with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE state = ? AND lease_expires < ?", (until, RUNNING, until)
            )

    async def requeue_worker(
        self, worker_id: str, keep: Sequence[Attempt], now: float
    ) -> list[tuple[jobs_pb2.Job, Attempt]]:
        async with self._transaction():
            rows = self._fetchall("SELECT id, attempt FROM jobs WHERE state = ? AND worker_id = ?", RUNNING, worker_id)
            lost = [Attempt(job_id, attempt) for job_id, attempt in rows if Attempt(job_id, attempt) not in keep]
            for attempt in lost:
                self._requeue(
                    attempt, worker_id, now, f"worker-lost: worker {worker_id} came back without this attempt"
                )
        return self._jobs_of(lost)

    async def release(self, attempt: Attempt, worker_id: str, reason: str, now: float) -> jobs_pb2.Job | None:
        async with self._transaction():
            if not self._holds(attempt):
                return None
            self._requeue(attempt, worker_id, now, f"released by worker {worker_id}: {reason}")
        return self._job(attempt.job_id)

    def _requeue(self, attempt: Attempt, worker_id: str, now: float, message: str) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, worker_id = '', update_time = ?, lease_expires = NULL WHERE id = ?",
            (QUEUED, now, attempt.job_id),
        )
        self._event(
            attempt.job_id,
            jobs_pb2.JOB_EVENT_KIND_REQUEUED,
            now,
            attempt=attempt.attempt,
            worker_id=worker_id,
            message=f"re-queued: {message}",
        )

    def _jobs_of(self, attempts: Sequence[Attempt]) -> list[tuple[jobs_pb2.Job, Attempt]]:
        jobs = [(self._job(attempt.job_id), attempt) for attempt in attempts]
        return [(job, attempt) for job, attempt in jobs if job is not None]

    async def cancel(self, *, queue: str, job_id: str, namespace: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if not self._fetchone("SELECT 1 FROM queue_jobs WHERE queue = ? AND job_id = ?", queue, job_id):
                return None
            if namespace == ALL_NAMESPACES:
                db.execute("DELETE FROM namespaces WHERE queue = ? AND job_id = ?", (queue, job_id))
            else:
                db.execute(
                    "DELETE FROM namespaces WHERE queue = ? AND job_id = ? AND namespace = ?",
                    (queue, job_id, namespace),
                )
            self._event(
                job_id,
                jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED,
                now,
                message=f"cancel requested on {queue!r} for namespace {namespace!r}",
            )
            held = self._fetchone("SELECT 1 FROM namespaces WHERE job_id = ? LIMIT 1", job_id)
            stop = None if held else self._end(job_id, jobs_pb2.FINISH_REASON_CANCELLED, now, "cancelled")
        job = self._details(job_id, queue)
        assert job is not None
        return Cancelled(job=job, stop=stop[0] if stop else None, worker_id=stop[1] if stop else "")

    async def replace_in_namespace(self, *, queue: str, namespace: str, keep: str, now: float) -> list[Cancelled]:
        ended: list[tuple[str, tuple[Attempt | None, str] | None]] = []
        async with self._transaction() as db:
            rows = self._fetchall(
                "SELECT n.job_id FROM namespaces n JOIN jobs j ON j.id = n.job_id"
                " WHERE n.queue = ? AND n.namespace = ? AND n.job_id != ? AND j.state != ?",
                queue,
                namespace,
                keep,
                FINISHED,
            )
            for (job_id,) in rows:
                db.execute(
                    "DELETE FROM namespaces WHERE queue = ? AND job_id = ? AND namespace = ?",
                    (queue, job_id, namespace),
                )
                self._event(
                    job_id,
                    jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED,
                    now,
                    message=f"replaced by job {keep} in namespace {namespace!r} of {queue!r}",
                )
                held = self._fetchone("SELECT 1 FROM namespaces WHERE job_id = ? LIMIT 1", job_id)
                stop = None if held else self._end(job_id, jobs_pb2.FINISH_REASON_REPLACED_BY_CLIENT, now, "replaced")
                ended.append((job_id, stop))
        replaced = []
        for job_id, stop in ended:
            job = self._details(job_id)
            assert job is not None
            replaced.append(Cancelled(job=job, stop=stop[0] if stop else None, worker_id=stop[1] if stop else ""))
        return replaced

    async def delete(self, job_id: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if self._job_row(job_id) is None:
                return None
            stop = self._end(job_id, jobs_pb2.FINISH_REASON_DELETED, now, "deleted", force=True)
            db.execute("DELETE FROM namespaces WHERE job_id = ?", (job_id,))
        job = self._details(job_id)
        assert job is not None
        return Cancelled(job=job, stop=stop[0] if stop else None, worker_id=stop[1] if stop else "")

    def _end(
        self, job_id: str, reason: jobs_pb2.FinishReason.ValueType, now: float, words: str, *, force: bool = False
    ) -> tuple[Attempt | None, str] | None:
        """Finish a queued or running job (any job with `force`); the attempt to stop and its worker."""
        state, attempt, worker_id = self._fetchone("SELECT state, attempt, worker_id FROM jobs WHERE id = ?", job_id)
        if state == FINISHED and not force:
            return None
        result = jobs_pb2.JobResult(reason=reason, message=f"{words} by a client", attempt=attempt)
        result.finish_time.CopyFrom(timestamp(now))
        self._db.execute(
            "UPDATE jobs SET state = ?, finish_reason = ?, update_time = ?, lease_expires = NULL, result = ?"
            " WHERE id = ?",
            (FINISHED, reason, now, result.SerializeToString(), job_id),
        )
        self._event(job_id, jobs_pb2.JOB_EVENT_KIND_FINISHED, now, attempt=attempt, message=result.message)
        running = Attempt(job_id, attempt) if state == RUNNING else None
        return running, worker_id

    async def append_logs(
        self,
        attempt: Attempt,
        kind: jobs_pb2.LogKind.ValueType,
        chunks: Sequence[jobs_pb2.LogChunk],
        start: int,
        max_chars: int = 0,
    ) -> tuple[int, list[jobs_pb2.LogChunk]] | None:
        async with self._transaction() as db:
            if not self._holds(attempt):
                return None
            stored = self._log_totals(attempt, kind)
            skipped = already_stored(stored.chunks, start, len(chunks))
            kept = within_limit(stored.chars, chunks[skipped:], max_chars)
            if kept:
                batch = jobs_pb2.LogBatch(kind=kind, chunks=kept)
                totals = stored.after(batch.chunks)
                db.execute(
                    "INSERT INTO logs (job_id, attempt, kind, start, count, data, stdout_chars, stderr_chars)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        attempt.job_id,
                        attempt.attempt,
                        kind,
                        stored.chunks,
                        len(batch.chunks),
                        batch.SerializeToString(),
                        totals.stdout_chars,
                        totals.stderr_chars,
                    ),
                )
            return stored.chunks, kept

    async def log_totals(self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType) -> LogTotals:
        return self._log_totals(attempt, kind)

    def _log_totals(self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType) -> LogTotals:
        # The last batch by index (the primary key) ends the log: batches never overlap.
        row = self._fetchone(
            "SELECT start + count, stdout_chars, stderr_chars FROM logs WHERE job_id = ? AND attempt = ? AND kind = ?"
            " ORDER BY start DESC LIMIT 1",
            attempt.job_id,
            attempt.attempt,
            kind,
        )
        return LogTotals(*row) if row else LogTotals()

    async def read_logs(
        self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, since: int, limit: int
    ) -> list[jobs_pb2.LogChunk]:
        rows = self._fetchall(
            "SELECT start, data FROM logs WHERE job_id = ? AND attempt = ? AND kind = ? AND start + count > ?"
            " ORDER BY start",
            attempt.job_id,
            attempt.attempt,
            kind,
            since,
        )
        chunks: list[jobs_pb2.LogChunk] = []
        for start, data in rows:
            batch = jobs_pb2.LogBatch.FromString(data)
            chunks.extend(batch.chunks[max(0, since - start) :])
            if len(chunks) >= limit:
                break
        return chunks[:limit]

    async def upsert_worker(self, info: jobs_pb2.WorkerInfo, *, queue: str, session: str) -> None:
        async with self._transaction() as db:
            db.execute(
                "INSERT INTO workers (id, queue, session, last_seen, info, slots, gpus) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, session = excluded.session,"
                " last_seen = excluded.last_seen, info = excluded.info, slots = excluded.slots, gpus = excluded.gpus",
                (
                    info.id,
                    queue,
                    session,
                    info.last_seen_time.ToMicroseconds() / 1e6,
                    info.SerializeToString(),
                    *worker_columns(info),
                ),
            )

    async def remove_worker(self, worker_id: str, *, session: str) -> None:
        async with self._transaction() as db:
            db.execute("DELETE FROM workers WHERE id = ? AND session = ?", (worker_id, session))

    async def list_workers(self, queue: str, *, seen_since: float) -> list[jobs_pb2.WorkerInfo]:
        rows = self._fetchall(
            "SELECT info FROM workers WHERE queue = ? AND last_seen >= ? ORDER BY id", queue, seen_since
        )
        running = self._fetchall(  # the state is literal so that the partial index jobs_worker serves
            f"SELECT j.worker_id, j.id FROM workers w JOIN jobs j ON j.worker_id = w.id AND j.state = {RUNNING}"
            " WHERE w.queue = ?",
            queue,
        )
        return workers_with_jobs([row[0] for row in rows], running)

    async def capacity(self, queue: str, *, seen_since: float) -> Capacity:
        workers, slots, most_gpus = self._fetchone(
            "SELECT COUNT(*), COALESCE(SUM(slots), 0), COALESCE(MAX(gpus), 0) FROM workers"
            " WHERE queue = ? AND last_seen >= ?",
            queue,
            seen_since,
        )
        (busy,) = self._fetchone(  # the state is literal so that the partial index jobs_worker serves
            f"SELECT COUNT(*) FROM workers w JOIN jobs j ON j.worker_id = w.id AND j.state = {RUNNING}"
            " WHERE w.queue = ? AND w.last_seen >= ?",
            queue,
            seen_since,
        )
        return Capacity(workers, slots, busy, most_gpus)

    async def queue_counts(self, queue: str) -> dict[int, int]:
        rows = self._fetchall("SELECT state, jobs FROM queue_states WHERE queue = ? AND jobs > 0", queue)
        return {state: count for state, count in rows}

    async def queue_position(self, queue: str, job_id: str) -> int:
        (ahead,) = self._fetchone(
            "SELECT COUNT(*) FROM (SELECT 1 FROM waiting WHERE queue = ?"
            " AND seq < (SELECT seq FROM queue_jobs WHERE queue = ? AND job_id = ?) LIMIT ?)",
            queue,
            queue,
            job_id,
            POSITION_LIMIT,
        )
        return int(ahead)


def _connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that waits out a checkpoint's brief locks."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: commits survive a crash of the process; no fsync each
    db.execute("PRAGMA busy_timeout=5000")
    return db
