"""The worker's messages for the server, queued while the stream is down or busy."""

from __future__ import annotations

import asyncio
import itertools

from jobwire.core.batching import take_ready
from jobwire.v1 import workers_pb2


class Outbox:
    """Messages for the server in order, except heartbeats, which go first: a backlog of log batches
    must never delay the heartbeat that keeps the worker's leases."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.PriorityQueue[tuple[int, int, workers_pb2.ConnectRequest]] = asyncio.PriorityQueue(size)
        self._sequence = itertools.count()

    async def put(self, message: workers_pb2.ConnectRequest) -> None:
        priority = 0 if message.HasField("heartbeat") else 1
        await self._queue.put((priority, next(self._sequence), message))

    async def get(self) -> workers_pb2.ConnectRequest:
        """The next message, with whatever else is queued now as one batch."""
        messages = take_ready((await self._queue.get())[2], self._queue, lambda entry: entry[2])
        if len(messages) == 1:
            return messages[0]
        return workers_pb2.ConnectRequest(batch=workers_pb2.ConnectRequestBatch(messages=messages))
