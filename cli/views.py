"""Jobs and queues as people read them: one row per job, a block per job, a queue summary."""

from __future__ import annotations

from datetime import UTC

from google.protobuf import timestamp_pb2

from jobwire.states import reason_name, state_name
from jobwire.v1 import jobs_pb2


def outcome(job: jobs_pb2.Job) -> str:
    """`finished: success, exit code 0`, `queued`, `running`."""
    text = state_name(job.state)
    if job.state == jobs_pb2.JOB_STATE_FINISHED:
        text += f": {reason_name(job.finish_reason)}"
        if job.result.HasField("exit_code"):
            text += f", exit code {job.result.exit_code}"
    return text


def job_row(job: jobs_pb2.Job) -> str:
    """One line: id, state and outcome, when it was queued, its worker."""
    return "\t".join([job.id, outcome(job), _time(job.create_time), job.worker_id or "-"])


def job_lines(job: jobs_pb2.Job, url: str) -> list[str]:
    """A job's essentials, one `name  value` line each."""
    definition = job.definition
    rows = [
        ("id", job.id),
        ("state", outcome(job)),
        ("queue", job.queue),
        ("queued at", _time(job.create_time)),
    ]
    if job.waiting_reason:
        rows.append(("waiting", job.waiting_reason))
    if job.worker_id:
        rows.append(("worker", f"{job.worker_id} (attempt {job.attempt})"))
    if job.result.message:
        rows.append(("message", job.result.message))
    if job.result.HasField("duration"):
        rows.append(("ran for", f"{job.result.duration.ToTimedelta().total_seconds():.1f}s"))
    rows.append(("image", definition.image or "(build)"))
    if definition.HasField("command"):
        rows.append(("command", definition.command))
    for name in sorted(definition.inputs):
        rows.append(("input", name))
    for name in sorted(job.result.outputs):
        rows.append(("output", name))
    rows.append(("url", url))
    return [f"{name:<10} {value}" for name, value in rows]


def queue_lines(status: jobs_pb2.GetQueueStatusResponse) -> list[str]:
    """Counts by state, then one line per connected worker."""
    lines = [f"queue {status.queue}: {status.queued} queued, {status.running} running, {status.finished} finished"]
    if not status.workers:
        lines.append("no worker connected")
    for worker in status.workers:
        gpus = f", {len(worker.gpus)} GPU(s)" if worker.gpus else ""
        running = len(worker.running_job_ids)
        lines.append(f"worker {worker.id} on {worker.hostname or '?'}: {running}/{worker.cpus} busy{gpus}")
    return lines


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
