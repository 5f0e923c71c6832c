"""Sending what a stream's queue holds at once as one message: a stream message costs far more than its bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message

BATCH_BYTES = 1024 * 1024
"""Queued messages go together up to about this size."""

M = TypeVar("M", bound=Message)
Q = TypeVar("Q")


def take_ready(first: M, queue: asyncio.Queue[Q], message: Callable[[Q], M]) -> list[M]:
    """`first`, then the messages `queue` holds right now (each taken out by `message`), in order, until
    about BATCH_BYTES of them."""
    messages, size = [first], first.ByteSize()
    while size < BATCH_BYTES and not queue.empty():
        messages.append(message(queue.get_nowait()))
        size += messages[-1].ByteSize()
    return messages
