"""`jobwire job …`: submit jobs, follow them, read their logs and outputs, cancel, copy, delete."""

from __future__ import annotations

import sys
from json import dumps
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter
from google.protobuf import json_format

from jobwire import Job
from jobwire.cli.console import CliError, Connection, Json, connect, human_size, print_json
from jobwire.cli.submission import definition_lines, stdin_definition, submit_options
from jobwire.cli.terminal import Transfers, stderr_console, stream_job, summary
from jobwire.cli.views import job_lines, job_row
from jobwire.core.definition import inline_bytes
from jobwire.errors import JobFailed
from jobwire.states import parse_state
from jobwire.v1 import jobs_pb2

job = App(name="job", help="Submit, inspect and follow jobs.")
Outputs = Annotated[Path, Parameter(name=["--outputs", "-o"])]
ExitCode = Annotated[bool, Parameter(negative="")]


@job.command
async def add(
    queue: str,
    definition: Annotated[str, Parameter(help="`-` reads a whole definition (JSON) from stdin.")] = "",
    *,
    image: Annotated[str, Parameter(name=["--image", "-m"])] = "",
    file: Annotated[list[Path] | None, Parameter(name=["--file", "-f"], negative="")] = None,
    command: Annotated[str | None, Parameter(name=["--command", "-c"])] = None,
    env: Annotated[list[str] | None, Parameter(name=["--env", "-e"], negative="")] = None,
    gpus: int | None = None,
    max_duration: str | None = None,
    namespace: str | None = None,
    build_file: Path | None = None,
    context: Path | None = None,
    git: Annotated[str | None, Parameter(name=["--git", "-r"])] = None,
    wait: Annotated[bool, Parameter(name=["--wait", "-w"], negative="")] = False,
    outputs: Outputs = Path("./outputs"),
    exit_code: ExitCode = False,
    connection: Connection = Connection(),
) -> int:
    """Submit a job to QUEUE and print its id; with --wait, stream its logs and save its outputs.

    Parameters
    ----------
    queue
        The queue to run the job on.
    image
        Docker image to run (default alpine:latest unless a definition or a build gives one).
    file
        A local file or folder to give the job under /inputs (repeatable). Small files go inline;
        larger ones are uploaded once by SHA-256 and skipped when the server has them.
    command
        The command, e.g. `python3 /inputs/script.py` (shell syntax needs `sh -c '…'`).
    env
        An environment variable `KEY=VALUE` (repeatable).
    gpus
        GPUs the job needs.
    max_duration
        Longest the job may run (`30s`, `20m`, `1h30m`).
    namespace
        The submission's namespace (cancel acts per namespace; default `_`).
    build_file
        A Dockerfile to build the image from (its contents go into the definition).
    context
        A folder to use as the build context (packed reproducibly and uploaded).
    git
        A Git repository to build the image from: `https://github.com/OWNER/REPO`, optionally
        `/tree/REF` or `/commit/SHA` (default `main`, then `master`); `https://TOKEN@github.com/…`
        for a private one (the token is used for the download only: it is no part of the job id
        and no answer shows it; it is visible in this machine's process list while the CLI runs).
    wait
        Follow the job: print its logs live, then write its outputs to --outputs.
    outputs
        Folder for the outputs with --wait.
    exit_code
        With --wait: exit with the container's exit code.
    """
    base, stdin_namespace = stdin_definition() if definition == "-" else (None, None)
    options = submit_options(base, image, file, command, env, gpus, max_duration, build_file, context, git)
    namespace = namespace if namespace is not None else stdin_namespace
    if namespace is not None:
        options["namespace"] = namespace
    async with connect(connection) as client:
        with Transfers("uploaded") as transfers:
            options["progress"] = transfers
            submitted = await client.submit(queue, base, **options)
        print(submitted.id, file=sys.stderr if wait else sys.stdout)
        if not wait:
            return 0
        return await _finish(submitted, outputs, exit_code)


