"""The seam between the SQL both stores share and the two databases: statements written once, run on either.

Statements are written once, in PostgreSQL's syntax with `?` placeholders, and each backend's
`Database` translates them (once per text, cached): PostgreSQL numbers the placeholders (`$1`…);
SQLite drops row locks (`FOR UPDATE [OF t] [SKIP LOCKED]`, `FOR SHARE`: it has one writer at a
time, and its operations never interleave) and keeps a history append a blob. The stores
(`lifecycle.Lifecycle`, `records.SqlStore`) only ever see a `Database`.

On SQLite the `Database` methods are coroutines that never suspend: an operation's statements still
run without yielding the loop between them, as the SQLite store requires (see `sqlite`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from jobwire.server.store.base import FINISHED_HOOK
from jobwire.server.store.rows import job_message, with_details
from jobwire.server.store.transitions import FINISHED, HOLDING, Change, Holding
from jobwire.v1 import jobs_pb2

JOB_COLUMNS = "id, state, queue, attempt, worker_id, create_time, update_time, finish_reason"
"""The columns `rows.job_message` reads, in its order."""
_JOB_WIDTH = JOB_COLUMNS.count(",") + 1
_NAMESPACES = "(SELECT json_agg(namespace) FROM namespaces WHERE queue = jobs.queue AND job_id = jobs.id)"
"""The namespaces holding a run, as a JSON array (NULL or `[]` for none), read in the run's statement."""
RUN_COLUMNS = f"{JOB_COLUMNS}, {_NAMESPACES}"
ARM_FINISHED = (
    "UPDATE webhooks SET armed = TRUE, next_time = ? WHERE job_id = ? AND queue = ? AND event = ? AND NOT armed"
)
"""A finish arms the run's `finished` webhooks: (now, job id, queue, FINISHED_HOOK)."""
JOB_RUN_ORDER = f"state = {FINISHED} DESC, update_time DESC"
"""Which of a job id's runs an id-only read shows: the most recently finished, else the most recently
changed (a job URL is for reading a result; the queue's URL names one run exactly)."""


class Database(Protocol):
    """One connection inside an operation; `sql` is in the shared dialect (see the module docstring)."""

    async def one(self, sql: str, *args: Any) -> Any:
        """The first row of the result (indexable by column number), or None."""

    async def all(self, sql: str, *args: Any) -> Sequence[Any]:
        """Every row of the result."""

    async def run(self, sql: str, *args: Any) -> None:
        """Run a statement that returns no rows."""


@functools.lru_cache(maxsize=512)
def postgres_sql(sql: str) -> str:
    """`sql` with its `?` placeholders numbered as asyncpg wants them (`$1`, `$2`…)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${number}{part}" for number, part in enumerate(parts[1:], start=1))


_ROW_LOCK = re.compile(r" FOR (UPDATE|SHARE)( OF \w+)?( SKIP LOCKED)?")


@functools.lru_cache(maxsize=512)
def sqlite_sql(sql: str) -> str:
    """`sql` without row locks, with a history append kept a blob (`||` makes text of blobs), and
    PostgreSQL's `json_agg` as SQLite names it."""
    sql = _ROW_LOCK.sub("", sql).replace("history = history || ?", "history = CAST(history || ? AS BLOB)")
    return sql.replace("json_agg(", "json_group_array(")


def run_of(row: Sequence[Any]) -> tuple[jobs_pb2.Job, Sequence[Any]]:
    """A run read with `RUN_COLUMNS` (and more columns after them): its Job, and those columns."""
    names = json.loads(row[_JOB_WIDTH]) if row[_JOB_WIDTH] else []
    return job_message(tuple(row[:_JOB_WIDTH]), namespaces=sorted(names)), tuple(row[_JOB_WIDTH + 1 :])


def assignments(change: Change) -> tuple[str, list[Any]]:
    """The SET clause writing `change` to one run's row (its columns, then its history entry appended)
    and its values, in order."""
    sets, values = [f"{column} = ?" for column in change.columns], [*change.columns.values()]
    if change.entry:
        sets.append("history = history || ?")
        values.append(change.entry)
    return ", ".join(sets), values


class SqlBase:
    """What every shared statement stands on: a backend opens operations; here, job rows are read and
    `transitions.Change`s written."""

    def _transaction(self) -> AbstractAsyncContextManager[Database]:
        """One atomic operation; returns only once it is stored."""
        raise NotImplementedError

    def _reading(self) -> AbstractAsyncContextManager[Database]:
        """A connection for reads outside any operation."""
        raise NotImplementedError

    async def _apply(
        self, db: Database, queue: str, job_id: str, change: Change, now: float, returning: str = ""
    ) -> Any:
        """Write what a transition decided to the job's run in `queue`: the row and its history in one
        statement (answering the row `returning` names, if it names one); a finish arms the run's
        `finished` webhooks in the same transaction."""
        sets, values = assignments(change)
        update = f"UPDATE jobs SET {sets} WHERE queue = ? AND id = ?{returning}"
        row = None
        if returning:
            row = await db.one(update, *values, queue, job_id)
        else:
            await db.run(update, *values, queue, job_id)
        if change.finishes:
            await db.run(ARM_FINISHED, *(now, job_id, queue, FINISHED_HOOK))
        return row

    async def _holding(self, db: Database, queue: str, job_id: str) -> Holding | None:
        """Who holds the job's run in `queue`, locking its row (on PostgreSQL) until the operation ends;
        None if unknown."""
        row = await db.one(f"SELECT {HOLDING} FROM jobs WHERE queue = ? AND id = ? FOR UPDATE", queue, job_id)
        return None if row is None else Holding(*row)

    async def _job(self, db: Database, queue: str, job_id: str) -> jobs_pb2.Job | None:
        """The job's run in `queue`, with the namespaces holding it."""
        found = await self._run(db, queue, job_id)
        return None if found is None else found[0]

    async def _run(
        self, db: Database, queue: str, job_id: str, more: str = ""
    ) -> tuple[jobs_pb2.Job, Sequence[Any]] | None:
        """The job's run in `queue` with the namespaces holding it, and the values of the columns `more`
        lists (`, definition, …`), read by one statement."""
        row = await db.one(f"SELECT {RUN_COLUMNS}{more} FROM jobs WHERE queue = ? AND id = ?", queue, job_id)
        return None if row is None else run_of(row)

    async def _changed(
        self, db: Database, queue: str, job_id: str, change: Change, now: float, result: bytes | None = None
    ) -> jobs_pb2.Job:
        """`_apply`, answering the run as the transition left it: its definition (and `result`) but no
        history, which is enough to assign it and to tell watchers. The row is written and read back
        by one statement."""
        row = await self._apply(db, queue, job_id, change, now, f" RETURNING {RUN_COLUMNS}, definition")
        assert row is not None
        job, (definition,) = run_of(row)
        return with_details(job, definition, result, b"")

    async def _details(self, db: Database, queue: str, job_id: str) -> jobs_pb2.Job | None:
        """The job's run in `queue` with definition, result and history; None if unknown. Without a
        queue: the run `JOB_RUN_ORDER` puts first."""
        if not queue:
            row = await db.one(f"SELECT queue FROM jobs WHERE id = ? ORDER BY {JOB_RUN_ORDER} LIMIT 1", job_id)
            if row is None:
                return None
            queue = row[0]
        found = await self._run(db, queue, job_id, ", definition, result, history")
        if found is None:
            return None
        job, (definition, result, history) = found
        return with_details(job, definition, result, history)
