"""The BlobStore protocol: streamed, resumable writes that commit only when complete and verified."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from jobwire.core.definition import is_sha256

CHUNK_SIZE = 1024 * 1024
URL_SECONDS = 3600
"""How long a presigned URL works."""


def put_headers(key: str) -> dict[str, str]:
    """Headers a presigned PUT of `key` must carry: the S3 checksum of a SHA-256 key, which the
    URL's signature covers, so the bucket refuses bytes of another hash."""
    if not is_sha256(key):
        return {}
    return {"x-amz-checksum-sha256": base64.b64encode(bytes.fromhex(key)).decode()}


class BlobWriter(Protocol):
    """An upload in progress; invisible until `commit`."""

    size: int
    """Bytes of the blob written so far, counting the resumed part."""

    async def write(self, data: bytes) -> None:
        """Append bytes."""

    async def commit(self) -> str:
        """Make the blob visible under its key; returns the SHA-256 hex of its bytes.

        Raises InvalidArgument (and drops the upload) when the key is a SHA-256 that the
        bytes do not match. A key that is not a SHA-256 is written once: AlreadyExists (the
        upload dropped) when a blob of other bytes is there; one of the same bytes is kept."""

    async def suspend(self) -> None:
        """Stop writing but keep what was written, for a later `writer(key, offset)`."""

    async def abort(self) -> None:
        """Drop what was written."""


class BlobStore(Protocol):
    """Blobs by key, shared by every server replica and reachable by workers."""

    async def writer(self, key: str, offset: int = 0, *, owner: str = "") -> BlobWriter:
        """Start writing the blob `key` (offset 0), or resume at `offset` the upload `owner`
        suspended (each owner, e.g. the digest of a client's secret, has its own).

        Stored bytes past `offset` are dropped. Raises Conflict when another upload of the
        key is in progress or `offset` passes the stored bytes."""

    async def pending(self, key: str, *, owner: str = "") -> tuple[int, bool]:
        """Bytes stored by `owner`'s unfinished upload of `key` (the offset to resume from; 0:
        none), and whether an upload of the key is running now."""

    def read(self, key: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` (at most `length`; 0: to the end), in chunks;
        raises NotFound if it does not exist."""

    async def size(self, key: str) -> int | None:
        """The blob's size, or None if it does not exist."""

    async def stale(self, before: float) -> list[str]:
        """Keys of the blobs last written before `before` (Unix seconds)."""

    async def delete(self, key: str) -> None:
        """Remove the blob, if it exists."""

    async def presigned_url(
        self, key: str, *, method: str = "GET", filename: str = "", content_type: str = ""
    ) -> str | None:
        """A URL that reads (GET) or writes (PUT) the blob without passing its bytes through the
        server, or None when this store has none (the bytes then go through the server).
        `filename` (a Content-Disposition value) and `content_type` shape a GET's response."""

    async def close(self) -> None:
        """Release connections."""


async def open_blobs(
    url: str, data_directory: Path, *, endpoint: str = "", public_endpoint: str = "", region: str = ""
) -> BlobStore:
    """The blob store for `url`: `s3://bucket/prefix` (at `endpoint`, e.g. a MinIO or moto server;
    empty: AWS; presigned URLs name `public_endpoint`), or empty for the folder `<data>/blobs`."""
    if not url:
        from jobwire.server.blobs.filesystem import FileBlobStore

        return FileBlobStore(data_directory / "blobs")
    if url.startswith("s3://"):
        from jobwire.server.blobs.s3 import S3BlobStore

        return await S3BlobStore.open(url, endpoint=endpoint, public_endpoint=public_endpoint, region=region)
    raise ValueError(f"unsupported blob store URL {url!r} (use s3://bucket/prefix, or nothing for the data directory)")
