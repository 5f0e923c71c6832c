"""Results count only where they were earned, and a job id reveals no queue (issue 19, items 4 and 5).

On the real stack (server, Envoy, a real worker on Docker). The attacker is a fake worker: a
hand-driven stream over the real gRPC `Connect`, which registers on the attacker's own queue,
takes the job and sends a forged result with a forged output.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import httpx
import pytest

from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc, workers_pb2, workers_pb2_grpc
from tests.conftest import BUSYBOX, StartWorker, wait_finished

ANSWER = "answer.txt"


def seed(command: str, **fields: Any) -> dict[str, Any]:
    """A definition as the seed's JSON (unique per test: its command names a fresh token)."""
    return {"image": BUSYBOX, "command": command, **fields}


async def submit(rest: httpx.AsyncClient, queue: str, definition: dict[str, Any], namespace: str = "_") -> Any:
    response = await rest.post(f"/q/{queue}", json={"definition": definition, "control": {"namespace": namespace}})
    assert response.status_code == 200, response.text
    return response.json()["job"]


class FakeWorker:
    """A worker stream driven by hand: what an attacker with the gRPC API can do."""

    def __init__(self, channel: grpc.aio.Channel, queue: str) -> None:
        self.call = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
        self.queue, self.unread = queue, list[workers_pb2.ConnectResponse]()

    async def register(self) -> None:
        register = workers_pb2.RegisterWorker(
            worker_id=f"fake-{uuid.uuid4().hex}", queue=self.queue, cpus=1, secret=uuid.uuid4().hex
        )
        await self.call.write(workers_pb2.ConnectRequest(register=register))
        assert (await self.read()).HasField("registered")

    async def read(self) -> workers_pb2.ConnectResponse:
        if not self.unread:
            message = await asyncio.wait_for(self.call.read(), 30)
            assert isinstance(message, workers_pb2.ConnectResponse)
            self.unread += message.batch.messages if message.HasField("batch") else [message]
        return self.unread.pop(0)

    async def take(self) -> workers_pb2.JobAssignment:
        while not (message := await self.read()).HasField("assignment"):
            pass
        return message.assignment

    async def finish(self, job: workers_pb2.JobAssignment, output: str, log: str = "") -> None:
        """Send a log line and a successful result whose output says `output`; wait for the ack."""
        if log:
            chunk = jobs_pb2.LogChunk(text=log, stream=jobs_pb2.LOG_STREAM_STDOUT)
            logs = workers_pb2.JobLogs(
                job_id=job.job_id, attempt=job.attempt, kind=jobs_pb2.LOG_KIND_RUN, chunks=[chunk]
            )
            await self.call.write(workers_pb2.ConnectRequest(logs=logs))
        forged = definition_pb2.DataRef(type="utf8")
        forged.value.string_value = output
        result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS, exit_code=0, outputs={ANSWER: forged})
        finished = workers_pb2.JobFinished(job_id=job.job_id, attempt=job.attempt, result=result)
        await self.call.write(workers_pb2.ConnectRequest(finished=finished))
        while not (await self.read()).HasField("finished_ack"):
            pass

    def close(self) -> None:
        self.call.cancel()


@pytest.fixture
async def fake_worker(channel: grpc.aio.Channel) -> Any:
    """Open fake workers: `await fake_worker(queue)`; all closed after the test."""
    opened: list[FakeWorker] = []

    async def open_one(queue: str) -> FakeWorker:
        worker = FakeWorker(channel, queue)
        opened.append(worker)
        await worker.register()
        return worker

    yield open_one
    for worker in opened:
        worker.close()


HONEST = f"mkdir -p /outputs && echo honest > /outputs/{ANSWER}"


async def test_a_forged_result_on_the_attackers_queue_never_answers_the_victims(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker, fake_worker: Any
) -> None:
    definition = seed(f"sh -c '{HONEST}; echo {uuid.uuid4().hex}'")
    attacker_queue = f"{queue}-attacker"
    attacker = await fake_worker(attacker_queue)
    forged = await submit(rest, attacker_queue, definition)
    await attacker.finish(await attacker.take(), "forged")
    assert (await rest.get(f"/q/{attacker_queue}/j/{forged['id']}/outputs/{ANSWER}")).text == "forged"

    await start_worker(queue)
    victim = await submit(rest, queue, definition)
    assert victim["id"] == forged["id"] and victim["state"] != "JOB_STATE_FINISHED"  # no answer from cache
    ran = await wait_finished(jobs, victim["id"], queue=queue)
    assert (ran.finish_reason, ran.result.exit_code) == (jobs_pb2.FINISH_REASON_SUCCESS, 0)
    assert ran.result.worker_id != "" and not ran.result.worker_id.startswith("fake-")
    assert (await rest.get(f"/q/{queue}/j/{victim['id']}/outputs/{ANSWER}")).text == "honest\n"
    again = await submit(rest, queue, definition)  # now its own queue's result answers
    assert (again["state"], again["workerId"], again["attempt"]) == ("JOB_STATE_FINISHED", ran.worker_id, 1)


