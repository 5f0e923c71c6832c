"""The front door refuses what a request does not plainly say, through the real Envoy and server.

A query parameter cannot override the path, an unknown JSON field is named and refused, JSON
routes take only JSON (no text/plain or form "simple requests"), Envoy's admin API listens on
no TCP port, and with an origin allow-list no other origin may call. Every refusal stores nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from jobwire.cli.services import descriptor_path, free_port, start_envoy, stop_envoy
from jobwire.envoy import config as envoy_config
from tests.conftest import BUSYBOX, Stack

pytestmark = pytest.mark.envoy
DEFINITION = {"image": BUSYBOX, "command": "true"}
ALLOWED = "https://allowed.example"


async def stored(rest: httpx.AsyncClient, queue: str) -> list[str]:
    response = await rest.get(f"/q/{queue}")
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["jobs"]]


def assert_refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == 3 and words in body["message"], body


async def test_a_query_parameter_cannot_override_the_path(rest: httpx.AsyncClient, queue: str) -> None:
    other = f"{queue}-secret"
    for name in ("queue", "que%75e"):
        assert_refused(await rest.post(f"/q/{queue}?{name}={other}", json={"definition": DEFINITION}), 400, "`queue`")
    assert await stored(rest, queue) == [] and await stored(rest, other) == []
    job_id = (await rest.post(f"/q/{queue}", json={"definition": DEFINITION})).json()["jobId"]
    for query in (f"queue={other}", "jobId=0", "job_id=0"):
        response = await rest.post(f"/q/{queue}/j/{job_id}/cancel?{query}")
        assert_refused(response, 400, f"`{query.split('=')[0]}`")
    assert_refused(await rest.post(f"/q/{queue}/j/{job_id}/a/cancel?namespace=b"), 400, "`namespace`")
    assert_refused(await rest.get(f"/q/{queue}?queue={other}"), 400, "`queue`")
    assert (await rest.get(f"/q/{queue}/j/{job_id}")).json()["job"]["state"] == "JOB_STATE_QUEUED"
    # The documented query parameters keep working.
    assert (await rest.get(f"/q/{queue}?pageSize=5&state=JOB_STATE_QUEUED")).json()["jobs"][0]["id"] == job_id
    cancelled = (await rest.post(f"/q/{queue}/j/{job_id}/cancel?namespace=*")).json()["job"]
    assert cancelled["finishReason"] == "FINISH_REASON_CANCELLED"


async def test_a_body_route_takes_no_query_parameters(rest: httpx.AsyncClient, queue: str) -> None:
    response = await rest.post(f"/q/{queue}?definition.image=other", json={"definition": DEFINITION})
    assert_refused(response, 400, "`definition.image`")
    assert await stored(rest, queue) == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"definition": {**DEFINITION, "maxDurration": "5s"}}, "`definition.maxDurration`"),
        ({"definition": {**DEFINITION, "requirments": {"cpus": 1}}}, "`definition.requirments`"),
        ({"definition": {**DEFINITION, "requirements": {"cpus": 1, "gpu": 1}}}, "`definition.requirements.gpu`"),
        (
            {"definition": {**DEFINITION, "inputs": {"a": {"type": "utf8", "vaule": "x"}}}},
            "`definition.inputs.a.vaule`",
        ),
        ({"definition": DEFINITION, "controll": {}}, "`controll`"),
    ],
)
async def test_an_unknown_json_field_is_refused_by_name(
    rest: httpx.AsyncClient, queue: str, body: dict[str, object], named: str
) -> None:
    assert_refused(await rest.post(f"/q/{queue}", json=body), 400, named)
    batch = {"jobs": [{"definition": DEFINITION}, body]}
    assert_refused(await rest.post(f"/q/{queue}/batch", json=batch), 400, "`jobs[1]." + named[1:])
    assert await stored(rest, queue) == []


async def test_an_escaped_field_name_is_refused(rest: httpx.AsyncClient, queue: str) -> None:
    # JSON would read `m\u0061xDuration` as maxDuration; the guard compares names as written.
    body = b'{"definition": {"image": "x", "command": "true", "m\\u0061xDuration": "5s"}}'
    response = await rest.post(f"/q/{queue}", content=body, headers={"content-type": "application/json"})
    assert_refused(response, 400, "`definition.m\\u0061xDuration`")


async def test_known_fields_pass_in_both_spellings_and_free_json_is_free(rest: httpx.AsyncClient, queue: str) -> None:
    body = {
        "definition": {
            **DEFINITION,
            "max_duration": "5s",
            "env": {"anyName": "1"},
            "inputs": {"a.json": {"type": "json", "value": {"free": [1, {"nested": None}]}}},
        },
        "control": {"namespace": "x"},
    }
    response = await rest.post(f"/q/{queue}", json=body)
    assert response.status_code == 200, response.text
    definition = (await rest.get(f"/j/{response.json()['jobId']}/definition.json")).json()["definition"]
    assert definition["maxDuration"] == "5s"
    assert definition["inputs"]["a.json"]["value"] == {"free": [1, {"nested": None}]}


@pytest.mark.parametrize(
    "request_args",
    [
        {"content": b'{"definition": {"image": "x", "command": "true"}}', "headers": {"content-type": "text/plain"}},
        {"data": {"definition": "x"}},
        {"files": {"definition": b"{}"}},
        {"content": b'{"definition": {"image": "x", "command": "true"}}'},
    ],
    ids=["text-plain", "form", "multipart", "no-content-type"],
)
async def test_json_routes_accept_only_json(
    rest: httpx.AsyncClient, queue: str, request_args: dict[str, object]
) -> None:
    response = await rest.post(f"/q/{queue}", **request_args)  # type: ignore[arg-type]
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["message"]
    job_id = (await rest.post(f"/q/{queue}", json={"definition": DEFINITION})).json()["jobId"]
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert (await rest.post(f"/q/{queue}/j/{job_id}/cancel", headers=form)).status_code == 415
    assert (await rest.post(f"/q/{queue}/j/{job_id}/copy", content=b'{"queue": "x"}', headers=form)).status_code == 415
    assert await stored(rest, queue) == [job_id]
    assert (await rest.get(f"/q/{queue}/j/{job_id}")).json()["job"]["state"] == "JOB_STATE_QUEUED"


async def test_raw_uploads_take_any_content_type(rest: httpx.AsyncClient, queue: str) -> None:
    blob = f"raw bytes {queue}".encode()
    key = hashlib.sha256(blob).hexdigest()
    response = await rest.put(f"/f/{key}", content=blob, headers={"content-type": "text/plain"})
    assert response.status_code == 200, response.text
    assert (await rest.get(f"/f/{key}")).content == blob


async def test_a_path_form_the_guard_does_not_know_is_refused(rest: httpx.AsyncClient, queue: str) -> None:
    # The transcoder takes `/q/a/`; the guard's table does not: it must not slip through unchecked.
    response = await rest.post(f"/q/{queue}/", json={"definition": {**DEFINITION, "maxDurration": "5s"}})
    assert response.status_code == 400, response.text
    assert await stored(rest, queue) == []


# --- an Envoy with an origin allow-list --------------------------------------------------


def listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (from /proc: its sockets, then the LISTEN table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest_asyncio.fixture(loop_scope="session")
async def private(stack: Stack, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """A client of an Envoy that allows only ALLOWED as a cross-origin caller, and its pid."""
    port = free_port()
    cfg = envoy_config.render(
        listen_host="127.0.0.1",
        listen_port=port,
        upstreams=[("127.0.0.1", stack.server.port)],
        descriptor_path=descriptor_path(),
        allowed_origins=[ALLOWED],
    )
    process = await start_envoy(envoy_config.write(cfg, tmp_path / "envoy.yaml"), port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, process.pid
    finally:
        await stop_envoy(process)


def preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


async def test_envoy_admin_listens_on_no_tcp_port(private: tuple[httpx.AsyncClient, int]) -> None:
    client, pid = private
    assert listening_tcp_ports(pid) == {client.base_url.port}


async def test_only_listed_origins_may_call(private: tuple[httpx.AsyncClient, int], queue: str) -> None:
    client, _ = private
    allowed = await client.options(f"/q/{queue}", headers=preflight(ALLOWED))
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "access-control-allow-credentials" not in allowed.headers
    other = await client.options(f"/q/{queue}", headers=preflight("https://evil.example"))
    assert "access-control-allow-origin" not in other.headers
    body = {"definition": DEFINITION}
    refused = await client.post(f"/q/{queue}", json=body, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and "https://evil.example" in refused.json()["message"]
    assert await stored(client, queue) == []
    accepted = await client.post(f"/q/{queue}", json=body, headers={"Origin": ALLOWED})
    assert accepted.status_code == 200 and accepted.headers["access-control-allow-origin"] == ALLOWED
    assert (await client.post(f"/q/{queue}", json=body)).status_code == 200  # no Origin: not a browser page


async def test_open_cors_never_allows_credentials(rest: httpx.AsyncClient, queue: str) -> None:
    response = await rest.options(f"/q/{queue}", headers=preflight("https://anyone.example"))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("https://anyone.example", "*")
    assert "access-control-allow-credentials" not in response.headers
