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
import logging
import operator
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from jobwire.server.store import credentials, records, runs
from jobwire.server.store.base import Holder
from jobwire.server.store.database import Database, sqlite_sql
from jobwire.server.store.records import SqlStore
from jobwire.server.store.rows import job_blob_keys, worker_columns
from jobwire.server.store.transitions import QUEUED
from jobwire.v1 import jobs_pb2

log = logging.getLogger(__name__)
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


_RUNS_WITH_PLACES = [
    # `seq` last: SQLite 3.40 plans a correlated subquery of a RETURNING clause (`_NAMESPACES`) as a
    # scan when the table's first column is its INTEGER PRIMARY KEY (measured: 150 µs a claim).
    """CREATE TABLE runs (
      id TEXT NOT NULL, state INTEGER NOT NULL, queue TEXT NOT NULL,
      attempt INTEGER NOT NULL DEFAULT 0, worker_id TEXT NOT NULL DEFAULT '', create_time REAL NOT NULL,
      update_time REAL NOT NULL, lease_expires REAL, finish_reason INTEGER NOT NULL DEFAULT 0,
      definition BLOB NOT NULL, result BLOB, gpus INTEGER NOT NULL DEFAULT 0, history BLOB NOT NULL DEFAULT x'',
      session TEXT NOT NULL DEFAULT '', seq INTEGER PRIMARY KEY AUTOINCREMENT, UNIQUE (queue, id)
    )""",
    f"INSERT INTO runs (seq, {runs.ROW_COLUMNS})"
    f" SELECT q.seq, {', '.join(f'j.{column}' for column in runs.ROW_COLUMNS.split(', '))}"
    " FROM jobs j JOIN queue_jobs q ON q.queue = j.queue AND q.job_id = j.id ORDER BY q.seq",
    # a place past every place given before, even those of runs since expired
    "UPDATE sqlite_sequence"
    " SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'queue_jobs'), 0)) WHERE name = 'runs'",
    # none, unless a run lost its place
    f"INSERT INTO runs ({runs.ROW_COLUMNS}) SELECT {runs.ROW_COLUMNS} FROM jobs j"
    " WHERE NOT EXISTS (SELECT 1 FROM queue_jobs q WHERE q.queue = j.queue AND q.job_id = j.id) ORDER BY create_time",
    "DROP TABLE queue_jobs",  # and its indexes, one on hashed job ids alone that no statement read
    "DELETE FROM sqlite_sequence WHERE name = 'queue_jobs'",
    # A job leaves `waiting` by its key (queue, seq), not through an index on its hashed id (a write on a
    # random page for every submission and every claim).
    "DROP INDEX waiting_job",
    "DROP TABLE jobs",
    "ALTER TABLE runs RENAME TO jobs",
    "CREATE INDEX jobs_running_lease ON jobs (lease_expires) WHERE state = 2",
    "CREATE INDEX jobs_worker ON jobs (worker_id) WHERE state = 2",
    "CREATE INDEX jobs_id ON jobs (id)",
    *records.LISTING_INDEXES.split(";"),
    "CREATE VIEW queue_jobs AS SELECT seq, queue, id AS job_id FROM jobs",
    "CREATE TRIGGER queue_jobs_deleted INSTEAD OF DELETE ON queue_jobs BEGIN SELECT 1; END",
    """CREATE TRIGGER job_added AFTER INSERT ON jobs BEGIN
      INSERT INTO queue_states VALUES (NEW.queue, NEW.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET jobs = jobs + 1;
      INSERT INTO queue_sizes VALUES (NEW.queue, length(NEW.definition))
        ON CONFLICT (queue) DO UPDATE SET bytes = bytes + excluded.bytes;
      INSERT INTO waiting SELECT NEW.queue, NEW.seq, NEW.id, NEW.gpus WHERE NEW.state = 1;
    END""",
    """CREATE TRIGGER job_state_changed AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
      UPDATE queue_states SET jobs = jobs - 1 WHERE queue = NEW.queue AND state = OLD.state;
      INSERT INTO queue_states VALUES (NEW.queue, NEW.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET jobs = jobs + 1;
    END""",
    """CREATE TRIGGER job_left_queue AFTER UPDATE OF state ON jobs WHEN OLD.state = 1 AND NEW.state != 1 BEGIN
      DELETE FROM waiting WHERE queue = NEW.queue AND seq = NEW.seq;
    END""",
    """CREATE TRIGGER job_queued_again AFTER UPDATE OF state ON jobs WHEN NEW.state = 1 AND OLD.state != 1 BEGIN
      INSERT INTO waiting VALUES (NEW.queue, NEW.seq, NEW.id, NEW.gpus);
    END""",
    """CREATE TRIGGER job_removed AFTER DELETE ON jobs BEGIN
      UPDATE queue_states SET jobs = jobs - 1 WHERE queue = OLD.queue AND state = OLD.state;
      UPDATE queue_sizes SET bytes = bytes - length(OLD.definition) WHERE queue = OLD.queue;
      DELETE FROM waiting WHERE queue = OLD.queue AND seq = OLD.seq;
    END""",
]


