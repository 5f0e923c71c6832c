"""Files through the real Envoy: 2 GiB both ways with flat server memory, hash checks, resumable uploads."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.api import httpbody_pb2

from jobwire.cli.services import free_port, start_local_envoy, stop_envoy
from jobwire.v1 import files_pb2, files_pb2_grpc
from tests.conftest import Stack

pytestmark = pytest.mark.envoy
MiB = 1024 * 1024


def generated(total: int, seed: bytes, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
    """Bytes [start, stop) of a deterministic `total`-byte stream, made 1 MiB at a time (never held whole)."""
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    stop = total if stop is None else stop

    async def chunks() -> AsyncIterator[bytes]:
        position = start
        while position < stop:
            index, within = divmod(position, MiB)
            chunk = (index.to_bytes(8, "big") + block[8:])[within : min(MiB, within + stop - position)]
            position += len(chunk)
            yield chunk

    return chunks()


async def digest_of(chunks: AsyncIterator[bytes]) -> str:
    hasher = hashlib.sha256()
    async for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


@dataclass
class Standalone:
    """A `jobwire server` process and an Envoy in front of it, for measuring the server alone."""

    server: asyncio.subprocess.Process
    envoy: asyncio.subprocess.Process
    port: int
    data: Path


@pytest_asyncio.fixture(loop_scope="session")
async def standalone(tmp_path: Path) -> AsyncIterator[Standalone]:
    grpc_port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobwire.cli", "server", "--host", "127.0.0.1", "--port", str(grpc_port),
        "--data-directory", str(tmp_path / "data"),
    )  # fmt: skip
    try:
        envoy, envoy_port = await start_local_envoy([("127.0.0.1", grpc_port)], tmp_path / "envoy.yaml")
    except BaseException:
        server.terminate()
        await server.wait()
        raise
    yield Standalone(server, envoy, envoy_port, tmp_path / "data")
    await stop_envoy(envoy)
    server.terminate()
    await server.wait()


@pytest.mark.timeout(900)
async def test_two_gib_up_and_down_with_flat_server_memory(standalone: Standalone) -> None:
    total = 2 * 1024 * MiB
    seed = os.urandom(16)
    key = await digest_of(generated(total, seed))
    pids = {"server": standalone.server.pid, "envoy": standalone.envoy.pid}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{standalone.port}", timeout=120) as client:
        assert (await client.get("/healthz")).status_code == 200
        for pid in pids.values():
            reset_peak(pid)
        before = {name: memory(pid)["VmRSS"] for name, pid in pids.items()}

        upload = await client.put(f"/f/{key}", content=generated(total, seed), headers={"Content-Length": str(total)})
        assert upload.status_code == 200, upload.text
        assert upload.json() == {"key": key, "size": str(total), "sha256": key}

        async with client.stream("GET", f"/f/{key}") as download:
            assert download.status_code == 200
            assert download.headers["content-length"] == str(total)
            assert await digest_of(download.aiter_bytes()) == key

        growth = {name: memory(pid)["VmHWM"] - before[name] for name, pid in pids.items()}
        print(f"peak RSS growth over a 2 GiB upload and download: {growth}")
        assert growth["server"] < 200 * MiB, growth
        assert growth["envoy"] < 200 * MiB, growth

        wrong = hashlib.sha256(b"not these bytes").hexdigest()
        refused = await client.put(
            f"/f/{wrong}", content=generated(8 * MiB, seed), headers={"Content-Length": str(8 * MiB)}
        )
        assert refused.status_code == 400 and "checksum mismatch" in refused.json()["message"]
        assert (await client.get(f"/f/{wrong}/exists")).status_code == 404
        assert (await client.get(f"/f/{wrong}/upload")).json()["offset"] == "0"
    (standalone.data / "blobs" / key).unlink()


class Interrupted(Exception):
    """Raised by an upload body to cut the connection halfway."""


async def cut_after(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in chunks:
        if sent >= limit:
            await asyncio.sleep(0.5)  # let Envoy and the server take in what was sent
            raise Interrupted
        sent += len(chunk)
        yield chunk


def token(who: str = "owner") -> dict[str, str]:
    """The header that binds an upload to the client holding the token (16+ characters)."""
    return {"x-jobwire-resume-token": f"{who}-{os.urandom(16).hex()}"}


async def stored_offset(client: httpx.AsyncClient, key: str, secret: dict[str, str]) -> int:
    """The resume offset (of the upload started with `secret`) once the upload ended on the server."""
    for _ in range(100):
        status = (await client.get(f"/f/{key}/upload", headers=secret)).json()
        if not status["inProgress"]:
            return int(status["offset"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"the upload of {key} never ended")


async def test_interrupted_rest_upload_resumes_without_resending(stack: Stack, rest: httpx.AsyncClient) -> None:
    total, half = 64 * MiB, 32 * MiB
    seed = os.urandom(16)
    key = await digest_of(generated(total, seed))
    secret = token()
    length = {"Content-Length": str(total)} | secret
    with pytest.raises(Interrupted):
        await rest.put(f"/f/{key}", content=cut_after(generated(total, seed), half), headers=length)
    offset = await stored_offset(rest, key, secret)
    assert half - 16 * MiB <= offset <= half, offset  # at most Envoy's buffers were lost
    assert (await rest.get(f"/f/{key}/exists")).status_code == 404  # nothing committed

    rest_of_it = {"Content-Length": str(total - offset)} | secret
    resumed = await rest.put(
        f"/f/{key}", params={"offset": offset}, content=generated(total, seed, offset), headers=rest_of_it
    )
    assert resumed.status_code == 200, resumed.text
    assert resumed.json() == {"key": key, "size": str(total), "sha256": key}
    async with rest.stream("GET", f"/f/{key}") as download:
        assert await digest_of(download.aiter_bytes()) == key
    assert (await rest.get(f"/f/{key}/upload", headers=secret)).json() == {
        "key": key, "offset": "0", "complete": True, "inProgress": False
    }  # fmt: skip
    (stack.data_directory / "blobs" / key).unlink()


async def test_interrupted_upload_without_a_hash_key_is_not_committed(rest: httpx.AsyncClient, queue: str) -> None:
    key, secret = f"notes-{queue}.bin", token()
    with pytest.raises(Interrupted):
        await rest.put(
            f"/f/{key}",
            content=cut_after(generated(8 * MiB, b"n"), 2 * MiB),
            headers={"Content-Length": str(8 * MiB)} | secret,
        )
    offset = await stored_offset(rest, key, secret)
    assert 0 < offset < 8 * MiB
    assert (await rest.get(f"/f/{key}/exists")).status_code == 404
    stale = await rest.put(f"/f/{key}", params={"offset": offset + 1}, content=b"x", headers=secret)
    assert stale.status_code == 409 and f"resume at offset {offset}" in stale.json()["message"]
    restart = await rest.put(f"/f/{key}", content=b"small")  # offset 0 starts over
    assert restart.json()["size"] == "5"
    assert (await rest.get(f"/f/{key}")).content == b"small"


async def test_interrupted_grpc_upload_resumes_through_envoy(stack: Stack) -> None:
    total, half = 24 * MiB, 12 * MiB
    seed, secret = os.urandom(16), os.urandom(16).hex()
    key = await digest_of(generated(total, seed))

    async def messages(start: int, stop: int | None) -> AsyncIterator[files_pb2.UploadFileRequest]:
        first = True
        async for chunk in generated(total, seed, start, stop):
            message = files_pb2.UploadFileRequest(body=httpbody_pb2.HttpBody(data=chunk))
            if first:
                message.key, message.offset, message.size, first = key, start, total, False
                message.resume_token = secret
            yield message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy_port}") as channel:
        files = files_pb2_grpc.FileServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await files.UploadFile(messages(0, half))  # the stream ends short of `size`
        assert cut.value.code() == grpc.StatusCode.ABORTED
        status = await files.GetUpload(files_pb2.GetUploadRequest(key=key, resume_token=secret))
        assert (status.offset, status.complete, status.in_progress) == (half, False, False)

        done = await files.UploadFile(messages(half, None))
        assert (done.size, done.sha256) == (total, key)
        tail = b"".join(
            [body.data async for body in files.DownloadFile(files_pb2.DownloadFileRequest(key=key, offset=total - 10))]
        )
        assert tail == b"".join([chunk async for chunk in generated(total, seed, total - 10)])
    with contextlib.suppress(FileNotFoundError):
        (stack.data_directory / "blobs" / key).unlink()


async def test_a_key_that_is_no_hash_cannot_be_overwritten_by_another_client(
    rest: httpx.AsyncClient, stack: Stack, queue: str
) -> None:
    key = f"report-{queue}.txt"
    assert (await rest.put(f"/f/{key}", content=b"the owner's report")).status_code == 200
    async with httpx.AsyncClient(base_url=stack.rest, timeout=30) as stranger:
        refused = await stranger.put(f"/f/{key}", content=b"a stranger's report")
        assert refused.status_code == 409, refused.text
        assert f"file {key!r} exists with other bytes" in refused.json()["message"]
        again = await stranger.put(f"/f/{key}", content=b"the owner's report")  # the same bytes: fine
        assert again.status_code == 200, again.text
        url = await stranger.get(f"/f/{key}/url", params={"method": "FILE_URL_METHOD_PUT"})
        assert url.json().get("url", "") == ""  # no way around the server's check
    assert (await rest.get(f"/f/{key}")).content == b"the owner's report"


async def test_an_interrupted_upload_is_resumed_only_by_the_client_that_started_it(
    rest: httpx.AsyncClient, stack: Stack, queue: str
) -> None:
    total, cut = 48 * MiB, 24 * MiB  # Envoy may hold up to 16 MiB of what was sent when it was cut
    key, secret, seed = f"dataset-{queue}.bin", token(), os.urandom(16)
    with pytest.raises(Interrupted):
        await rest.put(
            f"/f/{key}", content=cut_after(generated(total, seed), cut), headers={"Content-Length": str(total)} | secret
        )
    offset = await stored_offset(rest, key, secret)
    assert 0 < offset < total

    async with httpx.AsyncClient(base_url=stack.rest, timeout=30) as stranger:
        # The stranger sees no offset to resume from, and no offset or token of its own works.
        assert (await stranger.get(f"/f/{key}/upload")).json()["offset"] == "0"
        assert (await stranger.get(f"/f/{key}/upload", headers=token("stranger"))).json()["offset"] == "0"
        evil = b"E" * 4096  # refused for its token before its bytes are read: a small body, no reset mid-send
        without = await stranger.put(f"/f/{key}", params={"offset": offset}, content=evil)
        assert without.status_code == 409 and "without a resume token" in without.json()["message"], without.text
        guessed = await stranger.put(f"/f/{key}", params={"offset": offset}, content=evil, headers=token("stranger"))
        assert guessed.status_code == 409 and "no interrupted upload" in guessed.json()["message"], guessed.text
        assert (await stranger.get(f"/f/{key}/exists")).status_code == 404

    rest_of_it = {"Content-Length": str(total - offset)} | secret
    resumed = await rest.put(
        f"/f/{key}", params={"offset": offset}, content=generated(total, seed, offset), headers=rest_of_it
    )
    assert resumed.status_code == 200, resumed.text
    async with rest.stream("GET", f"/f/{key}") as download:
        assert await digest_of(download.aiter_bytes()) == await digest_of(generated(total, seed))


async def test_an_upload_without_a_resume_token_keeps_nothing_when_cut_short(
    rest: httpx.AsyncClient, queue: str
) -> None:
    key = f"loose-{queue}.bin"
    with pytest.raises(Interrupted):
        await rest.put(
            f"/f/{key}", content=cut_after(generated(4 * MiB, b"l"), MiB), headers={"Content-Length": str(4 * MiB)}
        )
    assert await stored_offset(rest, key, {}) == 0  # nothing anyone could resume
