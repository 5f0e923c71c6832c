"""The filesystem BlobStore: one file per key under the data directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from jobwire.definition import is_sha256
from jobwire.server.blobs.base import CHUNK_SIZE
from jobwire.server.errors import Conflict, InvalidArgument, NotFound

PARTIAL_MAX_AGE = 7 * 24 * 3600
"""Suspended uploads untouched for this long are removed when the store opens."""


class FileBlobStore:
    """Blobs as files `<root>/<key>`; uploads go to `<root>/.partial/<key>` until committed.

    One upload per key at a time (in this process): a partial file belongs to the upload
    that holds the key, and survives it when suspended so that the next one can resume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._partials = root / ".partial"
        self._partials.mkdir(parents=True, exist_ok=True)
        self._uploading: set[str] = set()
        _remove_stale(self._partials, time.time() - PARTIAL_MAX_AGE)

    async def writer(self, key: str, offset: int = 0) -> FileBlobWriter:
        if key in self._uploading:
            raise Conflict(f"another upload of {key!r} is in progress; retry when it has ended")
        self._uploading.add(key)
        try:
            partial = self._partials / key
            handle, digest = await asyncio.to_thread(_open_at, partial, offset)
        except BaseException:
            self._uploading.discard(key)
            raise
        return FileBlobWriter(key, partial, self.root / key, handle, digest, offset, self._uploading.discard)

    async def pending(self, key: str) -> tuple[int, bool]:
        try:
            stored = (await asyncio.to_thread(os.stat, self._partials / key)).st_size
        except FileNotFoundError:
            stored = 0
        return stored, key in self._uploading

    async def read(self, key: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        try:
            handle = await asyncio.to_thread((self.root / key).open, "rb")
        except FileNotFoundError:
            raise NotFound(f"file {key!r} not found") from None
        remaining = length if length > 0 else None
        with handle:
            handle.seek(offset)
            while remaining != 0:
                wanted = CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining)
                chunk = await asyncio.to_thread(handle.read, wanted)
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    async def size(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(os.stat, self.root / key)).st_size
        except FileNotFoundError:
            return None


def _open_at(partial: Path, offset: int) -> tuple[BinaryIO, hashlib._Hash]:
    """The partial file opened for appending at `offset`, and the hash of its bytes before it."""
    digest = hashlib.sha256()
    if offset == 0:
        return partial.open("wb"), digest
    try:
        handle = partial.open("r+b")
    except FileNotFoundError:
        raise Conflict(f"no interrupted upload of {partial.name!r} is stored; start at offset 0") from None
    stored = os.fstat(handle.fileno()).st_size
    if offset > stored:
        handle.close()
        raise Conflict(f"only {stored} bytes of {partial.name!r} are stored; resume at offset {stored}")
    handle.truncate(offset)
    while chunk := handle.read(min(CHUNK_SIZE, offset - handle.tell())):
        digest.update(chunk)
    return handle, digest


def _remove_stale(folder: Path, before: float) -> None:
    for path in folder.iterdir():
        if path.stat().st_mtime < before:
            path.unlink(missing_ok=True)


class FileBlobWriter:
    """An upload to a partial file, hashed as it is written."""

    def __init__(
        self,
        key: str,
        partial: Path,
        final: Path,
        handle: BinaryIO,
        digest: hashlib._Hash,
        offset: int,
        release: Callable[[str], None],
    ) -> None:
        self.key, self.size = key, offset
        self._partial, self._final, self._handle = partial, final, handle
        self._hash, self._release = digest, release

    async def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        await asyncio.to_thread(self._handle.write, data)

    async def commit(self) -> str:
        digest = self._hash.hexdigest()
        if is_sha256(self.key) and digest != self.key:
            await self.abort()
            raise InvalidArgument(
                f"checksum mismatch: the bytes hash to {digest}, not to the key {self.key}; nothing was stored"
            )
        try:
            await asyncio.to_thread(self._handle.close)
            await asyncio.to_thread(os.replace, self._partial, self._final)
        finally:
            self._release(self.key)
        return digest

    # Closing and unlinking happen without awaiting: they run while the upload's task is being
    # cancelled (the client went away), where a second cancel could cut an await short.
    async def suspend(self) -> None:
        try:
            self._handle.close()
        finally:
            self._release(self.key)

    async def abort(self) -> None:
        try:
            self._handle.close()
            self._partial.unlink(missing_ok=True)
        finally:
            self._release(self.key)