def _runs_with_places(db: sqlite3.Connection) -> None:
    """Migration 14: a run's place in its queue is its row's own key (`seq`) instead of a row of
    `queue_jobs` beside it, which every submission wrote with two indexes (one on hashed ids, a random
    page each) and every transition's triggers looked up. `queue_jobs` stays as a view of the runs, so
    the statements both stores share read it as before; the triggers keep `queue_states`, `queue_sizes`
    and `waiting` from the run's row alone, and run only the statements a change needs (a claim leaves
    the queue, a re-queue joins it, a finish touches neither). The runs are copied with their places
    (`waiting` keeps pointing at them) and the sequence goes on past every place given before; the old
    triggers go with the tables they were on."""
    for step in _RUNS_WITH_PLACES:
        db.execute(step)


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
    # 9: the worker session holding a running job, beside its worker (see transitions: fencing).
    "ALTER TABLE jobs ADD COLUMN session TEXT NOT NULL DEFAULT ''",
    # 10: digests of queues' worker credentials and of workers' secrets (see credentials).
    credentials.SCHEMA.format(time="REAL"),
    # 11: a job's row is its run in one queue, keyed by (queue, id), as are its logs and webhooks
    # (see runs: results count only in the queue where they ran).
    runs.split_sqlite,
    # 12: a queue's listing reads its running runs and its finished ones by time from indexes.
    records.LISTING_INDEXES,
    # 13: each queue's bytes of job definitions (inline inputs included), kept by triggers, for the
    # server's --max-queue-bytes.
    """
    CREATE TABLE queue_sizes (queue TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
    CREATE TRIGGER job_sized AFTER INSERT ON jobs BEGIN
      INSERT INTO queue_sizes VALUES (NEW.queue, length(NEW.definition))
        ON CONFLICT (queue) DO UPDATE SET bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER job_unsized AFTER DELETE ON jobs BEGIN
      UPDATE queue_sizes SET bytes = bytes - length(OLD.definition) WHERE queue = OLD.queue;
    END;
    INSERT INTO queue_sizes SELECT queue, SUM(length(definition)) FROM jobs GROUP BY queue
    """,
    # 14: a run's place in its queue is its own row's key (see `_runs_with_places`).
    _runs_with_places,
]
"""Applied in order after SCHEMA, each in a transaction of its own (SQL, or a function given the
connection); `PRAGMA user_version` counts those applied."""


CHECKPOINT_SECONDS = 1.0
GROUP_SECONDS = 0.002
"""How long a group commit may wait for more operations while every loop turn brings new ones."""


