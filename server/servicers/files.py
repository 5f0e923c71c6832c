"""FileService: blobs by key, streamed both ways, resumable uploads, ranged downloads."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from google.api import httpbody_pb2

from jobwire.core.definition import DefinitionError, check_key, is_sha256
from jobwire.core.units import timestamp
from jobwire.server import transfers
from jobwire.server.blobs import BlobStore
from jobwire.server.blobs.base import URL_SECONDS, put_headers
from jobwire.server.errors import Context, InvalidArgument, NotFound, grpc_errors
from jobwire.server.metrics import Metrics
from jobwire.server.servicers.http import header, is_rest
from jobwire.v1 import files_pb2, files_pb2_grpc


class FileServicer(files_pb2_grpc.FileServiceServicer):
    """Adapts FileService calls to the blob store."""

    def __init__(self, blobs: BlobStore, max_upload_size: int, metrics: Metrics) -> None:
        self.blobs, self.max_upload_size, self.metrics = blobs, max_upload_size, metrics

    async def UploadFile(
        self, request_iterator: AsyncIterator[files_pb2.UploadFileRequest], context: Context
    ) -> files_pb2.UploadFileResponse:
        async with grpc_errors(context):
            requests = aiter(request_iterator)
            first = await anext(requests, None)
            if first is None:
                raise InvalidArgument("empty upload: the first message must carry the key")
            key = checked_key(first.key)
            if first.offset < 0 or first.size < 0:
                raise InvalidArgument("offset and size must be 0 or more")
            expected = transfers.expected_size(first.offset, first.size, header(context, transfers.CONTENT_LENGTH))
            size, digest = await transfers.receive(
                self.blobs,
                key,
                _data(first, requests),
                offset=first.offset,
                expected=expected,
                limit=self.max_upload_size,
                owner=_owner(first.resume_token, context),
            )
            self.metrics.bytes["uploaded"] += size - first.offset
            return files_pb2.UploadFileResponse(key=key, size=size, sha256=digest)

    async def DownloadFile(
        self, request: files_pb2.DownloadFileRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with grpc_errors(context):
            key = checked_key(request.key)
            size = await self.blobs.size(key)
            if size is None:
                raise NotFound(f"file {key!r} not found")
            if is_rest(context) and (url := await self.blobs.presigned_url(key)):
                await context.send_initial_metadata(transfers.redirect(url))
                yield httpbody_pb2.HttpBody(content_type=transfers.content_type(key))
                return
            part = transfers.span(size, request.offset, request.length, header(context, "range"))
            await context.send_initial_metadata(part.metadata())
            chunks = self.blobs.read(key, part.start, part.length) if part.length else _nothing()
            async for body in transfers.bodies(chunks, transfers.content_type(key)):
                self.metrics.bytes["downloaded"] += len(body.data)
                yield body

    async def GetFileInfo(
        self, request: files_pb2.GetFileInfoRequest, context: Context
    ) -> files_pb2.GetFileInfoResponse:
        async with grpc_errors(context):
            size = await self.blobs.size(checked_key(request.key))
            if size is None:
                raise NotFound(f"file {request.key!r} not found")
            return files_pb2.GetFileInfoResponse(exists=True, size=size)

    async def GetUpload(self, request: files_pb2.GetUploadRequest, context: Context) -> files_pb2.GetUploadResponse:
        async with grpc_errors(context):
            key = checked_key(request.key)
            complete = await self.blobs.size(key) is not None
            offset, running = await self.blobs.pending(key, owner=_owner(request.resume_token, context))
            return files_pb2.GetUploadResponse(key=key, offset=offset, complete=complete, in_progress=running)

    async def GetFileUrl(self, request: files_pb2.GetFileUrlRequest, context: Context) -> files_pb2.GetFileUrlResponse:
        async with grpc_errors(context):
            key = checked_key(request.key)
            upload = request.method == files_pb2.FILE_URL_METHOD_PUT
            if not upload and await self.blobs.size(key) is None:
                raise NotFound(f"file {key!r} not found")
            if upload and not is_sha256(key):
                return files_pb2.GetFileUrlResponse()  # written once: the server compares the bytes
            url = await self.blobs.presigned_url(key, method="PUT" if upload else "GET")
            if url is None:
                return files_pb2.GetFileUrlResponse()
            response = files_pb2.GetFileUrlResponse(url=url, headers=put_headers(key) if upload else {})
            response.expire_time.CopyFrom(timestamp(time.time() + URL_SECONDS))
            return response


async def _data(
    first: files_pb2.UploadFileRequest, rest: AsyncIterator[files_pb2.UploadFileRequest]
) -> AsyncIterator[bytes]:
    yield first.body.data
    async for request in rest:
        yield request.body.data


async def _nothing() -> AsyncIterator[bytes]:
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk


def _owner(token: str, context: Context) -> str:
    """Who may resume the call's upload: from its resume token (the field, else the header)."""
    return transfers.owner(token or header(context, transfers.RESUME_TOKEN) or "")


def checked_key(key: str) -> str:
    """`key` if it is a valid blob key; InvalidArgument otherwise."""
    try:
        check_key(key)
    except DefinitionError as error:
        raise InvalidArgument(str(error)) from None
    return key
