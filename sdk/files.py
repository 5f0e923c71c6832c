"""Blobs on the server (FileService): chunked uploads and downloads by key, with progress.

The one file-transfer client: the SDK, the CLI and the worker all move bytes with it.
Uploads under a SHA-256 key are skipped when the server already has the blob; an
upload cut short resumes at the offset the server kept for it (`GetUpload`; bound to it by a
secret resume token, so only this upload can resume it); downloads resume at the byte they
reached and are checked against a SHA-256 key.
When the server keeps blobs in S3 it hands out presigned URLs (`GetFileUrl`), and the
bytes go straight between this client and the bucket instead of through the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from jobwire.connection import Calls
from jobwire.core import wire
from jobwire.core.definition import is_sha256
from jobwire.core.writing import ChunkWriter
from jobwire.errors import FileNotFound, RequestFailed, translate
from jobwire.v1 import files_pb2, files_pb2_grpc

CHUNK_SIZE = 1024 * 1024
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


@dataclass(frozen=True)
class Transfer:
    """Progress of one upload or download: `done` of `total` bytes so far.

    `complete` is set once: when the server has confirmed the upload, or the download
    is verified and in place. `skipped` (with `complete`): the server already had the blob.
    """

    name: str
    done: int
    total: int
    complete: bool = False
    skipped: bool = False


Progress = Callable[[Transfer], None]
"""Called as a transfer advances (after every chunk) and once more, `complete`, when it ends."""


def sha256_file(path: Path) -> str:
    """SHA-256 hex of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_SIZE):
            digest.update(block)
    return digest.hexdigest()


class FileClient:
    """Moves blobs between local files and the server, streamed in chunks."""

    def __init__(self, channel: grpc.aio.Channel, calls: Calls | None = None) -> None:
        self.stub = files_pb2_grpc.FileServiceStub(channel)
        # UploadFile and DownloadFile with their chunks' data encoded and decoded by `jobwire.core.wire`.
        self.upload_call = channel.stream_unary(
            "/jobwire.v1.FileService/UploadFile",
            request_serializer=bytes,
            response_deserializer=files_pb2.UploadFileResponse.FromString,
        )
        self.download_call = channel.unary_stream(
            "/jobwire.v1.FileService/DownloadFile",
            request_serializer=files_pb2.DownloadFileRequest.SerializeToString,
            response_deserializer=wire.body_data,
        )
        self.calls = calls or Calls()
        self._direct = True  # False once the server said it has no URLs (or no GetFileUrl)

    async def url(self, key: str, method: files_pb2.FileUrlMethod.ValueType) -> files_pb2.GetFileUrlResponse | None:
        """A presigned URL that moves the blob's bytes straight to or from the server's bucket, or
        None when they must go through the server (its blob store has no URLs)."""
        if not self._direct:
            return None
        request = files_pb2.GetFileUrlRequest(key=key, method=method)
        try:
            response = await self.calls.unary(self.stub.GetFileUrl, request, not_found=FileNotFound)
        except RequestFailed as error:
            if error.code != grpc.StatusCode.UNIMPLEMENTED:  # a server older than GetFileUrl
                raise
            response = files_pb2.GetFileUrlResponse()
        if not response.url:
            self._direct = False
            return None
        return response

    async def size(self, key: str) -> int | None:
        """The blob's size in bytes, or None when the server does not have it."""
        request = files_pb2.GetFileInfoRequest(key=key)
        try:
            return (await self.calls.unary(self.stub.GetFileInfo, request, not_found=FileNotFound)).size
        except FileNotFound:
            return None

    async def exists(self, key: str) -> bool:
        """True when the server has the blob."""
        return await self.size(key) is not None

    async def upload(
        self, source: Path | bytes, key: str = "", *, progress: Progress | None = None, name: str = ""
    ) -> str:
        """Upload a file's (or some) bytes under `key` (default: their SHA-256); skipped if the server has them."""
        if isinstance(source, bytes):
            key, total = key or hashlib.sha256(source).hexdigest(), len(source)
        else:
            key, total = key or await asyncio.to_thread(sha256_file, source), source.stat().st_size
        name = name or (source.name if isinstance(source, Path) else key)
        report = progress or _ignore
        if is_sha256(key) and await self.exists(key):
            report(Transfer(name, total, total, complete=True, skipped=True))
            return key
        # Other keys are written once, which only the server checks: they are never given a URL.
        direct = await self.url(key, files_pb2.FILE_URL_METHOD_PUT) if is_sha256(key) else None
        if direct is not None:
            await _put(direct, source, total, report, name)
        else:
            await _Upload(self, source, key, total, report, name).run()
        report(Transfer(name, total, total, complete=True))
        return key

    async def download(self, key: str, destination: Path, *, progress: Progress | None = None, name: str = "") -> None:
        """Write the blob to `destination` (via `<destination>.partial`, renamed when complete and verified)."""
        total = await self.size(key) if progress else 0
        if total is None:
            raise FileNotFound(f"file {key!r} not found", grpc.StatusCode.NOT_FOUND)
        download = _Download(self, key, destination, progress or _ignore, name or destination.name, total)
        await download.run()


