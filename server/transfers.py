"""File transfers over the blob store: resumable uploads and ranged downloads.

HTTP details travel as gRPC metadata, because Envoy's transcoder forwards request
headers as metadata and response metadata as headers: the `Range` request header, and
`x-jobwire-content-length` (the request's `Content-Length`, copied by Envoy's Lua filter,
which the transcoder would otherwise drop). Responses set `content-range`,
`x-jobwire-content-length` and `x-jobwire-http-status`, which the Lua filter turns into
`Content-Length` and the HTTP status for REST clients (and strips for gRPC ones). A REST
upload's resume token travels in the `x-jobwire-resume-token` header (a secret: not in the URL).
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

from google.api import httpbody_pb2

from jobwire.server.blobs import BlobStore
from jobwire.server.errors import Conflict, InvalidArgument, TooLarge

CONTENT_LENGTH = "x-jobwire-content-length"
RESUME_TOKEN = "x-jobwire-resume-token"
HTTP_STATUS = "x-jobwire-http-status"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


async def receive(
    blobs: BlobStore,
    key: str,
    chunks: AsyncIterator[bytes],
    *,
    offset: int,
    expected: int,
    limit: int,
    owner: str = "",
) -> tuple[int, str]:
    """Store `chunks` as blob `key` from `offset`; returns (size, SHA-256 hex).

    `expected` (0: unknown) is the blob's total size: a stream that ends short raises Conflict,
    as does any interruption of the stream. The stored bytes are then kept for `owner` alone
    (see `owner`) to resume; without one nothing is kept: another client could otherwise finish
    the upload with bytes of its own."""
    if offset and not owner:
        raise Conflict(
            f"no interrupted upload of {key!r} is kept for a client without a resume token ({RESUME_TOKEN});"
            " start at offset 0"
        )
    writer = await blobs.writer(key, offset, owner=owner)
    try:
        async for data in chunks:
            if writer.size + len(data) > limit:
                raise TooLarge(f"upload exceeds the limit of {limit} bytes")
            if expected and writer.size + len(data) > expected:
                raise InvalidArgument(f"upload is longer than the announced {expected} bytes")
            await writer.write(data)
    except (TooLarge, InvalidArgument):
        await writer.abort()
        raise
    except BaseException:
        await (writer.suspend() if owner else writer.abort())
        raise
    if expected and writer.size < expected:
        got = f"upload incomplete: {writer.size} of {expected} bytes of {key!r} arrived"
        if not owner:
            await writer.abort()
            raise Conflict(f"{got}; nothing was kept (send a resume token to be able to resume)")
        await writer.suspend()
        raise Conflict(f"{got} and are stored; resume at offset {writer.size}")
    return writer.size, await writer.commit()


def owner(token: str) -> str:
    """Who may resume an upload started with the resume `token`: its SHA-256 hex (the server
    keeps no token); empty without one. InvalidArgument for a token too short to be a secret."""
    if not token:
        return ""
    if not 16 <= len(token) <= 256:
        raise InvalidArgument(f"a resume token has 16 to 256 characters, not {len(token)}")
    return hashlib.sha256(token.encode()).hexdigest()


def expected_size(offset: int, size: int, content_length: str | None) -> int:
    """The blob's announced total size: `size`, else offset + the HTTP Content-Length, else 0."""
    if size:
        return size
    if content_length and content_length.isdigit():
        return offset + int(content_length)
    return 0


@dataclass(frozen=True)
class Span:
    """The part of a blob a download sends, and the HTTP headers that describe it."""

    start: int
    length: int
    status: int = 200
    content_range: str = ""

    def metadata(self) -> list[tuple[str, str]]:
        """Response metadata: content length, and range and status for partial responses."""
        pairs = [(CONTENT_LENGTH, str(self.length)), ("accept-ranges", "bytes")]
        if self.status != 200:
            pairs += [(HTTP_STATUS, str(self.status)), ("content-range", self.content_range)]
        return pairs


def span(size: int, offset: int, length: int, range_header: str | None) -> Span:
    """What to send of a blob of `size` bytes: `offset`/`length` (gRPC), else an HTTP Range."""
    if offset or length:
        if offset > size or length < 0 or offset < 0:
            raise InvalidArgument(f"offset {offset} and length {length} do not fit a blob of {size} bytes")
        return Span(offset, min(length or size, size - offset))
    match = _RANGE.fullmatch((range_header or "").strip())
    if match is None or match.groups() == ("", ""):
        return Span(0, size)  # no Range, several ranges or another unit: the whole blob
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    else:
        start, end = max(size - int(last), 0), size - 1
    if start >= size or end < start:
        return Span(0, 0, 416, f"bytes */{size}")
    return Span(start, end - start + 1, 206, f"bytes {start}-{end}/{size}")


async def bodies(chunks: AsyncIterator[bytes], content_type: str) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """`chunks` as HttpBody messages: the content type on the first, at least one message."""
    first = True
    async for chunk in chunks:
        yield httpbody_pb2.HttpBody(content_type=content_type if first else "", data=chunk)
        first = False
    if first:
        yield httpbody_pb2.HttpBody(content_type=content_type)


def redirect(location: str) -> list[tuple[str, str]]:
    """Response metadata that Envoy's Lua filter turns into a `302 Found` to `location` (REST only)."""
    return [(HTTP_STATUS, "302"), ("location", location), (CONTENT_LENGTH, "0")]


def attachment(name: str) -> str:
    """A Content-Disposition value naming the file (RFC 6266; ASCII-safe for metadata)."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def content_type(name: str) -> str:
    """The MIME type a file name suggests, `application/octet-stream` when none."""
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
