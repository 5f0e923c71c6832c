"""A real `jobwire up` process for tests: started as a user starts it, asked for its jobs over gRPC."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx

from jobwire.cli.services import free_port
from jobwire.v1 import jobs_pb2, jobs_pb2_grpc
from tests.conftest import Process, eventually


class Up:
    """A running `jobwire up`: Envoy's port (`api`, its URL) and the server's own gRPC port."""

    def __init__(self, port: int, grpc_port: int, scheme: str) -> None:
        self.port, self.grpc_port = port, grpc_port
        self.api = f"{scheme}://127.0.0.1:{port}"

    async def jobs(self, queue: str = "local") -> list[jobs_pb2.Job]:
        """The jobs `queue` holds, asked of the server itself over gRPC (not through Envoy)."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            reply = await jobs_pb2_grpc.JobServiceStub(channel).ListJobs(jobs_pb2.ListJobsRequest(queue=queue))
        return list(reply.jobs)


@contextlib.asynccontextmanager
async def running_up(data: Path, *options: str, ca_file: Path | None = None) -> AsyncIterator[Up]:
    """`jobwire up OPTIONS` with its data in `data`, once it answers /healthz (over TLS when `ca_file`
    is given, trusting that CA); stopped by SIGTERM after, which must end it cleanly."""
    started = Up(free_port(), free_port(), "https" if ca_file else "http")
    data.mkdir()
    ports = ["--port", str(started.port), "--grpc-port", str(started.grpc_port)]
    process = Process(["up", *ports, *options, "--data-directory", str(data)], data / "up.log")
    await process.start()
    verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True

    async def healthy() -> bool:
        assert process.process is not None and process.process.returncode is None, process.output()
        async with httpx.AsyncClient(verify=verify) as http:
            try:
                return (await http.get(f"{started.api}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

    try:
        await eventually(healthy, "jobwire up to answer")
        yield started
    finally:
        assert await process.terminate() == 0, process.output()