class _Upload:
    """One upload, resumed from the bytes the server kept when the connection drops."""

    def __init__(self, files: FileClient, source: Path | bytes, key: str, total: int, report: Progress, name: str):
        self.files, self.source, self.key, self.total = files, source, key, total
        self.report, self.name = report, name
        # The secret that binds what the server keeps of this upload, if it is cut short, to this
        # client: only an upload with the same token can resume it.
        self.token = secrets.token_urlsafe(32)

    async def run(self) -> None:
        delays = self.files.calls.retry.delays()
        # What the server kept for this upload's token (nothing, for a new one), or None when a
        # blob stored under its SHA-256 is already complete.
        offset = await self._resume_at()
        while offset is not None:
            try:
                await self.files.upload_call(self._chunks(offset))
                return
            except grpc.aio.AioRpcError as error:
                # UNAVAILABLE: the connection dropped; ABORTED: another upload of the key is running.
                delay = next(delays, None) if error.code() in _RESUMABLE else None
                if delay is None:
                    raise translate(error, target=self.files.calls.target, not_found=FileNotFound) from None
            await asyncio.sleep(delay)
            offset = await self._resume_at()

    async def _resume_at(self) -> int | None:
        """The byte to go on from: what an interrupted upload left on the server; None once it is complete."""
        request = files_pb2.GetUploadRequest(key=self.key, resume_token=self.token)
        try:
            state = await self.files.calls.unary(self.files.stub.GetUpload, request)
        except RequestFailed as error:
            if error.code == grpc.StatusCode.UNIMPLEMENTED:  # a server without resumable uploads
                return 0
            raise
        if state.complete and is_sha256(self.key):
            return None
        return min(state.offset, self.total)

    async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
        source = self.source
        # The first message names the key; the total size lets the server keep a cut-short upload for resuming.
        head = files_pb2.UploadFileRequest(
            key=self.key, offset=offset, size=self.total, resume_token=self.token
        ).SerializeToString()
        with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as handle:
            handle.seek(offset)
            done = offset
            while True:
                data = await asyncio.to_thread(handle.read, CHUNK_SIZE)
                if data or head:
                    yield wire.upload_request(head, data)
                if not data:
                    return
                head, done = b"", done + len(data)
                self.report(Transfer(self.name, done, self.total))


class _Download:
    """One download, resumed from the byte it reached when the connection drops."""

    def __init__(self, files: FileClient, key: str, destination: Path, report: Progress, name: str, total: int):
        self.files, self.key, self.destination = files, key, destination
        self.report, self.name, self.total = report, name, total
        self.partial = destination.with_name(destination.name + ".partial")
        self.done = 0

    async def run(self) -> None:
        delays = self.files.calls.retry.delays()
        # A blob named by its SHA-256 is checked against it; other keys promise no content to check.
        with self.partial.open("wb") as handle:
            chunks = ChunkWriter(handle, hashlib.sha256() if is_sha256(self.key) else None)
            try:
                await self._receive_all(chunks, delays)
            finally:
                chunks.stop(keep=False)  # a chunk still in flight when the download failed (none once flushed)
        if chunks.digest and (digest := chunks.digest.hexdigest()) != self.key:
            self.partial.unlink(missing_ok=True)
            raise RequestFailed(f"download of {self.key} is corrupt: its bytes hash to {digest}")
        os.replace(self.partial, self.destination)
        self.report(Transfer(self.name, self.done, max(self.total, self.done), complete=True))

    async def _receive_all(self, chunks: ChunkWriter, delays: Iterator[float]) -> None:
        while True:
            try:
                await self._receive(chunks)
                await chunks.flush()
                return
            except grpc.aio.AioRpcError as error:
                delay = next(delays, None) if error.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    self.partial.unlink(missing_ok=True)
                    raise translate(error, target=self.files.calls.target, not_found=FileNotFound) from None
            await asyncio.sleep(delay)

    async def _receive(self, chunks: ChunkWriter) -> None:
        direct = await self.files.url(self.key, files_pb2.FILE_URL_METHOD_GET)
        if direct is not None:
            await self._receive_direct(direct, chunks)
            return
        request = files_pb2.DownloadFileRequest(key=self.key, offset=self.done)
        async for data in self.files.download_call(request):
            await self._received(data, chunks)

    async def _receive_direct(self, direct: files_pb2.GetFileUrlResponse, chunks: ChunkWriter) -> None:
        headers = {**direct.headers, **({"range": f"bytes={self.done}-"} if self.done else {})}
        async with (
            httpx.AsyncClient(timeout=60) as client,
            client.stream("GET", direct.url, headers=headers) as response,
        ):
            if response.status_code >= 400:
                raise RequestFailed(f"download of {self.key} from the bucket failed: HTTP {response.status_code}")
            async for block in response.aiter_bytes(CHUNK_SIZE):
                await self._received(block, chunks)

    async def _received(self, data: bytes | memoryview, chunks: ChunkWriter) -> None:
        await chunks.append(data)
        self.done += len(data)
        self.report(Transfer(self.name, self.done, max(self.total, self.done)))


async def _put(
    direct: files_pb2.GetFileUrlResponse, source: Path | bytes, total: int, report: Progress, name: str
) -> None:
    """PUT the bytes to a presigned URL, with its headers (S3 takes no chunked uploads: a length)."""

    async def blocks() -> AsyncIterator[bytes]:
        done = 0
        with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as handle:
            while data := await asyncio.to_thread(handle.read, CHUNK_SIZE):
                done += len(data)
                yield data
                report(Transfer(name, done, total))

    headers = {**direct.headers, "content-length": str(total)}
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.put(direct.url, content=blocks(), headers=headers)
    if response.status_code >= 400:
        raise RequestFailed(
            f"upload of {name} to the bucket failed: HTTP {response.status_code}: {response.text[:200]}"
        )


def _ignore(_: Transfer) -> None:
    return None
