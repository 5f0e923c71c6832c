"""A handle on one job: follow it, wait for it, read its logs and outputs, cancel it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import grpc

from jobwire.connection import RESUMABLE
from jobwire.core.definition import DefinitionError, check_relative_path, inline_bytes
from jobwire.errors import JobFailed, JobNotFound, NotFound, RequestFailed, translate
from jobwire.files import Progress
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc

if TYPE_CHECKING:
    from jobwire.client import Client

_NO_LOGS = 2**62  # a run-log cursor past any log: WatchJob then sends states only
_KINDS = {"run": jobs_pb2.LOG_KIND_RUN, "build": jobs_pb2.LOG_KIND_BUILD}


class Job:
    """One job on a server. Cheap to make; every method is a call."""

    def __init__(
        self,
        client: Client,
        job_id: str,
        *,
        queue: str = "",
        namespace: str = "",
        snapshot: jobs_pb2.Job | None = None,
    ) -> None:
        self.client, self.id, self.queue, self.namespace = client, job_id, queue, namespace
        self.snapshot = snapshot
        """The job as last seen (by `submit`, `get` or `watch`), if at all."""

    def __repr__(self) -> str:
        return f"Job({self.id!r}, queue={self.queue!r})"

    @property
    def url(self) -> str:
        """The job's REST URL (`/j/{id}`)."""
        return f"{self.client.public_url}/j/{self.id}"

    async def get(self) -> jobs_pb2.Job:
        """The job now: state, definition, result (with logs) and history."""
        request = jobs_pb2.GetJobRequest(job_id=self.id, queue=self.queue)
        self.snapshot = (await self.client.calls.unary(self._stub.GetJob, request, not_found=JobNotFound)).job
        return self.snapshot

    async def result(self) -> jobs_pb2.JobResult | None:
        """The result once the job has finished (logs, outputs, exit code); None before."""
        request = jobs_pb2.GetJobResultRequest(job_id=self.id, queue=self.queue)
        response = await self.client.calls.unary(self._stub.GetJobResult, request, not_found=JobNotFound)
        return response.result if response.state == jobs_pb2.JOB_STATE_FINISHED else None

    async def watch(
        self, *, logs: bool = True, build_logs: bool = False
    ) -> AsyncIterator[jobs_pb2.Job | jobs_pb2.LogBatch]:
        """The job's state, then every state change and new log batch, until it finishes.

        A stream that breaks without an answer (`connection.RESUMABLE`: a replica or a proxy gone, a
        database restart) is resumed from the run log's cursor, with backoff, up to
        `Retry.stream_failures` failures in a row; no chunk is delivered twice or skipped.
        """
        position, retry = _Position(logs), self.client.calls.retry
        delays = retry.stream_delays()
        while True:
            request = position.request(self.id, self.queue, build_logs)
            call = self._stub.WatchJob(request)
            try:
                async for event in call:
                    delays = retry.stream_delays()
                    if event.HasField("job"):
                        if position.skips(event.job):
                            break  # the cursor was another attempt's: ask again from this one's start
                        self.snapshot = event.job
                        yield event.job
                    elif (batch := position.unseen(event.logs)).chunks:
                        yield batch
                else:
                    if position.finished:
                        return
                    delay = next(delays, None)  # ended without the final state: as a broken stream
                    if delay is None:
                        raise RequestFailed(f"job {self.id}: the server kept ending the stream before the job finished")
                    await asyncio.sleep(delay)
            except grpc.aio.AioRpcError as error:
                delay = next(delays, None) if error.code() in RESUMABLE else None
                if delay is None:
                    raise translate(error, target=self.client.calls.target, not_found=JobNotFound) from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def logs(
        self, *, follow: bool = False, kind: Literal["run", "build"] = "run"
    ) -> AsyncIterator[jobs_pb2.LogChunk]:
        """The job's log chunks; with `follow`, live until the job finishes."""
        if follow:
            async for event in self.watch(build_logs=kind == "build"):
                if isinstance(event, jobs_pb2.LogBatch) and event.kind == _KINDS[kind]:
                    for chunk in event.chunks:
                        yield chunk
            return
        request = jobs_pb2.GetJobLogsRequest(job_id=self.id, kind=_KINDS[kind], queue=self.queue)
        while True:
            page = await self.client.calls.unary(self._stub.GetJobLogs, request, not_found=JobNotFound)
            for chunk in page.chunks:
                yield chunk
            if not page.chunks:
                return
            request.since = page.next_cursor

    async def wait(self, timeout: float | None = None) -> jobs_pb2.JobResult:
        """Wait until the job finishes; its result, or JobFailed when it did not run to its end.

        A non-zero exit code is a result (`result.exit_code`), not a failure. TimeoutError
        after `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            async for _ in self.watch(logs=False):
                pass
        result = await self.result()
        if result is None:
            raise RequestFailed(f"job {self.id} stopped being followed before it finished")
        if result.reason != jobs_pb2.FINISH_REASON_SUCCESS:
            raise JobFailed(self.id, result)
        return result

    async def outputs(self) -> dict[str, definition_pb2.DataRef]:
        """The finished job's output files by path (inline refs, or blob `key` refs)."""
        result = await self.result()
        if result is None:
            raise NotFound(f"job {self.id} has not finished; it has no outputs yet", grpc.StatusCode.NOT_FOUND)
        return dict(result.outputs)

    async def download(self, directory: str | Path, *, progress: Progress | None = None) -> list[Path]:
        """Write the finished job's outputs under `directory` (folders as needed); the paths written."""
        folder, written = Path(directory), []
        for name, ref in sorted((await self.outputs()).items()):
            try:
                check_relative_path(name, what="output")
            except DefinitionError as error:
                raise RequestFailed(f"job {self.id}: refusing to write {error}") from None
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if ref.type == "key":
                await self.client.files.download(ref.value.string_value, target, progress=progress, name=name)
            elif ref.type == "url":
                raise RequestFailed(f"output {name!r} is a URL reference ({ref.value.string_value}); fetch it there")
            else:
                await asyncio.to_thread(target.write_bytes, inline_bytes(ref))
            written.append(target)
        return written

    async def cancel(self, namespace: str = "") -> jobs_pb2.Job:
        """Cancel for `namespace` (default: the one it was submitted with, else `_`; `*`: all namespaces).

        When no namespace holds the job any more it finishes as cancelled and its container is killed.
        Needs the handle's queue (a job id names no queue's run): the server refuses it without one.
        """
        request = jobs_pb2.CancelJobRequest(queue=self.queue, job_id=self.id, namespace=namespace or self.namespace)
        self.snapshot = (await self.client.calls.unary(self._stub.CancelJob, request, not_found=JobNotFound)).job
        return self.snapshot

    async def delete(self) -> None:
        """Delete the job's run in the handle's queue and its cached result (a running container is
        killed); the server refuses a handle without a queue."""
        request = jobs_pb2.DeleteJobRequest(job_id=self.id, queue=self.queue)
        await self.client.calls.unary(self._stub.DeleteJob, request, idempotent=False, not_found=JobNotFound)

    async def copy(self, queue: str, namespace: str = "") -> Job:
        """Submit the definition of this job's run (in the handle's queue) to another queue; the same id
        there, a run of its own."""
        request = jobs_pb2.CopyJobRequest(job_id=self.id, queue=queue, source_queue=self.queue)
        if namespace:
            request.control.namespace = namespace
        response = await self.client.calls.unary(self._stub.CopyJob, request, not_found=JobNotFound)
        return Job(self.client, response.job.id, queue=queue, namespace=namespace, snapshot=response.job)

    @property
    def _stub(self) -> jobs_pb2_grpc.JobServiceAsyncStub:
        return self.client.job_service


