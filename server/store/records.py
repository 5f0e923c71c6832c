"""The SQL store both backends are: a job's life (`lifecycle`), and its reads, logs, webhooks and
the worker records, in statements written once (see `database`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeAlias

from jobwire.server.store import transitions
from jobwire.server.store.base import POSITION_LIMIT, Attempt, Capacity, Holder, LogTotals, Waiting, Webhook
from jobwire.server.store.database import JOB_COLUMNS, Database
from jobwire.server.store.lifecycle import Lifecycle
from jobwire.server.store.rows import already_stored, job_message, within_limit, worker_columns, workers_with_jobs
from jobwire.server.store.transitions import FINISHED, RUNNING
from jobwire.v1 import jobs_pb2

LogKind: TypeAlias = jobs_pb2.LogKind.ValueType
_J_COLUMNS = ", ".join(f"j.{column}" for column in JOB_COLUMNS.split(", "))
"""`JOB_COLUMNS` of the runs table named `j`."""
_LISTED = (
    f"SELECT q.seq, j.update_time, {_J_COLUMNS} FROM jobs j JOIN queue_jobs q ON q.queue = j.queue AND q.job_id = j.id"
)
LISTING_INDEXES = (
    f"CREATE INDEX jobs_running_by_queue ON jobs (queue) WHERE state = {RUNNING};"
    f" CREATE INDEX jobs_finished_by_queue ON jobs (queue, update_time, id) WHERE state = {FINISHED}"
)
"""What a listing page reads by: a queue's running runs, its finished ones by time (its queued ones
are `waiting`, in queue order). The states are literals in the index and in the statements, so that
both databases use these partial indexes."""


def _listing_cursor(after: str) -> tuple[bool, float, str, int]:
    """(in the live part, the finish time and id, the queue position): of the last run listed,
    `L:SEQ` in the live part, `F:TIME:ID` in the finished part, '' at the start."""
    if not after:
        return True, 0.0, "", 0
    part, _, rest = after.partition(":")
    if part == "L":
        return True, 0.0, "", int(rest)
    if part == "F":
        mark, _, job_id = rest.partition(":")
        return False, float(mark), job_id, 0
    raise ValueError(f"not a listing cursor: {after!r}")


async def _live_page(db: Any, queue: str, state: int, seq: int, count: int) -> list[Any]:
    """Up to `count` of the queue's queued and running runs (or those of `state`) after position
    `seq`, in queue order: the queued ones from `waiting`, the running ones (few: a slot each) beside."""
    rows: list[Any] = []
    if state in (0, transitions.QUEUED):
        rows += await db.all(
            f"SELECT w.seq, j.update_time, {_J_COLUMNS}"
            " FROM waiting w JOIN jobs j ON j.queue = w.queue AND j.id = w.job_id"
            " WHERE w.queue = ? AND w.seq > ? ORDER BY w.seq LIMIT ?",
            *(queue, seq, count),
        )
    if state in (0, RUNNING):
        rows += await db.all(  # CROSS JOIN: SQLite reads the running rows first, not the queue's every row
            f"SELECT q.seq, j.update_time, {_J_COLUMNS}"
            " FROM jobs j CROSS JOIN queue_jobs q WHERE q.queue = j.queue AND q.job_id = j.id"
            f" AND j.queue = ? AND j.state = {RUNNING} AND q.seq > ? ORDER BY q.seq LIMIT ?",
            *(queue, seq, count),
        )
    return sorted(rows, key=lambda row: int(row[0]))[:count]


async def _namespaces(db: Any, queue: str, job_ids: Sequence[str]) -> dict[str, list[str]]:
    """The namespaces holding each of the queue's runs `job_ids`."""
    if not job_ids:
        return {}
    found: dict[str, list[str]] = {}
    for job_id, namespace in await db.all(
        f"SELECT job_id, namespace FROM namespaces WHERE queue = ? AND job_id IN ({', '.join('?' * len(job_ids))})"
        " ORDER BY job_id, namespace",
        queue,
        *job_ids,
    ):
        found.setdefault(job_id, []).append(namespace)
    return found


