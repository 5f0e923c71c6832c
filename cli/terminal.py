"""What the CLI draws on stderr: transfer progress bars, a live status line, job summaries.

Bars and the status line appear only when stderr is a terminal; otherwise one plain
line per finished transfer keeps logs of scripts readable. Job output itself goes
to stdout and stderr untouched.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.status import Status

from jobwire import Job, Transfer
from jobwire.cli.console import human_size
from jobwire.states import reason_name, state_name
from jobwire.v1 import jobs_pb2


def stderr_console() -> Console:
    """The console for everything that is not the job's own output."""
    return Console(stderr=True, highlight=False)


class Transfers:
    """Progress of uploads or downloads: bars on a terminal, a line per file otherwise."""

    def __init__(self, verb: str) -> None:
        self.verb, self.console = verb, stderr_console()
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Transfers:
        self.bars.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.bars.stop()

    def __call__(self, transfer: Transfer) -> None:
        if transfer.name not in self.tasks:
            self.tasks[transfer.name] = self.bars.add_task(transfer.name, total=transfer.total)
        task = self.tasks[transfer.name]
        self.bars.update(task, completed=transfer.done, total=transfer.total)
        if transfer.skipped:
            self.bars.update(task, description=f"{transfer.name} (already on the server)")
        if transfer.complete and self.bars.disable:
            done = (
                "already on the server, not uploaded"
                if transfer.skipped
                else f"{self.verb} {human_size(transfer.total)}"
            )
            self.console.print(f"{transfer.name}: {done}")


class StatusLine:
    """A spinner with the job's state while nothing else is printed (terminals only)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status: Status | None = None
        self.since = time.monotonic()

    def show(self, text: str) -> None:
        if not self.console.is_terminal:
            return
        if self.status is None:
            self.status = self.console.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def hide(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


async def stream_job(job: Job, *, build_logs: bool = True) -> jobs_pb2.Job | None:
    """Print the job's logs live until it finishes (run log to stdout/stderr, build log to stderr).

    A status line says why it waits while it is queued; returns the job's last state.
    """
    console = stderr_console()
    status, last, printing = StatusLine(console), None, False
    try:
        async for event in job.watch(build_logs=build_logs):
            if isinstance(event, jobs_pb2.Job):
                if last is not None and event.attempt > last.attempt > 0:
                    console.print(f"[yellow]job {job.id[:12]} re-queued; attempt {event.attempt}[/]")
                    printing = False
                last = event
                if not printing and event.state != jobs_pb2.JOB_STATE_FINISHED:
                    status.show(await _describe(job, event))
                continue
            status.hide()
            printing = True
            _write(event)
    finally:
        status.hide()
    return last


async def _describe(job: Job, event: jobs_pb2.Job) -> str:
    if event.state == jobs_pb2.JOB_STATE_QUEUED:
        reason = (await job.get()).waiting_reason
        return f"job {job.id[:12]} queued on {event.queue!r}" + (f": {reason}" if reason else "")
    return f"job {job.id[:12]} {state_name(event.state)} on worker {event.worker_id} (attempt {event.attempt})"


def _write(batch: jobs_pb2.LogBatch) -> None:
    for chunk in batch.chunks:
        stderr = batch.kind == jobs_pb2.LOG_KIND_BUILD or chunk.stream == jobs_pb2.LOG_STREAM_STDERR
        stream = sys.stderr if stderr else sys.stdout
        stream.write(chunk.text)
        stream.flush()


def summary(job_id: str, result: jobs_pb2.JobResult) -> str:
    """`job 1a2b…: success, exit code 0 in 1.2s` for a finished job."""
    text = f"job {job_id[:12]}: {reason_name(result.reason)}"
    if result.HasField("exit_code"):
        text += f", exit code {result.exit_code}"
    if result.HasField("duration"):
        text += f" in {result.duration.ToTimedelta().total_seconds():.1f}s"
    return text + (f" ({result.message})" if result.message and result.reason != jobs_pb2.FINISH_REASON_SUCCESS else "")
