"""The MCP tools: what an agent may do with jobwire, each a few SDK calls.

The tools hold no rights of their own: every call goes to the jobwire server through the SDK, so the
same capability rules apply as on every route (the queue name is the right to submit, list and
cancel; a job id shows the job). A wrong argument is a tool error (`isError`) that names it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import grpc
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobwire.agents.views import job_view, log_text, output_link
from jobwire.client import Client, SubmitOptions
from jobwire.errors import JobNotFound, JobwireError, translate
from jobwire.states import parse_state
from jobwire.v1 import jobs_pb2

MAX_TEXT_OUTPUT = 1024 * 1024
"""Largest output `get_output` returns as text; larger or binary ones are a link."""
MAX_UPLOAD = 16 * 1024 * 1024
"""Largest `upload_file` content (decoded); larger files go through the CLI or SDK."""

Queue = Annotated[str, Field(description="The queue's name (from `jobwire queue new`): the right to use the queue.")]
JobId = Annotated[str, Field(description="The job's id (64 hex characters, as submit_job returned it).")]
JobQueue = Annotated[
    str,
    Field(description="The queue the job was submitted to; empty shows the job by its id alone (what its URL shows)."),
]


class InputRef(BaseModel):
    """One input file of a job: exactly one of text, base64, file_key or url."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="The file's content as UTF-8 text.")
    base64: str | None = Field(None, description="The file's bytes, base64-encoded.")
    file_key: str | None = Field(None, description="The key upload_file returned (or `/f/KEY`): a stored file.")
    url: str | None = Field(None, description="An http(s) URL the worker downloads.")

    @model_validator(mode="after")
    def _one(self) -> InputRef:
        given = [name for name in ("text", "base64", "file_key", "url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, base64, file_key, url (got {', '.join(given) or 'none'})")
        return self

    def data_ref(self) -> dict[str, str]:
        """The definition's DataRef (seed JSON) for this input."""
        if self.text is not None:
            return {"type": "utf8", "value": self.text}
        if self.base64 is not None:
            return {"type": "base64", "value": self.base64}
        if self.file_key is not None:
            return {"type": "key", "value": self.file_key.removeprefix("/f/")}
        return {"type": "url", "value": str(self.url)}


# The definition's fields (as the SDK's and the server's messages name them) that are submit_job arguments.
ARGUMENTS = {
    "`maxDuration`": "`max_duration`",
    "`requirements.gpus`": "`gpus`",
    "`build.dockerfile`": "`dockerfile`",
    "`build.context`": "`build_context` (or `git_repo`)",
}


@contextlib.contextmanager
def _reported(arguments: dict[str, str] | None = None) -> Iterator[None]:
    """SDK errors become tool errors with the server's message (no traceback, no protocol error), the
    definition's field names in it replaced by the `arguments` they came from."""
    try:
        yield
    except JobwireError as error:
        message = str(error)
        for field, argument in (arguments or {}).items():
            message = message.replace(field, argument)
        raise ToolError(message) from None


class Tools:
    """The tools, bound to the jobwire server behind `client`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def submit_job(
        self,
        queue: Queue,
        image: Annotated[str | None, Field(description="Docker image to run, e.g. `python:3.12`.")] = None,
        command: Annotated[
            str | None,
            Field(
                description="Command to run, split as a shell would (use `sh -c '…'` for pipes); inputs are "
                "under /inputs, files written under /outputs become the job's outputs."
            ),
        ] = None,
        dockerfile: Annotated[
            str | None, Field(description="Dockerfile contents: the worker builds the image (with the build context).")
        ] = None,
        build_context: Annotated[
            str | None,
            Field(description="Build context: an http(s) URL of a tar(.gz) archive, or `/f/KEY` of an upload."),
        ] = None,
        git_repo: Annotated[
            str | None,
            Field(description="A Git repository URL (optionally `/tree/<ref>`) used as the build context."),
        ] = None,
        inputs: Annotated[
            dict[str, InputRef] | None, Field(description="Input files by name (a relative path under /inputs).")
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="Environment variables of the container.")] = None,
        max_duration: Annotated[
            str | None, Field(description="Longest run time, e.g. `10m` or `2h`; the worker's limit if shorter.")
        ] = None,
        namespace: Annotated[
            str | None, Field(description="Your namespace in the queue (default `_`); cancel acts on one namespace.")
        ] = None,
        gpus: Annotated[
            int | None, Field(ge=0, description="GPUs the job needs; only workers with them take it.")
        ] = None,
    ) -> dict[str, Any]:
        """Submit a Docker job to a queue; the same definition is the same job (its id is its SHA-256).

        Give `image`, or `dockerfile` and/or a build context (`build_context` or `git_repo`).
        Returns the job's id, URL and state; follow it with follow_job."""
        if build_context is not None and git_repo is not None:
            raise ToolError("build_context and git_repo: give one of them (git_repo is a build context too)")
        context = build_context if build_context is not None else git_repo
        if image is None and dockerfile is None and context is None:
            raise ToolError("image: give an image to run, or a dockerfile or build context to build one")
        definition: dict[str, Any] = {
            "image": image,
            "command": command,
            "maxDuration": max_duration,
            "env": env,
            "inputs": {name: ref.data_ref() for name, ref in (inputs or {}).items()} or None,
            "build": {"dockerfile": dockerfile, "context": context},
            "requirements": {"gpus": gpus},
        }
        options: SubmitOptions = {"namespace": namespace} if namespace is not None else {}
        with _reported(ARGUMENTS):
            job = await self.client.submit(queue, _present(definition), **options)
        assert job.snapshot is not None
        return job_view(self.client, job.snapshot, queue=queue)

    async def get_job_status(self, job_id: JobId, queue: JobQueue = "") -> dict[str, Any]:
        """A job's state, why it waits, and once finished its result (exit code, reason, outputs as links)."""
        with _reported():
            job = await self.client.job(job_id, queue).get()
        return job_view(self.client, job, queue=queue, full=True)

    async def get_job_logs(
        self,
        job_id: JobId,
        queue: JobQueue = "",
        cursor: Annotated[int, Field(ge=0, description="Where to start: 0, or `next_cursor` of the last call.")] = 0,
        kind: Annotated[
            Literal["run", "build"], Field(description="The container's log, or the image build's.")
        ] = "run",
    ) -> dict[str, Any]:
        """A page of a job's log from `cursor`: its text, the cursor to pass next, and whether more can come."""
        kinds = {"run": jobs_pb2.LOG_KIND_RUN, "build": jobs_pb2.LOG_KIND_BUILD}
        request = jobs_pb2.GetJobLogsRequest(job_id=job_id, queue=queue, since=cursor, kind=kinds[kind])
        with _reported():
            page = await self.client.calls.unary(self.client.job_service.GetJobLogs, request, not_found=JobNotFound)
        return {"text": log_text(page.chunks), "next_cursor": page.next_cursor, "final": page.final}

    async def follow_job(
        self,
        job_id: JobId,
        ctx: Context,  # type: ignore[type-arg]
        queue: JobQueue = "",
        timeout_seconds: Annotated[
            float, Field(gt=0, le=3600, description="Stop following after this many seconds (the job goes on).")
        ] = 300,
    ) -> dict[str, Any]:
        """Follow a job until it finishes or the timeout, sending progress notifications (state
        changes, log lines); then its status as get_job_status shows it, with `finished`."""
        handle, events = self.client.job(job_id, queue), 0
        with _reported():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_seconds):
                    async for event in handle.watch():
                        events += 1
                        if isinstance(event, jobs_pb2.Job):
                            message = f"state: {job_view(self.client, event)['state']}"
                        else:
                            message = log_text(event.chunks)[-200:]
                        await ctx.report_progress(events, message=message)
            job = await handle.get()
        view = job_view(self.client, job, queue=queue, full=True)
        return {"finished": job.state == jobs_pb2.JOB_STATE_FINISHED, **view}

    async def list_jobs(
        self,
        queue: Queue,
        state: Annotated[
            Literal["queued", "running", "finished"] | None, Field(description="Only jobs in this state.")
        ] = None,
        page_size: Annotated[int, Field(ge=1, le=1000, description="Jobs per page.")] = 50,
        page_token: Annotated[str, Field(description="`next_page_token` of the last call, for the next page.")] = "",
    ) -> dict[str, Any]:
        """The jobs of a queue, a page at a time (id, state, namespaces, why it waits, URL)."""
        request = jobs_pb2.ListJobsRequest(queue=queue, page_size=page_size, page_token=page_token)
        if state is not None:
            request.state = parse_state(state)
        with _reported():
            page = await self.client.calls.unary(self.client.job_service.ListJobs, request)
        jobs = [job_view(self.client, job, queue=queue) for job in page.jobs]
        return {"jobs": jobs, "next_page_token": page.next_page_token}

    async def cancel_job(
        self,
        queue: Queue,
        job_id: JobId,
        namespace: Annotated[
            str,
            Field(description="The namespace to cancel for (default `_`; `*`: all); the job stops when none holds it."),
        ] = "",
    ) -> dict[str, Any]:
        """Cancel a job in a queue; its container is killed once no namespace holds it."""
        with _reported():
            job = await self.client.job(job_id, queue).cancel(namespace)
        return job_view(self.client, job, queue=queue)

    async def upload_file(
        self,
        content: Annotated[str, Field(description="The file's content: text, or base64 with encoding `base64`.")],
        encoding: Annotated[Literal["text", "base64"], Field(description="How `content` is written.")] = "text",
        name: Annotated[str, Field(description="A name for the upload (for messages only).")] = "",
    ) -> dict[str, Any]:
        """Store a file on the server; use the returned `file_key` as a submit_job input (`{"file_key": …}`)."""
        data = _decoded(content, encoding)
        key = hashlib.sha256(data).hexdigest()
        with _reported():
            await self.client.files.upload(data, key, name=name or key)
        return {"file_key": key, "size": len(data), "url": f"{self.client.public_url}/f/{key}"}

    async def get_output(
        self,
        job_id: JobId,
        path: Annotated[str, Field(description="The output's path, as get_job_status lists it.")],
        queue: JobQueue = "",
    ) -> dict[str, Any]:
        """An output file of a finished job: its text when it is UTF-8 text up to 1 MiB, else a link."""
        with _reported():
            result = await self.client.job(job_id, queue).result()
            if result is None:
                raise ToolError(f"job_id: job {job_id} has not finished; it has no outputs yet")
            if path not in result.outputs:
                raise ToolError(f"path: no output {path!r} (outputs: {', '.join(sorted(result.outputs)) or 'none'})")
            link = output_link(self.client, job_id, path, result.outputs[path], queue)
            data = await _read_output(self.client, job_id, path, queue) if result.outputs[path].type != "url" else None
        if data is not None:
            with contextlib.suppress(UnicodeDecodeError):
                return {"path": path, "text": data.decode(), "url": link}
        return {"path": path, "url": link, "text": None}

    async def job_resource(self, job_id: str) -> dict[str, Any]:
        """A job as its URL shows it (state, result, outputs as links)."""
        with _reported():
            return job_view(self.client, await self.client.job(job_id).get(), full=True)


