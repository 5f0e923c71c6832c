"""EventBus contract: every backend delivers, isolates topics and signals lag the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest

from jobwire.server.bus import EventBus, Lagged, Subscription
from jobwire.server.bus import memory as memory_bus


@dataclass(frozen=True)
class Backend:
    """A bus under test and the most messages one subscriber may buffer before it lags."""

    bus: EventBus
    bound: int


@asynccontextmanager
async def memory() -> AsyncIterator[Backend]:
    yield Backend(memory_bus.MemoryBus(), memory_bus.QUEUE_SIZE)


BackendFactory = Callable[[], AbstractAsyncContextManager[Backend]]


@pytest.fixture(params=[memory])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    factory: BackendFactory = request.param
    async with factory() as opened:
        yield opened


@pytest.fixture
def bus(backend: Backend) -> EventBus:
    return backend.bus


async def take(subscription: Subscription, count: int) -> list[bytes]:
    """The next `count` messages of the subscription."""
    messages: list[bytes] = []
    if count:
        async for message in subscription:
            messages.append(message)
            if len(messages) == count:
                break
    return messages


async def drain(subscription: Subscription, published: int, into: list[bytes]) -> None:
    """Collect messages until all `published` arrived (a bus that never lags) or Lagged is raised."""
    async for message in subscription:
        into.append(message)
        if len(into) == published:
            return


async def test_subscriber_gets_messages_in_publish_order(bus: EventBus) -> None:
    async with bus.subscribe("t") as subscription:
        for message in (b"one", b"two", b"three"):
            await bus.publish("t", message)
        assert await take(subscription, 3) == [b"one", b"two", b"three"]


async def test_only_messages_after_subscribing_are_delivered(bus: EventBus) -> None:
    await bus.publish("t", b"before")
    async with bus.subscribe("t") as subscription:
        await bus.publish("t", b"after")
        assert await take(subscription, 1) == [b"after"]


async def test_every_subscriber_gets_every_message(bus: EventBus) -> None:
    async with bus.subscribe("t") as first, bus.subscribe("t") as second:
        await bus.publish("t", b"a")
        await bus.publish("t", b"b")
        assert await take(first, 2) == [b"a", b"b"]
        assert await take(second, 2) == [b"a", b"b"]


async def test_topics_are_isolated(bus: EventBus) -> None:
    async with bus.subscribe("left") as left, bus.subscribe("right") as right:
        await bus.publish("right", b"for right")
        await bus.publish("left", b"for left")
        # Each subscriber's first message is its own topic's, though the other was published first.
        assert await take(left, 1) == [b"for left"]
        assert await take(right, 1) == [b"for right"]


async def test_publish_without_subscribers_is_a_no_op(bus: EventBus) -> None:
    await bus.publish("nobody", b"x")
    async with bus.subscribe("nobody") as subscription:
        await bus.publish("nobody", b"y")
        assert await take(subscription, 1) == [b"y"]


async def test_unsubscribed_subscription_no_longer_blocks_others(bus: EventBus) -> None:
    async with bus.subscribe("t") as staying:
        async with bus.subscribe("t"):
            pass
        await bus.publish("t", b"x")
        assert await take(staying, 1) == [b"x"]


async def test_slow_subscriber_gets_lagged_not_unbounded_buffering(backend: Backend) -> None:
    bus = backend.bus
    published = backend.bound + 10
    async with bus.subscribe("t") as slow:
        for index in range(published):
            await bus.publish("t", str(index).encode())
        received: list[bytes] = []
        with pytest.raises(Lagged):
            await drain(slow, published, received)
        # What it got is an in-order prefix no longer than the bound; the rest was dropped.
        assert 0 < len(received) <= backend.bound
        assert received == [str(index).encode() for index in range(len(received))]


async def test_lag_does_not_spill_into_other_subscribers(backend: Backend) -> None:
    bus = backend.bus
    async with bus.subscribe("t") as slow, bus.subscribe("t") as fast:
        for index in range(backend.bound + 1):
            await bus.publish("t", str(index).encode())
            assert await take(fast, 1) == [str(index).encode()]
        with pytest.raises(Lagged):
            await drain(slow, backend.bound + 1, [])


async def test_lagged_subscription_keeps_delivering_new_messages(backend: Backend) -> None:
    bus = backend.bus
    async with bus.subscribe("t") as subscription:
        for index in range(backend.bound + 1):
            await bus.publish("t", str(index).encode())
        with pytest.raises(Lagged):
            await drain(subscription, backend.bound + 1, [])
        # Consumers catch Lagged, re-read the store, then iterate the same subscription again.
        await bus.publish("t", b"fresh")
        assert await take(subscription, 1) == [b"fresh"]
