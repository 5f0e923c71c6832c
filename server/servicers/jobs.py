"""JobService: queues and jobs."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

from google.api import httpbody_pb2

from jobwire.core.definition import inline_bytes
from jobwire.server import eventstream, transfers
from jobwire.server.blobs import BlobStore
from jobwire.server.errors import Conflict, Context, InvalidArgument, NotFound, failure_status, grpc_errors
from jobwire.server.logs import LogHub
from jobwire.server.scheduler import Scheduler, job_url_view
from jobwire.server.servicers.http import header, is_rest
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc

_PAGE_DEFAULT, _PAGE_MAX = 100, 1000
STREAM_SUBMISSIONS = 64
"""Submissions of one `SubmitJobStream` handled at once; the stream is not read while that many are."""


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """Adapts JobService calls to the scheduler, the log hub and the blob store."""

    def __init__(self, scheduler: Scheduler, logs: LogHub, blobs: BlobStore) -> None:
        self.scheduler, self.logs, self.blobs = scheduler, logs, blobs

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: Context) -> jobs_pb2.SubmitJobResponse:
        async with grpc_errors(context):
            return await self._submit(request)

    async def _submit(self, request: jobs_pb2.SubmitJobRequest) -> jobs_pb2.SubmitJobResponse:
        job = await self.scheduler.submit(request.queue, request.definition, request.control, request.id)
        return jobs_pb2.SubmitJobResponse(success=True, job_id=job.id, job=job)

    # Answers go out through context.write, as each submission's commit returns, so this handler
    # returns None.
    async def SubmitJobStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[jobs_pb2.SubmitJobStreamRequest], context: Context
    ) -> None:
        """Each submission in a task of its own (up to `STREAM_SUBMISSIONS` at once, so those that
        arrive together share a commit), answered with its tag; one that fails is answered with its
        status and the stream goes on. A bug ends the stream (UNKNOWN), as it fails a unary call."""
        writing, handling = asyncio.Lock(), asyncio.Semaphore(STREAM_SUBMISSIONS)

        async def answer(request: jobs_pb2.SubmitJobStreamRequest) -> None:
            try:
                try:
                    response = jobs_pb2.SubmitJobStreamResponse(
                        tag=request.tag, submitted=await self._submit(request.submission)
                    )
                except Exception as error:
                    if (status := failure_status(error)) is None:
                        raise
                    code, message = status
                    failed = jobs_pb2.SubmitJobError(code=code.value[0], message=message)
                    response = jobs_pb2.SubmitJobStreamResponse(tag=request.tag, error=failed)
                async with writing:
                    await context.write(response)
            finally:
                handling.release()

        async with grpc_errors(context), asyncio.TaskGroup() as group:
            async for request in request_iterator:
                await handling.acquire()
                group.create_task(answer(request))

    async def SubmitJobs(self, request: jobs_pb2.SubmitJobsRequest, context: Context) -> jobs_pb2.SubmitJobsResponse:
        async with grpc_errors(context):
            jobs = await self.scheduler.submit_many(request.queue, request.jobs)
            return jobs_pb2.SubmitJobsResponse(
                jobs=[jobs_pb2.SubmitJobResponse(success=True, job_id=job.id, job=job) for job in jobs]
            )

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Context) -> jobs_pb2.ListJobsResponse:
        async with grpc_errors(context):
            after = _page_cursor(request.page_token)
            limit = min(max(request.page_size, 0) or _PAGE_DEFAULT, _PAGE_MAX)
            jobs, cursor = await self.scheduler.list_jobs(request.queue, state=request.state, after=after, limit=limit)
            token = base64.urlsafe_b64encode(cursor.encode()).decode() if cursor else ""
            return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Context) -> jobs_pb2.GetJobResponse:
        async with grpc_errors(context):
            job = await self.scheduler.get_job(request.job_id, request.queue)
            await self._attach_logs(job)
            return jobs_pb2.GetJobResponse(job=_shown(job, request.queue))

    async def GetJobDefinition(
        self, request: jobs_pb2.GetJobDefinitionRequest, context: Context
    ) -> jobs_pb2.GetJobDefinitionResponse:
        async with grpc_errors(context):
            job = await self.scheduler.get_job(request.job_id, request.queue)
            return jobs_pb2.GetJobDefinitionResponse(definition=job.definition)

    async def GetJobResult(
        self, request: jobs_pb2.GetJobResultRequest, context: Context
    ) -> jobs_pb2.GetJobResultResponse:
        async with grpc_errors(context):
            job = await self.scheduler.get_job(request.job_id, request.queue)
            await self._attach_logs(job)
            job = _shown(job, request.queue)
            response = jobs_pb2.GetJobResultResponse(job_id=job.id, state=job.state)
            if job.HasField("result"):
                response.result.CopyFrom(job.result)
            return response

    async def _attach_logs(self, job: jobs_pb2.Job) -> None:
        if job.state == jobs_pb2.JOB_STATE_FINISHED and job.HasField("result") and job.attempt:
            job.result.logs_start, chunks = await self.logs.tail(job)
            job.result.logs.extend(chunks)

    async def GetJobLogs(self, request: jobs_pb2.GetJobLogsRequest, context: Context) -> jobs_pb2.GetJobLogsResponse:
        async with grpc_errors(context):
            if request.since < 0:
                raise InvalidArgument("`since` must be 0 or more")
            kind = _log_kind(request)
            job = await self.scheduler.get_job(request.job_id, request.queue)
            chunks = await self.logs.read(job, kind, request.since) if job.attempt else []
            return jobs_pb2.GetJobLogsResponse(
                chunks=chunks,
                slice_start=request.since,
                next_cursor=request.since + len(chunks),
                final=job.state == jobs_pb2.JOB_STATE_FINISHED,
            )

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        async with grpc_errors(context):
            async for message in self.logs.watch(
                request.job_id, request.run_logs_since, request.build_logs, request.queue
            ):
                yield message

    async def StreamJob(
        self, request: jobs_pb2.StreamJobRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with grpc_errors(context):
            await self.scheduler.get_job(request.job_id, request.queue)  # NotFound before the stream starts
            start = eventstream.resume(header(context, "last-event-id"), request.since)
            watch = self.logs.watch(request.job_id, start.run, not request.text, request.queue, resume=start)
            async for body in eventstream.text(watch) if request.text else eventstream.events(watch, start):
                yield body

    async def GetJobInput(
        self, request: jobs_pb2.GetJobInputRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with grpc_errors(context):
            job = await self.scheduler.get_job(request.job_id, request.queue)
            refs = {**job.definition.config_files, **job.definition.inputs}
            if request.path not in refs:
                raise NotFound(f"input {request.path!r} not found in job {job.id}")
            async for body in self._serve(refs[request.path], request.path, context):
                yield body

    async def GetJobOutput(
        self, request: jobs_pb2.GetJobOutputRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with grpc_errors(context):
            job = await self.scheduler.get_job(request.job_id, request.queue)
            if job.state != jobs_pb2.JOB_STATE_FINISHED:
                raise Conflict(f"job {job.id} has not finished; it has no outputs yet")
            if request.path not in job.result.outputs:
                raise NotFound(f"output {request.path!r} not found in job {job.id}")
            async for body in self._serve(job.result.outputs[request.path], request.path, context):
                yield body

    async def _serve(
        self, ref: definition_pb2.DataRef, path: str, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        kind = ref.type or "utf8"
        if kind == "url":  # a redirect: the bytes never pass through (or are fetched by) the server
            if not is_rest(context):
                raise NotFound(f"{path!r} is a URL reference: fetch {ref.value.string_value}")
            await context.send_initial_metadata(transfers.redirect(ref.value.string_value))
            yield httpbody_pb2.HttpBody(content_type=transfers.content_type(path))
            return
        disposition = ("content-disposition", transfers.attachment(path.rpartition("/")[2]))
        if kind == "key":
            key = ref.value.string_value
            size = await self.blobs.size(key)
            if size is None:
                raise NotFound(f"the file of {path!r} is missing from the blob store")
            if is_rest(context) and (
                url := await self.blobs.presigned_url(
                    key, filename=disposition[1], content_type=transfers.content_type(path)
                )
            ):
                await context.send_initial_metadata(transfers.redirect(url))
                yield httpbody_pb2.HttpBody(content_type=transfers.content_type(path))
                return
            chunks = self.blobs.read(key)
        else:
            data = inline_bytes(ref)
            size, chunks = len(data), _once(data)
        await context.send_initial_metadata([(transfers.CONTENT_LENGTH, str(size)), disposition])
        async for body in transfers.bodies(chunks, transfers.content_type(path)):
            yield body

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Context) -> jobs_pb2.CancelJobResponse:
        async with grpc_errors(context):
            job = await self.scheduler.cancel(request.queue, request.job_id, request.namespace)
            return jobs_pb2.CancelJobResponse(job=job)

    async def CopyJob(self, request: jobs_pb2.CopyJobRequest, context: Context) -> jobs_pb2.CopyJobResponse:
        async with grpc_errors(context):
            job = await self.scheduler.copy(request.job_id, request.source_queue, request.queue, request.control)
            return jobs_pb2.CopyJobResponse(success=True, job=job)

    async def DeleteJob(self, request: jobs_pb2.DeleteJobRequest, context: Context) -> jobs_pb2.DeleteJobResponse:
        async with grpc_errors(context):
            job = await self.scheduler.delete(request.queue, request.job_id)
            return jobs_pb2.DeleteJobResponse(job_id=job.id)

    async def GetQueueStatus(
        self, request: jobs_pb2.GetQueueStatusRequest, context: Context
    ) -> jobs_pb2.GetQueueStatusResponse:
        async with grpc_errors(context):
            return await self.scheduler.queue_status(request.queue)

    async def GetQueueMetrics(
        self, request: jobs_pb2.GetQueueMetricsRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        async with grpc_errors(context):
            text = await self.scheduler.queue_metrics(request.queue)
            return httpbody_pb2.HttpBody(content_type="text/plain; version=0.0.4", data=text.encode())


_LOG_FILES = {"run-logs.json": jobs_pb2.LOG_KIND_RUN, "build-logs.json": jobs_pb2.LOG_KIND_BUILD}


def _shown(job: jobs_pb2.Job, queue: str) -> jobs_pb2.Job:
    """The job as the request may see it: an id-only request (no queue) names no queue."""
    return job if queue else job_url_view(job)


def _log_kind(request: jobs_pb2.GetJobLogsRequest) -> jobs_pb2.LogKind.ValueType:
    if not request.file:
        return request.kind or jobs_pb2.LOG_KIND_RUN
    if request.file not in _LOG_FILES or request.kind:
        raise InvalidArgument(f"unknown log file {request.file!r}; use run-logs.json or build-logs.json")
    return _LOG_FILES[request.file]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _page_cursor(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        raise InvalidArgument("invalid page_token; pass the next_page_token of the previous page") from None