@job.command(name="add-many")
async def add_many(
    queue: str,
    definitions: Annotated[str, Parameter(help="A JSON Lines file of definitions; `-` reads stdin.")] = "-",
    *,
    namespace: str | None = None,
    connection: Connection = Connection(),
) -> None:
    """Submit a sweep: one job per line of DEFINITIONS (a definition, or `{"definition": …}`), in
    order, 1,000 per call; prints their ids, one a line. Every line is checked before any is sent.

    Parameters
    ----------
    queue
        The queue to run the jobs on.
    namespace
        The submissions' namespace (a namespace keeps its last job: leave it out for sweeps).
    """
    if definitions == "-":
        text, where = sys.stdin.read(), "stdin"
    else:
        try:
            text, where = Path(definitions).read_text(), definitions
        except OSError as error:
            raise CliError(f"cannot read {definitions}: {error.strerror}", 2) from None
    async with connect(connection) as client:
        for submitted in await client.submit_many(queue, definition_lines(text, where), namespace=namespace):
            print(submitted.id)


@job.command
async def get(job_id: str, *, queue: str = "", json: Json = False, connection: Connection = Connection()) -> None:
    """Print a job: state, result, where it runs, why it waits (--json: as GET /j/{id} answers)."""
    async with connect(connection) as client:
        found = await client.job(job_id, queue).get()
        if json:
            print_json(jobs_pb2.GetJobResponse(job=found))
        else:
            print("\n".join(job_lines(found, client.job(job_id).url)))


@job.command(name="ls")
async def list_jobs(
    queue: str, *, state: str = "", limit: int = 0, json: Json = False, connection: Connection = Connection()
) -> None:
    """List a queue's jobs, oldest first.

    Parameters
    ----------
    state
        Only jobs in this state: queued, running or finished.
    limit
        Show at most this many (0: all).
    """
    try:
        wanted = parse_state(state) if state else None
    except ValueError as error:
        raise CliError(str(error), 2) from None
    found: list[jobs_pb2.Job] = []
    async with connect(connection) as client:
        async for listed in client.jobs(queue, state=wanted):
            found.append(listed)
            if limit and len(found) >= limit:
                break
    if json:
        print_json(jobs_pb2.ListJobsResponse(jobs=found))
        return
    for listed in found:
        print(job_row(listed))


@job.command
async def logs(
    job_id: str,
    *,
    follow: Annotated[bool, Parameter(name=["--follow", "-f"], negative="")] = False,
    build: Annotated[bool, Parameter(negative="")] = False,
    exit_code: ExitCode = False,
    json: Json = False,
    connection: Connection = Connection(),
) -> int:
    """Print a job's log; with -f, live until the job finishes.

    Parameters
    ----------
    follow
        Keep printing as the job writes, until it finishes.
    build
        The build log (image pull and build) instead of the run log.
    exit_code
        Exit with the container's exit code (the job must have finished, or -f).
    json
        One JSON object per log chunk (text, time, stream).
    """
    async with connect(connection) as client:
        handle = client.job(job_id)
        if follow and not build and not json:
            await stream_job(handle, build_logs=False)
        else:
            async for chunk in handle.logs(follow=follow, kind="build" if build else "run"):
                _print_chunk(chunk, json)
        if not exit_code:
            return 0
        result = await handle.result()
        if result is None:
            raise CliError(f"job {job_id} has not finished; it has no exit code yet (-f waits for it)")
        return _code(handle.id, result, exit_code=True)


@job.command(name="wait")
async def wait_for(
    job_id: str,
    *,
    outputs: Outputs = Path("./outputs"),
    exit_code: ExitCode = False,
    connection: Connection = Connection(),
) -> int:
    """Follow a job: print its logs live, then write its outputs to --outputs.

    Parameters
    ----------
    outputs
        Folder for the outputs.
    exit_code
        Exit with the container's exit code.
    """
    async with connect(connection) as client:
        return await _finish(client.job(job_id), outputs, exit_code)


