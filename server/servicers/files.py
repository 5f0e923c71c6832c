"""FileService: blobs by key, streamed both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.api import httpbody_pb2

from jobwire.definition import DefinitionError, check_key
from jobwire.server.blobs import BlobStore
from jobwire.server.errors import Context, InvalidArgument, NotFound, TooLarge, grpc_errors
from jobwire.v1 import files_pb2, files_pb2_grpc


class FileServicer(files_pb2_grpc.FileServiceServicer):
    """Adapts FileService calls to the blob store."""

    def __init__(self, blobs: BlobStore, max_upload_size: int) -> None:
        self.blobs, self.max_upload_size = blobs, max_upload_size

    async def UploadFile(
        self, request_iterator: AsyncIterator[files_pb2.UploadFileRequest], context: Context
    ) -> files_pb2.UploadFileResponse:
        async with grpc_errors(context):
            first = await anext(aiter(request_iterator), None)
            if first is None:
                raise InvalidArgument("empty upload: the first message must carry the key")
            key = checked_key(first.key)
            writer = await self.blobs.writer(key)
            try:
                await writer.write(first.body.data)
                async for request in request_iterator:
                    if writer.size + len(request.body.data) > self.max_upload_size:
                        raise TooLarge(f"upload exceeds the limit of {self.max_upload_size} bytes")
                    await writer.write(request.body.data)
            except BaseException:
                await writer.abort()
                raise
            digest = await writer.commit()
            return files_pb2.UploadFileResponse(key=key, size=writer.size, sha256=digest)

    async def DownloadFile(
        self, request: files_pb2.DownloadFileRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with grpc_errors(context):
            key = checked_key(request.key)
            if await self.blobs.size(key) is None:
                raise NotFound(f"file {key!r} not found")
            first = True
            async for chunk in self.blobs.read(key, request.offset):
                yield httpbody_pb2.HttpBody(content_type="application/octet-stream" if first else "", data=chunk)
                first = False
            if first:
                yield httpbody_pb2.HttpBody(content_type="application/octet-stream")

    async def GetFileInfo(
        self, request: files_pb2.GetFileInfoRequest, context: Context
    ) -> files_pb2.GetFileInfoResponse:
        async with grpc_errors(context):
            size = await self.blobs.size(checked_key(request.key))
            if size is None:
                raise NotFound(f"file {request.key!r} not found")
            return files_pb2.GetFileInfoResponse(exists=True, size=size)


def checked_key(key: str) -> str:
    """`key` if it is a valid blob key; InvalidArgument otherwise."""
    try:
        check_key(key)
    except DefinitionError as error:
        raise InvalidArgument(str(error)) from None
    return key
