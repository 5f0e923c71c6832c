"""The async client: submit jobs, list queues, reach the server's files.

    async with Client("localhost:8080") as client:
        job = await client.submit("local", image="python:3.12", command="python -V")
        result = await job.wait()

Every call retries UNAVAILABLE with backoff when repeating it is harmless (reads,
and submissions, which are content-addressed) and raises the errors of
`jobwire.errors`, never raw gRPC ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import grpc
from google.protobuf import json_format

from jobwire.connection import Calls, Retry, Target, open_channel
from jobwire.core import tokens
from jobwire.core.definition import MAX_BATCH_JOBS, DefinitionError, validate
from jobwire.errors import InvalidDefinition
from jobwire.files import FileClient, Progress
from jobwire.inputs import Files, Upload, local_inputs, pack_context
from jobwire.job import Job
from jobwire.submissions import Submissions
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc, server_pb2, server_pb2_grpc

DEFAULT_TARGET = "localhost:8080"
Definition = definition_pb2.JobDefinition | Mapping[str, Any]
"""A JobDefinition message, or the seed's definition JSON as a dict."""


class SubmitOptions(TypedDict, total=False):
    """What `submit` adds to (or builds instead of) a full definition."""

    image: str
    command: str
    files: Files
    env: Mapping[str, str]
    gpus: int
    max_duration: str
    namespace: str
    dockerfile: str
    """Dockerfile contents; the worker builds the image from it (and the `context`)."""
    context: str | os.PathLike[str]
    """A local folder, packed (reproducibly) and uploaded as the build context (`/f/KEY`)."""
    git: str
    """A Git repository as the build context: `https://[user:token@]github.com/OWNER/REPO[.git]`,
    optionally `/tree/REF` or `/commit/SHA` (default branch `main`, then `master`); the worker fetches
    that ref's archive. A token is used for the download only, never part of the job id or shown."""
    progress: Progress


def new_queue_name() -> str:
    """An unguessable queue name (192 random bits): knowing it is the only access control."""
    return tokens.token(24)


