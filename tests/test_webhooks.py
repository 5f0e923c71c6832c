"""Webhooks: `queued` and `finished` POSTs, retried on failure, delivered across a server restart."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from jobwire.cli.services import free_port
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import BUSYBOX, Processes, eventually

pytestmark = pytest.mark.docker


class Receiver:
    """A webhook receiver on a loopback port: records each call; answers 500 to the first `fail` calls."""

    def __init__(self, fail: int) -> None:
        self.calls: list[tuple[str, dict[str, object], int]] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 500 if len(receiver.calls) < receiver.fail else 200
                receiver.calls.append((self.path, data, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def delivered(self, path: str) -> list[dict[str, object]]:
        return [data for called, data, status in self.calls if called == path and status == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver(fail=1)
    thread = threading.Thread(target=made.server.serve_forever, daemon=True)
    thread.start()
    yield made
    made.server.shutdown()
    made.server.server_close()


async def test_queued_and_finished_webhooks_survive_a_server_restart(
    tmp_path: Path, queue: str, processes: Processes, receiver: Receiver
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = await processes.server(port, tmp_path / "server", extra=("--egress-allow", "127.0.0.1"))  # the receiver
    async with grpc.aio.insecure_channel(target) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        await eventually(lambda: _serving(jobs), "the server", timeout=30)
        await processes.worker(queue, target)
        control = json_format.ParseDict(
            {
                "namespace": "hooks",
                "callbacks": {
                    "queued": {"url": f"{receiver.url}/queued", "payload": {"tag": queue}},
                    "finished": {"url": f"{receiver.url}/finished"},
                },
            },
            definition_pb2.JobControl(),
        )
        definition = definition_pb2.JobDefinition(image=BUSYBOX, command=f"sh -c 'sleep 3; echo {queue}'")
        job_id = (
            await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition, control=control))
        ).job_id
        await eventually(lambda: _true(bool(receiver.delivered("/queued"))), "the queued webhook (after a 500)")
        assert [status for path, _, status in receiver.calls if path == "/queued"] == [500, 200]
        assert receiver.delivered("/queued") == [
            {"jobId": job_id, "queue": queue, "namespace": "hooks", "config": {"tag": queue}}
        ]
        await server.kill()
        await server.start()
        await eventually(lambda: _true(bool(receiver.delivered("/finished"))), "the finished webhook", timeout=60)
    (finished,) = receiver.delivered("/finished")
    assert finished == {
        "jobId": job_id,
        "queue": queue,
        "namespace": "hooks",
        "config": {},
        "state": "finished",
        "reason": "success",
        "exitCode": 0,
    }
    await asyncio.sleep(1.5)  # no second delivery of either
    assert len(receiver.delivered("/queued")) == len(receiver.delivered("/finished")) == 1


async def _true(value: bool) -> bool:
    return value


async def _serving(jobs: jobs_pb2_grpc.JobServiceStub) -> bool:
    try:
        await jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue="probe"), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return True
