"""A Docker container's output, read exactly as the container wrote it, in a thread, handed to the loop.

A new container's output comes from an attach made before it starts (the engine forwards it as it
reads its pipes, many lines a piece); a container followed again after a worker restart is read
from the engine's log (one entry a line, far slower to serve: the engine flushes every entry).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

import docker
from docker.utils.socket import frames_iter
from google.protobuf import timestamp_pb2

from jobwire.worker.runtime import STDERR, STDOUT, Piece, Stream

Put = Callable[[Stream, bytes, str], None]
_HANDOFF = 512
"""Pieces of output the reader thread hands to the event loop between two waits for it."""
_REORDER_SECONDS = 2
"""How much earlier than the latest entry seen a late entry of the other stream may be stamped: the
engine copies stdout and stderr in a goroutine each, so it can write an entry of one after a later
one of the other."""


class Pieces:
    """What `read` hands on (in a thread of `threads`, from the first piece asked for), in order; at
    most `_HANDOFF` pieces wait in memory. `aclose` calls `close` (which should end `read`) and lets
    the thread go, unless the output ended already; before the first piece, it only calls `close`."""

    def __init__(
        self, threads: concurrent.futures.Executor, read: Callable[[Put], None], close: Callable[[], None]
    ) -> None:
        self._close, self._started = close, False
        self._pieces = _pieces(threads, read, close)

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> Piece:
        self._started = True
        return await anext(self._pieces)

    async def aclose(self) -> None:
        if not self._started:
            self._close()
        await self._pieces.aclose()


async def _pieces(
    threads: concurrent.futures.Executor, read: Callable[[Put], None], close: Callable[[], None]
) -> AsyncGenerator[Piece, None]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Piece | None] = asyncio.Queue()
    handed, closed = 0, False

    def put(stream: Stream, data: bytes, stamp: str) -> None:
        nonlocal handed
        if closed:
            return
        loop.call_soon_threadsafe(queue.put_nowait, (stream, data, stamp))
        handed += 1
        if handed % _HANDOFF == 0:  # let the loop catch up
            asyncio.run_coroutine_threadsafe(queue.join(), loop).result()

    def read_all() -> None:
        try:
            read(put)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    reader = loop.run_in_executor(threads, read_all)
    try:
        while (piece := await queue.get()) is not None:
            queue.task_done()
            yield piece
        await reader
    finally:
        if not reader.done():
            closed = True
            close()
            while not queue.empty():  # frees a reader waiting for the loop to catch up
                queue.get_nowait()
                queue.task_done()
            reader.add_done_callback(lambda done: done.exception())  # a closed socket's error is expected


def read_attached(attached: tuple[Any, Any], put: Put) -> None:
    """Hand on the frames of an attach until the container's output ends."""
    try:
        for stream, data in frames_iter(attached[1], tty=False):  # type: ignore[no-untyped-call]
            put(STDERR if stream == 2 else STDOUT, data, "")
    finally:
        close_attached(attached)


def close_attached(attached: tuple[Any, Any]) -> None:
    """Let go of an attach (more than once is fine)."""
    response, socket = attached
    with contextlib.suppress(OSError):
        response.close()  # first: it flushes the buffered reader over the socket
        socket.close()


def read_log(client: docker.DockerClient, container_id: str, put: Put) -> None:
    """Hand on the container's log from its first entry to its end."""
    seen = _Seen()
    _read_logs(client, container_id, put, True, seen)
    # A follower may end before the engine wrote the last entries (an unterminated last line is
    # flushed when the output closes): read on, without following, from a little before the latest
    # entry seen, skipping what was handed on.
    _read_logs(client, container_id, put, False, seen)


class _Seen:
    """The entries handed on lately, by (time, stream), to skip when a log is read again."""

    def __init__(self) -> None:
        self.latest = (0, 0)
        self.recent: collections.deque[tuple[tuple[int, int], int]] = collections.deque()
        self.counts: collections.Counter[tuple[tuple[int, int], int]] = collections.Counter()

    def since(self) -> str:
        """The `since` of a read that overlaps the entries kept (empty: none seen, read all)."""
        seconds, nanos = self.latest
        return f"{max(seconds - _REORDER_SECONDS, 0)}.{nanos:09d}" if self.latest > (0, 0) else ""

    def add(self, entry: tuple[tuple[int, int], int]) -> None:
        self.latest = max(self.latest, entry[0])
        self.recent.append(entry)
        self.counts[entry] += 1
        while self.recent[0][0] < (self.latest[0] - _REORDER_SECONDS, self.latest[1]):
            self.counts[self.recent.popleft()] -= 1

    def take(self, entry: tuple[tuple[int, int], int]) -> bool:
        """True (and forgotten) when the entry was handed on already."""
        if self.counts[entry] <= 0:
            return False
        self.counts[entry] -= 1
        return True


def _read_logs(client: docker.DockerClient, container_id: str, put: Put, follow: bool, seen: _Seen) -> None:
    """Read the container's log (frames of an 8-byte header, stream and size, then a timestamped entry),
    handing each entry on and adding it to `seen`; a read not following skips what `seen` holds."""
    params: dict[str, Any] = {"follow": int(follow), "stdout": 1, "stderr": 1, "timestamps": 1}
    if since := seen.since():
        params["since"] = since
    api: Any = client.api  # the raw response: the SDK's helpers drop the stream ids of timestamped logs
    url = api._url("/containers/{0}/logs", container_id)
    with api._get(url, params=params, stream=True, timeout=None) as response:
        api._raise_for_status(response)
        while len(header := _read_exactly(response.raw, 8)) == 8:
            stream = STDERR if header[0] == 2 else STDOUT
            stamp_bytes, _, data = _read_exactly(response.raw, int.from_bytes(header[4:8], "big")).partition(b" ")
            stamp = stamp_bytes.decode()
            entry = (_stamp_key(stamp), stream)
            if not follow and seen.take(entry):  # a read again: the entries handed on already
                continue
            seen.add(entry)
            put(stream, data, stamp)


def _stamp_key(stamp: str) -> tuple[int, int]:
    parsed = timestamp_pb2.Timestamp()
    parsed.FromJsonString(stamp)
    return parsed.seconds, parsed.nanos


def _read_exactly(raw: Any, size: int) -> bytes:
    data = b""
    while len(data) < size and (piece := raw.read(size - len(data))):
        data += piece
    return data
