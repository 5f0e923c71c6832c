"""The EventBus over PostgreSQL LISTEN/NOTIFY, so every server replica hears every other.

Each topic is a channel of its own (`jw_` + a hash of the name: channel names are short
identifiers), LISTENed on one dedicated connection while this process has a subscriber,
so a replica only receives the topics it follows. A payload carries the message as
base64 when it fits NOTIFY's 8000-byte limit; a larger one is written to the
`bus_messages` table and the payload carries only its row id (a pointer), read back by
the receivers. If the listening connection drops (the database stopped or restarted), every
subscriber gets `Lagged` (it re-reads the store), the bus reconnects with backoff (capped at
RECONNECT_MOST seconds) and LISTENs to every followed channel again, then wakes every subscriber once
more: a notification sent while nobody listened is re-read, not missed. Subscribing while the
database is down succeeds; the channel is listened to on reconnect.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from jobwire.server.bus.memory import QUEUE_SIZE, MemorySubscription
from jobwire.server.errors import JOB_STORE, raise_dependency_error
from jobwire.server.store.postgres import CONNECT_SECONDS, keep_session
from jobwire.server.store.postgres_schema import migrate

log = logging.getLogger(__name__)
INLINE_LIMIT = 7000
"""Largest payload sent inline (NOTIFY refuses more than 8000 bytes)."""
POINTER_TTL = 300.0
"""Seconds a pointed-to message body is kept: receivers read it within moments."""
_INBOX_SIZE = 8192
RECONNECT_MOST = 5.0
"""Most seconds between two attempts to reconnect the listening connection."""


def channel(topic: str) -> str:
    """The NOTIFY channel of a topic: a valid identifier whatever the topic's length or characters."""
    return "jw_" + hashlib.sha256(topic.encode()).hexdigest()[:40]


