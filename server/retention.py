"""Retention: queued jobs expire after `--queued-ttl`; finished jobs, and blobs nothing refers to, are
forgotten after `--retention`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from jobwire.server.blobs import BlobStore
from jobwire.server.store import StateStore

log = logging.getLogger(__name__)
BATCH = 1000


class Retention:
    """Sweeps every `interval` seconds: queued jobs past their time-to-live end as expired
    (`expire_queued`, the scheduler's), then jobs finished before the cutoff are forgotten, then
    unreferenced blobs last written before it (a blob any job still in the store refers to is kept)."""

    def __init__(
        self,
        store: StateStore,
        blobs: BlobStore,
        clock: Callable[[], float],
        retention: float,
        interval: float,
        expire_queued: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.store, self.blobs, self.clock = store, blobs, clock
        self.retention, self.interval, self.expire_queued = retention, interval, expire_queued

    async def run(self) -> None:
        while True:
            if self.expire_queued is not None:
                await self.expire_queued()
            await self.sweep()
            await asyncio.sleep(self.interval)

    async def sweep(self) -> None:
        before = self.clock() - self.retention
        while expired := await self.store.expire(before, BATCH):
            log.info("retention: forgot %d job(s) finished before the cutoff", len(expired))
        kept = await self.store.blob_references()
        unused = [key for key in await self.blobs.stale(before) if key not in kept]
        for key in unused:
            await self.blobs.delete(key)
        if unused:
            log.info("retention: removed %d blob(s) no job refers to", len(unused))
