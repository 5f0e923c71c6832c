"""`jobwire mcp`: an MCP server over stdio for a local agent (a desktop app, an IDE), pointed at any server."""

from __future__ import annotations

from jobwire.agents import tools
from jobwire.cli.console import Connection, connect


async def mcp(*, connection: Connection = Connection()) -> None:
    """Serve MCP over stdin/stdout (for an agent that starts this command): the jobwire tools, acting on
    `--server` through its gRPC API. The same tools answer at `/mcp` of any jobwire server over HTTP."""
    async with connect(connection) as client:
        await tools.build(client).run_stdio_async()
