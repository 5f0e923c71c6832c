"""Job logs: storing the batches workers send, reading them by cursor, following them live."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from jobwire.server import topics
from jobwire.server.bus import EventBus, Lagged
from jobwire.server.errors import NotFound
from jobwire.server.store import StateStore
from jobwire.server.store.base import Attempt, Holder
from jobwire.server.store.rows import job_summary, job_url_view
from jobwire.v1 import jobs_pb2, workers_pb2

READ_LIMIT, READ_SIZE = 100_000, 2 * 1024 * 1024
"""Most chunks, and about the most characters of text, returned by one read."""

TAIL_CHUNKS, TAIL_BYTES = 10_000, 1024 * 1024
"""Most chunks, and most bytes of text, of the run log that a result carries inline: results
are unary responses (Envoy buffers them whole, gRPC clients cap them at 4 MiB by default)."""

_FINISHED = jobs_pb2.JOB_STATE_FINISHED


class LogHub:
    """Appends log batches (fenced by attempt) and serves them to readers and followers."""

    def __init__(self, store: StateStore, bus: EventBus, max_chars: int = 256 * 1024 * 1024) -> None:
        self.store, self.bus, self.max_chars = store, bus, max_chars

    async def append(
        self,
        attempt: Attempt,
        holder: Holder,
        kind: jobs_pb2.LogKind.ValueType,
        chunks: Sequence[jobs_pb2.LogChunk],
        start: int,
    ) -> bool:
        """Store and publish a batch (skipping chunks already stored); False if the attempt is stale.
        A log is kept up to `max_chars` characters of text: the chunk that passes it is cut there and
        followed by a notice; everything after is dropped."""
        stored = await self.store.append_logs(attempt, holder, kind, chunks, start, self.max_chars)
        if stored is None:
            return False
        first, kept = stored
        if kept:
            batch = jobs_pb2.LogBatch(kind=kind, start=first, chunks=kept, attempt=attempt.attempt)
            message = jobs_pb2.WatchJobResponse(logs=batch)
            await self.bus.publish(topics.job(holder.queue, attempt.job_id), message.SerializeToString())
        return True

    async def read(self, job: jobs_pb2.Job, kind: jobs_pb2.LogKind.ValueType, since: int) -> list[jobs_pb2.LogChunk]:
        """The current attempt's chunks of one log of the run from index `since`."""
        return await _read(self.store, job.queue, Attempt(job.id, job.attempt), kind or jobs_pb2.LOG_KIND_RUN, since)

    async def cursor(self, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, queue: str) -> workers_pb2.LogCursor:
        """How much of the log of the attempt of the job's run in `queue` is stored: chunks, and
        characters of each stream."""
        totals = await self.store.log_totals(attempt, kind, queue=queue)
        return workers_pb2.LogCursor(
            job_id=attempt.job_id,
            attempt=attempt.attempt,
            kind=kind,
            stored=totals.chunks,
            stdout_chars=totals.stdout_chars,
            stderr_chars=totals.stderr_chars,
        )

    async def tail(self, job: jobs_pb2.Job) -> tuple[int, list[jobs_pb2.LogChunk]]:
        """The end of the current attempt's run log that fits a result, and the index it starts at:
        read from the log's last batches, so it costs the same for 10 lines and 256 Mi characters."""
        attempt = Attempt(job.id, job.attempt)
        start, chunks = await self.store.read_log_tail(
            attempt, jobs_pb2.LOG_KIND_RUN, TAIL_CHUNKS, TAIL_BYTES, queue=job.queue
        )
        if len(chunks) > TAIL_CHUNKS:
            start, chunks = start + len(chunks) - TAIL_CHUNKS, chunks[-TAIL_CHUNKS:]
        size, first = 0, len(chunks)
        while first > 0 and size + len(chunks[first - 1].text) <= TAIL_BYTES:
            first -= 1
            size += len(chunks[first].text)
        return start + first, chunks[first:]

    async def watch(
        self, job_id: str, run_since: int, build: bool, queue: str = "", *, resume: Resume | None = None
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        """The state of the job's run in `queue`, its logs so far, then every change until it finishes.
        Without a queue: the run an id-only read shows when the watch begins, and no queue name
        (`job_url_view`). `resume` (a follower's position) overrides `run_since`: its cursors apply
        to its attempt only; another attempt is sent from its start."""
        run = await self.store.get_job(job_id, queue=queue)
        if run is None:
            raise NotFound(f"job {job_id} not found")
        async with self.bus.subscribe(topics.job(run.queue, job_id)) as subscription:
            follower = _Follower(self, run.queue, job_id, resume or Resume(0, run_since), build, shown=queue)
            async for message in follower.resync():
                yield message
            while not follower.finished():
                try:
                    async for payload in subscription:
                        async for message in follower.handle(jobs_pb2.WatchJobResponse.FromString(payload)):
                            yield message
                        if follower.finished():
                            break
                except Lagged:
                    async for message in follower.resync():
                        yield message


@dataclass(frozen=True)
class Resume:
    """Where a follower resumes: the attempt its cursors belong to (0: whichever is sent first) and
    how many chunks of the run and build logs it has."""

    attempt: int
    run: int
    build: int = 0


class _Follower:
    """Cursor state of one watcher: which attempt, and how far into each log."""

    def __init__(self, hub: LogHub, queue: str, job_id: str, resume: Resume, build: bool, shown: str) -> None:
        self.hub, self.queue, self.job_id, self.shown = hub, queue, job_id, shown
        self.kinds = [jobs_pb2.LOG_KIND_BUILD, jobs_pb2.LOG_KIND_RUN] if build else [jobs_pb2.LOG_KIND_RUN]
        self.cursors = {kind: 0 for kind in self.kinds}
        self.cursors[jobs_pb2.LOG_KIND_RUN] = resume.run
        if build:
            self.cursors[jobs_pb2.LOG_KIND_BUILD] = resume.build
        self.resumed = resume.attempt
        self.attempt = -1
        self.state: jobs_pb2.JobState.ValueType = jobs_pb2.JOB_STATE_UNSPECIFIED

    async def resync(self) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        """Send the job's state and whatever the store has beyond the cursors."""
        job = await self.hub.store.get_job(self.job_id, queue=self.queue)
        if job is None:
            raise NotFound(f"job {self.job_id} not found")
        async for message in self._on_job(job):
            yield message

    async def handle(self, event: jobs_pb2.WatchJobResponse) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        """Forward one bus event, filling gaps from the store."""
        if event.HasField("job"):
            async for message in self._on_job(event.job):
                yield message
            return
        batch = event.logs
        if batch.attempt != self.attempt or batch.kind not in self.cursors:
            return
        cursor = self.cursors[batch.kind]
        if batch.start > cursor:
            async for message in self._catch_up():
                yield message
        elif batch.start + len(batch.chunks) > cursor:
            yield self._batch(batch.kind, cursor, batch.chunks[cursor - batch.start :])

    async def _on_job(self, job: jobs_pb2.Job) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        if job.attempt != self.attempt:
            if self.attempt >= 0 or self.resumed not in (0, job.attempt):
                self.cursors = {kind: 0 for kind in self.kinds}
            self.attempt = job.attempt
        yield jobs_pb2.WatchJobResponse(job=job_summary(job) if self.shown else job_url_view(job_summary(job)))
        async for message in self._catch_up():
            yield message
        self.state = job.state

    def finished(self) -> bool:
        return self.state == _FINISHED

    async def _catch_up(self) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        if self.attempt <= 0:
            return
        for kind in self.kinds:
            attempt = Attempt(self.job_id, self.attempt)
            while chunks := await _read(self.hub.store, self.queue, attempt, kind, self.cursors[kind]):
                yield self._batch(kind, self.cursors[kind], chunks)

    def _batch(
        self, kind: jobs_pb2.LogKind.ValueType, start: int, chunks: Sequence[jobs_pb2.LogChunk]
    ) -> jobs_pb2.WatchJobResponse:
        self.cursors[kind] = start + len(chunks)
        batch = jobs_pb2.LogBatch(kind=kind, start=start, chunks=chunks, attempt=self.attempt)
        return jobs_pb2.WatchJobResponse(logs=batch)


async def _read(
    store: StateStore, queue: str, attempt: Attempt, kind: jobs_pb2.LogKind.ValueType, since: int
) -> list[jobs_pb2.LogChunk]:
    """Chunks from index `since`, as many as fit one response (at least one). A long log is read in
    such pieces, and the loop runs others' calls between them (SQLite's statements run on it)."""
    await asyncio.sleep(0)
    chunks = await store.read_logs(attempt, kind, since, READ_LIMIT, queue=queue, max_chars=READ_SIZE)
    size = 0
    for count, chunk in enumerate(chunks):
        size += len(chunk.text)
        if size > READ_SIZE and count:
            return chunks[:count]
    return chunks
