"""gRPC-Web from a real browser: headless Chromium on another origin submits a job and streams its logs."""

from __future__ import annotations

import asyncio
import functools
import http.server
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.browser import Chromium, chromium_binary
from tests.conftest import BUSYBOX, Stack, WorkerHandle

pytestmark = pytest.mark.docker
StartWorker = Callable[..., Awaitable[WorkerHandle]]
PAGE = Path(__file__).parent / "grpcweb"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The test page, served from its own origin (so every API call is cross-origin)."""
    handler = functools.partial(_Quiet, directory=str(PAGE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    if chromium_binary() is None:
        pytest.fail("chromium missing; `make browser` installs it (as `make test` does)")
    browser = Chromium(tmp_path / "profile", tmp_path / "chromium.log")
    yield browser
    browser.close()


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
