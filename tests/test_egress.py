"""The egress policy, played by an attacker: `url` inputs, build contexts and webhooks that name loopback,
link-local, private or IPv4-mapped addresses (directly, by a redirect, by a host name) are refused
before any connection; an allow-list entry lets one through; the server's own `/f/KEY` is a blob.

Traffic only ever goes to loopback test servers; for other addresses the test asserts that the policy
refused them before anything was connected to."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpcore
import httpx
import pytest
from google.protobuf import json_format

from jobwire.cli.services import free_port
from jobwire.core import egress
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, Processes, StartWorker, eventually, wait_finished

SECRET = b"the worker's secret\n"
OUTSIDE = ["169.254.169.254", "10.11.12.13"]  # never connected to: refused before any connection


class FileServer:
    """A loopback HTTP server: `/secret` answers SECRET, `/to?url=U` redirects to U; records each request."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.requests.append(self.path)
                if self.path.startswith("/to?"):
                    self.send_response(302)
                    self.send_header("Location", parse_qs(urlsplit(self.path).query)["url"][0])
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(SECRET)))
                self.end_headers()
                self.wfile.write(SECRET)

            do_POST = do_GET

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"


@pytest.fixture
def files() -> Iterator[FileServer]:
    made = FileServer()
    thread = threading.Thread(target=made.server.serve_forever, daemon=True)
    thread.start()
    yield made
    made.server.shutdown()
    made.server.server_close()


def _loopback_spellings(port: int) -> list[tuple[str, str]]:
    """(URL, the address its refusal names) for loopback as an attacker spells it."""
    return [
        (f"http://127.0.0.1:{port}/secret", "127.0.0.1"),
        (f"http://[::ffff:127.0.0.1]:{port}/secret", "127.0.0.1"),
        (f"http://localhost:{port}/secret", "localhost"),
        (f"http://2130706433:{port}/secret", "127.0.0.1"),  # decimal
        (f"http://0177.1:{port}/secret", "127.0.0.1"),  # octal, short form (httpx refuses 0177.0.0.1 itself)
        (f"http://[::1]:{port}/secret", "::1"),
    ]


# --- the policy and its client, without a job -------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("fd00::1", "unique-local"),
        ("fec0::1", "site-local"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
    ],
)
def test_the_policy_refuses_what_is_not_public(address: str, reason: str) -> None:
    with pytest.raises(egress.EgressRefused, match=f"a {reason} address"):
        egress.Policy().check("attacker.example", address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"])
def test_the_policy_lets_public_addresses_through(address: str) -> None:
    egress.Policy().check("example.com", address)


def test_allow_entries_are_networks_addresses_or_host_names() -> None:
    policy = egress.Policy(egress.parse_allow(["10.0.0.0/8,files.lab.example", "127.0.0.1"]))
    policy.check("anything", "10.200.0.1")
    policy.check("files.lab.example", "192.168.7.7")
    policy.check("anything", "::ffff:127.0.0.1")
    with pytest.raises(egress.EgressRefused, match=r"192\.168\.7\.7"):
        policy.check("other.lab.example", "192.168.7.7")
    with pytest.raises(ValueError, match="not 'no way'"):
        egress.parse_allow(["no way"])


class _Spy(httpcore.AsyncNetworkBackend):
    """Records where connections would go, and connects only to loopback."""

    def __init__(self) -> None:
        self.connected: list[str] = []
        self.real = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, *rest: Any, **options: Any) -> httpcore.AsyncNetworkStream:
        self.connected.append(host)
        if host not in ("127.0.0.1", "::1"):
            raise httpcore.ConnectError("the test connects only to loopback")
        return await self.real.connect_tcp(host, port, *rest, **options)

    async def sleep(self, seconds: float) -> None:
        await self.real.sleep(seconds)


def _spied(client: httpx.AsyncClient) -> _Spy:
    spy = _Spy()
    transport = client._transport
    assert isinstance(transport, egress._Transport)
    backend = transport._pool._network_backend  # where httpx keeps it: the policy depends on it
    assert isinstance(backend, egress._Backend)
    backend.inner = spy
    return spy


async def test_the_client_refuses_before_connecting_and_checks_every_redirect(files: FileServer) -> None:
    async with egress.client(egress.Policy(), 5) as client:
        spy = _spied(client)
        for url, named in _loopback_spellings(files.port):
            with pytest.raises(egress.EgressRefused, match=f"refused to connect to .*{named}"):
                await client.get(url)
    assert spy.connected == [] and files.requests == []

    async with egress.client(egress.Policy(["127.0.0.1"]), 5) as client:
        spy = _spied(client)
        assert (await client.get(f"{files.url}/secret")).content == SECRET
        for target in [*OUTSIDE, "[::1]"]:
            with pytest.raises(egress.EgressRefused, match=target.strip("[]")):
                await client.get(f"{files.url}/to?url=http://{target}:{files.port}/secret")
    assert set(spy.connected) == {"127.0.0.1"}  # the redirects' targets: never
    assert len(files.requests) == 4


