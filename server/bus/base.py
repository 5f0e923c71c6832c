"""The EventBus protocol: topics of byte messages, delivered to live subscribers only.

The bus is a notification path, never the record: a subscriber that falls
behind gets `Lagged` and re-reads what it missed from the state store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class Lagged(Exception):
    """The subscriber fell behind and messages were dropped; re-read from the store."""


class Subscription(Protocol):
    """Messages of one topic from the moment of subscribing."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Yield messages; raises Lagged after an overflow."""


class EventBus(Protocol):
    """Publish/subscribe by topic name."""

    async def publish(self, topic: str, message: bytes) -> None:
        """Deliver `message` to every current subscriber of `topic`."""

    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Subscription]:
        """An async context manager yielding a subscription (use with `async with`)."""

    async def close(self) -> None:
        """Stop delivering and release connections."""


async def open_bus(database: str) -> EventBus:
    """The bus that reaches every replica sharing `database`: LISTEN/NOTIFY on PostgreSQL,
    in-process otherwise (one server process)."""
    from jobwire.server.store.base import is_postgres

    if is_postgres(database):
        from jobwire.server.bus.postgres import PostgresBus

        return await PostgresBus.open(database)
    from jobwire.server.bus.memory import MemoryBus

    return MemoryBus()