class SqliteDatabase:
    """The `Database` of a SQLite connection: statements run at once, on the loop's thread."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def one(self, sql: str, *args: Any) -> Any:
        return self.db.execute(sqlite_sql(sql), args).fetchone()

    async def all(self, sql: str, *args: Any) -> Sequence[Any]:
        return self.db.execute(sqlite_sql(sql), args).fetchall()

    async def run(self, sql: str, *args: Any) -> None:
        self.db.execute(sqlite_sql(sql), args)


class SqliteStore(SqlStore, credentials.CredentialRecords):
    """StateStore on one SQLite file; see the module's docstring for how it stays off the loop's way."""

    QUEUE_ENTRY = ""  # a run's row is its place in the queue (migration 16)
    QUEUE_HELD = (  # the per-queue state counters instead of PostgreSQL's queue_waiting
        f"SELECT COALESCE((SELECT jobs FROM queue_states WHERE queue = ? AND state = {QUEUED}), 0),"
        " COALESCE((SELECT bytes FROM queue_sizes WHERE queue = ?), 0)"
    )
    """As `Lifecycle.QUEUE_HELD`; read in the submission's own savepoint by the one writer, after
    every submission before it and before any after it (no operation's statements suspend): a queue's
    limits hold exactly however many submissions race for its last places."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db, self._path, self._statements = db, path, SqliteDatabase(db)
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
        try:
            await asyncio.to_thread(self._checkpoint)
        except (sqlite3.Error, OSError) as error:  # the WAL keeps what the file lacks; the next open reads it
            log.warning("job store: the last WAL checkpoint failed (%s)", error)
        self._db.close()

    async def _checkpoint_forever(self) -> None:
        """Copy the WAL into the database file every second there were writes, off the loop. A
        checkpoint that fails (a full disk) is logged once and tried again the next second."""
        written, failing = self._db.total_changes, False
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            if self._db.total_changes != written or failing:
                written = self._db.total_changes
                try:
                    await asyncio.to_thread(self._checkpoint)
                except (sqlite3.Error, OSError) as error:
                    if not failing:
                        log.warning("job store: WAL checkpoint failed (%s); retrying every second", error)
                    failing = True
                    continue
                if failing:
                    log.warning("job store: WAL checkpoints work again")
                failing = False

    def _checkpoint(self) -> None:
        with contextlib.closing(_connect(self._path)) as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[Database]:
        yield self._statements

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Database]:
        """One store operation: a savepoint inside a transaction shared by the operations that arrive
        together (group commit, see `_commit_when_quiet`); the operation returns after that commit, so
        nothing is acknowledged before it is stored. The body must not suspend (its `Database` calls
        never do).

        A failure of the database (a full disk, an I/O error) fails the operations of the group it
        hits, never the process: if SQLite rolled the whole transaction back (as it may on SQLITE_FULL
        or SQLITE_IOERR), every operation that shared it fails at once, and the next operation starts
        a new group."""
        if self._commit is None:
            loop = asyncio.get_running_loop()
            self._db.execute("BEGIN IMMEDIATE")
            self._commit, self._operations = loop.create_future(), 0
            loop.call_soon(self._commit_when_quiet, self._commit, 0, loop.time() + GROUP_SECONDS)
        commit = self._commit
        self._operations += 1
        try:
            self._db.execute("SAVEPOINT operation")
        except sqlite3.Error as error:
            self._fail_group(commit, error)
            raise
        try:
            yield self._statements
        except BaseException as error:
            self._undo(commit, error)
            raise
        try:
            self._db.execute("RELEASE operation")
        except sqlite3.Error as error:
            self._fail_group(commit, error)
            raise
        await asyncio.shield(commit)

    def _undo(self, commit: asyncio.Future[None], error: BaseException) -> None:
        """Roll back the failed operation's savepoint; if SQLite rolled back the whole transaction
        (or the savepoint cannot be), fail the group."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK TO operation")
                self._db.execute("RELEASE operation")
                return
            except sqlite3.Error as undo_error:
                error = undo_error
        if not isinstance(error, sqlite3.Error):
            error = sqlite3.OperationalError("the transaction was rolled back")
        self._fail_group(commit, error)

    def _fail_group(self, commit: asyncio.Future[None], error: BaseException) -> None:
        """End the open group without storing it: roll back, and fail every operation waiting on it."""
        if self._commit is commit:
            self._commit = None
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.rollback()
        if not commit.done():
            commit.set_exception(error)
            commit.exception()  # retrieved: a group nobody awaits any more must not warn

    def _commit_when_quiet(self, commit: asyncio.Future[None], seen: int, deadline: float) -> None:
        """Commit once a loop turn began no new operation (a lone request waits one turn), or at
        `deadline`: under load one commit, and one write of the pages it touched, serves many."""
        if self._commit is not commit:
            return  # the group failed already (see `_fail_group`)
        loop = asyncio.get_running_loop()
        if self._operations != seen and loop.time() < deadline:
            loop.call_soon(self._commit_when_quiet, commit, self._operations, deadline)
            return
        self._commit = None
        try:
            self._db.execute("COMMIT")
        except Exception as error:  # every operation in it fails; the store takes the next ones
            self._fail_group(commit, error)
        else:
            commit.set_result(None)

    async def claim(
        self, *, queue: str, holder: Holder, now: float, lease: float, gpus: int = 0, count: int = 1
    ) -> list[jobs_pb2.Job]:
        waiting = "SELECT 1 FROM waiting WHERE queue = ? AND gpus <= ? LIMIT 1"
        if self._db.execute(waiting, (queue, gpus)).fetchone() is None:
            return []  # as most claims are when several workers wake for one job: no commit to wait for
        return await super().claim(queue=queue, holder=holder, now=now, lease=lease, gpus=gpus, count=count)

    async def blob_references(self) -> set[str]:
        return await asyncio.to_thread(self._scan_blob_references)

    def _scan_blob_references(self) -> set[str]:
        keys: set[str] = set()
        with contextlib.closing(_connect(self._path)) as db:
            for definition, result in db.execute("SELECT definition, result FROM jobs"):
                keys |= job_blob_keys(definition, result)
        return keys

    async def queue_counts(self, queue: str) -> dict[int, int]:
        rows = self._db.execute("SELECT state, jobs FROM queue_states WHERE queue = ? AND jobs > 0", (queue,))
        return {state: count for state, count in rows}


def _connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that waits out a checkpoint's brief locks."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: commits survive a crash of the process; no fsync each
    db.execute("PRAGMA busy_timeout=5000")
    return db
