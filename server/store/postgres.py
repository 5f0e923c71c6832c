"""The PostgreSQL StateStore (asyncpg): shared by every server replica, claims with SKIP LOCKED.

Each call is one transaction on a pooled connection, often a single statement. Rows a call changes
are locked first (`FOR UPDATE`), or written by a compare-and-set under the row's lock, so two
replicas acting on one job serialise on it; claims, lease reaping, retention and webhook delivery
skip rows another replica holds (`SKIP LOCKED`), so two replicas never assign one job twice or
deliver one webhook twice at once. The schema is `postgres_schema`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from jobwire.server.errors import JOB_STORE, ServerError, dependency_error, raise_dependency_error
from jobwire.server.store import credentials, transitions
from jobwire.server.store.base import FINISHED_HOOK, NO_LIMITS, Attempt, Holder, LogTotals, Room, Submission
from jobwire.server.store.database import ARM_FINISHED, RUN_COLUMNS, Database, assignments, postgres_sql, run_of
from jobwire.server.store.postgres_batches import Claims, Finish, LogEnds, Parameters, RunKey
from jobwire.server.store.postgres_schema import migrate
from jobwire.server.store.records import SqlStore
from jobwire.server.store.rows import (
    already_stored,
    job_blob_keys,
    job_message,
    with_details,
    within_limit,
)
from jobwire.server.store.transitions import HOLDING, Change, Holding
from jobwire.v1 import jobs_pb2

QUEUED, RUNNING, FINISHED = (
    jobs_pb2.JOB_STATE_QUEUED,
    jobs_pb2.JOB_STATE_RUNNING,
    jobs_pb2.JOB_STATE_FINISHED,
)

Connection = Any  # asyncpg.Connection or a pool's proxy of one


CONNECT_SECONDS = 5.0
"""How long opening a connection may take: while the database is unreachable, calls fail (UNAVAILABLE)
within this bound rather than hang. Pools keep no floor of open connections (`min_size=0`): they open
one when a call needs it, so an outage costs no background reconnect loop (whose every failed try
asyncpg logs with a traceback), and a connection broken by the outage is replaced on its next use."""


async def keep_session(connection: Connection) -> None:
    """A pool's `reset`: a connection goes back to its pool as it is (asyncpg still rolls back a
    transaction left open). The default reset runs `SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` on every release, one round trip more per store call, for session state
    that jobwire's pooled connections never make: no SET, no session advisory lock (migrations take
    a transaction's), no LISTEN (the bus listens on a connection of its own), cursors only inside
    transactions."""


_ROOM = """ known AS (
  SELECT FROM jobs WHERE queue = $5 AND id = ANY($1) LIMIT 1
), held AS (
  SELECT COALESCE((SELECT jobs FROM queue_waiting WHERE queue = $5), 0) AS jobs,
    COALESCE((SELECT bytes FROM queue_sizes WHERE queue = $5), 0) AS bytes
), refused AS (
  SELECT jobs, bytes FROM held WHERE ($8::bigint > 0 AND jobs + cardinality($1) > $8)
    OR ($9::bigint > 0 AND bytes + (SELECT SUM(octet_length(definition)) FROM input) > $9)
),"""
"""What `_SUBMIT_NEW` reads before it adds anything: whether the queue knows any of the jobs, its
counters (as `Lifecycle.QUEUE_HELD`), and those counters again when the jobs do not fit its room
(the same rule as `Room.refusal`, which turns them into the QueueFull raised)."""


def _submitting(only_if_all_new: bool) -> str:
    if not only_if_all_new:
        adding, answer = "", ""
    else:  # nothing if the queue knows a job, or if the jobs do not fit its room ($8 jobs, $9 bytes; 0: no limit)
        adding = " WHERE NOT EXISTS (SELECT FROM known) AND NOT EXISTS (SELECT FROM refused)"
        answer = " UNION ALL SELECT NULL, jobs, bytes FROM refused WHERE NOT EXISTS (SELECT FROM known)"
    return f"""