async def test_a_name_is_resolved_once_and_connected_to_as_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the answer that was checked is the address connected to, even if the name's
    next answer would be loopback."""
    answers = iter(["93.184.216.34", "127.0.0.1"])
    lookups: list[str] = []

    async def getaddrinfo(self: object, host: str, port: int, **_: object) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(type(asyncio.get_running_loop()), "getaddrinfo", getaddrinfo)
    async with egress.client(egress.Policy(), 5) as client:
        spy = _spied(client)
        with pytest.raises(httpx.ConnectError):
            await client.get("http://rebind.example/")
    assert lookups == ["rebind.example"] and spy.connected == ["93.184.216.34"]


# --- url inputs and build contexts, on a real worker and server --------------------------------------


async def _run(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, fields: dict[str, object]) -> jobs_pb2.Job:
    definition = json_format.ParseDict(fields, definition_pb2.JobDefinition())
    submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
    return await wait_finished(jobs, submitted.job_id, timeout=90)


def _url_input(url: str) -> dict[str, object]:
    return {"image": BUSYBOX, "command": "cat /inputs/stolen", "inputs": {"stolen": {"type": "url", "value": url}}}


def _build(url: str) -> dict[str, object]:
    return {"build": {"context": url}, "command": "true"}


@pytest.mark.docker
async def test_url_inputs_and_build_contexts_are_refused_with_the_address(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker, files: FileServer
) -> None:
    await start_worker(queue)
    urls = [*_loopback_spellings(files.port), *((f"http://{a}/latest/meta-data/", a) for a in OUTSIDE)]
    for url, named in urls:
        for fields in (_url_input(url), _build(url)):
            job = await _run(jobs, queue, fields)
            assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR, (url, fields)
            assert "refused to connect to" in job.result.message and named in job.result.message, job.result.message
    assert files.requests == []


@pytest.mark.docker
async def test_an_allowed_address_is_fetched_and_its_redirects_are_checked_again(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker, files: FileServer
) -> None:
    await start_worker(queue, egress_allow=("127.0.0.1",))
    job = await _run(jobs, queue, _url_input(f"{files.url}/secret"))
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert "".join(chunk.text for chunk in job.result.logs) == SECRET.decode()
    for target in [*OUTSIDE, "[::1]"]:
        for fields in (
            _url_input(f"{files.url}/to?url=http://{target}:{files.port}/secret"),
            _build(f"{files.url}/to?url=http://{target}/c.tar"),
        ):
            job = await _run(jobs, queue, fields)
            assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR
            assert f"refused to connect to {target.strip('[]')}" in job.result.message, job.result.message


@pytest.mark.docker
async def test_a_url_naming_the_servers_own_blob_is_fetched_over_the_workers_channel(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    """The seed's upload helper writes `{public URL}/f/KEY`; the test server's public URL is
    http://localhost:8080, where nothing listens and which the policy refuses: only the blob route works."""
    await start_worker(queue)
    uploaded = f"uploaded for {queue}\n".encode()
    key = hashlib.sha256(uploaded).hexdigest()
    assert (await rest.put(f"/f/{key}", content=uploaded)).status_code == 200
    job = await _run(jobs, queue, _url_input(f"http://localhost:8080/f/{key}"))
    assert job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, job.result.message
    assert "".join(chunk.text for chunk in job.result.logs) == uploaded.decode()


# --- webhooks, from `jobwire server` -----------------------------------------------------------------


@pytest.mark.docker
async def test_jobwire_server_never_calls_a_webhook_the_policy_refuses(
    tmp_path: Path, queue: str, processes: Processes, files: FileServer
) -> None:
    port = free_port()
    server = await processes.server(port, tmp_path / "server")
    targets = [url for url, _ in _loopback_spellings(files.port)] + [f"http://{a}/hook" for a in OUTSIDE]
    targets.append(f"http://127.0.0.2:{files.port}/to?url={files.url}/secret")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        for index, url in enumerate(targets):
            control = json_format.ParseDict({"callbacks": {"queued": {"url": url}}}, definition_pb2.JobControl())
            definition = definition_pb2.JobDefinition(image=BUSYBOX, command=f"echo {index}")
            request = jobs_pb2.SubmitJobRequest(queue=queue, definition=definition, control=control)
            await jobs.SubmitJob(request, wait_for_ready=True, timeout=30)

    async def abandoned() -> bool:
        return server.output().count("abandoned: refused to connect to") == len(targets)

    await eventually(abandoned, "every webhook abandoned", timeout=30)
    assert files.requests == []
    for named in ["127.0.0.1", "localhost", "::1", "127.0.0.2", *OUTSIDE]:
        assert f"refused to connect to {named}" in server.output() or f"the address of {named}" in server.output()


def test_the_allow_list_reads_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobwire.cli.services import Local
    from jobwire.server.settings import ServerSettings
    from tests.test_settings import parsed

    monkeypatch.delenv("JOBWIRE_EGRESS_ALLOW", raising=False)
    given = ("--egress-allow", "10.0.0.0/8,files.lab.example", "--egress-allow", "127.0.0.1")
    assert parsed("worker", "q", *given).egress_allow == ("10.0.0.0/8", "files.lab.example", "127.0.0.1")
    assert parsed("server", *given).egress_allow == ("10.0.0.0/8", "files.lab.example", "127.0.0.1")
    assert ServerSettings().egress_allow == parsed("worker", "q").egress_allow == ()
    up = Local().egress_allow  # jobwire up: the private networks, never loopback nor link-local
    assert "10.0.0.0/8" in up and "fc00::/7" in up
    for address in ("127.0.0.1", "::1", "169.254.169.254"):
        with pytest.raises(egress.EgressRefused):
            egress.Policy(up).check(address, address)
    with pytest.raises(Exception, match="no way"):
        parsed("server", "--egress-allow", "no way")
