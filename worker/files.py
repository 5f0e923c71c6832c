"""The worker's client of the server's FileService: blob download and upload by key.

When the server keeps blobs in S3 it hands out presigned URLs (`GetFileUrl`), and the bytes
go straight between the worker and the bucket; otherwise they stream through the server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
from google.api import httpbody_pb2

from jobwire.v1 import files_pb2, files_pb2_grpc

CHUNK_SIZE = 1024 * 1024


class FileClient:
    """Moves blobs between the worker's disk and the server, streamed in chunks."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = files_pb2_grpc.FileServiceStub(channel)
        self._direct = True  # False once the server said it has no URLs (or no GetFileUrl)

    async def url(self, key: str, method: files_pb2.FileUrlMethod.ValueType) -> files_pb2.GetFileUrlResponse | None:
        """A presigned URL for the blob, or None when the bytes must go through the server."""
        if not self._direct:
            return None
        try:
            response = await self.stub.GetFileUrl(files_pb2.GetFileUrlRequest(key=key, method=method))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            response = files_pb2.GetFileUrlResponse()  # a server older than GetFileUrl
        if not response.url:
            self._direct = False
            return None
        return response

    async def exists(self, key: str) -> bool:
        """True when the server has the blob."""
        try:
            await self.stub.GetFileInfo(files_pb2.GetFileInfoRequest(key=key))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def download(self, key: str, destination: Path) -> None:
        """Write the blob to `destination` (via a temporary file, renamed when complete)."""
        partial = destination.with_name(destination.name + ".partial")
        direct = await self.url(key, files_pb2.FILE_URL_METHOD_GET)
        with partial.open("wb") as handle:
            if direct is not None:
                async with (
                    httpx.AsyncClient(timeout=60) as client,
                    client.stream("GET", direct.url, headers=dict(direct.headers)) as response,
                ):
                    response.raise_for_status()
                    async for block in response.aiter_bytes(CHUNK_SIZE):
                        await asyncio.to_thread(handle.write, block)
            else:
                async for body in self.stub.DownloadFile(files_pb2.DownloadFileRequest(key=key)):
                    await asyncio.to_thread(handle.write, body.data)
        os.replace(partial, destination)

    async def upload(self, path: Path, key: str) -> files_pb2.UploadFileResponse:
        """Upload the file at `path` under `key` (straight to the bucket when the server gives a URL)."""
        direct = await self.url(key, files_pb2.FILE_URL_METHOD_PUT)
        if direct is None:
            return await self.stub.UploadFile(_chunks(path, key))
        size = path.stat().st_size
        headers = {**direct.headers, "content-length": str(size)}  # S3 takes no chunked uploads
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.put(direct.url, content=_blocks(path), headers=headers)
            response.raise_for_status()
        return files_pb2.UploadFileResponse(key=key, size=size)


async def _blocks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while data := await asyncio.to_thread(handle.read, CHUNK_SIZE):
            yield data


async def _chunks(path: Path, key: str) -> AsyncIterator[files_pb2.UploadFileRequest]:
    with path.open("rb") as handle:
        first = True
        while True:
            data = await asyncio.to_thread(handle.read, CHUNK_SIZE)
            if not data and not first:
                return
            yield files_pb2.UploadFileRequest(key=key if first else "", body=httpbody_pb2.HttpBody(data=data))
            first = False
            if not data:
                return
