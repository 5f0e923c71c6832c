"""ServerService: health and info."""

from __future__ import annotations

import functools
from importlib import resources

from google.api import httpbody_pb2

import jobwire
from jobwire.server.errors import Context, grpc_errors
from jobwire.server.scheduler import Scheduler
from jobwire.server.settings import ServerSettings
from jobwire.v1 import server_pb2, server_pb2_grpc


class ServerServicer(server_pb2_grpc.ServerServiceServicer):
    """Answers health checks and describes the server."""

    def __init__(self, scheduler: Scheduler, settings: ServerSettings) -> None:
        self.scheduler, self.settings = scheduler, settings

    async def GetHealth(self, request: server_pb2.GetHealthRequest, context: Context) -> httpbody_pb2.HttpBody:
        async with grpc_errors(context):
            await self.scheduler.ping()
            return httpbody_pb2.HttpBody(content_type="text/plain", data=b"OK")

    async def GetOpenApi(self, request: server_pb2.GetOpenApiRequest, context: Context) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type="application/json", data=openapi_document())

    async def GetServerInfo(
        self, request: server_pb2.GetServerInfoRequest, context: Context
    ) -> server_pb2.GetServerInfoResponse:
        async with grpc_errors(context):
            offered = self.settings.offered_queue
            if offered and not await self.scheduler.live_workers(offered):
                offered = ""
            return server_pb2.GetServerInfoResponse(
                version=jobwire.__version__,
                inline_limit=self.settings.inline_limit,
                max_upload_size=self.settings.max_upload_size,
                offered_queue=offered,
            )


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI document `make gen` writes next to the generated code."""
    return resources.files("jobwire.v1").joinpath("openapi.json").read_bytes()
