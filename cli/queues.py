"""`jobwire queue …`: mint queue names, see what a queue holds and who serves it."""

from __future__ import annotations

import asyncio

from cyclopts import App
from rich.live import Live

from jobwire import Client, new_queue_name
from jobwire.cli.console import Connection, Json, connect, print_json
from jobwire.cli.terminal import stderr_console
from jobwire.cli.views import job_row, queue_lines
from jobwire.v1 import jobs_pb2

queue = App(name="queue", help="Create queue names, watch queues and their workers.")
_ACTIVE = (jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_QUEUED)


@queue.command
def new() -> None:
    """Print a new unguessable queue name (knowing the name is the only access control)."""
    print(new_queue_name())


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
