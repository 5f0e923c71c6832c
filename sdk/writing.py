"""Streamed files written and hashed in a worker thread, one chunk behind the stream."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import BinaryIO


class ChunkWriter:
    """Appends chunks to an open file and hashes them in a worker thread.

    Hashing and writing release the GIL, so they run while the caller receives the next
    chunk; `append` waits for the chunk before, so one chunk at most is in flight."""

    def __init__(self, handle: BinaryIO, digest: hashlib._Hash | None = None) -> None:
        self.handle = handle
        self.digest = digest or hashlib.sha256()
        self._queued = b""
        self._lock = threading.Lock()
        self._writing: asyncio.Future[None] | None = None

    async def append(self, data: bytes) -> None:
        """Queue `data` after the chunk before it (raising that chunk's error, if any)."""
        await self.flush()
        self._queued = data
        self._writing = asyncio.get_running_loop().run_in_executor(None, self._take)

    async def flush(self) -> None:
        """Until every appended chunk is written and hashed."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await writing

    def stop(self, *, keep: bool) -> None:
        """Write the chunk in flight now (`keep`) or forget it; never awaits, so it is safe
        in a task being cancelled. Waits for a chunk being written in the thread."""
        try:
            self._take(keep)
        finally:
            if self._writing is not None:
                self._writing.cancel()  # the thread has nothing left to do

    def _take(self, keep: bool = True) -> None:
        with self._lock:
            data, self._queued = self._queued, b""
            if keep and data:
                self.digest.update(data)
                self.handle.write(data)
