"""The filesystem BlobStore: one file per key under the data directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from jobwire.definition import DefinitionError, check_key, is_sha256
from jobwire.server.blobs.base import CHUNK_SIZE
from jobwire.server.errors import InvalidArgument, NotFound


class FileBlobStore:
    """Blobs as files `<root>/<key>`; uploads go to `<root>/.partial/` until committed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / ".partial").mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        """The file of `key`; InvalidArgument for a key that could name a path outside the root."""
        try:
            check_key(key)
        except DefinitionError as error:
            raise InvalidArgument(str(error)) from None
        return self.root / key

    async def writer(self, key: str) -> FileBlobWriter:
        final = self._path(key)
        partial = self.root / ".partial" / f"{key}.{uuid.uuid4().hex}"
        handle = await asyncio.to_thread(partial.open, "wb")
        return FileBlobWriter(key, partial, final, handle)

    async def read(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise NotFound(f"file {key!r} not found") from None
        with handle:
            handle.seek(offset)
            while chunk := await asyncio.to_thread(handle.read, CHUNK_SIZE):
                yield chunk

    async def size(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(os.stat, self._path(key))).st_size
        except FileNotFoundError:
            return None


class FileBlobWriter:
    """An upload to a partial file, hashed as it is written."""

    def __init__(self, key: str, partial: Path, final: Path, handle: BinaryIO) -> None:
        self.key, self.size = key, 0
        self._partial, self._final, self._handle = partial, final, handle
        self._hash = hashlib.sha256()

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
        await asyncio.to_thread(self._handle.close)
        await asyncio.to_thread(os.replace, self._partial, self._final)
        return digest

    async def abort(self) -> None:
        await asyncio.to_thread(self._handle.close)
        self._partial.unlink(missing_ok=True)