class PostgresBus:
    """EventBus whose messages travel through PostgreSQL; subscribers are local bounded queues."""

    def __init__(self, dsn: str, pool: asyncpg.Pool, queue_size: int = QUEUE_SIZE) -> None:
        self.dsn, self.pool, self.queue_size = dsn, pool, queue_size
        self._topics: defaultdict[str, set[MemorySubscription]] = defaultdict(set)
        self._channels: dict[str, str] = {}  # channel -> topic, for the topics listened to
        self._inbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue(_INBOX_SIZE)
        self._listener: asyncpg.Connection | None = None
        self._listen_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pointers = 0
        self._pending: list[tuple[str, str, asyncio.Future[None]]] = []  # NOTIFYs not sent yet
        self._sender: asyncio.Task[None] | None = None  # sending them

    @classmethod
    async def open(cls, dsn: str, queue_size: int = QUEUE_SIZE) -> PostgresBus:
        """Connect (a small pool to publish, one connection to listen) and start dispatching."""
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=4, timeout=CONNECT_SECONDS, reset=keep_session)
        try:
            async with pool.acquire() as connection:
                await migrate(connection)  # the table of large message bodies
            bus = cls(dsn, pool, queue_size)
            await bus._connect()
        except BaseException:
            await pool.close()
            raise
        bus._tasks = [asyncio.create_task(bus._dispatch()), asyncio.create_task(bus._reconnect())]
        return bus

    async def close(self) -> None:
        """Stop dispatching and close the connections."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if (listener := self._listener) is not None:
            self._listener = None
            with contextlib.suppress(Exception):
                await listener.close()
        await self.pool.close()

    async def publish(self, topic: str, message: bytes) -> None:
        """Raises `Unavailable` while the database is down (see errors.dependency_error)."""
        payload = "=" + base64.b64encode(message).decode()
        try:
            if len(payload) > INLINE_LIMIT:
                payload = "#" + str(await self._store(message))
            await self._notify(channel(topic), payload)
        except Exception as error:
            raise_dependency_error(error, JOB_STORE)
            raise

    async def _notify(self, name: str, payload: str) -> None:
        """NOTIFY, sent with the others published meanwhile: while one statement of notifications is
        on its way, the next ones wait and go together in the next (one round trip and one commit for
        many, in the order published). Returns once its statement is done; fails as it does."""
        sent = asyncio.get_running_loop().create_future()
        self._pending.append((name, payload, sent))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_pending())
        await asyncio.shield(sent)

    async def _send_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self.pool.execute(
                        "SELECT pg_notify(name, payload) FROM unnest($1::text[], $2::text[]) WITH ORDINALITY"
                        " AS notes(name, payload, n) ORDER BY n",
                        [name for name, _, _ in batch],
                        [payload for _, payload, _ in batch],
                    )
                except Exception as error:  # every publisher of the batch fails alike
                    for _, _, sent in batch:
                        if not sent.done():
                            sent.set_exception(error)
                            sent.exception()  # retrieved: a publisher that went away must not warn
                else:
                    for _, _, sent in batch:
                        if not sent.done():
                            sent.set_result(None)
        finally:
            self._sender = None

    async def _store(self, message: bytes) -> int:
        now = time.time()
        self._pointers += 1
        if self._pointers % 100 == 1:
            await self.pool.execute("DELETE FROM bus_messages WHERE created < $1", now - POINTER_TTL)
        row_id: int = await self.pool.fetchval(
            "INSERT INTO bus_messages (created, data) VALUES ($1, $2) RETURNING id", now, message
        )
        return row_id

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[MemorySubscription]:
        subscription = MemorySubscription(self.queue_size)
        if not self._topics[topic]:
            await self._listen(topic)
        self._topics[topic].add(subscription)
        try:
            yield subscription
        finally:
            self._topics[topic].discard(subscription)
            if not self._topics[topic]:
                del self._topics[topic]
                await self._unlisten(topic)

    async def _listen(self, topic: str) -> None:
        name = channel(topic)
        async with self._listen_lock:
            self._channels[name] = topic
            if self._listener is not None and not self._listener.is_closed():
                try:
                    await self._listener.add_listener(name, self._on_notify)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                    # The connection is failing: the reconnect listens to every channel again.
                    log.warning("event bus: LISTEN failed (%s); reconnecting", error)
                    self._lost.set()

    async def _unlisten(self, topic: str) -> None:
        name = channel(topic)
        async with self._listen_lock:
            if topic in self._topics:  # subscribed again meanwhile
                return
            self._channels.pop(name, None)
            if self._listener is not None and not self._listener.is_closed():
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await self._listener.remove_listener(name, self._on_notify)

    def _on_notify(self, connection: object, pid: int, name: str, payload: object) -> None:
        try:
            self._inbox.put_nowait((name, str(payload)))
        except asyncio.QueueFull:
            self._lag_all()

    def _lag_all(self) -> None:
        for subscriptions in self._topics.values():
            for subscription in subscriptions:
                subscription.lag()

    async def _dispatch(self) -> None:
        while True:
            name, payload = await self._inbox.get()
            topic = self._channels.get(name)
            if topic is None or topic not in self._topics:
                continue
            message = await self._body(payload)
            if message is None:
                for subscription in list(self._topics.get(topic, ())):
                    subscription.lag()
                continue
            for subscription in list(self._topics.get(topic, ())):
                subscription.offer(message)

    async def _body(self, payload: str) -> bytes | None:
        if payload.startswith("="):
            return base64.b64decode(payload[1:])
        try:
            data = await self.pool.fetchval("SELECT data FROM bus_messages WHERE id = $1", int(payload[1:]))
        except Exception as error:  # the database down, a timeout, a bad pointer: never the dispatcher's end
            log.warning("event bus: could not read a large message back from the database (%s)", error)
            return None
        return bytes(data) if data is not None else None

    async def _connect(self) -> None:
        listener = await asyncpg.connect(self.dsn, timeout=CONNECT_SECONDS)
        try:
            async with self._listen_lock:
                for name in list(self._channels):
                    await listener.add_listener(name, self._on_notify)
                previous, self._listener = self._listener, listener
                listener.add_termination_listener(self._on_termination)
        except BaseException:
            listener.terminate()
            raise
        if previous is not None and not previous.is_closed():
            previous.terminate()

    def _on_termination(self, connection: object) -> None:
        if connection is self._listener:  # not one this bus replaced or closed on purpose
            self._lost.set()

    async def _reconnect(self) -> None:
        """When the listening connection drops: tell subscribers they lagged, connect again (logging
        the outage once, not every try), then wake them again."""
        while True:
            await self._lost.wait()
            self._lost.clear()
            log.warning("event bus: lost the LISTEN connection; reconnecting")
            self._lag_all()
            delay, tries = 0.1, 0
            while True:
                try:
                    await self._connect()
                    break
                except Exception as error:  # refused, reset, timed out, shutting down: all the same here
                    if tries == 0:
                        log.warning("event bus: cannot reconnect yet (%s); retrying with backoff", error)
                    tries += 1
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MOST)
            if tries:
                log.warning("event bus: listening again after %d failed tries", tries)
            self._lost.clear()  # a LISTEN that failed meanwhile was on the connection just replaced
            self._lag_all()  # messages sent while reconnecting were missed

    async def flush(self) -> None:
        """Return once every message published before the call has reached local subscribers."""
        topic = f"flush:{uuid.uuid4().hex}"
        async with self.subscribe(topic) as subscription:
            await self.publish(topic, b"flush")
            async for _ in subscription:
                return
