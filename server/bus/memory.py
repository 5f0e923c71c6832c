"""The in-process EventBus, for a single server process."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from jobwire.server.bus.base import Lagged

QUEUE_SIZE = 4096


class MemorySubscription:
    """A bounded queue of one topic's messages."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)  # None: wake up to see a lag
        self.lagged = False

    def offer(self, message: bytes) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.lagged = True

    def lag(self) -> None:
        """Messages were lost on the way here: make the subscriber re-read the store."""
        self.lagged = True
        if self.queue.empty():
            self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self.lagged and self.queue.empty():
                self.lagged = False
                raise Lagged
            message = await self.queue.get()
            if message is not None:
                yield message


class MemoryBus:
    """Topics held in a dict of subscriber sets."""

    def __init__(self) -> None:
        self._topics: defaultdict[str, set[MemorySubscription]] = defaultdict(set)

    async def close(self) -> None:
        pass

    async def publish(self, topic: str, message: bytes) -> None:
        for subscription in list(self._topics.get(topic, ())):
            subscription.offer(message)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[MemorySubscription]:
        subscription = MemorySubscription()
        self._topics[topic].add(subscription)
        try:
            yield subscription
        finally:
            self._topics[topic].discard(subscription)
            if not self._topics[topic]:
                del self._topics[topic]
