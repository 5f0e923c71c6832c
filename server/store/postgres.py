"""The PostgreSQL StateStore (asyncpg): shared by every server replica, claims with SKIP LOCKED.

Each call is one transaction on a pooled connection. Rows a call changes are locked first
(`FOR UPDATE`), so two replicas acting on one job serialise on it; claims, lease reaping,
retention and webhook delivery skip rows another replica holds (`SKIP LOCKED`), so two
replicas never assign one job twice or deliver one webhook twice at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

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

Connection = Any  # asyncpg.Connection or a pool's proxy of one


async def _worker_columns(connection: Connection) -> None:
    await connection.execute(
        "ALTER TABLE workers ADD COLUMN slots INTEGER NOT NULL DEFAULT 0, ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0"
    )
    for worker_id, info in await connection.fetch("SELECT id, info FROM workers"):
        slots, gpus = worker_columns(jobs_pb2.WorkerInfo.FromString(info))
        await connection.execute("UPDATE workers SET slots = $1, gpus = $2 WHERE id = $3", slots, gpus, worker_id)


MIGRATIONS: list[str | Callable[[Connection], Awaitable[None]]] = [
    # 1: the schema as of SQLite's migration 3 (jobs with GPUs, webhooks, queue order), with the indexes that
    # keep claims, lists, status and reaping fast at millions of jobs, and bus message bodies
    # too large for a NOTIFY payload.
    f"""
    CREATE TABLE jobs (
      id TEXT PRIMARY KEY, state INTEGER NOT NULL, queue TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
      worker_id TEXT NOT NULL DEFAULT '', create_time DOUBLE PRECISION NOT NULL,
      update_time DOUBLE PRECISION NOT NULL, lease_expires DOUBLE PRECISION,
      finish_reason INTEGER NOT NULL DEFAULT 0, definition BYTEA NOT NULL, result BYTEA,
      gpus INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_running_lease ON jobs (lease_expires) WHERE state = {RUNNING};
    CREATE INDEX jobs_queued ON jobs (id) WHERE state = {QUEUED};
    CREATE INDEX jobs_finished ON jobs (update_time) WHERE state = {FINISHED};
    CREATE INDEX jobs_worker ON jobs (worker_id) WHERE state = {RUNNING};
    CREATE TABLE queue_jobs (
      seq BIGSERIAL PRIMARY KEY, queue TEXT NOT NULL, job_id TEXT NOT NULL, UNIQUE (queue, job_id)
    );
    CREATE INDEX queue_jobs_queue ON queue_jobs (queue, seq);
    CREATE INDEX queue_jobs_job ON queue_jobs (job_id);
    CREATE TABLE namespaces (
      queue TEXT NOT NULL, job_id TEXT NOT NULL, namespace TEXT NOT NULL, PRIMARY KEY (queue, job_id, namespace)
    );
    CREATE INDEX namespaces_job ON namespaces (job_id);
    CREATE INDEX namespaces_queue_namespace ON namespaces (queue, namespace);
    CREATE TABLE events (seq BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL, data BYTEA NOT NULL);
    CREATE INDEX events_job ON events (job_id, seq);
    CREATE TABLE logs (
      job_id TEXT NOT NULL, attempt INTEGER NOT NULL, kind INTEGER NOT NULL, start INTEGER NOT NULL,
      count INTEGER NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (job_id, attempt, kind, start)
    );
    CREATE TABLE workers (
      id TEXT PRIMARY KEY, queue TEXT NOT NULL, session TEXT NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
      info BYTEA NOT NULL
    );
    CREATE INDEX workers_queue ON workers (queue, last_seen);
    CREATE TABLE webhooks (
      id BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL, event TEXT NOT NULL, url TEXT NOT NULL, body BYTEA NOT NULL,
      armed BOOLEAN NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_time DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX webhooks_due ON webhooks (next_time) WHERE armed;
    CREATE INDEX webhooks_job ON webhooks (job_id, event);
    CREATE TABLE bus_messages (
      id BIGSERIAL PRIMARY KEY, created DOUBLE PRECISION NOT NULL, data BYTEA NOT NULL
    );
    """,
    # 2: `waiting` holds the queue_jobs rows of queued jobs, kept by triggers, so that a claim takes a
    # queue's first waiting row instead of walking past every finished job (as SQLite's migration 4;
    # SQLite's per-queue state counters are left out here: under many replicas those rows would be
    # locked by every transition of the queue).
    f"""
    CREATE TABLE waiting (
      queue TEXT NOT NULL, seq BIGINT NOT NULL, job_id TEXT NOT NULL, gpus INTEGER NOT NULL, PRIMARY KEY (queue, seq)
    );
    CREATE INDEX waiting_job ON waiting (job_id);
    CREATE FUNCTION jobwire_queue_job_added() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
      INSERT INTO waiting SELECT NEW.queue, NEW.seq, id, gpus FROM jobs WHERE id = NEW.job_id AND state = {QUEUED};
      RETURN NULL;
    END $$;
    CREATE TRIGGER queue_job_added AFTER INSERT ON queue_jobs FOR EACH ROW EXECUTE FUNCTION jobwire_queue_job_added();
    CREATE FUNCTION jobwire_queue_job_removed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
      DELETE FROM waiting WHERE queue = OLD.queue AND seq = OLD.seq;
      RETURN NULL;
    END $$;
    CREATE TRIGGER queue_job_removed AFTER DELETE ON queue_jobs
      FOR EACH ROW EXECUTE FUNCTION jobwire_queue_job_removed();
    CREATE FUNCTION jobwire_job_state_changed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
      DELETE FROM waiting WHERE job_id = OLD.id;
      IF TG_OP = 'UPDATE' AND NEW.state = {QUEUED} THEN
        INSERT INTO waiting SELECT queue, seq, job_id, NEW.gpus FROM queue_jobs WHERE job_id = NEW.id;
      END IF;
      RETURN NULL;
    END $$;
    CREATE TRIGGER job_state_changed AFTER UPDATE OF state ON jobs
      FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION jobwire_job_state_changed();
    CREATE TRIGGER job_removed AFTER DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION jobwire_job_state_changed();
    INSERT INTO waiting SELECT q.queue, q.seq, q.job_id, j.gpus FROM queue_jobs q JOIN jobs j ON j.id = q.job_id
      WHERE j.state = {QUEUED};
    """,
    # 3: each batch records the characters of each stream stored up to its end (as SQLite's migration 5).
    "ALTER TABLE logs ADD COLUMN stdout_chars BIGINT NOT NULL DEFAULT 0,"
    " ADD COLUMN stderr_chars BIGINT NOT NULL DEFAULT 0",
    # 4: a job's history lives in its row (as SQLite's migration 7): each `events` row becomes the
    # bytes that append it (field 12 of Job, length-delimited: tag 0x62, a varint length, the entry).
    r"""
    ALTER TABLE jobs ADD COLUMN history BYTEA NOT NULL DEFAULT '';
    CREATE FUNCTION pg_temp.jobwire_varint(n BIGINT) RETURNS BYTEA LANGUAGE plpgsql AS $$
    DECLARE encoded BYTEA := '';
    BEGIN
      WHILE n >= 128 LOOP
        encoded := encoded || set_byte('\x00'::bytea, 0, ((n & 127) | 128)::int);
        n := n >> 7;
      END LOOP;
      RETURN encoded || set_byte('\x00'::bytea, 0, n::int);
    END $$;
    UPDATE jobs SET history = entries.history FROM (
      SELECT job_id, string_agg('\x62'::bytea || pg_temp.jobwire_varint(length(data)) || data, '' ORDER BY seq)
        AS history
      FROM events GROUP BY job_id
    ) entries WHERE jobs.id = entries.job_id;
    DROP TABLE events;
    """,
    # 5: each worker's slots and GPU devices beside its record (as SQLite's migration 8).
    _worker_columns,
]
"""Applied in order at start (SQL, or a function given the connection); `jobwire_schema.version`
counts those applied."""

_MIGRATION_LOCK = 0x6A6F6277  # pg_advisory_xact_lock key: replicas starting together migrate once
_JOB_COLUMNS = "id, state, queue, attempt, worker_id, create_time, update_time, finish_reason"


async def migrate(connection: Connection) -> int:
    """Apply the migrations not applied yet, under an advisory lock; returns the schema version."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await connection.execute("CREATE TABLE IF NOT EXISTS jobwire_schema (version INTEGER NOT NULL)")
        version = await connection.fetchval("SELECT version FROM jobwire_schema")
        if version is None:
            await connection.execute("INSERT INTO jobwire_schema VALUES (0)")
            version = 0
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            if isinstance(migration, str):
                await connection.execute(migration)
            else:
                await migration(connection)
            await connection.execute("UPDATE jobwire_schema SET version = $1", number)
        return len(MIGRATIONS)


class PostgresStore:
    """StateStore on a PostgreSQL database, through a pool of asyncpg connections."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, *, max_size: int = 10) -> PostgresStore:
        """Connect a pool to `dsn` (postgresql://…) and bring the schema up to date."""
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size)
        try:
            async with pool.acquire() as connection:
                await migrate(connection)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        async with self.pool.acquire() as connection, connection.transaction():
            yield connection

    async def _event(
        self, db: Connection, job_id: str, kind: jobs_pb2.JobEventKind.ValueType, now: float, **fields: Any
    ) -> None:
        await db.execute(
            "UPDATE jobs SET history = history || $1 WHERE id = $2", history_entry(kind, now, **fields), job_id
        )
        if kind == jobs_pb2.JOB_EVENT_KIND_FINISHED:
            await self._arm_finished_hooks(db, job_id, now)

    async def _arm_finished_hooks(self, db: Connection, job_id: str, now: float) -> None:
        """In the transaction that finishes the job."""
        await db.execute(
            "UPDATE webhooks SET armed = TRUE, next_time = $1 WHERE job_id = $2 AND event = $3 AND NOT armed",
            now,
            job_id,
            FINISHED_HOOK,
        )

    async def add_webhook(self, hook: Webhook, *, armed: bool, now: float) -> None:
        async with self._transaction() as db:
            state = await db.fetchval("SELECT state FROM jobs WHERE id = $1 FOR SHARE", hook.job_id)
            await db.execute(
                "INSERT INTO webhooks (job_id, event, url, body, armed, next_time) VALUES ($1, $2, $3, $4, $5, $6)",
                hook.job_id,
                hook.event,
                hook.url,
                hook.body,
                armed or state == FINISHED,
                now,
            )

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[Webhook]:
        async with self._transaction() as db:
            rows = await db.fetch(
                "SELECT id, job_id, event, url, body, attempts FROM webhooks WHERE armed AND next_time <= $1"
                " ORDER BY next_time LIMIT $2 FOR UPDATE SKIP LOCKED",
                now,
                limit,
            )
            await db.execute("UPDATE webhooks SET next_time = $1 WHERE id = ANY($2)", until, [r[0] for r in rows])
        return [Webhook(r[1], r[2], r[3], bytes(r[4]), r[0], r[5]) for r in rows]

    async def settle_webhook(self, hook_id: int, retry_at: float | None) -> None:
        if retry_at is None:
            await self.pool.execute("DELETE FROM webhooks WHERE id = $1", hook_id)
        else:
            await self.pool.execute(
                "UPDATE webhooks SET attempts = attempts + 1, next_time = $1 WHERE id = $2", retry_at, hook_id
            )

    async def _job(self, db: Connection, job_id: str, queue: str = "") -> jobs_pb2.Job | None:
        row = await db.fetchrow(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
        if row is None:
            return None
        names = await db.fetch(
            "SELECT namespace FROM namespaces WHERE queue = $1 AND job_id = $2 ORDER BY namespace",
            queue or row[2],
            job_id,
        )
        return job_message(tuple(row), namespaces=[r[0] for r in names])

    async def _current(self, db: Connection, job_id: str, result: bytes | None = None) -> jobs_pb2.Job:
        """The job as a transition left it: its definition (and `result`) but no history, which is
        enough to assign it and to tell watchers."""
        job = await self._job(db, job_id)
        assert job is not None
        definition = await db.fetchval("SELECT definition FROM jobs WHERE id = $1", job_id)
        return with_details(job, definition, result, b"")

    async def submit(self, *, queue: str, jobs: Sequence[Submission], now: float) -> list[tuple[jobs_pb2.Job, bool]]:
        async with self._transaction() as db:
            return [await self._submit(db, job, queue, now) for job in jobs]

    async def _submit(
        self, db: Connection, submission: Submission, queue: str, now: float
    ) -> tuple[jobs_pb2.Job, bool]:
        job_id, definition = submission.job_id, submission.definition
        inserted = await db.fetchval(
            "INSERT INTO jobs (id, state, queue, create_time, update_time, definition, gpus)"
            " VALUES ($1, $2, $3, $4, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING id",
            job_id,
            QUEUED,
            queue,
            now,
            definition.SerializeToString(),
            definition.requirements.gpus,
        )
        await db.execute("INSERT INTO queue_jobs (queue, job_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", queue, job_id)
        await db.execute(
            "INSERT INTO namespaces VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", queue, job_id, submission.namespace
        )
        if inserted is None:
            state, reason = await db.fetchrow("SELECT state, finish_reason FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            if state != FINISHED or reason in FINAL_REASONS:
                job = await self._job(db, job_id, queue)
                assert job is not None
                return job, False
            await db.execute(
                "UPDATE jobs SET state = $1, queue = $2, worker_id = '', update_time = $3, finish_reason = 0,"
                " result = NULL, lease_expires = NULL WHERE id = $4",
                QUEUED,
                queue,
                now,
                job_id,
            )
        await self._event(db, job_id, jobs_pb2.JOB_EVENT_KIND_QUEUED, now, message=f"queued on {queue!r}")
        job = await self._job(db, job_id, queue)
        assert job is not None
        return job, True

    async def get_job(self, job_id: str, *, queue: str = "") -> jobs_pb2.Job | None:
        async with self.pool.acquire() as db:
            return await self._full_job(db, job_id, queue)

    async def _full_job(self, db: Connection, job_id: str, queue: str = "") -> jobs_pb2.Job | None:
        if queue and not await db.fetchval("SELECT 1 FROM queue_jobs WHERE queue = $1 AND job_id = $2", queue, job_id):
            return None
        job = await self._job(db, job_id, queue)
        if job is None:
            return None
        definition, result, history = await db.fetchrow(
            "SELECT definition, result, history FROM jobs WHERE id = $1", job_id
        )
        return with_details(job, definition, result, history)

    async def list_jobs(self, queue: str, *, state: int, after: int, limit: int) -> tuple[list[jobs_pb2.Job], int]:
        where = "q.queue = $1 AND q.seq > $2" + (" AND j.state = $4" if state else "")
        args: list[Any] = [queue, after, limit + 1] + ([state] if state else [])
        rows = await self.pool.fetch(
            f"SELECT q.seq, {', '.join('j.' + c for c in _JOB_COLUMNS.split(', '))}"
            f" FROM queue_jobs q JOIN jobs j ON j.id = q.job_id WHERE {where} ORDER BY q.seq LIMIT $3",
            *args,
        )
        jobs = [job_message(tuple(row)[1:], namespaces=[]) for row in rows[:limit]]
        return jobs, (rows[limit - 1][0] if len(rows) > limit else 0)

    async def claim(
        self, *, queue: str, worker_id: str, now: float, lease: float, gpus: int = 0, count: int = 1
    ) -> list[jobs_pb2.Job]:
        claimed: list[jobs_pb2.Job] = []
        async with self._transaction() as db:
            while len(claimed) < count:
                row = await db.fetchrow(
                    "SELECT j.id, j.attempt FROM waiting w JOIN jobs j ON j.id = w.job_id"
                    " WHERE w.queue = $1 AND j.state = $2 AND w.gpus <= $3 ORDER BY w.seq LIMIT 1"
                    " FOR UPDATE OF j SKIP LOCKED",
                    queue,
                    QUEUED,
                    gpus,
                )
                if row is None:
                    break
                job_id, attempt = row[0], row[1] + 1
                entry = history_entry(
                    jobs_pb2.JOB_EVENT_KIND_ASSIGNED,
                    now,
                    attempt=attempt,
                    worker_id=worker_id,
                    message=f"assigned to worker {worker_id} as attempt {attempt}",
                )
                await db.execute(  # the row and its history in one statement
                    "UPDATE jobs SET state = $1, attempt = $2, worker_id = $3, update_time = $4, lease_expires = $5,"
                    " queue = $6, history = history || $7 WHERE id = $8",
                    RUNNING,
                    attempt,
                    worker_id,
                    now,
                    now + lease,
                    queue,
                    entry,
                    job_id,
                )
                claimed.append(await self._current(db, job_id))
                gpus -= claimed[-1].definition.requirements.gpus
        return claimed

    async def _holds(self, db: Connection, attempt: Attempt) -> str | None:
        """The worker of the attempt, locking its job, if the attempt still holds the job; else None."""
        row = await db.fetchrow("SELECT state, attempt, worker_id FROM jobs WHERE id = $1 FOR UPDATE", attempt.job_id)
        if row is None or row[0] != RUNNING or row[1] != attempt.attempt:
            return None
        return str(row[2])

    async def start(self, attempt: Attempt, now: float) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            worker_id = await self._holds(db, attempt)
            if worker_id is None:
                return None
            await self._event(
                db,
                attempt.job_id,
                jobs_pb2.JOB_EVENT_KIND_STARTED,
                now,
                attempt=attempt.attempt,
                worker_id=worker_id,
                message="container started",
            )
            return await self._current(db, attempt.job_id)

    async def renew(self, worker_id: str, attempts: Sequence[Attempt], until: float) -> list[Attempt]:
        stale: list[Attempt] = []
        async with self._transaction() as db:
            for attempt in attempts:
                renewed = await db.fetchval(
                    "UPDATE jobs SET lease_expires = $1 WHERE id = $2 AND attempt = $3 AND state = $4"
                    " AND worker_id = $5 RETURNING 1",
                    until,
                    attempt.job_id,
                    attempt.attempt,
                    RUNNING,
                    worker_id,
                )
                if renewed is None:
                    stale.append(attempt)
        return stale

    async def finish(self, attempt: Attempt, result: jobs_pb2.JobResult, now: float) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            if await self._holds(db, attempt) is None:
                return None
            stored = result.SerializeToString()
            entry = history_entry(
                jobs_pb2.JOB_EVENT_KIND_FINISHED,
                now,
                attempt=attempt.attempt,
                worker_id=result.worker_id,
                message=finish_message(result),
            )
            await db.execute(  # the row and its history in one statement
                "UPDATE jobs SET state = $1, finish_reason = $2, update_time = $3, lease_expires = NULL, result = $4,"
                " history = history || $5 WHERE id = $6",
                FINISHED,
                result.reason,
                now,
                stored,
                entry,
                attempt.job_id,
            )
            await self._arm_finished_hooks(db, attempt.job_id, now)
            return await self._current(db, attempt.job_id, stored)

    async def requeue_expired(self, now: float) -> list[tuple[jobs_pb2.Job, Attempt]]:
        async with self._transaction() as db:
            rows = await db.fetch(
                "SELECT id, attempt, worker_id FROM jobs WHERE state = $1 AND lease_expires < $2"
                " FOR UPDATE SKIP LOCKED",
                RUNNING,
                now,
            )
            for job_id, attempt, worker_id in rows:
                await self._requeue(
                    db,
                    Attempt(job_id, attempt),
                    worker_id,
                    now,
                    f"worker-lost: no word from worker {worker_id} within its lease",
                )
            return await self._jobs_of(db, [Attempt(job_id, attempt) for job_id, attempt, _ in rows])

    async def expire(self, before: float, limit: int) -> list[str]:
        async with self._transaction() as db:
            rows = await db.fetch(
                "SELECT id FROM jobs WHERE state = $1 AND update_time < $2 LIMIT $3 FOR UPDATE SKIP LOCKED",
                FINISHED,
                before,
                limit,
            )
            ids = [row[0] for row in rows]
            for table, column in (
                ("queue_jobs", "job_id"),
                ("namespaces", "job_id"),
                ("logs", "job_id"),
                ("webhooks", "job_id"),
                ("jobs", "id"),
            ):
                await db.execute(f"DELETE FROM {table} WHERE {column} = ANY($1)", ids)
        return ids

    async def blob_references(self) -> set[str]:
        keys: set[str] = set()
        async with self.pool.acquire() as db, db.transaction():
            async for definition, result in db.cursor("SELECT definition, result FROM jobs", prefetch=500):
                keys |= blob_keys(definition_pb2.JobDefinition.FromString(definition))
                if result is not None:
                    outputs = jobs_pb2.JobResult.FromString(result).outputs.values()
                    keys |= {ref.value.string_value for ref in outputs if ref.type == "key"}
        return keys

    async def extend_leases(self, until: float) -> None:
        await self.pool.execute(
            "UPDATE jobs SET lease_expires = $1 WHERE state = $2 AND lease_expires < $1", until, RUNNING
        )

    async def requeue_worker(
        self, worker_id: str, keep: Sequence[Attempt], now: float
    ) -> list[tuple[jobs_pb2.Job, Attempt]]:
        async with self._transaction() as db:
            rows = await db.fetch(
                "SELECT id, attempt FROM jobs WHERE state = $1 AND worker_id = $2 ORDER BY id FOR UPDATE",
                RUNNING,
                worker_id,
            )
            lost = [Attempt(job_id, attempt) for job_id, attempt in rows if Attempt(job_id, attempt) not in keep]
            for attempt in lost:
                await self._requeue(
                    db, attempt, worker_id, now, f"worker-lost: worker {worker_id} came back without this attempt"
                )
            return await self._jobs_of(db, lost)

    async def release(self, attempt: Attempt, worker_id: str, reason: str, now: float) -> jobs_pb2.Job | None:
        async with self._transaction() as db:
            if await self._holds(db, attempt) is None:
                return None
            await self._requeue(db, attempt, worker_id, now, f"released by worker {worker_id}: {reason}")
            return await self._job(db, attempt.job_id)

    async def _requeue(self, db: Connection, attempt: Attempt, worker_id: str, now: float, message: str) -> None:
        await db.execute(
            "UPDATE jobs SET state = $1, worker_id = '', update_time = $2, lease_expires = NULL WHERE id = $3",
            QUEUED,
            now,
            attempt.job_id,
        )
        await self._event(
            db,
            attempt.job_id,
            jobs_pb2.JOB_EVENT_KIND_REQUEUED,
            now,
            attempt=attempt.attempt,
            worker_id=worker_id,
            message=f"re-queued: {message}",
        )

    async def _jobs_of(self, db: Connection, attempts: Sequence[Attempt]) -> list[tuple[jobs_pb2.Job, Attempt]]:
        jobs = [(await self._job(db, attempt.job_id), attempt) for attempt in attempts]
        return [(job, attempt) for job, attempt in jobs if job is not None]

    async def cancel(self, *, queue: str, job_id: str, namespace: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if not await db.fetchval("SELECT 1 FROM queue_jobs WHERE queue = $1 AND job_id = $2", queue, job_id):
                return None
            await db.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            if namespace == ALL_NAMESPACES:
                await db.execute("DELETE FROM namespaces WHERE queue = $1 AND job_id = $2", queue, job_id)
            else:
                await db.execute(
                    "DELETE FROM namespaces WHERE queue = $1 AND job_id = $2 AND namespace = $3",
                    queue,
                    job_id,
                    namespace,
                )
            await self._event(
                db,
                job_id,
                jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED,
                now,
                message=f"cancel requested on {queue!r} for namespace {namespace!r}",
            )
            held = await db.fetchval("SELECT 1 FROM namespaces WHERE job_id = $1 LIMIT 1", job_id)
            stop = None if held else await self._end(db, job_id, jobs_pb2.FINISH_REASON_CANCELLED, now, "cancelled")
            job = await self._full_job(db, job_id, queue)
        assert job is not None
        return _cancelled(job, stop)

    async def replace_in_namespace(self, *, queue: str, namespace: str, keep: str, now: float) -> list[Cancelled]:
        replaced: list[Cancelled] = []
        async with self._transaction() as db:
            rows = await db.fetch(
                "SELECT n.job_id FROM namespaces n JOIN jobs j ON j.id = n.job_id"
                " WHERE n.queue = $1 AND n.namespace = $2 AND n.job_id != $3 AND j.state != $4"
                " ORDER BY n.job_id FOR UPDATE OF j",
                queue,
                namespace,
                keep,
                FINISHED,
            )
            for (job_id,) in rows:
                await db.execute(
                    "DELETE FROM namespaces WHERE queue = $1 AND job_id = $2 AND namespace = $3",
                    queue,
                    job_id,
                    namespace,
                )
                await self._event(
                    db,
                    job_id,
                    jobs_pb2.JOB_EVENT_KIND_CANCEL_REQUESTED,
                    now,
                    message=f"replaced by job {keep} in namespace {namespace!r} of {queue!r}",
                )
                held = await db.fetchval("SELECT 1 FROM namespaces WHERE job_id = $1 LIMIT 1", job_id)
                stop = (
                    None
                    if held
                    else await self._end(db, job_id, jobs_pb2.FINISH_REASON_REPLACED_BY_CLIENT, now, "replaced")
                )
                job = await self._full_job(db, job_id)
                assert job is not None
                replaced.append(_cancelled(job, stop))
        return replaced

    async def delete(self, job_id: str, now: float) -> Cancelled | None:
        async with self._transaction() as db:
            if await db.fetchval("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job_id) is None:
                return None
            stop = await self._end(db, job_id, jobs_pb2.FINISH_REASON_DELETED, now, "deleted", force=True)
            await db.execute("DELETE FROM namespaces WHERE job_id = $1", job_id)
            job = await self._full_job(db, job_id)
        assert job is not None
        return _cancelled(job, stop)

    async def _end(
        self,
        db: Connection,
        job_id: str,
        reason: jobs_pb2.FinishReason.ValueType,
        now: float,
        words: str,
        *,
        force: bool = False,
    ) -> tuple[Attempt | None, str] | None:
        """Finish a queued or running job (any job with `force`); the attempt to stop and its worker."""
        state, attempt, worker_id = await db.fetchrow(
            "SELECT state, attempt, worker_id FROM jobs WHERE id = $1 FOR UPDATE", job_id
        )
        if state == FINISHED and not force:
            return None
        result = jobs_pb2.JobResult(reason=reason, message=f"{words} by a client", attempt=attempt)
        result.finish_time.CopyFrom(timestamp(now))
        await db.execute(
            "UPDATE jobs SET state = $1, finish_reason = $2, update_time = $3, lease_expires = NULL, result = $4"
            " WHERE id = $5",
            FINISHED,
            reason,
            now,
            result.SerializeToString(),
            job_id,
        )
        await self._event(db, job_id, jobs_pb2.JOB_EVENT_KIND_FINISHED, now, attempt=attempt, message=result.message)
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
            if await self._holds(db, attempt) is None:  # also locks the job: one append at a time
                return None
            stored = await self._log_totals(db, attempt, kind)
            skipped = already_stored(stored.chunks, start, len(chunks))
            kept = within_limit(stored.chars, chunks[skipped:], max_chars)
            if kept:
                batch = jobs_pb2.LogBatch(kind=kind, chunks=kept)
                totals = stored.after(batch.chunks)
                await db.execute(
                    "INSERT INTO logs (job_id, attempt, kind, start, count, data, stdout_chars, stderr_chars)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    attempt.job_id,
                    attempt.attempt,
                    kind,
                    stored.chunks,
                    len(batch.chunks),
                    batch.SerializeToString(),
                    totals.stdout_chars,
                    totals.stderr_chars,
                )
            return stored.chunks, kept

    async def log_totals(self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType) -> LogTotals:
        async with self.pool.acquire() as db:
            return await self._log_totals(db, attempt, kind)

    async def _log_totals(self, db: Connection, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType) -> LogTotals:
        # The last batch by index (the primary key) ends the log: batches never overlap.
        row = await db.fetchrow(
            "SELECT start + count, stdout_chars, stderr_chars FROM logs WHERE job_id = $1 AND attempt = $2"
            " AND kind = $3 ORDER BY start DESC LIMIT 1",
            attempt.job_id,
            attempt.attempt,
            kind,
        )
        return LogTotals(*row) if row else LogTotals()

    async def read_logs(
        self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, since: int, limit: int
    ) -> list[jobs_pb2.LogChunk]:
        chunks: list[jobs_pb2.LogChunk] = []
        async with self.pool.acquire() as db, db.transaction():
            cursor = db.cursor(
                "SELECT start, data FROM logs WHERE job_id = $1 AND attempt = $2 AND kind = $3 AND start + count > $4"
                " ORDER BY start",
                attempt.job_id,
                attempt.attempt,
                kind,
                since,
                prefetch=64,
            )
            async for start, data in cursor:
                batch = jobs_pb2.LogBatch.FromString(data)
                chunks.extend(batch.chunks[max(0, since - start) :])
                if len(chunks) >= limit:
                    break
        return chunks[:limit]

    async def upsert_worker(self, info: jobs_pb2.WorkerInfo, *, queue: str, session: str) -> None:
        await self.pool.execute(
            "INSERT INTO workers (id, queue, session, last_seen, info, slots, gpus) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, session = excluded.session,"
            " last_seen = excluded.last_seen, info = excluded.info, slots = excluded.slots, gpus = excluded.gpus",
            info.id,
            queue,
            session,
            info.last_seen_time.ToMicroseconds() / 1e6,
            info.SerializeToString(),
            *worker_columns(info),
        )

    async def remove_worker(self, worker_id: str, *, session: str) -> None:
        await self.pool.execute("DELETE FROM workers WHERE id = $1 AND session = $2", worker_id, session)

    async def list_workers(self, queue: str, *, seen_since: float) -> list[jobs_pb2.WorkerInfo]:
        rows = await self.pool.fetch(
            "SELECT info FROM workers WHERE queue = $1 AND last_seen >= $2 ORDER BY id", queue, seen_since
        )
        running = await self.pool.fetch(  # the state is literal so that the partial index jobs_worker serves
            f"SELECT j.worker_id, j.id FROM workers w JOIN jobs j ON j.worker_id = w.id AND j.state = {RUNNING}"
            " WHERE w.queue = $1",
            queue,
        )
        return workers_with_jobs([row[0] for row in rows], [(row[0], row[1]) for row in running])

    async def capacity(self, queue: str, *, seen_since: float) -> Capacity:
        row = await self.pool.fetchrow(
            "SELECT COUNT(*), COALESCE(SUM(slots), 0), COALESCE(MAX(gpus), 0),"
            f" (SELECT COUNT(*) FROM workers w JOIN jobs j ON j.worker_id = w.id AND j.state = {RUNNING}"
            "   WHERE w.queue = $1 AND w.last_seen >= $2)"
            " FROM workers WHERE queue = $1 AND last_seen >= $2",
            queue,
            seen_since,
        )
        assert row is not None  # an aggregate has its row
        return Capacity(workers=row[0], slots=row[1], busy=row[3], most_gpus=row[2])

    async def queue_counts(self, queue: str) -> dict[int, int]:
        rows = await self.pool.fetch(
            "SELECT j.state, COUNT(*) FROM queue_jobs q JOIN jobs j ON j.id = q.job_id WHERE q.queue = $1"
            " GROUP BY j.state",
            queue,
        )
        return {state: count for state, count in rows}

    async def queue_position(self, queue: str, job_id: str) -> int:
        count = await self.pool.fetchval(
            "SELECT COUNT(*) FROM (SELECT 1 FROM waiting WHERE queue = $1"
            " AND seq < (SELECT seq FROM queue_jobs WHERE queue = $1 AND job_id = $2) LIMIT $3) ahead",
            queue,
            job_id,
            POSITION_LIMIT,
        )
        return int(count or 0)


def _cancelled(job: jobs_pb2.Job, stop: tuple[Attempt | None, str] | None) -> Cancelled:
    return Cancelled(job=job, stop=stop[0] if stop else None, worker_id=stop[1] if stop else "")
