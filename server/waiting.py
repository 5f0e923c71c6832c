"""Worker sessions waiting in line for a queue's work, woken as many at a time as there is work.

A server subscribes once to each queue its workers serve (not once per worker). A notice that
n jobs arrived wakes the sessions that have waited longest, until their free slots add up to n;
a session whose claim filled every slot it had passes the wake on (there may be more), and one
whose claim came short passes it only to a session with more free GPUs (the jobs left may need
them). So a job submitted wakes one session, not every connected worker of its queue: with
1,000 idle workers a submission costs one claim, not 1,000.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from jobwire.server import topics
from jobwire.server.bus import EventBus, Lagged


class Waiter(Protocol):
    """A worker session, as the line sees it."""

    wake: asyncio.Event

    def free_slots(self) -> int:
        """Jobs it could take now."""

    def free_gpus(self) -> int:
        """GPU devices none of its jobs holds."""


class Line:
    """The sessions of one queue on this server waiting for work, oldest first."""

    def __init__(self) -> None:
        self._parked: dict[Waiter, None] = {}
        self._called: set[Waiter] = set()  # woken by the line, not yet back to it
        self._pending = False  # work was announced while no session waited
        self.ready = asyncio.Event()  # set once the line hears its queue's notices
        self.members = 0
        self.relay: asyncio.Task[None] | None = None

    async def listening(self) -> None:
        """While the line hears its queue's notices; raises what ended that (a lost bus connection)."""
        assert self.relay is not None
        await asyncio.shield(self.relay)

    def park(self, waiter: Waiter) -> bool:
        """Wait in line (until `waiter.wake`); False, and claim at once, when work was announced while
        nobody waited."""
        if self._pending:
            self._pending = False
            return False
        self._parked[waiter] = None
        return True

    def leave(self, waiter: Waiter) -> bool:
        """Out of the line; True when the line had woken `waiter` for work (which it now owes a claim,
        or a `pass_on`)."""
        self._parked.pop(waiter, None)
        if waiter in self._called:
            self._called.discard(waiter)
            return True
        return False

    def notify(self, jobs: int) -> None:
        """`jobs` arrived: wake the oldest waiters until their free slots cover them."""
        while jobs > 0 and self._parked:
            waiter = self._call(next(iter(self._parked)))
            jobs -= max(waiter.free_slots(), 1)
        if jobs > 0:
            self._pending = True

    def pass_on(self, gpus_left: int | None = None) -> None:
        """After a claim: it took all it asked for (None), so wake the next waiter (or leave the work
        pending); or it came short with `gpus_left` devices free, so wake the oldest waiter with more."""
        for waiter in self._parked:
            if gpus_left is None or waiter.free_gpus() > gpus_left:
                self._call(waiter)
                return
        if gpus_left is None:
            self._pending = True

    def _call(self, waiter: Waiter) -> Waiter:
        del self._parked[waiter]
        self._called.add(waiter)
        waiter.wake.set()
        return waiter


class Lines:
    """This server's lines, one per queue that has sessions, each fed by one bus subscription."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._lines: dict[str, Line] = {}

    @contextlib.asynccontextmanager
    async def joined(self, queue: str) -> AsyncIterator[Line]:
        """The queue's line, once it hears the queue's notices, while the caller serves the queue."""
        line = self._lines.get(queue)
        if line is None:
            line = self._lines[queue] = Line()
            line.relay = asyncio.create_task(self._relay(queue, line))
        relay = line.relay
        assert relay is not None
        line.members += 1
        try:
            ready = asyncio.ensure_future(line.ready.wait())
            await asyncio.wait([ready, relay], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if relay.done():
                relay.result()  # the subscription failed: raise why
            yield line
        finally:
            line.members -= 1
            if not line.members:
                relay.cancel()
                del self._lines[queue]

    async def _relay(self, queue: str, line: Line) -> None:
        async with self.bus.subscribe(topics.queue(queue)) as subscription:
            line.ready.set()
            while True:
                try:
                    async for notice in subscription:
                        line.notify(topics.noticed_jobs(notice))
                except Lagged:  # notices were lost: wake one session, which passes the wake on while it finds work
                    line.notify(1)
