"""One log of an attempt (its build's or its run's) on its way to the server: decoded, chunked,
batched, and kept a while for sending again what a broken stream lost."""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import time
from collections.abc import Awaitable, Callable

from google.protobuf import timestamp_pb2

from jobwire.core.units import timestamp
from jobwire.v1 import jobs_pb2, workers_pb2
from jobwire.worker.runtime import STDERR, STDOUT

log = logging.getLogger(__name__)
Send = Callable[[workers_pb2.ConnectRequest], Awaitable[None]]
_LINGER = 0.05
_CHUNK_SIZE = 64 * 1024
"""Characters a chunk grows to (a piece more at most) while it waits to be sent."""
_BATCH_SIZE = 512 * 1024
"""Characters of text a batch (one message) holds before it is sent without waiting."""
_RETAINED_CHUNKS, _RETAINED_SIZE = 50_000, 32 * 1024 * 1024


class JobLog:
    """One log of an execution: decodes bytes as UTF-8 per stream, gathers the text into chunks (a run
    of one stream's text, timed by its first piece) and batches, and sends them in order."""

    def __init__(self, job_id: str, attempt: int, kind: jobs_pb2.LogKind.ValueType, send: Send) -> None:
        self.job_id, self.attempt, self.kind, self.send = job_id, attempt, kind, send
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in (STDOUT, STDERR)}
        self.pending: list[tuple[jobs_pb2.LogStream.ValueType, timestamp_pb2.Timestamp, list[str]]] = []
        self.pending_size = self.run_size = 0
        self.sent = 0
        self.skip = {STDOUT: 0, STDERR: 0}  # characters the server has already, of a log read again
        self.placed = asyncio.Event()  # cleared until the server says where its copy ends (`resume_at`)
        self.placed.set()
        self.lock = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None  # rings when the linger is over
        self.flushing: asyncio.Future[None] | None = None  # the flush it started
        # The latest chunks handed to `send`, for sending again what a broken stream lost.
        self.recent: collections.deque[jobs_pb2.LogChunk] = collections.deque()
        self.recent_size = 0

    def add(self, stream: jobs_pb2.LogStream.ValueType, data: bytes, stamp: str = "") -> None:
        """A piece of output; `stamp` is the engine's RFC 3339 time of it (default: now)."""
        self._append(stream, self.decoders[stream].decode(data), stamp)

    def end(self) -> None:
        """Emit what the decoders still hold (an incomplete UTF-8 sequence at the very end)."""
        for stream in self.decoders:
            self._append(stream, self.decoders[stream].decode(b"", final=True))

    def _append(self, stream: jobs_pb2.LogStream.ValueType, text: str, stamp: str = "") -> None:
        if self.skip[stream]:
            cut = min(self.skip[stream], len(text))
            text, self.skip[stream] = text[cut:], self.skip[stream] - cut
        if not text:
            return
        if self.pending and self.pending[-1][0] == stream and self.run_size < _CHUNK_SIZE:
            self.pending[-1][2].append(text)
            self.run_size += len(text)
        else:
            when = timestamp(time.time())
            if stamp:
                when.FromJsonString(stamp)
            self.pending.append((stream, when, [text]))
            self.run_size = len(text)
        self.pending_size += len(text)

    async def soon(self) -> None:
        """Send within `_LINGER` seconds, with whatever else arrives meanwhile; at once when a batch is
        full. One message per line would bury the worker's heartbeats under log traffic."""
        if self.pending_size >= _BATCH_SIZE:
            await self.flush()
        elif self.timer is None:
            # A timer, not a task: a log flushed before it rings (a short job's, at its end) costs no task.
            self.timer = asyncio.get_running_loop().call_later(_LINGER, self._lingered)

    def _lingered(self) -> None:
        self.timer = None
        if self.pending:
            self.flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        async with self.lock:
            while self.pending:
                chunks = [
                    jobs_pb2.LogChunk(text="".join(parts), time=when, stream=s) for s, when, parts in self.pending
                ]
                self.pending, self.pending_size = [], 0
                logs = workers_pb2.JobLogs(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    kind=self.kind,
                    chunks=chunks,
                    start=self.sent,
                )
                self.sent += len(chunks)
                self._retain(chunks)
                await self.send(workers_pb2.ConnectRequest(logs=logs))

    def _retain(self, chunks: list[jobs_pb2.LogChunk]) -> None:
        self.recent.extend(chunks)
        self.recent_size += sum(len(chunk.text) for chunk in chunks)
        while len(self.recent) > _RETAINED_CHUNKS or self.recent_size > _RETAINED_SIZE:
            self.recent_size -= len(self.recent.popleft().text)

    def resume_at(self, cursor: workers_pb2.LogCursor) -> workers_pb2.ConnectRequest | None:
        """Where the server's copy of this log ends. A log read again from the container's first output
        (after a worker restart) goes on from there, skipping the text the server has; any other log
        answers the chunks it sent that the server lacks (lost in flight), if any."""
        if self.placed.is_set():
            return self.resend_from(cursor.stored)
        self.sent = cursor.stored
        self.skip = {STDOUT: cursor.stdout_chars, STDERR: cursor.stderr_chars}
        self.placed.set()
        return None

    def resend_from(self, stored: int) -> workers_pb2.ConnectRequest | None:
        """The chunks from index `stored` on that were sent already (the server lost them in flight)."""
        if stored >= self.sent:
            return None
        first = self.sent - len(self.recent)
        chunks = list(self.recent)[max(stored - first, 0) :]
        if stored < first:  # older than what is kept: fill the hole so later indices still line up
            log.warning("job %s: %d log chunks lost for good", self.job_id, first - stored)
            note = jobs_pb2.LogChunk(text=f"[jobwire: {first - stored} log chunks lost]\n", stream=STDERR)
            chunks = [note] + [jobs_pb2.LogChunk() for _ in range(first - stored - 1)] + chunks
        logs = workers_pb2.JobLogs(
            job_id=self.job_id,
            attempt=self.attempt,
            kind=self.kind,
            chunks=chunks,
            start=stored,
        )
        return workers_pb2.ConnectRequest(logs=logs)
