"""The PostgreSQL schema: its migrations, applied in order by `migrate` when a server starts (each
replica; under an advisory lock, so replicas starting together migrate once)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from jobwire.server.store import credentials, records, runs
from jobwire.server.store.rows import worker_columns
from jobwire.v1 import jobs_pb2

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
    # 6: the worker session holding a running job, beside its worker (see transitions: fencing).
    "ALTER TABLE jobs ADD COLUMN session TEXT NOT NULL DEFAULT ''",
    # 7: digests of queues' worker credentials and of workers' secrets (as SQLite's migration 10).
    credentials.SCHEMA.format(time="DOUBLE PRECISION"),
    # 8: a job's row is its run in one queue, keyed by (queue, id), as are its logs and webhooks
    # (as SQLite's migration 11; see runs).
    runs.split_postgres,
    # 9: a queue's listing reads its running runs and its finished ones by time from indexes (as SQLite's migration 12).
    records.LISTING_INDEXES,
    # 10: each queue's bytes of job definitions (as SQLite's migration 13), for --max-queue-bytes. The
    # trigger is deferred to the commit, so concurrent submissions to one queue hold its row only
    # while they commit.
    """
    CREATE TABLE queue_sizes (queue TEXT PRIMARY KEY, bytes BIGINT NOT NULL);
    CREATE FUNCTION jobwire_job_sized() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
      IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_sizes VALUES (NEW.queue, octet_length(NEW.definition))
          ON CONFLICT (queue) DO UPDATE SET bytes = queue_sizes.bytes + EXCLUDED.bytes;
      ELSE
        UPDATE queue_sizes SET bytes = bytes - octet_length(OLD.definition) WHERE queue = OLD.queue;
      END IF;
      RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER job_sized AFTER INSERT OR DELETE ON jobs DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION jobwire_job_sized();
    INSERT INTO queue_sizes SELECT queue, SUM(octet_length(definition)) FROM jobs GROUP BY queue;
    """,
    # 11: each queue's number of waiting (queued) jobs, for --max-queued-jobs: one row read per
    # submission instead of counting up to the limit's rows of `waiting`. As queue_sizes, kept by a
    # trigger deferred to the commit, so that submissions and claims of one queue on several
    # replicas hold its row only while they commit (operations that change several queues' rows do
    # so in queue order: see lifecycle, `_requeue` and `expire_queued`).
    """
    CREATE TABLE queue_waiting (queue TEXT PRIMARY KEY, jobs BIGINT NOT NULL);
    CREATE FUNCTION jobwire_waiting_counted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
      IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_waiting VALUES (NEW.queue, 1)
          ON CONFLICT (queue) DO UPDATE SET jobs = queue_waiting.jobs + 1;
      ELSE
        UPDATE queue_waiting SET jobs = jobs - 1 WHERE queue = OLD.queue;
      END IF;
      RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER waiting_counted AFTER INSERT OR DELETE ON waiting DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION jobwire_waiting_counted();
    INSERT INTO queue_waiting SELECT queue, COUNT(*) FROM waiting GROUP BY queue;
    """,
    # 12: a run's row touches `waiting` only when it leaves or enters the queued state: `waiting` holds
    # the queued runs only, so a running run's finish (or a finished run's removal) ran the trigger's
    # statements for nothing.
    f"""
    DROP TRIGGER job_state_changed ON jobs;
    CREATE TRIGGER job_state_changed AFTER UPDATE OF state ON jobs FOR EACH ROW
      WHEN (OLD.state IS DISTINCT FROM NEW.state AND (OLD.state = {QUEUED} OR NEW.state = {QUEUED}))
      EXECUTE FUNCTION jobwire_job_state_changed();
    DROP TRIGGER job_removed ON jobs;
    CREATE TRIGGER job_removed AFTER DELETE ON jobs FOR EACH ROW WHEN (OLD.state = {QUEUED})
      EXECUTE FUNCTION jobwire_job_state_changed();
    """,
]
"""Applied in order at start (SQL, or a function given the connection); `jobwire_schema.version`
counts those applied."""

_MIGRATION_LOCK = 0x6A6F6277  # pg_advisory_xact_lock key: replicas starting together migrate once


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