@job.command
async def cancel(
    job_id: str, *, queue: str, namespace: str = "", json: Json = False, connection: Connection = Connection()
) -> None:
    """Cancel a queued or running job; its container is killed.

    Parameters
    ----------
    queue
        The job's queue (a job id names no queue's run).
    namespace
        Cancel for this namespace only (default `_`); `*` cancels for every namespace.
    """
    async with connect(connection) as client:
        after = await client.job(job_id, queue).cancel(namespace)
        if json:
            print_json(jobs_pb2.CancelJobResponse(job=after))
        else:
            print(job_row(after))


@job.command(name="outputs")
async def list_outputs(
    job_id: str,
    *,
    output_dir: Annotated[Path | None, Parameter(name=["--outputs", "-o"])] = None,
    json: Json = False,
    connection: Connection = Connection(),
) -> None:
    """List a finished job's outputs; with -o DIR, download them there.

    Parameters
    ----------
    output_dir
        Folder to write the outputs to.
    """
    async with connect(connection) as client:
        handle = client.job(job_id)
        if output_dir is not None:
            with Transfers("downloaded") as transfers:
                for path in await handle.download(output_dir, progress=transfers):
                    print(path)
            return
        refs = await handle.outputs()
        if json:
            print(dumps({"outputs": {name: json_format.MessageToDict(ref) for name, ref in refs.items()}}, indent=2))
            return
        for name, ref in sorted(refs.items()):
            if ref.type == "key":
                size = await client.files.size(ref.value.string_value)
                where = f"blob {ref.value.string_value}, " + (human_size(size) if size is not None else "missing")
            elif ref.type == "url":
                where = ref.value.string_value
            else:
                where = f"inline, {human_size(len(inline_bytes(ref)))}"
            print(f"{name}\t{where}")


@job.command
async def copy(
    job_id: str, queue: str, *, source: str, namespace: str = "", connection: Connection = Connection()
) -> None:
    """Submit the definition of the job's run in queue SOURCE to QUEUE (the same job id there)."""
    async with connect(connection) as client:
        copied = await client.job(job_id, source).copy(queue, namespace)
        print(job_row(copied.snapshot or await copied.get()))


@job.command
async def delete(job_id: str, *, queue: str, connection: Connection = Connection()) -> None:
    """Delete the job's run in QUEUE and its cached result, so an identical submission there runs again."""
    async with connect(connection) as client:
        await client.job(job_id, queue).delete()
        print(f"deleted {job_id}")


async def _finish(handle: Job, outputs: Path, exit_code: bool) -> int:
    """Stream the job to its end, write its outputs; the exit code per the job's result."""
    await stream_job(handle)
    result = await handle.result()
    if result is None:
        raise CliError(f"job {handle.id} stopped being followed before it finished")
    if result.outputs:
        with Transfers("downloaded") as transfers:
            await handle.download(outputs, progress=transfers)
        stderr_console().print(f"{len(result.outputs)} output(s) written to {outputs}")
    return _code(handle.id, result, exit_code)


def _code(job_id: str, result: jobs_pb2.JobResult, exit_code: bool) -> int:
    if result.reason != jobs_pb2.FINISH_REASON_SUCCESS:
        raise JobFailed(job_id, result)
    stderr_console().print(summary(job_id, result))
    return result.exit_code if exit_code else 0


def _print_chunk(chunk: jobs_pb2.LogChunk, as_json: bool) -> None:
    if as_json:
        print(dumps(json_format.MessageToDict(chunk, always_print_fields_with_no_presence=True)))
        return
    stream = sys.stderr if chunk.stream == jobs_pb2.LOG_STREAM_STDERR else sys.stdout
    stream.write(chunk.text)
    stream.flush()
