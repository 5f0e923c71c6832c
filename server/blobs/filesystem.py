"""The filesystem BlobStore: one file per key under the data directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from jobwire.core.definition import DefinitionError, check_key, is_sha256
from jobwire.core.writing import ChunkWriter
from jobwire.server.blobs.base import CHUNK_SIZE
from jobwire.server.errors import AlreadyExists, Conflict, InvalidArgument, NotFound

PARTIAL_MAX_AGE = 7 * 24 * 3600
"""Suspended uploads untouched for this long are removed when the store opens."""


class FileBlobStore:
    """Blobs as files `<root>/<key>`; each upload writes its own `<root>/.partial/<key>.<uuid>`.

    Uploads of one key never mix. A suspended upload becomes its owner's resumable partial of
    the key, `<root>/.partial/<key>~<owner>` (the owner's latest one wins); a resume claims it
    by renaming it to its own name, so two resumes cannot both continue it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._partials = root / ".partial"
        self._partials.mkdir(parents=True, exist_ok=True)
        self._running: Counter[str] = Counter()
        _remove_stale(self._partials, time.time() - PARTIAL_MAX_AGE)

    def _path(self, key: str) -> Path:
        """The file of `key`; InvalidArgument for a key that could name a path outside the root."""
        try:
            check_key(key)
        except DefinitionError as error:
            raise InvalidArgument(str(error)) from None
        return self.root / key

    async def writer(self, key: str, offset: int = 0, *, owner: str = "") -> FileBlobWriter:
        final = self._path(key)
        own, resumable = self._partials / f"{key}.{uuid.uuid4().hex}", self._resumable(key, owner)
        handle, digest = await asyncio.to_thread(_open_at, resumable, own, offset)
        self._running[key] += 1
        return FileBlobWriter(key, own, final, resumable, handle, digest, offset, self._ended)

    def _resumable(self, key: str, owner: str) -> Path:
        """The suspended upload of `key` by `owner` (`~` is in no key, so names never collide)."""
        return self._partials / (f"{key}~{owner}" if owner else key)

    def _ended(self, key: str) -> None:
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]

    async def pending(self, key: str, *, owner: str = "") -> tuple[int, bool]:
        self._path(key)
        try:
            stored = (await asyncio.to_thread(os.stat, self._resumable(key, owner))).st_size
        except FileNotFoundError:
            stored = 0
        return stored, key in self._running

    async def read(self, key: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
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
            return (await asyncio.to_thread(os.stat, self._path(key))).st_size
        except FileNotFoundError:
            return None

    async def stale(self, before: float) -> list[str]:
        def scan() -> list[str]:
            with os.scandir(self.root) as entries:
                return [e.name for e in entries if e.is_file() and e.stat().st_mtime < before]

        return await asyncio.to_thread(scan)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    async def presigned_url(
        self, key: str, *, method: str = "GET", filename: str = "", content_type: str = ""
    ) -> str | None:
        """None: files are only reachable through the server."""
        return None

    async def close(self) -> None:
        pass


def _open_at(resumable: Path, own: Path, offset: int) -> tuple[BinaryIO, hashlib._Hash]:
    """The upload's own partial file, open for appending at `offset`, and the hash of the bytes before it.

    Offset 0 starts an empty file; a larger offset claims the key's resumable partial."""
    digest = hashlib.sha256()
    if offset == 0:
        return own.open("wb"), digest
    try:
        os.rename(resumable, own)
    except FileNotFoundError:
        raise Conflict(f"no interrupted upload of {resumable.name!r} is stored; start at offset 0") from None
    handle = own.open("r+b")
    stored = os.fstat(handle.fileno()).st_size
    if offset > stored:
        handle.close()
        os.rename(own, resumable)
        raise Conflict(f"only {stored} bytes of {resumable.name!r} are stored; resume at offset {stored}")
    handle.truncate(offset)
    while chunk := handle.read(min(CHUNK_SIZE, offset - handle.tell())):
        digest.update(chunk)
    return handle, digest


def _write_once(partial: Path, final: Path, digest: str) -> None:
    """Make `partial` the blob `final` unless a blob is there: a key that is not a SHA-256 is
    written once (a hard link fails when the name exists, atomically, whoever races). An existing
    blob of the same bytes is kept as it is; one of other bytes refuses the upload."""
    try:
        os.link(partial, final)
    except FileExistsError:
        with final.open("rb") as stored:
            same = hashlib.file_digest(stored, "sha256").hexdigest() == digest
        if not same:
            raise AlreadyExists(
                f"file {final.name!r} exists with other bytes; a key that is not a SHA-256 of its bytes is"
                " written once: upload under another key (or under the bytes' SHA-256)"
            ) from None


def _remove_stale(folder: Path, before: float) -> None:
    for path in folder.iterdir():
        if path.stat().st_mtime < before:
            path.unlink(missing_ok=True)


class FileBlobWriter:
    """An upload to its own partial file, hashed as it is written."""

    def __init__(
        self,
        key: str,
        partial: Path,
        final: Path,
        resumable: Path,
        handle: BinaryIO,
        digest: hashlib._Hash,
        offset: int,
        ended: Callable[[str], None],
    ) -> None:
        self.key, self.size = key, offset
        self._partial, self._final, self._resumable = partial, final, resumable
        self._chunks, self._digest, self._ended = ChunkWriter(handle, digest), digest, ended

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        await self._chunks.append(data)

    async def commit(self) -> str:
        try:
            await self._chunks.flush()
        except BaseException:  # the last chunk failed to be written, or the client went away
            await self.suspend()
            raise
        digest = self._digest.hexdigest()
        if is_sha256(self.key) and digest != self.key:
            await self.abort()
            raise InvalidArgument(
                f"checksum mismatch: the bytes hash to {digest}, not to the key {self.key}; nothing was stored"
            )
        try:
            await asyncio.to_thread(self._chunks.handle.close)
            if is_sha256(self.key):
                await asyncio.to_thread(os.replace, self._partial, self._final)
            else:
                await asyncio.to_thread(_write_once, self._partial, self._final, digest)
            self._resumable.unlink(missing_ok=True)  # the blob is complete: nothing left to resume
        finally:
            self._partial.unlink(missing_ok=True)
            self._ended(self.key)
        return digest

    # Closing, renaming and unlinking happen without awaiting: they run while the upload's task
    # is being cancelled (the client went away), where a second cancel could cut an await short.
    async def suspend(self) -> None:
        try:
            self._chunks.stop(keep=True)
            self._chunks.handle.close()
            os.replace(self._partial, self._resumable)
        finally:
            self._ended(self.key)

    async def abort(self) -> None:
        try:
            self._chunks.stop(keep=False)
            self._chunks.handle.close()
            self._partial.unlink(missing_ok=True)
        finally:
            self._ended(self.key)
