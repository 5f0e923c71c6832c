"""gRPC-Web from a real browser: headless Chromium on another origin submits a job and streams its logs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.browser import Chromium, headless, serving
from tests.conftest import BUSYBOX, Stack, WorkerHandle

pytestmark = pytest.mark.docker
StartWorker = Callable[..., Awaitable[WorkerHandle]]
PAGE = Path(__file__).parent / "grpcweb"


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The test page, served from its own origin (so every API call is cross-origin)."""
    with serving(PAGE) as origin:
        yield origin


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    with headless(tmp_path) as browser:
        yield browser


async def test_browser_submits_a_job_and_streams_its_logs_over_grpc_web(
    stack: Stack, queue: str, start_worker: StartWorker, page_origin: str, chromium: Chromium
) -> None:
    await start_worker(queue)
    command = f"sh -c 'echo from the browser {queue}; sleep 1; echo second line'"
    query = urlencode({"api": stack.rest, "queue": queue, "image": BUSYBOX, "command": command})
    result = await asyncio.to_thread(chromium.evaluate_page, f"{page_origin}/index.html?{query}", "window.result", 90)
    assert "error" not in result, result
    assert result["origin"] != stack.rest  # cross-origin: CORS let it through
    assert len(result["jobId"]) == 64 and "grpc-status:0" in result["submitTrailers"]
    assert result["log"] == f"from the browser {queue}\nsecond line\n"
    assert result["states"][-1] == 3  # JOB_STATE_FINISHED
    assert "grpc-status:0" in result["trailers"] and result["messages"] >= 3
