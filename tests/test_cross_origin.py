"""A page on another origin cannot drive a default `jobwire up` (issue 19, item 7), in real headless Chromium.

A real `jobwire up` process (its server, Envoy and a Docker worker) runs private, as by default, with
one origin listed (`--allow-origin`). One small page is served from two loopback origins: the listed
one (the control, which may submit) and another (the attacker). The attacker's page tries every way
a page can POST to `/q/local`: `fetch` with JSON (preflighted), `fetch` with `text/plain` (a simple
request, sent without asking), and a `text/plain` form whose body is crafted to be the job's JSON.
The server is then asked over gRPC which jobs queue `local` holds: only the control's. The same
`up` answers only to its own host names (against DNS rebinding).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from jobwire.cli.front import private_hosts
from tests.browser import Chromium, headless, serving
from tests.conftest import BUSYBOX
from tests.up import Up, running_up

pytestmark = [pytest.mark.docker, pytest.mark.envoy]

# Each way a page may try to submit, by name. The definitions differ (the marker in the command), so
# each would be a job of its own.
PAGE = """<!doctype html>
<title>another origin</title>
<iframe name="sink"></iframe>
<script>
const definition = (how) => ({image: "%(image)s", command: "echo " + how + " %(marker)s"});
const body = (how) => JSON.stringify({definition: definition(how)});

async function attempt(send) {
  try {
    const response = await send();
    return {status: response.status, text: await response.text()};
  } catch (error) {
    return {error: String(error)};
  }
}

window.submitAll = async (api) => ({
  json: await attempt(() => fetch(api + "/q/local", {
    method: "POST", headers: {"content-type": "application/json"}, body: body("json")})),
  text: await attempt(() => fetch(api + "/q/local", {
    method: "POST", headers: {"content-type": "text/plain"}, body: body("text")})),
  form: await new Promise((resolve) => {
    const form = document.createElement("form");
    form.method = "POST";
    form.enctype = "text/plain";
    form.target = "sink";
    form.action = api + "/q/local";
    // text/plain sends name=value: with the `=` inside the command, the body is the job's JSON.
    const input = document.createElement("input");
    input.name = body("form").slice(0, -3) + " a";
    input.value = 'b"}}';
    form.appendChild(input);
    document.body.appendChild(form);
    document.querySelector("iframe").addEventListener("load", () => resolve({loaded: true}), {once: true});
    form.submit();
  }),
});
</script>
"""


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def origins(tmp_path: Path, marker: str) -> Iterator[tuple[str, str]]:
    """(listed, other): the page on the origin `up` lists and on one it does not."""
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "index.html").write_text(PAGE % {"image": BUSYBOX, "marker": marker})
    with serving(pages) as listed, serving(pages) as other:
        yield listed, other


@pytest_asyncio.fixture(loop_scope="session")
async def up(tmp_path: Path, origins: tuple[str, str], docker_images: None) -> AsyncIterator[Up]:
    """`jobwire up` as a user starts it, with the first origin listed."""
    async with running_up(tmp_path / "up", "--allow-origin", origins[0], "--web-directory", str(tmp_path)) as started:
        yield started


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    with headless(tmp_path) as browser:
        yield browser


async def submit_from(chromium: Chromium, origin: str, api: str) -> dict[str, Any]:
    expression = f"window.submitAll({json.dumps(api)})"
    result: dict[str, Any] = await asyncio.to_thread(chromium.evaluate_page, f"{origin}/index.html", expression, 60)
    return result


async def test_a_page_on_another_origin_cannot_submit(
    up: Up, origins: tuple[str, str], chromium: Chromium, marker: str
) -> None:
    listed, other = origins
    seen = await submit_from(chromium, other, up.api)
    # The page learns nothing but failure: no answer it may read.
    assert "Failed to fetch" in seen["json"]["error"], seen
    assert "Failed to fetch" in seen["text"]["error"], seen
    assert seen["form"] == {"loaded": True}  # the form was sent (its answer is the iframe's, unreadable)
    assert await up.jobs() == []

    # The control: the same page on the listed origin submits, and reads the answer, with JSON only.
    control = await submit_from(chromium, listed, up.api)
    assert control["json"]["status"] == 200, control
    assert control["text"]["status"] == 415, control
    (job,) = await up.jobs()
    assert job.id == json.loads(control["json"]["text"])["jobId"]


async def test_answers_only_to_its_own_host_names(up: Up, origins: tuple[str, str]) -> None:
    async with httpx.AsyncClient(base_url=up.api) as http:
        for host in (f"localhost:{up.port}", f"127.0.0.1:{up.port}", f"[::1]:{up.port}", "localhost"):
            assert (await http.get("/healthz", headers={"host": host})).status_code == 200, host
        # A page whose name was pointed at 127.0.0.1 (DNS rebinding) sends its own name as Host.
        rebound = await http.get("/q/local", headers={"host": f"evil.example:{up.port}"})
        # The agents' app (MCP) is behind the same checks: its own host and the listed origins only.
        assert (await http.get("/mcp/health")).json()["status"] == "ok"
        mcp = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        other = await http.post("/mcp", json=call, headers={**mcp, "origin": origins[1]})
        assert other.status_code == 403, other.text
        assert (await http.post("/mcp", json=call, headers={**mcp, "host": "evil.example"})).status_code == 403
    assert rebound.status_code == 403
    assert rebound.json()["message"] == "this server answers only to its own host name"


def test_private_hosts() -> None:
    assert private_hosts("0.0.0.0", 8080) is None and private_hosts("::", 8080) is None
    assert private_hosts("127.0.0.1", 8080) == [
        *("localhost", "localhost:8080", "127.0.0.1", "127.0.0.1:8080", "[::1]", "[::1]:8080"),
    ]
    assert private_hosts("fd00::5", 80)[-2:] == ["[fd00::5]", "[fd00::5]:80"]
    assert private_hosts("192.168.1.5", 80)[-2:] == ["192.168.1.5", "192.168.1.5:80"]
