"""The SQLite StateStore: one file in the data directory, WAL mode, one writer at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from jobwire.server.store.base import (
    ALL_NAMESPACES,
    FINAL_REASONS,
    FINISHED_HOOK,
    Attempt,
    Cancelled,
    Webhook,
)
from jobwire.server.store.rows import already_stored, blob_keys, event, job_message, with_details
from jobwire.units import timestamp
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
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS logs (
  job_id TEXT NOT NULL, attempt INTEGER NOT NULL, kind INTEGER NOT NULL, start INTEGER NOT NULL,
  count INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, attempt, kind, start)
);
CREATE TABLE IF NOT EXISTS workers (
  id TEXT PRIMARY KEY, queue TEXT NOT NULL, session TEXT NOT NULL, last_seen REAL NOT NULL, info BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS workers_queue ON workers (queue, last_seen);
"""

MIGRATIONS = [
    # 1: GPU devices a job needs, so claims can skip jobs a worker has no room for.
    "ALTER TABLE jobs ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0",
    # 2: webhooks: waiting for their event (armed = 0) or due at next_time.
    "CREATE TABLE webhooks (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, event TEXT NOT NULL,"
    " url TEXT NOT NULL, body BLOB NOT NULL, armed INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    " next_time REAL NOT NULL); CREATE INDEX webhooks_due ON webhooks (armed, next_time);"
    " CREATE INDEX webhooks_job ON webhooks (job_id, event)",
    # 3: claims and listings walk a queue in submission order.
    "CREATE INDEX queue_jobs_order ON queue_jobs (queue, seq)",
]
"""Applied in order after SCHEMA; `PRAGMA user_version` counts those applied."""

_JOB_COLUMNS = "id, state, queue, attempt, worker_id, create_time, update_time, finish_reason"


