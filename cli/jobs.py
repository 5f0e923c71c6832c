"""`jobwire job …`: submit jobs, follow them, fetch their outputs."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated

import grpc
from cyclopts import App, Parameter
from google.protobuf import json_format, struct_pb2

from jobwire.cli.console import CliError, channel
from jobwire.definition import DefinitionError, check_relative_path, inline_bytes
from jobwire.v1 import (
    definition_pb2,
    files_pb2,
    files_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)
from jobwire.worker.files import FileClient

job = App(name="job", help="Submit, inspect and follow jobs.")
Server = Annotated[str, Parameter(name=["--server", "-s"], help="The server's gRPC address (Envoy or direct).")]


@job.command
async def add(
    queue: str,
    definition: Annotated[str, Parameter(help="`-` reads a whole definition (JSON) from stdin.")] = "",
    *,
    image: Annotated[str, Parameter(name=["--image", "-m"])] = "alpine:latest",
    file: Annotated[list[Path] | None, Parameter(name=["--file", "-f"], negative="")] = None,
    command: Annotated[str, Parameter(name=["--command", "-c"])] = "",
    env: Annotated[list[str] | None, Parameter(name=["--env", "-e"], negative="")] = None,
    namespace: str = "",
    wait: Annotated[bool, Parameter(name=["--wait", "-w"], negative="")] = False,
    outputs: Annotated[Path, Parameter(name=["--outputs", "-o"])] = Path("./outputs"),
    server: Server = "localhost:8080",
) -> int:
    """Submit a job to QUEUE and print its id; with --wait, stream its logs and save its outputs.

    Parameters
    ----------
    queue
        The queue to run the job on.
    image
        Docker image to run.
    file
        A local file to give the job as /inputs/<name> (repeatable).
    command
        The command, e.g. `python3 /inputs/script.py` (shell syntax needs `sh -c '…'`).
    env
        An environment variable `KEY=VALUE` (repeatable).
    namespace
        The submission's namespace (cancel acts per namespace).
    wait
        Follow the job: print its logs live, then write its outputs to --outputs.
    outputs
        Folder for the outputs with --wait.
    """
    request = jobs_pb2.SubmitJobRequest(queue=queue)
    if definition == "-":
        _parse_stdin(request)
    else:
        request.definition.image = image
        if command:
            request.definition.command = command
        for pair in env or []:
            key, sep, value = pair.partition("=")
            if not sep:
                raise CliError(f"--env expects KEY=VALUE, not {pair!r}")
            request.definition.env[key] = value
    if namespace:
        request.control.namespace = namespace
    async with channel(server) as opened:
        info = await server_pb2_grpc.ServerServiceStub(opened).GetServerInfo(server_pb2.GetServerInfoRequest())
        for path in file or []:
            request.definition.inputs[path.name].CopyFrom(await _input_ref(opened, path, info.inline_limit))
        response = await jobs_pb2_grpc.JobServiceStub(opened).SubmitJob(request)
        print(response.job_id, file=sys.stderr if wait else sys.stdout)
        if not wait:
            return 0
        return await _follow(opened, response.job_id, outputs)


@job.command
async def get(job_id: str, *, server: Server = "localhost:8080") -> None:
    """Print a job (state, definition, result, history) as JSON."""
    async with channel(server) as opened:
        response = await jobs_pb2_grpc.JobServiceStub(opened).GetJob(jobs_pb2.GetJobRequest(job_id=job_id))
        print(json_format.MessageToJson(response.job, indent=2))


@job.command
async def wait(
    job_id: str,
    *,
    outputs: Annotated[Path, Parameter(name=["--outputs", "-o"])] = Path("./outputs"),
    server: Server = "localhost:8080",
) -> int:
    """Follow a job: print its logs live, then write its outputs to --outputs."""
    async with channel(server) as opened:
        return await _follow(opened, job_id, outputs)


def _parse_stdin(request: jobs_pb2.SubmitJobRequest) -> None:
    try:
        payload = json.load(sys.stdin)
        if "definition" not in payload:
            payload = {"definition": payload}
        payload.pop("id", None)
        json_format.ParseDict(payload, request, ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError) as error:
        raise CliError(f"invalid definition on stdin: {error}") from None


async def _input_ref(opened: grpc.aio.Channel, path: Path, inline_limit: int) -> definition_pb2.DataRef:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None
    if len(data) <= inline_limit:
        return definition_pb2.DataRef(
            type="base64", value=struct_pb2.Value(string_value=base64.b64encode(data).decode())
        )
    digest = hashlib.sha256(data).hexdigest()
    files = FileClient(opened)
    if not await files.exists(digest):
        await files.upload(path, digest)
    return definition_pb2.DataRef(type="key", value=struct_pb2.Value(string_value=digest), hash=digest)


async def _follow(opened: grpc.aio.Channel, job_id: str, outputs: Path) -> int:
    """Print logs live until the job finishes, save its outputs; returns the container's exit code."""
    stub = jobs_pb2_grpc.JobServiceStub(opened)
    async for event in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
        for chunk in event.logs.chunks:
            stream = sys.stderr if chunk.stream == jobs_pb2.LOG_STREAM_STDERR else sys.stdout
            stream.write(chunk.text)
            stream.flush()
    result = (await stub.GetJobResult(jobs_pb2.GetJobResultRequest(job_id=job_id))).result
    await _save_outputs(opened, result, outputs)
    if result.reason != jobs_pb2.FINISH_REASON_SUCCESS:
        reason = jobs_pb2.FinishReason.Name(result.reason).removeprefix("FINISH_REASON_").lower()
        raise CliError(f"job {job_id} finished: {reason}: {result.message}")
    return result.exit_code


async def _save_outputs(opened: grpc.aio.Channel, result: jobs_pb2.JobResult, folder: Path) -> None:
    files = files_pb2_grpc.FileServiceStub(opened)
    for name, ref in result.outputs.items():
        try:
            check_relative_path(name, what="output")
        except DefinitionError as error:
            raise CliError(str(error)) from None
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if ref.type == "key":
            with target.open("wb") as handle:
                async for body in files.DownloadFile(files_pb2.DownloadFileRequest(key=ref.value.string_value)):
                    handle.write(body.data)
        else:
            target.write_bytes(inline_bytes(ref))
    if result.outputs:
        print(f"{len(result.outputs)} output(s) written to {folder}", file=sys.stderr)
