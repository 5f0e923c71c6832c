"""AI agents as users: the `mcp` SDK's own client, over Streamable HTTP through real Envoy and over
stdio through a real `jobwire mcp`, drives a job on the real stack with Docker; /llms.txt is complete."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from jobwire.agents import llms
from jobwire.agents.http import AgentsServer
from jobwire.agents.tools import TOOLS
from jobwire.cli.services import free_port, start_local_envoy, stop_envoy
from jobwire.client import Client
from tests.conftest import BUSYBOX, JOBWIRE, Processes, Stack, StartWorker, eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Front:
    """Envoy in front of the stack's server and of the agents' app talking to it."""

    url: str
    stack: Stack


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def front(stack: Stack) -> AsyncIterator[Front]:
    agents = AgentsServer(Client(stack.grpc_target, public_url="http://jobwire.test"))
    task = asyncio.create_task(agents.run())
    envoy, port = await start_local_envoy(
        [("127.0.0.1", stack.server.port)],
        stack.data_directory / "envoy-agents.yaml",
        agents=[(agents.host, agents.port)],
    )
    yield Front(f"http://127.0.0.1:{port}", stack)
    await stop_envoy(envoy)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@asynccontextmanager
async def http_session(front: Front) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(f"{front.url}/mcp") as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def stdio_session(front: Front) -> AsyncIterator[ClientSession]:
    parameters = StdioServerParameters(
        command=JOBWIRE, args=["mcp", "--server", front.url], env={"PATH": str(Path(sys.executable).parent)}
    )
    async with stdio_client(parameters) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


SESSIONS: dict[str, Callable[[Front], AbstractAsyncContextManager[ClientSession]]] = {
    "http": http_session,
    "stdio": stdio_session,
}


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured answer; fails on a tool error."""
    result = await session.call_tool(tool, arguments)
    assert not result.isError, _text(result)
    assert result.structuredContent is not None
    return result.structuredContent


def _text(result: CallToolResult) -> str:
    return " ".join(part.text for part in result.content if isinstance(part, TextContent))


@pytest.mark.parametrize("transport", sorted(SESSIONS))
async def test_an_agent_submits_follows_reads_cancels_lists_and_uploads(
    front: Front, start_worker: StartWorker, queue: str, transport: str
) -> None:
    await start_worker(queue)
    async with SESSIONS[transport](front) as session:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(listed) == set(TOOLS)
        for tool in listed.values():
            undescribed = [
                name for name, schema in tool.inputSchema["properties"].items() if not schema.get("description")
            ]
            assert tool.description and not undescribed, f"{tool.name}: {undescribed}"

        uploaded = await call(session, "upload_file", content=f"uploaded by {transport}\n", name="data.txt")
        command = "sh -c 'cat /inputs/note.txt /inputs/data.txt | tee /outputs/out.txt'"
        inputs = {"note.txt": {"text": "a text input\n"}, "data.txt": {"file_key": uploaded["file_key"]}}
        submitted = await call(session, "submit_job", queue=queue, image=BUSYBOX, command=command, inputs=inputs)
        sleeper = await call(session, "submit_job", queue=queue, image=BUSYBOX, command="sleep 300")

        progress: list[tuple[float, str | None]] = []

        async def noted(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, message))

        followed = await session.call_tool(
            "follow_job", {"job_id": submitted["id"], "timeout_seconds": 120}, progress_callback=noted
        )
        assert not followed.isError, _text(followed)
        status = followed.structuredContent
        assert status is not None and status["finished"] and status["result"]["exit_code"] == 0, status
        # Links are the server's public URL over HTTP; over stdio, the address `jobwire mcp` was given.
        base = "http://jobwire.test" if transport == "http" else front.url
        assert status["result"]["outputs"] == {"out.txt": f"{base}/j/{submitted['id']}/outputs/out.txt"}
        assert progress and any(message == "state: finished" for _, message in progress), progress

        expected = f"a text input\nuploaded by {transport}\n"
        logs = await call(session, "get_job_logs", job_id=submitted["id"], queue=queue)
        assert logs["text"] == expected and logs["final"]
        assert (await call(session, "get_job_logs", job_id=submitted["id"], cursor=logs["next_cursor"]))["text"] == ""
        output = await call(session, "get_output", job_id=submitted["id"], path="out.txt")
        assert output["text"] == expected

        cancelled = await call(session, "cancel_job", queue=queue, job_id=sleeper["id"])
        assert cancelled["id"] == sleeper["id"]
        final = await call(session, "follow_job", job_id=sleeper["id"], queue=queue, timeout_seconds=60)
        assert final["finished"] and final["finish_reason"] == "cancelled", final

        jobs = (await call(session, "list_jobs", queue=queue))["jobs"]
        assert {job["id"]: job["state"] for job in jobs} == {submitted["id"]: "finished", sleeper["id"]: "finished"}


async def test_a_wrong_argument_is_a_tool_error_naming_it(front: Front, queue: str) -> None:
    async with http_session(front) as session:
        wrong = {
            "gpus": {"queue": queue, "image": BUSYBOX, "gpus": "many"},
            "image": {"queue": queue, "command": "true"},
            "inputs": {"queue": queue, "image": BUSYBOX, "inputs": {"a": {"text": "x", "url": "https://x"}}},
            "max_duration": {"queue": queue, "image": BUSYBOX, "max_duration": "soon"},
        }
        for argument, arguments in wrong.items():
            result = await session.call_tool("submit_job", arguments)
            assert result.isError and argument in _text(result) and "Traceback" not in _text(result), _text(result)
        missing = await session.call_tool("get_output", {"job_id": "0" * 64, "path": "x"})
        assert missing.isError and "Traceback" not in _text(missing), _text(missing)


async def test_llms_txt_names_every_rest_route_and_every_tool(front: Front) -> None:
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as client:
        health = await client.get("/mcp/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        served = await client.get("/llms.txt")
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")
    routes = [(method.upper(), path) for path, ops in llms.openapi()["paths"].items() for method in ops]
    missing = [f"{method} {path}" for method, path in routes if f"`{method} {path}`" not in served.text]
    missing += [f"tool {name}" for name in TOOLS if f"- `{name}`" not in served.text]
    assert routes and not missing, missing


async def test_a_git_repository_is_the_build_context(front: Front, queue: str) -> None:
    """`git_repo` reaches the definition as `build.context` (the worker resolves repository URLs)."""
    repository = "https://github.com/jobwire-test/example/tree/v1.2.3"
    async with http_session(front) as session:
        submitted = await call(session, "submit_job", queue=queue, git_repo=repository, command="true")
        both = await session.call_tool("submit_job", {"queue": queue, "git_repo": repository, "build_context": "/f/x"})
    assert both.isError and "git_repo" in _text(both)
    async with Client(front.stack.grpc_target) as client:
        job = await client.job(submitted["id"], queue).get()
    assert job.definition.build.context == repository and not job.definition.HasField("image")


async def test_jobwire_server_serves_mcp_beside_grpc_and_stops_on_sigterm(processes: Processes, tmp_path: Path) -> None:
    mcp_port = free_port()
    server = await processes.server(free_port(), tmp_path / "server", extra=("--mcp-port", str(mcp_port)))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{mcp_port}", timeout=5) as client:

        async def healthy() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await client.get("/mcp/health")).status_code == 200
            return False

        await eventually(healthy, "the agents' app of `jobwire server` to answer")
        assert "`submit_job`" in (await client.get("/llms.txt")).text
    assert await server.terminate() == 0, server.output()
