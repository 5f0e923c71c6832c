"""`SubmitJobStream`, the kept-open stream the SDK submits on, against the real server (and Envoy):
each submission answered by its tag, a failed one answered with its status while the stream goes on,
a full queue refusing per message, and the SDK falling back to `SubmitJob` on a server without it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from jobwire import Client
from jobwire.core.definition import job_id
from jobwire.errors import InvalidRequest, TooLarge
from jobwire.server.settings import ServerSettings
from jobwire.submissions import STREAM_LIMIT
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from tests.conftest import Stack, own_server

pytestmark = pytest.mark.docker


def _definition(command: str) -> definition_pb2.JobDefinition:
    return definition_pb2.JobDefinition(image="busybox", command=command)


async def test_each_submission_is_answered_by_its_tag_and_a_bad_one_does_not_end_the_stream(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str
) -> None:
    call = jobs.SubmitJobStream()
    good, other = _definition("echo good"), _definition("echo other")
    sent = {
        7: jobs_pb2.SubmitJobRequest(queue=queue, definition=good),
        8: jobs_pb2.SubmitJobRequest(queue=queue, definition=definition_pb2.JobDefinition(command="no image")),
        9: jobs_pb2.SubmitJobRequest(queue="", definition=other),
        10: jobs_pb2.SubmitJobRequest(queue=queue, definition=other),
    }
    for tag, submission in sent.items():
        await call.write(jobs_pb2.SubmitJobStreamRequest(tag=tag, submission=submission))
    await call.done_writing()
    answers = {response.tag: response async for response in call}
    assert await call.code() == grpc.StatusCode.OK
    assert set(answers) == set(sent)
    assert answers[7].submitted.job_id == job_id(good) and answers[7].submitted.job.queue == queue
    assert answers[10].submitted.job_id == job_id(other)
    for tag in (8, 9):
        assert answers[tag].WhichOneof("outcome") == "error"
        assert answers[tag].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image" in answers[8].error.message
    status = await jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue=queue))
    assert status.queued == 2  # the failed ones stored nothing


async def test_sdk_submissions_in_flight_together_share_one_stream_through_envoy(stack: Stack, queue: str) -> None:
    async with Client(f"127.0.0.1:{stack.envoy_port}") as client:
        definitions = [_definition(f"echo {index}") for index in range(40)]
        submitted = await asyncio.gather(*(client.submit(queue, definition) for definition in definitions))
        assert [job.id for job in submitted] == [job_id(definition) for definition in definitions]
        first = client.submissions._call
        again = await client.submit(queue, definitions[0])  # the same definition is the same job
        assert again.id == submitted[0].id and client.submissions._call is first
        with pytest.raises(InvalidRequest, match="queue"):
            await client.submit("", definitions[1])
        assert (await client.submit(queue, _definition("echo after"))).id == job_id(_definition("echo after"))
        assert client.submissions._call is first
        status = await client.queue_status(queue)
        assert status.queued == 41


async def test_a_full_queue_refuses_the_submission_not_the_stream(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = ServerSettings(
        data_directory=tmp_path_factory.mktemp("full-queue"), host="127.0.0.1", port=0, max_queued_jobs=2
    )
    async with own_server(settings) as target, Client(target) as client:
        await client.submit("full", _definition("echo 1"))
        await client.submit("full", _definition("echo 2"))
        with pytest.raises(TooLarge, match="max-queued-jobs"):
            await client.submit("full", _definition("echo 3"))
        assert (await client.submit("another", _definition("echo 3"))).queue == "another"


class _UnaryOnly(jobs_pb2_grpc.JobServiceServicer):
    """A JobService as a server before `SubmitJobStream` had: SubmitJob only (the rest UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.calls = 0

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> jobs_pb2.SubmitJobResponse:
        self.calls += 1
        return jobs_pb2.SubmitJobResponse(success=True, job_id=job_id(request.definition))


@contextlib.asynccontextmanager
async def _unary_only_server() -> AsyncIterator[tuple[str, _UnaryOnly]]:
    servicer, server = _UnaryOnly(), grpc.aio.server()
    jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def test_the_sdk_submits_by_unary_calls_to_a_server_without_the_stream() -> None:
    async with _unary_only_server() as (target, servicer), Client(target) as client:
        first = await client.submit("q", _definition("echo 1"))
        second = await client.submit("q", _definition("echo 2"))
        assert (first.id, second.id) == (job_id(_definition("echo 1")), job_id(_definition("echo 2")))
        assert servicer.calls == 2


async def test_a_submission_too_large_for_the_stream_goes_as_a_call(stack: Stack, queue: str) -> None:
    async with Client(stack.grpc_target) as client:
        large = definition_pb2.JobDefinition(image="busybox", command="true", env={"PAD": "x" * STREAM_LIMIT})
        job = await client.submit(queue, large)
        assert job.id == job_id(large)
        assert not client.submissions._open  # it never opened the stream


async def test_a_submitter_that_never_reads_its_answers_is_held_back_and_others_are_served(
    stack: Stack, jobs: jobs_pb2_grpc.JobServiceStub, queue: str
) -> None:
    """An attacker's stream writes submissions and reads no answer: the server handles 64 at once,
    stops reading while their answers cannot be sent, and flow control then stops the writer (the
    server holds a bounded amount for it); the server keeps serving everyone else meanwhile."""
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        call = jobs_pb2_grpc.JobServiceStub(channel).SubmitJobStream()
        # Refused at once, and its answer (which names the queue) as large as the submission: the
        # windows of both directions fill after a few thousand.
        bad_queue = jobs_pb2.SubmitJobRequest(queue="/" * 16 * 1024)
        refused = jobs_pb2.SubmitJobStreamRequest(submission=bad_queue)
        written, held_back = 0, False
        while written < 6_000:  # 100 MB
            try:
                await asyncio.wait_for(call.write(refused), timeout=2)
            except TimeoutError:
                held_back = True
                break
            written += 1
        assert held_back, f"{written:,} submissions written and none held back"
        submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=_definition("echo served")))
        assert submitted.job_id == job_id(_definition("echo served"))
        call.cancel()
