"""`jobwire queue …`: create queues and their worker credentials, see what a queue holds and who serves it."""

from __future__ import annotations

import asyncio
from typing import Annotated

from cyclopts import App, Parameter
from rich.live import Live

from jobwire import Client, new_queue_name
from jobwire.cli.console import Connection, Json, connect, print_json
from jobwire.cli.terminal import stderr_console
from jobwire.cli.views import job_row, queue_lines
from jobwire.v1 import jobs_pb2, queues_pb2, queues_pb2_grpc

queue = App(name="queue", help="Create queue names, watch queues and their workers.")
_ACTIVE = (jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_QUEUED)


Credential = Annotated[str, Parameter(show_default=False)]
"""A queue's worker credential: `--credential`, or (better: command lines are visible to every user of
the machine) JOBWIRE_CREDENTIAL."""


@queue.command
async def new(
    *, open_: Annotated[bool, Parameter(name="--open", negative="")] = False, connection: Connection = Connection()
) -> None:
    """Create a queue on the server: print its unguessable name and its worker credential (shown this
    once) as shell lines, `eval "$(jobwire queue new)"` sets JOBWIRE_QUEUE and JOBWIRE_CREDENTIAL.
    The name is the right to submit to the queue; the credential, the right to serve it as a worker.

    Parameters
    ----------
    open_
        Only print a new name, without asking the server: a queue any worker may serve (unless the
        server requires worker credentials).
    """
    if open_:
        print(new_queue_name())
        return
    async with connect(connection) as client:
        stub = queues_pb2_grpc.QueueServiceStub(client.channel)
        created = await client.calls.unary(stub.CreateQueue, queues_pb2.CreateQueueRequest(), idempotent=False)
    print(f"export JOBWIRE_QUEUE={created.queue}\nexport JOBWIRE_CREDENTIAL={created.credential}")


@queue.command
async def rotate(name: str, *, credential: Credential = "", connection: Connection = Connection()) -> None:
    """Replace the queue's worker credential (the current one is needed) and print the new one as a shell
    line; the old one stops working at once: its workers take no new job, nor register again."""
    async with connect(connection) as client:
        stub = queues_pb2_grpc.QueueServiceStub(client.channel)
        request = queues_pb2.RotateQueueCredentialRequest(queue=name, credential=credential)
        rotated = await client.calls.unary(stub.RotateQueueCredential, request, idempotent=False)
    print(f"export JOBWIRE_CREDENTIAL={rotated.credential}")


@queue.command
async def revoke(name: str, *, credential: Credential = "", connection: Connection = Connection()) -> None:
    """Revoke the queue's worker credential (the current one is needed): no worker may serve the queue
    any more; the jobs its workers are running finish."""
    async with connect(connection) as client:
        stub = queues_pb2_grpc.QueueServiceStub(client.channel)
        request = queues_pb2.RevokeQueueCredentialRequest(queue=name, credential=credential)
        await client.calls.unary(stub.RevokeQueueCredential, request, idempotent=False)


@queue.command
async def status(name: str, *, json: Json = False, connection: Connection = Connection()) -> None:
    """Job counts by state and the connected workers (--json: as GET /q/{queue}/status answers)."""
    async with connect(connection) as client:
        answer = await client.queue_status(name)
    if json:
        print_json(answer)
    else:
        print("\n".join(queue_lines(answer)))


@queue.command
async def watch(name: str, *, interval: float = 1.0, limit: int = 20, connection: Connection = Connection()) -> None:
    """Follow a queue live: counts, workers, and its running and queued jobs (Ctrl-C stops).

    Parameters
    ----------
    interval
        Seconds between refreshes.
    limit
        Most jobs shown per state.
    """
    console = stderr_console()
    async with connect(connection) as client:
        if not console.is_terminal:
            shown = ""
            while True:
                text = await _snapshot(client, name, limit)
                if text != shown:
                    print(text, flush=True)
                    shown = text
                await asyncio.sleep(interval)
        with Live("", console=console, auto_refresh=False) as live:
            while True:
                live.update(await _snapshot(client, name, limit), refresh=True)
                await asyncio.sleep(interval)


@queue.command
async def metrics(name: str, *, connection: Connection = Connection()) -> None:
    """Print the queue's Prometheus metrics (as GET /q/{queue}/metrics answers)."""
    async with connect(connection) as client:
        print(await client.queue_metrics(name), end="")


async def _snapshot(client: Client, name: str, limit: int) -> str:
    lines = queue_lines(await client.queue_status(name))
    for state in _ACTIVE:
        count = 0
        async for job in client.jobs(name, state=state, page_size=limit):
            lines.append(job_row(job))
            count += 1
            if count >= limit:
                break
    return "\n".join(lines)
