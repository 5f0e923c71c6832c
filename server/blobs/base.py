"""The BlobStore protocol: streamed writes that commit only when complete and verified."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

CHUNK_SIZE = 1024 * 1024


class BlobWriter(Protocol):
    """An upload in progress; invisible until `commit`."""

    size: int

    async def write(self, data: bytes) -> None:
        """Append bytes."""

    async def commit(self) -> str:
        """Make the blob visible under its key; returns the SHA-256 hex of its bytes.

        Raises InvalidArgument when the key is a SHA-256 that the bytes do not match."""

    async def abort(self) -> None:
        """Drop what was written."""


class BlobStore(Protocol):
    """Blobs by key, shared by every server replica and reachable by workers."""

    async def writer(self, key: str) -> BlobWriter:
        """Start writing the blob `key`."""

    def read(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset`, in chunks; raises NotFound if it does not exist."""

    async def size(self, key: str) -> int | None:
        """The blob's size, or None if it does not exist."""
