"""TLS end to end: Envoy terminates it with a certificate from a CA the test makes, in front of the real server.

The SDK, the CLI and REST clients trusting that CA work through it (gRPC over HTTP/2, REST over
HTTP/1.1 or 2); one trusting another CA is refused with a clear error; a certificate moved into
place on disk is what the next connection gets, Envoy running on. Every definition names its
test's queue: identical definitions are one job across queues, and another test's must not find
this one's finished.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import trustme

from jobwire import Client
from jobwire.cli.services import start_local_envoy, stop_envoy
from jobwire.envoy import config as envoy_config
from jobwire.envoy import tls
from jobwire.errors import ServerUnavailable
from jobwire.v1 import jobs_pb2
from tests.conftest import BUSYBOX, JOBWIRE, Process, Processes, Stack, eventually
from tests.up import running_up

pytestmark = [pytest.mark.envoy, pytest.mark.docker]


@dataclass
class Front:
    """Envoy with TLS on `port`; its certificate and key in `folder`, issued by `ca` (PEM at `ca_file`)."""

    port: int
    folder: Path
    ca: trustme.CA
    ca_file: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def install(issued: trustme.LeafCert, folder: Path) -> None:
    """Put `issued`'s chain and key in `folder` as a renewal would: written aside, then moved in."""
    chain = b"".join(pem.bytes() for pem in issued.cert_chain_pems)
    for name, blob in (("key.pem", issued.private_key_pem.bytes()), ("cert.pem", chain)):
        aside = folder.parent / f"{name}.new"
        aside.write_bytes(blob)
        os.replace(aside, folder / name)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def front(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Front]:
    directory = tmp_path_factory.mktemp("tls")
    folder = directory / "certificate"
    folder.mkdir()
    ca = trustme.CA()
    install(ca.issue_cert("localhost", "127.0.0.1"), folder)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    secret = envoy_config.write(tls.secret(folder / "cert.pem", folder / "key.pem"), directory / "envoy-tls.yaml")
    envoy, port = await start_local_envoy(
        [("127.0.0.1", stack.server.port)], directory / "envoy.yaml", tls_secret=secret
    )
    yield Front(port, folder, ca, directory / "ca.pem")
    await stop_envoy(envoy)


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """The PEM of a CA that signed nothing Envoy serves."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


async def test_a_worker_and_the_sdk_run_a_job_through_tls(front: Front, queue: str, processes: Processes) -> None:
    # A real `jobwire worker` process dialling Envoy over TLS, trusting the test's CA.
    worker = await processes.worker(queue, front.url, extra=("--ca-file", str(front.ca_file)))
    async with Client(front.url, root_certificates=front.ca_file.read_bytes()) as client:
        assert client.target.tls
        job = await client.submit(queue, image=BUSYBOX, command=f"echo over tls {queue}")
        result = await job.wait(timeout=90)
        assert result.exit_code == 0
        assert f"over tls {queue}" in "".join([chunk.text async for chunk in job.logs()])
        assert (await job.get()).worker_id == worker.args[worker.args.index("--id") + 1]


async def test_a_worker_trusting_another_ca_takes_nothing(
    front: Front, queue: str, processes: Processes, other_ca: Path
) -> None:
    worker = await processes.worker(queue, front.url, extra=("--ca-file", str(other_ca)))
    # The worker's own log line (not only gRPC's) names the failure, and it keeps retrying.
    await eventually(lambda: _logs(worker, "CERTIFICATE_VERIFY_FAILED"), "the worker to report the certificate")
    async with Client(front.url, root_certificates=front.ca_file.read_bytes()) as client:
        status = await client.queue_status(queue)
    assert list(status.workers) == []


async def _logs(process: Process, text: str) -> bool:
    return any("jobwire.worker" in line and text in line for line in process.output().splitlines())


async def test_sdk_refuses_a_server_its_roots_do_not_vouch_for(front: Front, other_ca: Path) -> None:
    async with Client(front.url, root_certificates=other_ca.read_bytes(), timeout=5) as client:
        with pytest.raises(ServerUnavailable, match="TLS certificate this client does not trust"):
            await client.server_info()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JOBWIRE, *args], capture_output=True, text=True, timeout=60, check=False)


async def test_cli_submits_and_reads_through_tls(front: Front, queue: str) -> None:
    server = ["--server", front.url, "--ca-file", str(front.ca_file)]
    definition = ["--image", BUSYBOX, "--command", f"echo {queue}"]
    added = await asyncio.to_thread(run_cli, "job", "add", *server, queue, *definition)
    assert added.returncode == 0, added.stderr
    job_id = added.stdout.strip()
    listed = await asyncio.to_thread(run_cli, "job", "ls", *server, queue)
    assert listed.returncode == 0, listed.stderr
    assert job_id[:12] in listed.stdout


async def test_cli_with_another_ca_says_the_certificate_is_not_trusted(
    front: Front, queue: str, other_ca: Path
) -> None:
    server = ["--server", front.url, "--ca-file", str(other_ca), "--retries", "0"]
    refused = await asyncio.to_thread(run_cli, "job", "ls", *server, queue)
    assert refused.returncode == 3  # ServerUnavailable's exit code
    assert refused.stdout == ""
    # gRPC's own handshake log line may come first; the CLI's answer is the last line.
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the jobwire server at 127.0.0.1:{front.port} has a TLS certificate"), last
    assert "CERTIFICATE_VERIFY_FAILED" in last and "--ca-file" in last


async def test_rest_over_http1_with_httpx(front: Front, queue: str) -> None:
    trusted = ssl.create_default_context(cafile=str(front.ca_file))
    async with httpx.AsyncClient(base_url=front.url, verify=trusted) as http:
        submitted = await http.post(f"/q/{queue}", json={"definition": {"image": BUSYBOX, "command": f"echo {queue}"}})
        assert submitted.status_code == 200, submitted.text
        assert submitted.http_version == "HTTP/1.1"
        job = (await http.get(f"/j/{submitted.json()['jobId']}")).json()
    assert job["job"]["id"] == submitted.json()["jobId"]


async def test_rest_over_http2_with_curl(front: Front, queue: str) -> None:
    body = json.dumps({"definition": {"image": BUSYBOX, "command": f"echo {queue} http2"}})
    command = ["curl", "-sS", "--http2", "--cacert", str(front.ca_file), "--json", body, "-w", "\n%{http_version}"]
    done = await asyncio.to_thread(subprocess.run, [*command, f"{front.url}/q/{queue}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    answer, version = done.stdout.rsplit("\n", 1)
    assert version == "2"
    assert len(json.loads(answer)["jobId"]) == 64


async def test_rest_client_trusting_another_ca_is_refused(front: Front, other_ca: Path) -> None:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(other_ca))) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get(f"{front.url}/healthz")


async def test_plain_http_gets_no_answer(front: Front) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(f"http://127.0.0.1:{front.port}/healthz")


def served_certificate(port: int, ca_file: Path) -> bytes:
    """The DER certificate a new TLS connection to 127.0.0.1:port is given (verified against ca_file)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_a_certificate_moved_into_place_is_served_without_a_restart(front: Front) -> None:
    renewed = front.ca.issue_cert("localhost", "127.0.0.1")
    expected = ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())
    assert await asyncio.to_thread(served_certificate, front.port, front.ca_file) != expected
    install(renewed, front.folder)
    # Envoy reloads when it sees the move (inotify): poll new connections until it has, within a bound.
    for _ in range(100):
        if await asyncio.to_thread(served_certificate, front.port, front.ca_file) == expected:
            break
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(served_certificate, front.port, front.ca_file) == expected
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(front.ca_file))) as http:
        assert (await http.get(f"{front.url}/healthz")).text == "OK"