_LOG = "queue = ? AND job_id = ? AND attempt = ? AND kind = ?"  # a log's batches: a prefix of the key
_LAST_PAGE = 256
"""Most batches a log read asks for in one statement (a short log's batches may be a chunk each;
the worker's are about 512 KiB)."""
_END = 2**31 - 1  # an index past any log's that the INTEGER `start` column can be compared with


async def _next_page(rows: int, size: int, left: int) -> int:
    """How many batches the next statement of a log read asks for: as many as `left` more characters
    take at the average size of the `rows` read so far (`size` characters), so that a read costs what
    it returns; doubling when nothing bounds the characters. Lets the loop run others' work first
    (SQLite's statements run on it)."""
    await asyncio.sleep(0)
    if left <= 0 or size == 0:
        return min(rows * 2, _LAST_PAGE)
    return max(1, min(_LAST_PAGE, -(-left * rows // size)))


class SqlStore(Lifecycle):
    """StateStore in shared SQL; a backend adds its connections, schema and what it must do its own way."""

    async def ping(self) -> None:
        async with self._reading() as db:
            await db.one("SELECT 1")

    async def get_job(self, job_id: str, *, queue: str = "") -> jobs_pb2.Job | None:
        async with self._reading() as db:
            return await self._details(db, queue, job_id)

    async def list_jobs(self, queue: str, *, state: int, after: str, limit: int) -> tuple[list[jobs_pb2.Job], str]:
        """Live runs (queued, running) in queue order, then finished ones, the most recently finished
        first; each with its namespaces. Raises ValueError for a cursor this listing never gave."""
        live, mark, last_id, seq = _listing_cursor(after)
        rows: list[Any] = []
        async with self._reading() as db:
            if live and state != FINISHED:
                rows = await _live_page(db, queue, state, seq, limit + 1)
            if len(rows) <= limit and state in (0, FINISHED):
                since = "" if live else " AND (j.update_time < ? OR (j.update_time = ? AND j.id < ?))"
                rows += await db.all(
                    f"{_LISTED} WHERE j.queue = ? AND j.state = {FINISHED}{since}"
                    " ORDER BY j.update_time DESC, j.id DESC LIMIT ?",
                    *(queue, *(() if live else (mark, mark, last_id)), limit + 1 - len(rows)),
                )
            names = await _namespaces(db, queue, [row[2] for row in rows[:limit]])
        jobs = [job_message(tuple(row)[2:], namespaces=names.get(row[2], [])) for row in rows[:limit]]
        if len(rows) <= limit:
            return jobs, ""
        seq, update_time, job_id, job_state = rows[limit - 1][:4]
        return jobs, f"F:{update_time!r}:{job_id}" if job_state == FINISHED else f"L:{seq}"

    async def add_webhook(self, hook: Webhook, *, armed: bool, now: float) -> None:
        async with self._transaction() as db:
            finished = await db.one(
                "SELECT 1 FROM jobs WHERE queue = ? AND id = ? AND state = ? FOR SHARE",
                hook.queue,
                hook.job_id,
                FINISHED,
            )
            await db.run(
                "INSERT INTO webhooks (job_id, queue, event, url, body, armed, next_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                *(hook.job_id, hook.queue, hook.event, hook.url, hook.body, armed or finished is not None, now),
            )

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[Webhook]:
        async with self._transaction() as db:
            rows = await db.all(
                "SELECT id, job_id, queue, event, url, body, attempts FROM webhooks WHERE armed AND next_time <= ?"
                " ORDER BY next_time LIMIT ? FOR UPDATE SKIP LOCKED",
                now,
                limit,
            )
            for row in rows:
                await db.run("UPDATE webhooks SET next_time = ? WHERE id = ?", until, row[0])
        return [
            Webhook(job, queue, event, url, bytes(body), id, tries) for id, job, queue, event, url, body, tries in rows
        ]

    async def settle_webhook(self, hook_id: int, retry_at: float | None) -> None:
        async with self._transaction() as db:
            if retry_at is None:
                await db.run("DELETE FROM webhooks WHERE id = ?", hook_id)
            else:
                await db.run(
                    "UPDATE webhooks SET attempts = attempts + 1, next_time = ? WHERE id = ?", retry_at, hook_id
                )

    async def append_logs(
        self,
        attempt: Attempt,
        holder: Holder,
        kind: LogKind,
        chunks: Sequence[jobs_pb2.LogChunk],
        start: int,
        max_chars: int = 0,
    ) -> tuple[int, list[jobs_pb2.LogChunk]] | None:
        async with self._transaction() as db:
            # reading who holds the job also locks it (on PostgreSQL): one append at a time
            if not transitions.holds(await self._held(db, attempt, holder), attempt, holder):
                return None
            stored = await self._log_totals(db, holder.queue, attempt, kind)
            kept = within_limit(stored.chars, chunks[already_stored(stored.chunks, start, len(chunks)) :], max_chars)
            if kept:
                batch = jobs_pb2.LogBatch(kind=kind, chunks=kept)
                totals = stored.after(batch.chunks)
                await db.run(
                    "INSERT INTO logs (queue, job_id, attempt, kind, start, count, data, stdout_chars, stderr_chars)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    *(holder.queue, attempt.job_id, attempt.attempt, kind, stored.chunks, len(batch.chunks)),
                    *(batch.SerializeToString(), totals.stdout_chars, totals.stderr_chars),
                )
            return stored.chunks, kept

    async def log_totals(self, attempt: Attempt, kind: LogKind, *, queue: str) -> LogTotals:
        async with self._reading() as db:
            return await self._log_totals(db, queue, attempt, kind)

    async def _log_totals(self, db: Database, queue: str, attempt: Attempt, kind: LogKind) -> LogTotals:
        # The last batch by index (the primary key) ends the log: batches never overlap.
        row = await db.one(
            "SELECT start + count, stdout_chars, stderr_chars FROM logs"
            " WHERE queue = ? AND job_id = ? AND attempt = ? AND kind = ? ORDER BY start DESC LIMIT 1",
            *(queue, attempt.job_id, attempt.attempt, kind),
        )
        return LogTotals(*row) if row else LogTotals()

    async def read_logs(
        self, attempt: Attempt, kind: LogKind, since: int, limit: int, *, queue: str, max_chars: int = 0
    ) -> list[jobs_pb2.LogChunk]:
        key = (queue, attempt.job_id, attempt.attempt, kind)
        chunks: list[jobs_pb2.LogChunk] = []
        async with self._reading() as db:
            # the batch holding `since`, found by the key (batches never overlap): a cursor deep into a
            # long log costs what one at its start does
            row = await db.one(
                f"SELECT start, count FROM logs WHERE {_LOG} AND start <= ? ORDER BY start DESC LIMIT 1",
                *key,
                min(since, _END),
            )
            after = 0 if row is None else row[0] if row[0] + row[1] > since else row[0] + 1  # past it: not read
            page, size, read = 1, 0, 0
            while len(chunks) < limit and not (max_chars and size >= max_chars):
                rows = await db.all(
                    f"SELECT start, data FROM logs WHERE {_LOG} AND start >= ? ORDER BY start LIMIT ?",
                    *key,
                    after,
                    page,
                )
                for start, data in rows:
                    batch = jobs_pb2.LogBatch.FromString(data).chunks[max(0, since - start) :]
                    chunks.extend(batch)
                    size += sum(len(chunk.text) for chunk in batch)
                    after, read = start + 1, read + 1
                    if len(chunks) >= limit or (max_chars and size >= max_chars):
                        break
                if len(rows) < page:
                    break
                page = await _next_page(read, size, max_chars - size if max_chars else 0)
        return chunks[:limit]

    async def read_log_tail(
        self, attempt: Attempt, kind: LogKind, chunks: int, chars: int, *, queue: str
    ) -> tuple[int, list[jobs_pb2.LogChunk]]:
        key = (queue, attempt.job_id, attempt.attempt, kind)
        batches: list[Sequence[jobs_pb2.LogChunk]] = []  # last first
        first, count, size, page = 0, 0, 0, 1
        async with self._reading() as db:
            while count < chunks and size <= chars:
                rows = await db.all(
                    f"SELECT start, data FROM logs WHERE {_LOG} AND start < ? ORDER BY start DESC LIMIT ?",
                    *key,
                    first if batches else _END,
                    page,
                )
                for start, data in rows:
                    batch = jobs_pb2.LogBatch.FromString(data).chunks
                    batches.append(batch)
                    first, count, size = start, count + len(batch), size + sum(len(chunk.text) for chunk in batch)
                    if count >= chunks or size > chars:
                        break
                if len(rows) < page:
                    break
                page = await _next_page(len(batches), size, chars + 1 - size)
        return first, [chunk for batch in reversed(batches) for chunk in batch]

    async def upsert_worker(self, info: jobs_pb2.WorkerInfo, *, queue: str, session: str) -> None:
        async with self._transaction() as db:
            await db.run(
                "INSERT INTO workers (id, queue, session, last_seen, info, slots, gpus) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, session = excluded.session,"
                " last_seen = excluded.last_seen, info = excluded.info, slots = excluded.slots, gpus = excluded.gpus",
                *(info.id, queue, session, info.last_seen_time.ToMicroseconds() / 1e6, info.SerializeToString()),
                *worker_columns(info),
            )

    async def remove_worker(self, worker_id: str, *, session: str) -> None:
        async with self._transaction() as db:
            await db.run("DELETE FROM workers WHERE id = ? AND session = ?", worker_id, session)

    async def list_workers(self, queue: str, *, seen_since: float) -> list[jobs_pb2.WorkerInfo]:
        async with self._reading() as db:
            rows = await db.all(
                "SELECT info FROM workers WHERE queue = ? AND last_seen >= ? ORDER BY id", queue, seen_since
            )
            running = await db.all(  # the state is literal so that the partial index jobs_worker serves
                f"SELECT j.worker_id, j.id FROM workers w JOIN jobs j ON j.worker_id = w.id AND j.state = {RUNNING}"
                " WHERE w.queue = ?",
                queue,
            )
        return workers_with_jobs([row[0] for row in rows], [(row[0], row[1]) for row in running])

    async def waiting(self, queue: str, job_id: str, *, seen_since: float) -> Waiting:
        async with self._reading() as db:  # one statement: one round trip on PostgreSQL
            workers, slots, most_gpus, busy, ahead = await db.one(
                "SELECT COUNT(*), COALESCE(SUM(slots), 0), COALESCE(MAX(gpus), 0),"
                # the state is literal so that the partial index jobs_worker serves
                f" (SELECT COUNT(*) FROM workers w JOIN jobs j ON j.worker_id = w.id AND j.state = {RUNNING}"
                " WHERE w.queue = ? AND w.last_seen >= ?),"
                " (SELECT COUNT(*) FROM (SELECT 1 FROM waiting WHERE queue = ?"
                " AND seq < (SELECT seq FROM queue_jobs WHERE queue = ? AND job_id = ?) LIMIT ?) ahead)"
                " FROM workers WHERE queue = ? AND last_seen >= ?",
                *(queue, seen_since, queue, queue, job_id, POSITION_LIMIT, queue, seen_since),
            )
        return Waiting(Capacity(workers, slots, busy, most_gpus), int(ahead or 0))