class SqliteStore:
    """StateStore on one SQLite file; transactions are serialised by a lock."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (creating) the database file and apply the schema."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "busy_timeout=5000",
            "foreign_keys=ON",
        ):
            await db.execute(f"PRAGMA {pragma}")
        await db.executescript(SCHEMA)
        async with db.execute("PRAGMA user_version") as cursor:
            (version,) = await cursor.fetchone() or (0,)
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.executescript(f"BEGIN; {migration}; PRAGMA user_version = {number}; COMMIT;")
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            if self._db.in_transaction:  # left open by a task cancelled while BEGIN ran in the thread
                await self._db.rollback()
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def _fetchone(self, sql: str, *args: Any) -> Any:
        async with self._db.execute(sql, args) as cursor:
            return await cursor.fetchone()

    async def _fetchall(self, sql: str, *args: Any) -> list[Any]:
        async with self._db.execute(sql, args) as cursor:
            return list(await cursor.fetchall())

    async def _event(self, job_id: str, kind: jobs_pb2.JobEventKind.ValueType, now: float, **fields: Any) -> None:
        await self._db.execute(
            "INSERT INTO events (job_id, data) VALUES (?, ?)",
            (job_id, event(kind, now, **fields).SerializeToString()),
        )
        if kind == jobs_pb2.JOB_EVENT_KIND_FINISHED:  # in the same transaction as the finish
            await self._db.execute(
                "UPDATE webhooks SET armed = 1, next_time = ? WHERE job_id = ? AND event = ? AND armed = 0",
                (now, job_id, FINISHED_HOOK),
            )

    async def add_webhook(self, hook: Webhook, *, armed: bool, now: float) -> None:
        async with self._transaction() as db:
            finished = await self._fetchone("SELECT 1 FROM jobs WHERE id = ? AND state = ?", hook.job_id, FINISHED)
            await db.execute(
                "INSERT INTO webhooks (job_id, event, url, body, armed, next_time) VALUES (?, ?, ?, ?, ?, ?)",
                (hook.job_id, hook.event, hook.url, hook.body, int(armed or bool(finished)), now),
            )

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[Webhook]:
        async with self._transaction() as db:
            rows = await self._fetchall(
                "SELECT id, job_id, event, url, body, attempts FROM webhooks WHERE armed = 1 AND next_time <= ?"
                " ORDER BY next_time LIMIT ?",
                now,
                limit,
            )
            for row in rows:
                await db.execute("UPDATE webhooks SET next_time = ? WHERE id = ?", (until, row[0]))
        return [
            Webhook(job_id, event, url, bytes(body), id, attempts) for id, job_id, event, url, body, attempts in rows
        ]

    async def settle_webhook(self, hook_id: int, retry_at: float | None) -> None:
        async with self._transaction() as db:
            if retry_at is None:
                await db.execute("DELETE FROM webhooks WHERE id = ?", (hook_id,))
            else:
                await db.execute(
                    "UPDATE webhooks SET attempts = attempts + 1, next_time = ? WHERE id = ?", (retry_at, hook_id)
                )

    async def _job_row(self, job_id: str) -> Any:
        return await self._fetchone(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", job_id)

    async def _job(self, job_id: str, queue: str = "") -> jobs_pb2.Job | None:
        row = await self._job_row(job_id)
        if row is None:
            return None
        rows = await self._fetchall(
            "SELECT namespace FROM namespaces WHERE queue = ? AND job_id = ? ORDER BY namespace",
            queue or row[2],
            job_id,
        )
        return job_message(row, namespaces=[r[0] for r in rows])

    async def submit(
        self,
        *,
        job_id: str,
        definition: definition_pb2.JobDefinition,
        queue: str,
        namespace: str,
        now: float,
    ) -> tuple[jobs_pb2.Job, bool]:
        async with self._transaction() as db:
            row = await self._job_row(job_id)
            await db.execute("INSERT OR IGNORE INTO queue_jobs (queue, job_id) VALUES (?, ?)", (queue, job_id))
            await db.execute("INSERT OR IGNORE INTO namespaces VALUES (?, ?, ?)", (queue, job_id, namespace))
            if row is None:
                await db.execute(
                    "INSERT INTO jobs (id, state, queue, create_time, update_time, definition, gpus)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, QUEUED, queue, now, now, definition.SerializeToString(), definition.requirements.gpus),
                )
            elif row[1] == FINISHED and row[7] not in FINAL_REASONS:
                await db.execute(
                    "UPDATE jobs SET state = ?, queue = ?, worker_id = '', update_time = ?, finish_reason = 0,"
                    " result = NULL, lease_expires = NULL WHERE id = ?",
                    (QUEUED, queue, now, job_id),
                )
            else:
                job = await self._job(job_id, queue)
                assert job is not None
                return job, False
            await self._event(job_id, jobs_pb2.JOB_EVENT_KIND_QUEUED, now, message=f"queued on {queue!r}")
            job = await self._job(job_id, queue)
            assert job is not None
            return job, True

    async def get_job(self, job_id: str, *, queue: str = "") -> jobs_pb2.Job | None:
        if queue and not await self._fetchone("SELECT 1 FROM queue_jobs WHERE queue = ? AND job_id = ?", queue, job_id):
            return None
        job = await self._job(job_id, queue)
        if job is None:
            return None
        definition, result = await self._fetchone("SELECT definition, result FROM jobs WHERE id = ?", job_id)
        history = [
            data for (data,) in await self._fetchall("SELECT data FROM events WHERE job_id = ? ORDER BY seq", job_id)
        ]
        return with_details(job, definition, result, history)

    async def list_jobs(self, queue: str, *, state: int, after: int, limit: int) -> tuple[list[jobs_pb2.Job], int]:
        where = "q.queue = ? AND q.seq > ?" + (" AND j.state = ?" if state else "")
        args: list[Any] = [queue, after] + ([state] if state else [])
        rows = await self._fetchall(
            f"SELECT q.seq, {', '.join('j.' + c for c in _JOB_COLUMNS.split(', '))}"
            f" FROM queue_jobs q JOIN jobs j ON j.id = q.job_id WHERE {where} ORDER BY q.seq LIMIT ?",
            *args,
            limit + 1,
        )
        jobs = [job_message(row[1:], namespaces=[]) for row in rows[:limit]]
        return jobs, (rows[limit - 1][0] if len(rows) > limit else 0)

    async def claim(
        self, *, queue: str, worker_id: str, now: float, lease: float, gpus: int = 0
    ) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            row = await self._fetchone(
                "SELECT j.id, j.attempt FROM queue_jobs q JOIN jobs j ON j.id = q.job_id"
                " WHERE q.queue = ? AND j.state = ? AND j.gpus <= ? ORDER BY q.seq LIMIT 1",
                queue,
                QUEUED,
                gpus,
            )
            if row is None:
                return None
            job_id, attempt = row[0], row[1] + 1
            await db.execute(
                "UPDATE jobs SET state = ?, attempt = ?, worker_id = ?, update_time = ?, lease_expires = ?,"
                " queue = ? WHERE id = ?",
                (RUNNING, attempt, worker_id, now, now + lease, queue, job_id),
            )
            await self._event(
                job_id,
                jobs_pb2.JOB_EVENT_KIND_ASSIGNED,
                now,
                attempt=attempt,
                worker_id=worker_id,
                message=f"assigned to worker {worker_id} as attempt {attempt}",
            )
        return await self.get_job(job_id)

    async def _holds(self, attempt: Attempt) -> bool:
        row = await self._fetchone("SELECT state, attempt FROM jobs WHERE id = ?", attempt.job_id)
        return row is not None and row[0] == RUNNING and row[1] == attempt.attempt

    async def start(self, attempt: Attempt, now: float) -> bool:
        async with self._transaction():
            if not await self._holds(attempt):
                return False
            row = await self._fetchone("SELECT worker_id FROM jobs WHERE id = ?", attempt.job_id)
            await self._event(
                attempt.job_id,
                jobs_pb2.JOB_EVENT_KIND_STARTED,
                now,
                attempt=attempt.attempt,
                worker_id=row[0],
                message="container started",
            )
            return True

    async def renew(self, worker_id: str, attempts: Sequence[Attempt], until: float) -> list[Attempt]:
        stale: list[Attempt] = []
        async with self._transaction() as db:
            for attempt in attempts:
                cursor = await db.execute(
                    "UPDATE jobs SET lease_expires = ? WHERE id = ? AND attempt = ? AND state = ? AND worker_id = ?",
                    (until, attempt.job_id, attempt.attempt, RUNNING, worker_id),
                )
                if cursor.rowcount == 0:
                    stale.append(attempt)
        return stale

    async def finish(self, attempt: Attempt, result: jobs_pb2.JobResult, now: float) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            if not await self._holds(attempt):
                return None
            await db.execute(
                "UPDATE jobs SET state = ?, finish_reason = ?, update_time = ?, lease_expires = NULL, result = ?"
                " WHERE id = ?",
                (FINISHED, result.reason, now, result.SerializeToString(), attempt.job_id),
            )
            await self._event(
                attempt.job_id,
                jobs_pb2.JOB_EVENT_KIND_FINISHED,
                now,
                attempt=attempt.attempt,
                worker_id=result.worker_id,
                message=_finish_message(result),
            )
        return await self.get_job(attempt.job_id)

    async def requeue_expired(self, now: float) -> list[tuple[jobs_pb2.Job, Attempt]]:
        async with self._transaction():
            rows = await self._fetchall(
                "SELECT id, attempt, worker_id FROM jobs WHERE state = ? AND lease_expires < ?", RUNNING, now
            )
            for job_id, attempt, worker_id in rows:
                await self._requeue(
                    Attempt(job_id, attempt),
                    worker_id,
                    now,
                    f"worker-lost: no word from worker {worker_id} within its lease",
                )
        return await self._jobs_of([Attempt(job_id, attempt) for job_id, attempt, _ in rows])

    async def expire(self, before: float, limit: int) -> list[str]:
        async with self._transaction() as db:
            rows = await self._fetchall(
                "SELECT id FROM jobs WHERE state = ? AND update_time < ? LIMIT ?", FINISHED, before, limit
            )
            for (job_id,) in rows:
                for table, column in (
                    ("jobs", "id"),
                    ("queue_jobs", "job_id"),
                    ("namespaces", "job_id"),
                    ("events", "job_id"),
                    ("logs", "job_id"),
                    ("webhooks", "job_id"),
                ):
                    await db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))
        return [job_id for (job_id,) in rows]

    async def blob_references(self) -> set[str]:
        rows = await self._fetchall("SELECT definition, result FROM jobs")
        keys: set[str] = set()
        for definition, result in rows:
            keys |= blob_keys(definition_pb2.JobDefinition.FromString(definition))
            if result is not None:
                keys |= {
                    ref.value.string_value
                    for ref in jobs_pb2.JobResult.FromString(result).outputs.values()
                    if ref.type == "key"
                }
        return keys

    async def extend_leases(self, until: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE state = ? AND lease_expires < ?", (until, RUNNING, until)
            )

    async def requeue_worker(
        self, worker_id: str, keep: Sequence[Attempt], now: float
    ) -> list[tuple[jobs_pb2.Job, Attempt]]:
        async with self._transaction():
            rows = await self._fetchall(
                "SELECT id, attempt FROM jobs WHERE state = ? AND worker_id = ?", RUNNING, worker_id
            )
            lost = [Attempt(job_id, attempt) for job_id, attempt in rows if Attempt(job_id, attempt) not in keep]
            for attempt in lost:
                await self._requeue(
                    attempt, worker_id, now, f"worker-lost: worker {worker_id} came back without this attempt"
                )
        return await self._jobs_of(lost)

    async def release(self, attempt: Attempt, worker_id: str, reason: str, now: float) -> jobs_pb2.Job | None:
        async with self._transaction():
            if not await self._holds(attempt):
                return None
            await self._requeue(attempt, worker_id, now, f"released by worker {worker_id}: {reason}")
        return await self._job(attempt.job_id)

    async def _requeue(self, attempt: Attempt, worker_id: str, now: float, message: str) -> None:
        await self._db.execute(
            "UPDATE jobs SET state = ?, worker_id = '', update_time = ?, lease_expires = NULL WHERE id = ?",
            (QUEUED, now, attempt.job_id),
        )
        await self._event(
            attempt.job_id,
            jobs_pb2.JOB_EVENT_KIND_REQUEUED,
            now,
            attempt=attempt.attempt,
            worker_id=worker_id,
            message=f"re-queued: {message}",
        )

    async def _jobs_of(self, attempts: Sequence[Attempt]) -> list[tuple[jobs_pb2.Job, Attempt]]:
        jobs = [(await self._job(attempt.job_id), attempt) for attempt in attempts]
        return [(job, attempt) for job, attempt in jobs if job is not None]

    async def cancel(self, *, queue: str, job_id: str, namespace: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if not await self._fetchone("SELECT 1 FROM queue_jobs WHERE queue = ? AND job_id = ?", queue, job_id):
                return None
            if namespace == ALL_NAMESPACES:
                await db.execute("DELETE FROM namespaces WHERE queue = ? AND job_id = ?", (queue, job_id))
            else:
                await db.execute(
                    "DELETE FROM namespaces WHERE queue = ? AND job_id = ? AND namespace = ?",
                    (queue, job_id, namespace),
                )
            await self._event(
                job_id,
                jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED,
                now,
                message=f"cancel requested on {queue!r} for namespace {namespace!r}",
            )
            held = await self._fetchone("SELECT 1 FROM namespaces WHERE job_id = ? LIMIT 1", job_id)
            stop = None if held else await self._end(job_id, jobs_pb2.FINISH_REASON_CANCELLED, now, "cancelled")
        job = await self.get_job(job_id, queue=queue)
        assert job is not None
        return Cancelled(job=job, stop=stop[0] if stop else None, worker_id=stop[1] if stop else "")

    async def replace_in_namespace(self, *, queue: str, namespace: str, keep: str, now: float) -> list[Cancelled]:
        ended: list[tuple[str, tuple[Attempt | None, str] | None]] = []
        async with self._transaction() as db:
            rows = await self._fetchall(
                "SELECT n.job_id FROM namespaces n JOIN jobs j ON j.id = n.job_id"
                " WHERE n.queue = ? AND n.namespace = ? AND n.job_id != ? AND j.state != ?",
                queue,
                namespace,
                keep,
                FINISHED,
            )
            for (job_id,) in rows:
                await db.execute(
                    "DELETE FROM namespaces WHERE queue = ? AND job_id = ? AND namespace = ?",
                    (queue, job_id, namespace),
                )
                await self._event(
                    job_id,
                    jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED,
                    now,
                    message=f"replaced by job {keep} in namespace {namespace!r} of {queue!r}",
                )
                held = await self._fetchone("SELECT 1 FROM namespaces WHERE job_id = ? LIMIT 1", job_id)
                stop = (
                    None
                    if held
                    else await self._end(job_id, jobs_pb2.FINISH_REASON_REPLACED_BY_CLIENT, now, "replaced")
                )
                ended.append((job_id, stop))
        replaced = []
        for job_id, stop in ended:
            job = await self.get_job(job_id)
            assert job is not None
            replaced.append(Cancelled(job=job, stop=stop[0] if stop else None, worker_id=stop[1] if stop else ""))
        return replaced

    async def delete(self, job_id: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if await self._job_row(job_id) is None:
                return None
            stop = await self._end(job_id, jobs_pb2.FINISH_REASON_DELETED, now, "deleted", force=True)
            await db.execute("DELETE FROM namespaces WHERE job_id = ?", (job_id,))
        job = await self.get_job(job_id)
        assert job is not None
        return Cancelled(job=job, stop=stop[0] if stop else None, worker_id=stop[1] if stop else "")

    async def _end(
        self, job_id: str, reason: jobs_pb2.FinishReason.ValueType, now: float, words: str, *, force: bool = False
    ) -> tuple[Attempt | None, str] | None:
        """Finish a queued or running job (any job with `force`); the attempt to stop and its worker."""
        state, attempt, worker_id = await self._fetchone(
            "SELECT state, attempt, worker_id FROM jobs WHERE id = ?", job_id
        )
        if state == FINISHED and not force:
            return None
        result = jobs_pb2.JobResult(reason=reason, message=f"{words} by a client", attempt=attempt)
        result.finish_time.CopyFrom(timestamp(now))
        await self._db.execute(
            "UPDATE jobs SET state = ?, finish_reason = ?, update_time = ?, lease_expires = NULL, result = ?"
            " WHERE id = ?",
            (FINISHED, reason, now, result.SerializeToString(), job_id),
        )
        await self._event(job_id, jobs_pb2.JOB_EVENT_KIND_FINISHED, now, attempt=attempt, message=result.message)
        running = Attempt(job_id, attempt) if state == RUNNING else None
        return running, worker_id

    async def append_logs(
        self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, chunks: Sequence[jobs_pb2.LogChunk], start: int
    ) -> tuple[int, int] | None:
        async with self._transaction() as db:
            if not await self._holds(attempt):
                return None
            stored = await self.log_length(attempt, kind)
            skipped = already_stored(stored, start, len(chunks))
            if skipped < len(chunks):
                batch = jobs_pb2.LogBatch(kind=kind, chunks=chunks[skipped:])
                await db.execute(
                    "INSERT INTO logs VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        attempt.job_id,
                        attempt.attempt,
                        kind,
                        stored,
                        len(chunks) - skipped,
                        batch.SerializeToString(),
                    ),
                )
            return int(stored), skipped

    async def log_length(self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType) -> int:
        (stored,) = await self._fetchone(
            "SELECT COALESCE(MAX(start + count), 0) FROM logs WHERE job_id = ? AND attempt = ? AND kind = ?",
            attempt.job_id,
            attempt.attempt,
            kind,
        )
        return int(stored)

    async def read_logs(
        self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, since: int, limit: int
    ) -> list[jobs_pb2.LogChunk]:
        rows = await self._fetchall(
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
            await db.execute(
                "INSERT INTO workers VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET queue = excluded.queue,"
                " session = excluded.session, last_seen = excluded.last_seen, info = excluded.info",
                (
                    info.id,
                    queue,
                    session,
                    info.last_seen_time.ToMicroseconds() / 1e6,
                    info.SerializeToString(),
                ),
            )

    async def remove_worker(self, worker_id: str, *, session: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM workers WHERE id = ? AND session = ?", (worker_id, session))

    async def list_workers(self, queue: str, *, seen_since: float) -> list[jobs_pb2.WorkerInfo]:
        rows = await self._fetchall(
            "SELECT info FROM workers WHERE queue = ? AND last_seen >= ? ORDER BY id",
            queue,
            seen_since,
        )
        return [jobs_pb2.WorkerInfo.FromString(row[0]) for row in rows]

    async def queue_counts(self, queue: str) -> dict[int, int]:
        rows = await self._fetchall(
            "SELECT j.state, COUNT(*) FROM queue_jobs q JOIN jobs j ON j.id = q.job_id WHERE q.queue = ?"
            " GROUP BY j.state",
            queue,
        )
        return {state: count for state, count in rows}

    async def queue_position(self, queue: str, job_id: str) -> int:
        row = await self._fetchone(
            "SELECT COUNT(*) FROM queue_jobs q JOIN jobs j ON j.id = q.job_id WHERE q.queue = ? AND j.state = ?"
            " AND q.seq < (SELECT seq FROM queue_jobs WHERE queue = ? AND job_id = ?)",
            queue,
            QUEUED,
            queue,
            job_id,
        )
        return int(row[0])


def _finish_message(result: jobs_pb2.JobResult) -> str:
    reason = jobs_pb2.FinishReason.Name(result.reason).removeprefix("FINISH_REASON_").lower()
    exit_code = f", exit code {result.exit_code}" if result.HasField("exit_code") else ""
    detail = f": {result.message}" if result.message else ""
    return f"finished ({reason}{exit_code}){detail}"
