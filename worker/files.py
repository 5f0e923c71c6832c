"""The worker's client of the server's FileService: blob download and upload by key."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.api import httpbody_pb2

from jobwire.v1 import files_pb2, files_pb2_grpc

CHUNK_SIZE = 1024 * 1024


class FileClient:
    """Moves blobs between the worker's disk and the server, streamed in chunks."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = files_pb2_grpc.FileServiceStub(channel)

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
        with partial.open("wb") as handle:
            async for body in self.stub.DownloadFile(files_pb2.DownloadFileRequest(key=key)):
                await asyncio.to_thread(handle.write, body.data)
        os.replace(partial, destination)

    async def upload(self, path: Path, key: str) -> files_pb2.UploadFileResponse:
        """Upload the file at `path` under `key`."""
        return await self.stub.UploadFile(_chunks(path, key))


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
