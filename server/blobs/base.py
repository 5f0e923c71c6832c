"""The BlobStore protocol: streamed, resumable writes that commit only when complete and verified."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

CHUNK_SIZE = 1024 * 1024


class BlobWriter(Protocol):
    """An upload in progress; invisible until `commit`."""

    size: int
    """Bytes of the blob written so far, counting the resumed part."""

    async def write(self, data: bytes) -> None:
        """Append bytes."""

    async def commit(self) -> str:
        """Make the blob visible under its key; returns the SHA-256 hex of its bytes.

        Raises InvalidArgument (and drops the upload) when the key is a SHA-256 that the
        bytes do not match."""

    async def suspend(self) -> None:
        """Stop writing but keep what was written, for a later `writer(key, offset)`."""

    async def abort(self) -> None:
        """Drop what was written."""


class BlobStore(Protocol):
    """Blobs by key, shared by every server replica and reachable by workers."""

    async def writer(self, key: str, offset: int = 0) -> BlobWriter:
        """Start writing the blob `key` (offset 0), or resume a suspended upload at `offset`.

        Stored bytes past `offset` are dropped. Raises Conflict when another upload of the
        key is in progress or `offset` passes the stored bytes."""

    async def pending(self, key: str) -> tuple[int, bool]:
        """Bytes stored by an unfinished upload of `key` (the offset to resume from; 0: none),
        and whether an upload of it is running now."""

    def read(self, key: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` (at most `length`; 0: to the end), in chunks;
        raises NotFound if it does not exist."""

    async def size(self, key: str) -> int | None:
        """The blob's size, or None if it does not exist."""

    async def stale(self, before: float) -> list[str]:
        """Keys of the blobs last written before `before` (Unix seconds)."""

    async def delete(self, key: str) -> None:
        """Remove the blob, if it exists."""
