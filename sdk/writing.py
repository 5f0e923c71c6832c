"""Streamed files written and hashed in worker threads, one chunk behind the stream."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from typing import BinaryIO


class ChunkWriter:
    """Appends chunks to an open file and hashes them, in worker threads.

    Hashing and writing release the GIL, so a chunk is hashed and written at once, in two
    threads, while the caller receives the next; `append` waits for the chunk before, so one
    chunk at most is in flight."""

    def __init__(self, handle: BinaryIO, digest: hashlib._Hash | None = None) -> None:
        self.handle = handle
        self.digest = digest or hashlib.sha256()
        self._hashing = _Lane(self.digest.update)
        self._writing = _Lane(handle.write)
        self._pending: list[asyncio.Future[None]] = []

    async def append(self, data: bytes | memoryview) -> None:
        """Queue `data` after the chunk before it (raising that chunk's error, if any)."""
        await self.flush()
        loop = asyncio.get_running_loop()
        for lane in (self._hashing, self._writing):
            lane.queued = data
            self._pending.append(loop.run_in_executor(None, lane.run))

    async def flush(self) -> None:
        """Until every appended chunk is written and hashed."""
        pending, self._pending = self._pending, []
        for future in pending:
            await future

    def stop(self, *, keep: bool) -> None:
        """Write the chunk in flight now (`keep`) or forget it; never awaits, so it is safe
        in a task being cancelled. Waits for a chunk being written in a thread."""
        try:
            self._hashing.run(keep=False)  # the hash of a stopped file is of no use
            self._writing.run(keep)
        finally:
            for future in self._pending:
                future.cancel()  # the threads have nothing left to do


class _Lane:
    """One chunk's worth of work for a worker thread, taken once: by the thread, or by `stop`."""

    def __init__(self, work: Callable[[bytes | memoryview], object]) -> None:
        self.work = work
        self.queued: bytes | memoryview = b""
        self._lock = threading.Lock()

    def run(self, keep: bool = True) -> None:
        with self._lock:
            data, self.queued = self.queued, b""
            if keep and data:
                self.work(data)