def build(client: Client, *, name: str = "jobwire", **settings: Any) -> FastMCP:
    """An MCP server whose tools act on the jobwire server behind `client`."""
    server = FastMCP(name, instructions=INSTRUCTIONS, **settings)
    tools = Tools(client)
    for tool in TOOLS:
        server.add_tool(getattr(tools, tool))
    server.resource("jobwire://jobs/{job_id}", mime_type="application/json")(tools.job_resource)
    return server


TOOLS = (
    "submit_job",
    "get_job_status",
    "get_job_logs",
    "follow_job",
    "list_jobs",
    "cancel_job",
    "upload_file",
    "get_output",
)
"""The tools' names, in the order they are listed."""


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` without the arguments not given (None), and without objects left empty by that."""
    present = {}
    for name, value in fields.items():
        if isinstance(value, dict) and name != "env" and name != "inputs":
            value = _present(value) or None
        if value is not None:
            present[name] = value
    return present


def _decoded(content: str, encoding: str) -> bytes:
    if encoding == "text":
        data = content.encode()
    else:
        try:
            data = base64.b64decode(content, validate=True)
        except binascii.Error:
            raise ToolError("content: not valid base64 (encoding is `base64`)") from None
    if len(data) > MAX_UPLOAD:
        raise ToolError(f"content: {len(data)} bytes, more than {MAX_UPLOAD}; upload it with the jobwire CLI")
    return data


async def _read_output(client: Client, job_id: str, path: str, queue: str) -> bytes | None:
    """The output's bytes, or None past MAX_TEXT_OUTPUT (then the link is the answer)."""
    request = jobs_pb2.GetJobOutputRequest(job_id=job_id, path=path, queue=queue)
    data = bytearray()
    call = client.job_service.GetJobOutput(request)
    try:
        async for body in call:
            data += body.data
            if len(data) > MAX_TEXT_OUTPUT:
                return None
    except grpc.aio.AioRpcError as error:
        raise translate(error, target=client.calls.target, not_found=JobNotFound) from None
    finally:
        call.cancel()
    return bytes(data)


INSTRUCTIONS = """jobwire runs Docker jobs on workers of a queue. A queue's name is the right to use it: \
submit_job, list_jobs and cancel_job need it; a job id alone shows the job (get_job_status, get_job_logs, \
follow_job, get_output). Submit, then follow_job until it finishes, then read logs and outputs. \
Files: give small ones as text inputs; upload larger ones with upload_file and pass the file_key."""
