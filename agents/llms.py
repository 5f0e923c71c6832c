"""/llms.txt: what an agent needs to use jobwire, generated from the REST API's OpenAPI document
(itself generated from the proto) and the MCP server's own tool list, so it is never written twice."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from mcp.server.fastmcp import FastMCP

HEADER = """# jobwire

> Public compute queues: submit Docker jobs to a queue, workers that dial out run them. A queue's \
name (unguessable, from `jobwire queue new`) is the right to use it; a job's id (the SHA-256 of its \
definition) shows the job. There are no accounts.

Use the REST API below (JSON; errors are `{"code", "message", "details"}` with an HTTP status), gRPC \
(`jobwire.v1`, the same methods), or MCP: Streamable HTTP at `{base}/mcp`, or stdio with \
`jobwire mcp --server {base}`.
"""


def openapi() -> dict[str, Any]:
    """The packaged OpenAPI document of the REST routes (gen/jobwire/v1/openapi.json)."""
    text = resources.files("jobwire.v1").joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def rest_lines(document: dict[str, Any]) -> list[str]:
    """One line per REST route (method and path): what it does, its parameters."""
    lines = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            summary = " ".join(operation.get("summary") or operation.get("description", "").split())
            query = [p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"]
            body = any(p.get("in") == "body" for p in operation.get("parameters", []))
            extra = (" Query: " + ", ".join(query) + "." if query else "") + (" JSON body." if body else "")
            lines.append(f"- `{method.upper()} {path}`: {summary}{extra}")
    return lines


async def tool_lines(server: FastMCP) -> list[str]:
    """One entry per MCP tool: its description and every argument's."""
    lines = []
    for tool in await server.list_tools():
        description = " ".join((tool.description or "").split())
        lines.append(f"- `{tool.name}`: {description}")
        required = set(tool.inputSchema.get("required", []))
        for name, schema in tool.inputSchema.get("properties", {}).items():
            flag = " (required)" if name in required else ""
            lines.append(f"  - `{name}`{flag}: {' '.join(schema.get('description', '').split())}")
    return lines


async def render(server: FastMCP, base_url: str) -> str:
    """The whole /llms.txt for a server reached at `base_url`."""
    sections = [
        HEADER.replace("{base}", base_url.rstrip("/")),
        "## REST API\n",
        *rest_lines(openapi()),
        "\n## MCP tools\n",
        *await tool_lines(server),
        "\n## Docs\n",
        f"- [OpenAPI document]({base_url.rstrip('/')}/openapi.json): every route's request and response.",
    ]
    return "\n".join(sections) + "\n"