WITH input AS (
  SELECT * FROM unnest($1::text[], $2::bytea[], $3::int[], $4::text[]) WITH ORDINALITY
    AS i (job_id, definition, gpus, namespace, n)
),{_ROOM if only_if_all_new else ""} added AS (
  INSERT INTO jobs (id, state, queue, create_time, update_time, definition, gpus, history)
    SELECT job_id, {QUEUED}, $5, $6, $6, definition, gpus, $7 FROM input{adding} ORDER BY n
    ON CONFLICT (queue, id) DO NOTHING RETURNING id
), listed AS (
  INSERT INTO queue_jobs (queue, job_id) SELECT $5, job_id FROM input WHERE job_id IN (SELECT id FROM added)
    ORDER BY n ON CONFLICT DO NOTHING
), named AS (
  INSERT INTO namespaces SELECT $5, job_id, namespace FROM input WHERE job_id IN (SELECT id FROM added)
    ON CONFLICT DO NOTHING
)
SELECT id, NULL::bigint, NULL::bigint FROM added{answer}"""


_SUBMIT = _submitting(False)
"""A submission's new jobs in one statement (the row, its place in the queue, its namespace: the
triggers of queue_jobs, run after the statement, see the rows it added); answers their ids. Its jobs
already known to the queue are not touched: `Lifecycle._submit` takes them one by one."""
_SUBMIT_NEW = _submitting(True)
"""`_SUBMIT`, adding nothing if the queue knows any of the jobs or they do not fit its room: run on
its own (its own transaction), it is a whole submission of jobs all new, in one round trip. Answers
the ids added; or, for jobs all new that do not fit, one row (NULL, queued jobs, bytes) of what the
queue held; or nothing for a submission naming a known job (the caller takes the slow path)."""
_ANY_WAITING = "SELECT 1 FROM waiting WHERE queue = $1 AND gpus <= $2 LIMIT 1"


def _waiting(lock: str) -> str:
    return (
        "SELECT j.id, j.attempt FROM"
        " (SELECT queue, seq, job_id FROM waiting WHERE queue = $1 AND gpus <= $3 ORDER BY seq OFFSET 0) w,"
        f" LATERAL (SELECT id, attempt FROM jobs WHERE queue = w.queue AND id = w.job_id AND state = {QUEUED}"
        f" {lock}) j ORDER BY w.seq LIMIT $2"
    )


_WAITING = _waiting("FOR UPDATE SKIP LOCKED")
"""(id, attempt) of up to $2 of the queue's oldest waiting jobs needing at most $3 GPU devices,
locked. Written so that its plan is the one that costs what it takes whatever the planner believes
of the tables' sizes: the queue's `waiting` rows in order (its primary key), each one's job row
looked up and locked, until $2 are (the subqueries are not flattened: one has OFFSET 0, the other
locks). Written as a join, PostgreSQL planned it, on a fresh database before statistics, as a loop
over every queued job that searched `waiting` for each: 100 ms a claim at a thousand queued jobs."""


CLAIM_TRIES = 3
"""Reads and compare-and-sets a claim tries before it takes the locked path (`PostgresStore.claim`)."""


def _written_if(parameters: Parameters, sets: str, run: str, returning: str) -> str:
    """`WITH u, locked, run`: the rows of `unnest` (`u`), and `run`, the update by `sets` of each run
    matching `run` (a condition on `jobs` and a row of `u`) that no other transaction holds, answering
    `returning`. The runs are looked up and locked one row of `u` at a time (LATERAL), skipping those
    another transaction holds: on a join of `jobs` and `u` PostgreSQL, knowing nothing of `u`'s size,
    planned a scan of every queued run of the queue (~2 ms a claim with 2,000 queued); and waiting for
    a lock while holding others could deadlock with a transaction locking runs in another order."""
    return (
        f"WITH u AS (SELECT * FROM {parameters.unnest()}),"
        " locked AS (SELECT l.queue, l.id FROM u,"
        f" LATERAL (SELECT queue, id FROM jobs WHERE {run} FOR UPDATE SKIP LOCKED) l),"
        f" run AS (UPDATE jobs SET {sets} FROM u WHERE {run} AND (jobs.queue, jobs.id) IN (SELECT * FROM locked)"
        f" RETURNING {returning})"
    )


_OLDEST = _waiting("LIMIT 1")
"""`_WAITING` read without locking (LIMIT 1 keeps the row's subquery from being flattened, as the lock does)."""
_LOG_END = (
    "SELECT j.state, j.attempt, j.worker_id, j.session, l.chunks, l.stdout_chars, l.stderr_chars FROM jobs j"
    " LEFT JOIN LATERAL (SELECT start + count AS chunks, stdout_chars, stderr_chars FROM logs"
    " WHERE queue = j.queue AND job_id = j.id AND attempt = ? AND kind = ? ORDER BY start DESC LIMIT 1) l ON TRUE"
    " WHERE j.queue = ? AND j.id = ?"
)
"""Who holds a run, and the totals of one of its logs (`LogTotals`; NULLs for none yet), in one read."""
_LOG_APPEND = (
    "INSERT INTO logs (queue, job_id, attempt, kind, start, count, data, stdout_chars, stderr_chars)"
    " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT FROM jobs WHERE queue = ? AND id = ?"
    f" AND {' AND '.join(f'{column} = ?' for column in HOLDING.split(', '))})"
    " ON CONFLICT DO NOTHING RETURNING start"
)
"""A batch of a log, stored only if the run is still held as read and no batch took its place."""


class PostgresDatabase:
    """The `Database` of an asyncpg connection (or a pool: one statement each)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def one(self, sql: str, *args: Any) -> Any:
        return await self.connection.fetchrow(postgres_sql(sql), *args)

    async def all(self, sql: str, *args: Any) -> Sequence[Any]:
        rows: Sequence[Any] = await self.connection.fetch(postgres_sql(sql), *args)
        return rows

    async def run(self, sql: str, *args: Any) -> None:
        await self.connection.execute(postgres_sql(sql), *args)


class PostgresStore(SqlStore, credentials.CredentialRecords):
    """StateStore on a PostgreSQL database, through a pool of asyncpg connections."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._log_ends = LogEnds()
        self._claims = Claims()
        self._finishes: list[Finish] = []
        self._finishing = asyncio.Lock()

    @classmethod
    async def open(cls, dsn: str, *, max_size: int = 10) -> PostgresStore:
        """Connect a pool to `dsn` (postgresql://…) and bring the schema up to date."""
        pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=max_size, timeout=CONNECT_SECONDS, reset=keep_session
        )
        try:
            async with pool.acquire() as connection:
                await migrate(connection)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    # Every operation below reports the database down, restarting or out of disk as `Unavailable` or
    # `DiskFull` (see errors.dependency_error), not as asyncpg's or the socket's own errors, and never
    # gives back to the pool a connection that failed under it: after a restart of PostgreSQL an idle
    # pooled connection can be left in a broken protocol state ("cannot switch to state 12; another
    # operation is in progress"), which its next user would meet again.

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Database]:
        async with self._connection() as connection, connection.transaction():
            yield PostgresDatabase(connection)

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[Database]:
        async with self._connection() as connection:
            yield PostgresDatabase(connection)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        try:
            async with self.pool.acquire() as connection:
                try:
                    yield connection
                except Exception as error:
                    if not isinstance(error, ServerError) and dependency_error(error) is not None:
                        # The pool opens a new one in its place (one it already let go of is gone).
                        with contextlib.suppress(asyncpg.InterfaceError):
                            connection.terminate()
                    raise
        except Exception as error:
            raise_dependency_error(error, JOB_STORE)
            raise

    # A job's life in fewer round trips than the shared statements (`lifecycle`) take one by one:
    # the same rows, locks and `transitions` decisions, written by one statement where those
    # write several.

    async def submit(
        self, *, queue: str, jobs: Sequence[Submission], now: float, room: Room = NO_LIMITS
    ) -> list[tuple[jobs_pb2.Job, bool]]:
        """As `Lifecycle.submit`, in one round trip when the jobs are all new (the statement is its
        own transaction, room checked in it). One naming a job the queue knows takes one transaction,
        as on SQLite; only when another call submits one of the same jobs between that check and the
        insert are this call's jobs stored by two transactions (it answers once both committed; each
        job's answer is as if the calls ran one after the other).

        The room is checked against the queue's counters as committed when the statement (or the
        transaction's first read) runs: READ COMMITTED, so submissions to one queue committing at the
        same moment, on one replica or several, do not see each other's jobs and may pass a limit
        together by at most what they add at once (as before the check moved into the store)."""
        ids = [submission.job_id for submission in jobs]
        if len(set(ids)) != len(ids):  # the same job twice in one call: one at a time, as SQLite does
            return await super().submit(queue=queue, jobs=jobs, now=now, room=room)
        change = transitions.queued(now)
        definitions = [submission.definition.SerializeToString() for submission in jobs]
        values = (
            ids,
            definitions,
            [submission.definition.requirements.gpus for submission in jobs],
            [submission.namespace for submission in jobs],
            *(queue, now, change.entry),
        )
        async with self._reading() as db:  # jobs all new: the statement is the whole submission
            rows = await db.all(_SUBMIT_NEW, *values, room.max_jobs, room.max_bytes)
        if rows and rows[0][0] is None:  # all new, and no room for them
            refusal = room.refusal(rows[0][1], rows[0][2], len(jobs), sum(map(len, definitions)))
            assert refusal is not None
            raise refusal
        new = {row[0] for row in rows}
        if len(new) < len(jobs):  # known jobs (or a concurrent submission of one): all in one transaction
            async with self._transaction() as db:
                held = await self._queue_held(db, queue, room)
                new |= {row[0] for row in await db.all(_SUBMIT, *values)}
                stored = [await self._answer(db, submission, new, queue, now) for submission in jobs]
                self._fits(room, held, jobs, stored)
        else:
            stored = [await self._answer(None, submission, new, queue, now) for submission in jobs]
        return [(job, queued) for job, queued, _ in stored]

    async def _answer(
        self, db: Database | None, submission: Submission, new: set[str], queue: str, now: float
    ) -> tuple[jobs_pb2.Job, bool, bool]:
        """A submitted job's run, whether the submission queued it and whether it created the run: a new
        one as written, a known one as `Lifecycle._submit` finds (and maybe queues) it."""
        if submission.job_id in new:
            fields = (submission.job_id, QUEUED, queue, 0, "", now, now, 0)
            return job_message(fields, namespaces=[submission.namespace]), True, True
        assert db is not None
        return await self._submit(db, submission, queue, now)

    async def claim(
        self, *, queue: str, holder: Holder, now: float, lease: float, gpus: int = 0, count: int = 1
    ) -> list[jobs_pb2.Job]:
        """As `Lifecycle.claim`. A worker without free GPU devices (most) takes its jobs with two
        statements and no transaction around them: a read of the queue's oldest waiting runs (when
        nothing waits, as most claims find when several workers wake for one job, that read is all),
        then one compare-and-set assigning each run still queued at the attempt read, that no other
        transaction holds. The read passes over the runs this store's other claims of the queue are
        taking (`Claims`: workers woken together would otherwise all read the same oldest runs). Runs
        that another replica's claim took between the two, or that a transaction held, are made up
        for by reading again past them; after `CLAIM_TRIES` reads, by the locked path
        (`_claim_locked`), which skips what others hold."""
        if gpus:
            claimed = await self._claim_locked(queue, holder, now, lease, gpus, count)
        else:
            claimed = await self._claim_compared(queue, holder, now, lease, count)
        for job in claimed:  # a new attempt: its logs are empty
            self._log_ends.claimed((queue, job.id, job.attempt), holder.session)
        return claimed

    async def _claim_compared(
        self, queue: str, holder: Holder, now: float, lease: float, count: int
    ) -> list[jobs_pb2.Job]:
        """`claim` by reads and compare-and-sets (see there)."""
        claimed: list[jobs_pb2.Job] = []
        lost: set[str] = set()  # runs read as waiting that another claim took first
        for _ in range(CLAIM_TRIES):
            async with self._claims.reading(queue) as taking:  # past the runs this store's claims chose
                passed = taking.assigning | lost  # as the read begins: one committed meanwhile may still show
                async with self._reading() as db:
                    read = await db.all(_OLDEST, queue, count - len(claimed) + len(passed), 0)
                rows = [row for row in read if row[0] not in passed][: count - len(claimed)]
                chosen = {job_id for job_id, _ in rows}
                taking.assigning |= chosen
            if not rows:
                return claimed
            try:
                assigned = await self._assign_if_waiting(queue, rows, holder, now, lease)
            finally:
                self._claims.assigned(queue, chosen)
            claimed += assigned
            if len(assigned) == len(rows):
                return claimed
            lost |= chosen - {job.id for job in assigned}
        # taken from under it again and again (claims of other replicas): the locked path
        return claimed + await self._claim_locked(queue, holder, now, lease, 0, count - len(claimed))

    async def _assign_if_waiting(
        self, queue: str, rows: Sequence[Any], holder: Holder, now: float, lease: float
    ) -> list[jobs_pb2.Job]:
        """Each (id, attempt) of `rows` assigned to `holder` if its run is still queued at that attempt
        and no other transaction holds it (compared and set under the row's lock, which is skipped,
        not waited for: `_written_if`), in one statement; the runs assigned, in `rows`' order."""
        parameters = Parameters()
        sets = parameters.sets([transitions.assigned(attempt, holder, now, lease) for _, attempt in rows])
        job_id = parameters.array("u_id", [job_id for job_id, _ in rows])
        was = parameters.array("u_was", [attempt for _, attempt in rows])
        run = f"jobs.queue = {parameters.add(queue)} AND jobs.id = {job_id}"
        run += f" AND jobs.state = {QUEUED} AND jobs.attempt = {was}"
        sql = _written_if(parameters, sets, run, f"{RUN_COLUMNS}, definition, u.u_n") + " SELECT * FROM run"
        async with self._reading() as db:
            written = sorted(await db.all(sql, *parameters.values), key=lambda row: row[-1])
        return [with_details(job, definition, None, b"") for job, (definition, _) in map(run_of, written)]

    async def _claim_locked(
        self, queue: str, holder: Holder, now: float, lease: float, gpus: int, count: int
    ) -> list[jobs_pb2.Job]:
        """As `Lifecycle.claim` (with `_WAITING`); nothing waiting costs one read outside any transaction,
        and a worker without free GPU devices takes its jobs with one read and one write however many."""
        async with self._reading() as db:
            if await db.one(_ANY_WAITING, queue, gpus) is None:
                return []
        async with self._transaction() as db:
            if gpus:  # each job taken leaves fewer devices for the next: one at a time
                claimed: list[jobs_pb2.Job] = []
                while len(claimed) < count and (rows := await db.all(_WAITING, queue, 1, gpus)):
                    job_id, attempt = rows[0]
                    assigned = transitions.assigned(attempt, holder, now, lease)
                    claimed.append(await self._changed(db, queue, job_id, assigned, now))
                    gpus -= claimed[-1].definition.requirements.gpus
                return claimed
            rows = await db.all(_WAITING, queue, count, 0)
            if not rows:
                return []
            changes = [transitions.assigned(attempt, holder, now, lease) for _, attempt in rows]
            written = await self._apply_all(db, queue, [job_id for job_id, _ in rows], changes)
        return [with_details(job, definition, None, b"") for job, (definition,) in map(run_of, written)]

    async def _apply_all(
        self, db: Database, queue: str, job_ids: Sequence[str], changes: Sequence[Change]
    ) -> list[Any]:
        """`_apply` of each change (none of them a finish, all setting the same columns) to its job's
        run, in one statement; answers the runs (`RUN_COLUMNS, definition`) in the order of `job_ids`."""
        parameters = Parameters()
        sets = parameters.sets(changes)
        ids = parameters.array("u_id", list(job_ids))
        sql = (
            f"UPDATE jobs SET {sets} FROM {parameters.unnest()} WHERE jobs.queue = {parameters.add(queue)}"
            f" AND jobs.id = {ids} RETURNING {RUN_COLUMNS}, definition"
        )
        rows = {row[0]: row for row in await db.all(sql, *parameters.values)}
        return [rows[job_id] for job_id in job_ids]

    async def _apply(
        self, db: Database, queue: str, job_id: str, change: Change, now: float, returning: str = ""
    ) -> Any:
        """As `SqlBase._apply`; a finish arms the run's `finished` webhooks in the same statement."""
        if not change.finishes:
            return await super()._apply(db, queue, job_id, change, now, returning)
        sets, assigned = assignments(change)
        update = f"WITH armed AS ({ARM_FINISHED}) UPDATE jobs SET {sets} WHERE queue = ? AND id = ?{returning}"
        values = (now, job_id, queue, FINISHED_HOOK, *assigned, queue, job_id)
        return await (db.one if returning else db.run)(update, *values)

    # A worker's start and finish of the attempt it holds, the usual case, are one statement (its own
    # transaction): `transitions` decides the change for the holding the worker's attempt and session
    # imply, and the statement writes it only if the run's holding is exactly that one (compared and
    # set under the row's lock). Otherwise (a stale attempt, a worker back after its lease ran out)
    # the shared path reads the holding, locked, and `transitions` decides on what it finds.

    async def start(self, attempt: Attempt, holder: Holder, now: float) -> jobs_pb2.Job | None:
        held = Holding(RUNNING, attempt.attempt, holder.worker_id, holder.session)
        if transitions.holds(held, attempt, holder):
            job = await self._changed_if(
                holder.queue, attempt.job_id, held, transitions.started(attempt, holder, now), now
            )
            if job is not None:
                return job
        return await super().start(attempt, holder, now)

    async def finish(
        self, attempt: Attempt, holder: Holder, result: jobs_pb2.JobResult, now: float, *, started: bool = False
    ) -> jobs_pb2.Job | None:
        """As `Lifecycle.finish`; finishes of several runs that arrive while one is being written are
        written together by the next statement (`_finish_together`)."""
        self._log_ends.forget((holder.queue, attempt.job_id, attempt.attempt))
        held = Holding(RUNNING, attempt.attempt, holder.worker_id, holder.session)
        if transitions.may_finish(held, attempt, holder, result):
            change = transitions.finished(attempt, holder, result, now, started=started)
            row = await self._finish_together(Finish(holder.queue, attempt.job_id, held, change, now))
            if row is not None:
                job, (definition, *_) = run_of(row)
                return with_details(job, definition, change.columns["result"], b"")
        return await super().finish(attempt, holder, result, now, started=started)

    # Finishes together: while one statement writes finishes, the finishes that arrive (other worker
    # sessions' messages, or other jobs' of one session: see sessions) wait for it, and the next
    # statement writes all of them. Nothing waits for company: a finish arriving alone is written at
    # once, by the one-run statement (`_changed_row_if`).

    async def _finish_together(self, finish: Finish) -> Any:
        """The run's row after `finish` is written (None: the run is not held as `finish.held`, nothing
        written), by a statement that may write other callers' finishes too; a failure of that
        statement (the database down: `Unavailable`) is raised to each of its callers."""
        self._finishes.append(finish)
        try:
            async with self._finishing:
                while not finish.done:
                    await self._write_finishes(self._next_finishes(), finish)
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._finishes.remove(finish)
            raise
        if finish.error is not None:
            raise finish.error
        return finish.row

    def _next_finishes(self) -> list[Finish]:
        """The finishes waiting, but one per run (a run's later finish waits for the next statement)."""
        batch: list[Finish] = []
        later: list[Finish] = []
        runs: set[tuple[str, str]] = set()
        for finish in self._finishes:
            run = (finish.queue, finish.job_id)
            (later if run in runs else batch).append(finish)
            runs.add(run)
        self._finishes = later
        return batch

    async def _write_finishes(self, batch: list[Finish], mine: Finish) -> None:
        """Write `batch` (with `mine`, the caller's own, in it), marking each done with its outcome."""
        try:
            if len(batch) == 1:
                (only,) = batch
                rows = {1: await self._changed_row_if(only.queue, only.job_id, only.held, only.change, only.now)}
            else:
                rows = await self._finished_all(batch)
        except asyncio.CancelledError:  # `mine`'s caller gave up: the others wait for the next statement
            self._finishes[:0] = [finish for finish in batch if finish is not mine]
            raise
        except Exception as error:
            for finish in batch:
                finish.done, finish.error = True, error
            return
        for n, finish in enumerate(batch, start=1):
            finish.done, finish.row = True, rows.get(n)

    async def _finished_all(self, batch: Sequence[Finish]) -> dict[int, Any]:
        """Each finish of `batch` (runs all different) written, in one statement, if its run is held as
        its `held` says (compared and set under the row's lock), arming the finished runs' webhooks as
        `ARM_FINISHED` does; answers the runs written (`RUN_COLUMNS, definition, …`) by their place in
        `batch` (from 1). The statement never waits for a lock: a run another transaction has locked
        is skipped (not written, so its finish takes the one-run path, which waits for it alone).
        Waiting while holding the other runs' locks could deadlock with a transaction that locks
        several runs in another order (a worker's renewal locks its runs in the order it names them)."""
        parameters = Parameters()
        sets = parameters.sets([finish.change for finish in batch])
        queue = parameters.column("u_queue", [finish.queue for finish in batch])
        job_id = parameters.array("u_id", [finish.job_id for finish in batch])
        holding = " AND ".join(
            f"jobs.{column} = {parameters.column(f'u_{column}', [finish.held[n] for finish in batch])}"
            for n, column in enumerate(HOLDING.split(", "))
        )
        now = parameters.array("u_now", [finish.now for finish in batch])
        run = f"jobs.queue = {queue} AND jobs.id = {job_id} AND {holding}"
        sql = (
            _written_if(parameters, sets, run, f"{RUN_COLUMNS}, definition, u.u_n, {now} AS u_now")
            + ", armed AS (UPDATE webhooks SET armed = TRUE, next_time = run.u_now FROM run"
            " WHERE webhooks.queue = run.queue AND webhooks.job_id = run.id"
            f" AND webhooks.event = {parameters.add(FINISHED_HOOK)} AND NOT webhooks.armed)"
            " SELECT * FROM run"
        )
        async with self._reading() as db:
            return {row[-2]: row for row in await db.all(sql, *parameters.values)}

    async def release(self, attempt: Attempt, holder: Holder, reason: str, now: float) -> jobs_pb2.Job | None:
        self._log_ends.forget((holder.queue, attempt.job_id, attempt.attempt))
        return await super().release(attempt, holder, reason, now)

    async def _requeue(
        self, db: Database, rows: Sequence[Any], now: float, why: Callable[[Holding, float], Change]
    ) -> list[tuple[jobs_pb2.Job, Attempt]]:
        lost: list[tuple[jobs_pb2.Job, Attempt]] = await super()._requeue(db, rows, now, why)
        for job, attempt in lost:
            self._log_ends.forget((job.queue, attempt.job_id, attempt.attempt))
        return lost

    async def append_logs(
        self,
        attempt: Attempt,
        holder: Holder,
        kind: jobs_pb2.LogKind.ValueType,
        chunks: Sequence[jobs_pb2.LogChunk],
        start: int,
        max_chars: int = 0,
    ) -> tuple[int, list[jobs_pb2.LogChunk]] | None:
        """As `SqlStore.append_logs`, in one statement where the store knows where the log ends
        (`LogEnds`), else two, with no transaction around them: one reads who holds the run and where
        the log ends; the batch is then stored only if the run is held as known and nothing was stored
        at that end meanwhile (the log's primary key). Anything else (not held, another append first)
        takes the read, then the locked path, which decides on what it finds."""
        run = (holder.queue, attempt.job_id, attempt.attempt)
        known = self._log_ends.known(run, holder.session, kind)
        if known is not None:
            held = Holding(RUNNING, attempt.attempt, holder.worker_id, holder.session)
            stored = await self._append_at(run, held, kind, chunks, start, max_chars, known)
            if stored is not None:
                return stored
            self._log_ends.forget(run)
        async with self._reading() as db:
            row = await db.one(_LOG_END, attempt.attempt, kind, holder.queue, attempt.job_id)
        if row is not None and transitions.holds(held := Holding(*row[:4]), attempt, holder):
            known = LogTotals() if row[4] is None else LogTotals(*row[4:])
            stored = await self._append_at(run, held, kind, chunks, start, max_chars, known)
            if stored is not None:
                return stored
        return await super().append_logs(attempt, holder, kind, chunks, start, max_chars)

    async def _append_at(
        self,
        run: RunKey,
        held: Holding,
        kind: jobs_pb2.LogKind.ValueType,
        chunks: Sequence[jobs_pb2.LogChunk],
        start: int,
        max_chars: int,
        stored: LogTotals,
    ) -> tuple[int, list[jobs_pb2.LogChunk]] | None:
        """The batch stored after `stored` (the log's totals, as read or known), if the run is held as
        `held` and no batch is stored there; None (nothing stored) if not."""
        kept = within_limit(stored.chars, chunks[already_stored(stored.chunks, start, len(chunks)) :], max_chars)
        if not kept:
            return stored.chunks, kept
        batch = jobs_pb2.LogBatch(kind=kind, chunks=kept)
        totals = stored.after(batch.chunks)
        try:
            async with self._reading() as db:
                written = await db.one(
                    _LOG_APPEND,
                    *(*run, kind, stored.chunks, len(batch.chunks)),
                    *(batch.SerializeToString(), totals.stdout_chars, totals.stderr_chars),
                    *(*run[:2], *held),
                )
        except BaseException:
            self._log_ends.forget(run)  # stored or not: unknown
            raise
        if written is None:
            return None
        self._log_ends.stored(run, held.session, kind, totals)
        return stored.chunks, kept

    async def _changed_if(
        self, queue: str, job_id: str, held: Holding, change: Change, now: float, result: bytes | None = None
    ) -> jobs_pb2.Job | None:
        """`_changed` in one statement, if the run is held as `held`; None (and no change) if not."""
        row = await self._changed_row_if(queue, job_id, held, change, now)
        if row is None:
            return None
        job, (definition,) = run_of(row)
        return with_details(job, definition, result, b"")

    async def _changed_row_if(self, queue: str, job_id: str, held: Holding, change: Change, now: float) -> Any:
        """The run's row (`RUN_COLUMNS, definition`) after `change`, written if it is held as `held`
        (a finish arms its webhooks in the same statement); None (and no change) if not."""
        sets, values = assignments(change)
        holding = " AND ".join(f"{column} = ?" for column in HOLDING.split(", "))
        sql = (
            f"WITH run AS (UPDATE jobs SET {sets} WHERE queue = ? AND id = ? AND {holding}"
            f" RETURNING {RUN_COLUMNS}, definition)"
        )
        values += [queue, job_id, *held]
        if change.finishes:
            sql += f", armed AS ({ARM_FINISHED} AND EXISTS (SELECT FROM run))"
            values += [now, job_id, queue, FINISHED_HOOK]
        async with self._reading() as db:
            return await db.one(sql + " SELECT * FROM run", *values)

    async def blob_references(self) -> set[str]:
        keys: set[str] = set()
        async with self._connection() as db, db.transaction():
            async for definition, result in db.cursor("SELECT definition, result FROM jobs", prefetch=500):
                keys |= job_blob_keys(definition, result)
        return keys

    async def queue_counts(self, queue: str) -> dict[int, int]:
        async with self._reading() as db:
            rows = await db.all("SELECT state, COUNT(*) FROM jobs WHERE queue = ? GROUP BY state", queue)
        return {state: count for state, count in rows}