class _Position:
    """Where a follower is: the attempt it follows, and how far into each of that attempt's logs it
    has delivered (the cursor a resumed watch asks from)."""

    def __init__(self, logs: bool) -> None:
        self.logs, self.attempt, self.asked, self.finished = logs, 0, 0, False
        self.delivered: dict[tuple[int, int], int] = {}

    def request(self, job_id: str, queue: str, build_logs: bool) -> jobs_pb2.WatchJobRequest:
        """A watch from the cursor: the run-log chunks delivered of the attempt last seen."""
        self.asked = self.delivered.get((self.attempt, jobs_pb2.LOG_KIND_RUN), 0)
        since = self.asked if self.logs else _NO_LOGS
        return jobs_pb2.WatchJobRequest(job_id=job_id, run_logs_since=since, build_logs=build_logs, queue=queue)

    def skips(self, job: jobs_pb2.Job) -> bool:
        """Take a state; True when it is the first of a call whose cursor belongs to another attempt
        (the server applies it to the attempt it sends first, so it would skip part of that log)."""
        self.attempt, self.finished = job.attempt, job.state == jobs_pb2.JOB_STATE_FINISHED
        asked, self.asked = self.asked, 0  # later attempts of the same call start at 0 on the server
        return asked > self.delivered.get((job.attempt, jobs_pb2.LOG_KIND_RUN), 0)

    def unseen(self, batch: jobs_pb2.LogBatch) -> jobs_pb2.LogBatch:
        """The part of `batch` not yet delivered (a resumed watch may repeat the build log)."""
        return _unseen(batch, self.delivered)


def _unseen(batch: jobs_pb2.LogBatch, delivered: dict[tuple[int, int], int]) -> jobs_pb2.LogBatch:
    """The part of `batch` not yet delivered (a resumed watch sends each attempt's log from its start)."""
    key = (batch.attempt, batch.kind)
    skip = max(0, delivered.get(key, 0) - batch.start)
    delivered[key] = max(delivered.get(key, 0), batch.start + len(batch.chunks))
    if skip == 0:
        return batch
    return jobs_pb2.LogBatch(
        kind=batch.kind, start=batch.start + skip, chunks=batch.chunks[skip:], attempt=batch.attempt
    )
