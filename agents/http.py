"""The agents' HTTP app: MCP over Streamable HTTP at /mcp, /mcp/health and /llms.txt, run by uvicorn
beside the gRPC server; Envoy routes those paths here (`envoy.config.render(agents=…)`).

Stateless (`stateless_http`): each POST stands alone, so any replica behind Envoy can answer it and
nothing is lost when one restarts; a tool's progress notifications travel on its own response stream.
Host and origin checks are Envoy's (its route table and CORS policy), as for every other route.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp

from jobwire.agents import llms, tools
from jobwire.client import Client
from jobwire.errors import JobwireError


def app(client: Client) -> ASGIApp:
    """The ASGI app serving /mcp, /mcp/health and /llms.txt for the jobwire server behind `client`."""
    server = tools.build(
        client,
        stateless_http=True,
        streamable_http_path="/mcp",
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )

    async def health(request: Request) -> Response:
        try:
            info = await client.server_info()
        except JobwireError as error:
            return JSONResponse({"status": "unavailable", "message": str(error)}, status_code=503)
        return JSONResponse({"status": "ok", "server_version": info.version})

    async def llms_txt(request: Request) -> Response:
        return PlainTextResponse(await llms.render(server, client.public_url))

    server.custom_route("/mcp/health", methods=["GET"])(health)
    server.custom_route("/llms.txt", methods=["GET"])(llms_txt)
    return server.streamable_http_app()


class _Server(uvicorn.Server):
    """uvicorn inside a program that handles its own signals (the CLI's `_until_signal`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AgentsServer:
    """The agents' app bound to host:port (0: any free port, then `port` says which)."""

    def __init__(self, client: Client, host: str = "127.0.0.1", port: int = 0) -> None:
        self.client = client
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(128)  # connections wait in the backlog until uvicorn accepts: no start to await
        self.host, self.port = host, int(self.socket.getsockname()[1])

    async def run(self) -> None:
        """Serve until cancelled, then close open streams within a second and the client."""
        config = uvicorn.Config(
            app(self.client), log_level="warning", lifespan="on", access_log=False, timeout_graceful_shutdown=1
        )
        server = _Server(config)
        task = asyncio.ensure_future(server.serve(sockets=[self.socket]))
        try:
            await asyncio.shield(task)
        finally:
            server.should_exit = True
            await task
            await self.client.close()
