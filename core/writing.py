"""Streamed files written and hashed in worker threads, one chunk behind the stream."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from typing import BinaryIO

WRITE_SIZE = 256 * 1024
"""A chunk goes to the file in writes of at most this many bytes. Measured on the 2-core VMs the
benchmarks run on (Linux 6.18, ext4): into memory the host has taken back (freed more than ~2 s
before: free page reporting), 1 GiB written as 1 MiB writes cost the writing process 0.5-2.9 s of
system time, as 256 KiB writes ~0.25-0.75 s; into memory freed a moment ago both cost ~0.25 s.
(Probably a big write taking one large folio, which comes from the blocks the host took back.)
Four writes per MiB instead of one cost microseconds."""


class ChunkWriter:
    """Appends chunks to an open file and hashes them into `digest` (if given), in worker threads.

    Hashing and writing release the GIL, so a chunk is hashed and written at once, in two
    threads, while the caller receives the next; `append` waits for the chunk before, so one
    chunk at most is in flight. Hashing costs about as much CPU as the rest of a download
    (SHA-256 at ~1.7 GB/s a core), so only what checks or reports a hash asks for one."""

    def __init__(self, handle: BinaryIO, digest: hashlib._Hash | None = None) -> None:
        self.handle = handle
        self.digest = digest
        self._hashing = _Lane(digest.update) if digest else None
        self._writing = _Lane(self._write)
        self._lanes = [lane for lane in (self._hashing, self._writing) if lane]
        self._pending: list[asyncio.Future[None]] = []

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SIZE):
            self.handle.write(view[start : start + WRITE_SIZE])

    async def append(self, data: bytes | memoryview) -> None:
        """Queue `data` after the chunk before it (raising that chunk's error, if any)."""
        await self.flush()
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
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
            if self._hashing:
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
