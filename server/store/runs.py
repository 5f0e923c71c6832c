"""The migration to a run per queue: a job's row is its run in one queue, keyed by (queue, id).

Before it, one job row could be listed by several queues (a later submission of the same definition
to another queue joined it, and a result earned on one queue answered every other). The row stays
the run of the queue it was first queued on (its `queue` column), with its attempts, logs, result and
webhooks; every other queue that listed it gets a fresh queued run of its own, so that no queue keeps
a result it did not earn. Both backends apply it as their last migration (same steps, their syntax).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from jobwire.server.store.rows import history_entry
from jobwire.v1 import jobs_pb2

QUEUED = jobs_pb2.JOB_STATE_QUEUED
_JOINED = (
    "SELECT q.queue, j.id, j.create_time, j.update_time, j.definition, j.gpus"
    " FROM queue_jobs q JOIN jobs j ON j.id = q.job_id WHERE q.queue != j.queue"
)
"""Queues that listed a job first queued on another queue: each gets a run of its own."""
_NEW_RUN = "INSERT INTO jobs (queue, id, create_time, update_time, definition, gpus, state, history) VALUES ({marks})"
_WORDS = "queued (a run of its own: a result counts only in the queue where it ran)"


def _new_runs(rows: list[Any]) -> list[tuple[Any, ...]]:
    """The fresh queued run of each (queue, id, create_time, update_time, definition, gpus) row."""
    return [(*row, QUEUED, history_entry(jobs_pb2.JOB_EVENT_KIND_QUEUED, row[3], message=_WORDS)) for row in rows]


_SQLITE_TRIGGERS = [
    """CREATE TRIGGER queue_job_added AFTER INSERT ON queue_jobs BEGIN
      INSERT INTO queue_states SELECT NEW.queue, state, 1 FROM jobs WHERE queue = NEW.queue AND id = NEW.job_id
        ON CONFLICT (queue, state) DO UPDATE SET jobs = jobs + 1;
      INSERT INTO waiting SELECT NEW.queue, NEW.seq, id, gpus FROM jobs
        WHERE queue = NEW.queue AND id = NEW.job_id AND state = 1;
    END""",
    """CREATE TRIGGER queue_job_removed AFTER DELETE ON queue_jobs BEGIN
      UPDATE queue_states SET jobs = jobs - 1
        WHERE queue = OLD.queue AND state = (SELECT state FROM jobs WHERE queue = OLD.queue AND id = OLD.job_id);
      DELETE FROM waiting WHERE queue = OLD.queue AND seq = OLD.seq;
    END""",
    """CREATE TRIGGER job_state_changed AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
      UPDATE queue_states SET jobs = jobs - 1 WHERE queue = NEW.queue AND state = OLD.state
        AND EXISTS (SELECT 1 FROM queue_jobs WHERE queue = NEW.queue AND job_id = NEW.id);
      INSERT INTO queue_states SELECT queue, NEW.state, 1 FROM queue_jobs WHERE queue = NEW.queue AND job_id = NEW.id
        ON CONFLICT (queue, state) DO UPDATE SET jobs = jobs + 1;
      DELETE FROM waiting WHERE queue = NEW.queue AND job_id = NEW.id;
      INSERT INTO waiting SELECT queue, seq, job_id, NEW.gpus FROM queue_jobs
        WHERE queue = NEW.queue AND job_id = NEW.id AND NEW.state = 1;
    END""",
    """CREATE TRIGGER job_removed AFTER DELETE ON jobs BEGIN
      UPDATE queue_states SET jobs = jobs - 1 WHERE queue = OLD.queue AND state = OLD.state
        AND EXISTS (SELECT 1 FROM queue_jobs WHERE queue = OLD.queue AND job_id = OLD.id);
      DELETE FROM waiting WHERE queue = OLD.queue AND job_id = OLD.id;
    END""",
]
ROW_COLUMNS = (
    "id, state, queue, attempt, worker_id, create_time, update_time, lease_expires, finish_reason, definition,"
    " result, gpus, history, session"
)
"""Every column of a run's row (SQLite's rebuilds copy them)."""
_SQLITE_REBUILD = [
    *(f"DROP TRIGGER {name}" for name in ("queue_job_added", "queue_job_removed", "job_state_changed", "job_removed")),
    """CREATE TABLE runs (
      id TEXT NOT NULL, state INTEGER NOT NULL, queue TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
      worker_id TEXT NOT NULL DEFAULT '', create_time REAL NOT NULL, update_time REAL NOT NULL, lease_expires REAL,
      finish_reason INTEGER NOT NULL DEFAULT 0, definition BLOB NOT NULL, result BLOB,
      gpus INTEGER NOT NULL DEFAULT 0, history BLOB NOT NULL DEFAULT x'', session TEXT NOT NULL DEFAULT '',
      PRIMARY KEY (queue, id)
    )""",
    f"INSERT INTO runs ({ROW_COLUMNS}) SELECT {ROW_COLUMNS} FROM jobs",
    """CREATE TABLE run_logs (
      queue TEXT NOT NULL, job_id TEXT NOT NULL, attempt INTEGER NOT NULL, kind INTEGER NOT NULL,
      start INTEGER NOT NULL, count INTEGER NOT NULL, data BLOB NOT NULL, stdout_chars INTEGER NOT NULL DEFAULT 0,
      stderr_chars INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (queue, job_id, attempt, kind, start)
    )""",
    "INSERT INTO run_logs SELECT j.queue, l.job_id, l.attempt, l.kind, l.start, l.count, l.data, l.stdout_chars,"
    " l.stderr_chars FROM logs l JOIN jobs j ON j.id = l.job_id",
    "DROP TABLE logs",
    "ALTER TABLE run_logs RENAME TO logs",
    "ALTER TABLE webhooks ADD COLUMN queue TEXT NOT NULL DEFAULT ''",
    "UPDATE webhooks SET queue = COALESCE((SELECT queue FROM jobs WHERE id = webhooks.job_id), '')",
    "DROP TABLE jobs",
    "ALTER TABLE runs RENAME TO jobs",
    "CREATE INDEX jobs_running_lease ON jobs (lease_expires) WHERE state = 2",
    "CREATE INDEX jobs_worker ON jobs (worker_id) WHERE state = 2",
    "CREATE INDEX jobs_id ON jobs (id)",
    *_SQLITE_TRIGGERS,
]
_SQLITE_RECOUNT = [
    "DELETE FROM queue_states",
    "INSERT INTO queue_states SELECT q.queue, j.state, COUNT(*) FROM queue_jobs q"
    " JOIN jobs j ON j.queue = q.queue AND j.id = q.job_id GROUP BY q.queue, j.state",
    "DELETE FROM waiting",
    "INSERT INTO waiting SELECT q.queue, q.seq, q.job_id, j.gpus FROM queue_jobs q"
    " JOIN jobs j ON j.queue = q.queue AND j.id = q.job_id WHERE j.state = 1",
]


def split_sqlite(db: sqlite3.Connection) -> None:
    """SQLite: rebuild jobs and logs keyed by run (a primary key cannot change in place), then the
    triggers and the counts they keep."""
    joined = _new_runs(db.execute(_JOINED).fetchall())
    for step in _SQLITE_REBUILD:
        db.execute(step)
    db.executemany(_NEW_RUN.format(marks=", ".join("?" * 8)), joined)
    for step in _SQLITE_RECOUNT:
        db.execute(step)


_POSTGRES_STEPS = f"""
ALTER TABLE logs ADD COLUMN queue TEXT NOT NULL DEFAULT '';
UPDATE logs SET queue = j.queue FROM jobs j WHERE j.id = logs.job_id;
ALTER TABLE logs DROP CONSTRAINT logs_pkey, ADD PRIMARY KEY (queue, job_id, attempt, kind, start);
ALTER TABLE webhooks ADD COLUMN queue TEXT NOT NULL DEFAULT '';
UPDATE webhooks SET queue = j.queue FROM jobs j WHERE j.id = webhooks.job_id;
ALTER TABLE jobs DROP CONSTRAINT jobs_pkey, ADD PRIMARY KEY (queue, id);
CREATE INDEX jobs_id ON jobs (id);
CREATE OR REPLACE FUNCTION jobwire_queue_job_added() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  INSERT INTO waiting SELECT NEW.queue, NEW.seq, id, gpus FROM jobs
    WHERE queue = NEW.queue AND id = NEW.job_id AND state = {QUEUED};
  RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION jobwire_job_state_changed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  DELETE FROM waiting WHERE queue = OLD.queue AND job_id = OLD.id;
  IF TG_OP = 'UPDATE' AND NEW.state = {QUEUED} THEN
    INSERT INTO waiting SELECT queue, seq, job_id, NEW.gpus FROM queue_jobs WHERE queue = NEW.queue AND job_id = NEW.id;
  END IF;
  RETURN NULL;
END $$;
"""
_POSTGRES_WAITING = f"""
DELETE FROM waiting;
INSERT INTO waiting SELECT q.queue, q.seq, q.job_id, j.gpus FROM queue_jobs q
  JOIN jobs j ON j.queue = q.queue AND j.id = q.job_id WHERE j.state = {QUEUED};
"""


async def split_postgres(connection: Any) -> None:
    """PostgreSQL: the same steps; its keys, trigger functions and `waiting` rows change in place."""
    joined = _new_runs(list(await connection.fetch(_JOINED)))
    await connection.execute(_POSTGRES_STEPS)
    marks = ", ".join(f"${number}" for number in range(1, 9))
    await connection.executemany(_NEW_RUN.format(marks=marks), joined)
    await connection.execute(_POSTGRES_WAITING)