class Client:
    """A connection to one jobwire server, through Envoy or straight to its gRPC port."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = 30.0,
        retry: Retry | None = None,
        public_url: str = "",
    ) -> None:
        """`target` is `host:port`, `http://host:port` or `https://host`; `timeout` bounds each unary call.

        `public_url` is the REST base URL users reach (for `Job.url`); by default the
        target's own URL.
        """
        self.target = Target.parse(target, tls)
        self.calls = Calls(target=self.target.address, timeout=timeout, retry=retry or Retry())
        self.public_url = (public_url or self.target.url).rstrip("/")
        self._root_certificates = root_certificates
        self._channel: grpc.aio.Channel | None = None
        self._jobs: jobs_pb2_grpc.JobServiceAsyncStub | None = None
        self._files: FileClient | None = None
        self._info: server_pb2.GetServerInfoResponse | None = None
        self.submissions = Submissions(lambda: self.job_service, self.calls)
        """The kept-open stream `submit` sends submissions on (`SubmitJobStream`)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; calls in flight are cancelled."""
        await self.submissions.close()
        if self._channel is not None:
            channel, self._channel, self._jobs, self._files = self._channel, None, None, None
            await channel.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        """The gRPC channel, opened on first use (inside the running event loop)."""
        if self._channel is None:
            self._channel = open_channel(self.target, self._root_certificates)
        return self._channel

    @property
    def job_service(self) -> jobs_pb2_grpc.JobServiceAsyncStub:
        """The generated JobService stub, for calls the SDK does not wrap."""
        if self._jobs is None:
            self._jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        return self._jobs

    @property
    def files(self) -> FileClient:
        """Blobs on the server: upload, download, exists."""
        if self._files is None:
            self._files = FileClient(self.channel, self.calls)
        return self._files

    async def server_info(self) -> server_pb2.GetServerInfoResponse:
        """The server's version and limits (fetched once)."""
        if self._info is None:
            stub = server_pb2_grpc.ServerServiceStub(self.channel)
            self._info = await self.calls.unary(stub.GetServerInfo, server_pb2.GetServerInfoRequest())
        return self._info

    async def submit(self, queue: str, definition: Definition | None = None, **options: Unpack[SubmitOptions]) -> Job:
        """Submit a job to `queue`: a full `definition`, the options, or both (the options win).

        Local `files` become inputs: small ones inline, larger ones uploaded once by
        SHA-256 (skipped when the server has them). The definition is checked before
        anything is uploaded (InvalidDefinition). An identical definition is the same job.
        """
        built = _definition(definition, options)
        uploads: list[Upload] = []
        if "files" in options:
            inputs = await asyncio.to_thread(local_inputs, options["files"], (await self.server_info()).inline_limit)
            uploads += inputs.uploads
            for name, ref in inputs.refs.items():
                built.inputs[name].CopyFrom(ref)
        if "context" in options:
            archive = await asyncio.to_thread(pack_context, Path(options["context"]))
            key = hashlib.sha256(archive).hexdigest()
            uploads.append(Upload("build context", archive, key, len(archive)))
            built.build.context = f"/f/{key}"  # the uploaded blob; the same folder is the same job anywhere
        try:
            validate(built)
        except DefinitionError as error:
            raise InvalidDefinition(f"invalid definition: {error}") from None
        for upload in uploads:
            await self.files.upload(upload.source, upload.key, progress=options.get("progress"), name=upload.name)
        request = jobs_pb2.SubmitJobRequest(queue=queue, definition=built)
        if "namespace" in options:
            request.control.namespace = options["namespace"]
        response = await self.submissions.submit(request)
        return Job(self, response.job_id, queue=queue, namespace=options.get("namespace", ""), snapshot=response.job)

    async def submit_many(
        self, queue: str, definitions: Iterable[Definition], *, namespace: str | None = None
    ) -> list[Job]:
        """Submit many jobs to `queue` in order, up to 1,000 per call (`SubmitJobs`): for sweeps.

        Each definition is complete (message or seed JSON): its inputs are inline or refer to
        URLs or stored files (`FileClient.upload`, or `submit` for local files). Each is checked
        before anything is sent (InvalidDefinition names its index); a call stores all its jobs
        or none."""
        requests = []
        for index, definition in enumerate(definitions):
            try:
                built = _definition(definition, {})
                validate(built)
            except DefinitionError as error:
                raise InvalidDefinition(f"definitions[{index}]: invalid definition: {error}") from None
            except InvalidDefinition as error:
                raise InvalidDefinition(f"definitions[{index}]: {error}") from None
            request = jobs_pb2.SubmitJobRequest(definition=built)
            if namespace is not None:
                request.control.namespace = namespace
            requests.append(request)
        jobs = []
        for start in range(0, len(requests), MAX_BATCH_JOBS):
            batch = jobs_pb2.SubmitJobsRequest(queue=queue, jobs=requests[start : start + MAX_BATCH_JOBS])
            for response in (await self.calls.unary(self.job_service.SubmitJobs, batch)).jobs:
                jobs.append(Job(self, response.job_id, queue=queue, namespace=namespace or "", snapshot=response.job))
        return jobs

    def job(self, job_id: str, queue: str = "") -> Job:
        """A handle on an existing job (no call is made)."""
        return Job(self, job_id, queue=queue)

    async def jobs(
        self, queue: str, *, state: jobs_pb2.JobState.ValueType | None = None, page_size: int = 100
    ) -> AsyncIterator[jobs_pb2.Job]:
        """The queue's jobs, oldest first (without definition, result and history), page by page."""
        request = jobs_pb2.ListJobsRequest(
            queue=queue, page_size=page_size, state=state or jobs_pb2.JOB_STATE_UNSPECIFIED
        )
        while True:
            page = await self.calls.unary(self.job_service.ListJobs, request)
            for job in page.jobs:
                yield job
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def queue_status(self, queue: str) -> jobs_pb2.GetQueueStatusResponse:
        """Job counts by state and the workers connected to `queue`."""
        return await self.calls.unary(self.job_service.GetQueueStatus, jobs_pb2.GetQueueStatusRequest(queue=queue))

    async def queue_metrics(self, queue: str) -> str:
        """The queue's Prometheus metrics, as text."""
        request = jobs_pb2.GetQueueMetricsRequest(queue=queue)
        text: str = (await self.calls.unary(self.job_service.GetQueueMetrics, request)).data.decode()
        return text


def _definition(definition: Definition | None, options: SubmitOptions) -> definition_pb2.JobDefinition:
    """The definition to submit: `definition` (message or seed JSON) with the options applied."""
    if isinstance(definition, definition_pb2.JobDefinition):
        built = definition_pb2.JobDefinition()
        built.CopyFrom(definition)
    else:
        try:
            built = json_format.ParseDict(dict(definition or {}), definition_pb2.JobDefinition(), True)
        except json_format.ParseError as error:
            raise InvalidDefinition(f"invalid definition: {error}") from None
    if "image" in options:
        built.image = options["image"]
    if "command" in options:
        built.command = options["command"]
    if "max_duration" in options:
        built.max_duration = options["max_duration"]
    built.env.update(options.get("env", {}))
    if "gpus" in options:
        built.requirements.gpus = options["gpus"]
    if "dockerfile" in options:
        built.build.dockerfile = options["dockerfile"]
    if "git" in options:
        if "context" in options:
            raise InvalidDefinition(
                "give a build context as a local folder (`context`) or a repository (`git`), not both"
            )
        built.build.context = options["git"]
    return built