def test_up_takes_a_certificate_and_its_key_together(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("")
    for given in (["--tls-cert", "cert.pem"], ["--tls-key", "cert.pem"]):
        refused = subprocess.run(
            [JOBWIRE, "up", *given, "--data-directory", str(tmp_path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        assert "--tls-cert and --tls-key go together" in refused.stderr
    missing = run_cli(
        "up",
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "nope.pem"),
        "--data-directory",
        str(tmp_path),
    )
    assert missing.returncode == 2
    assert f"--tls-key {tmp_path / 'nope.pem'}: no such file" in missing.stderr


async def test_up_with_a_certificate_serves_tls_end_to_end(tmp_path: Path, docker_images: None) -> None:
    ca = trustme.CA()
    folder = tmp_path / "certificate"
    folder.mkdir()
    install(ca.issue_cert("localhost", "127.0.0.1"), folder)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    certificate = ["--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem")]
    async with running_up(tmp_path / "up", *certificate, ca_file=tmp_path / "ca.pem") as up:
        server = ["--server", up.api, "--ca-file", str(tmp_path / "ca.pem")]
        command = ["job", "add", *server, "local", "--image", BUSYBOX, "--command", "echo through up over tls"]
        done = await asyncio.to_thread(run_cli, *command, "--wait", "--outputs", str(tmp_path / "out"))
        assert done.returncode == 0, done.stderr
        assert "through up over tls" in done.stdout
        (job,) = await up.jobs()
        assert job.state == jobs_pb2.JOB_STATE_FINISHED