async def test_a_definition_waiting_on_a_queue_without_workers_does_not_hold_back_the_victims(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    definition = seed(f"sh -c '{HONEST}; echo {uuid.uuid4().hex}'")
    unserved = f"{queue}-nobody"
    first = await submit(rest, unserved, definition)
    assert first["state"] == "JOB_STATE_QUEUED"
    await start_worker(queue)
    victim = await submit(rest, queue, definition)
    ran = await wait_finished(jobs, victim["id"], queue=queue)
    assert ran.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS
    assert (await rest.get(f"/q/{queue}/j/{victim['id']}/outputs/{ANSWER}")).text == "honest\n"
    still = (await rest.get(f"/q/{unserved}/j/{first['id']}")).json()["job"]
    assert still["state"] == "JOB_STATE_QUEUED"


ID_ONLY_READS = [
    "/j/{j}",
    "/j/{j}/definition.json",
    "/j/{j}/result.json",
    "/j/{j}/results.json",
    "/j/{j}/logs",
    "/j/{j}/run-logs.json",
    "/j/{j}/build-logs.json",
    "/j/{j}/watch",
    "/j/{j}/stream",
    "/j/{j}/stream?text=true",
    "/j/{j}/inputs/in.txt",
    f"/j/{{j}}/outputs/{ANSWER}",
]


async def test_no_id_only_route_names_the_queue_and_none_changes_a_run(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, fake_worker: Any
) -> None:
    private = f"private-{uuid.uuid4().hex}"
    inputs = {"in.txt": {"type": "utf8", "value": "hi"}}
    definition = seed(f"echo {uuid.uuid4().hex}", inputs=inputs)
    worker = await fake_worker(private)
    done = await submit(rest, private, definition, namespace="alice")
    await submit(rest, private, definition, namespace="bob")
    cancel = await rest.post(f"/q/{private}/j/{done['id']}/bob/cancel")  # history: a cancel request
    assert cancel.status_code == 200, cancel.text
    await worker.finish(await worker.take(), "out", log="a log line\n")
    worker.close()  # gone: the next job waits, and its waiting reason would name the queue
    waiting = (await submit(rest, private, seed(f"echo {uuid.uuid4().hex}"), namespace="carol"))["id"]
    assert private in (await rest.get(f"/q/{private}/j/{waiting}")).text  # with the queue: its waiting reason

    for path in [*ID_ONLY_READS, "/j/{j}"]:
        for job_id in (done["id"], waiting):
            if job_id == waiting and any(word in path for word in ("outputs", "inputs", "watch", "stream")):
                continue  # it has no outputs yet; a follow lasts until it finishes
            response = await rest.get(path.format(j=job_id), timeout=10)
            assert response.status_code == 200, (path, response.text)
            assert private not in response.text, (path, response.text)
            assert "alice" not in response.text and "carol" not in response.text, (path, response.text)
    shown = (await rest.get(f"/j/{done['id']}")).json()["job"]
    assert shown["state"] == "JOB_STATE_FINISHED" and "a log line" in str(shown["result"]["logs"])

    before = (await rest.get(f"/q/{private}/j/{waiting}")).json()["job"]
    refused = [
        await rest.delete(f"/j/{waiting}"),
        await rest.post(f"/j/{waiting}/copy", json={"queue": f"{queue}-copy"}),
        await rest.post(f"/j/{waiting}/cancel"),
    ]
    assert [response.status_code for response in refused[:2]] == [400, 400], [r.text for r in refused]
    assert "needs the job's queue" in refused[0].text and "needs the job's queue" in refused[1].text
    assert refused[2].status_code >= 400  # no such route
    with pytest.raises(grpc.aio.AioRpcError, match="needs the job's queue") as error:
        await jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=waiting, namespace="*"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = (await rest.get(f"/q/{private}/j/{waiting}")).json()["job"]
    assert (after["state"], after["updateTime"], after["namespaces"]) == (
        "JOB_STATE_QUEUED",
        before["updateTime"],
        ["carol"],
    )
    assert (await rest.get(f"/q/{queue}-copy")).json().get("jobs", []) == []
