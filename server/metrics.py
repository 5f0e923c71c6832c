"""Prometheus text for a queue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jobwire.v1 import jobs_pb2


def queue_metrics(queue: str, counts: Mapping[int, int], workers: Sequence[jobs_pb2.WorkerInfo]) -> str:
    """The queue's gauges in the Prometheus text format; `queue_length` is the seed's metric."""
    queued = counts.get(jobs_pb2.JOB_STATE_QUEUED, 0)
    running = counts.get(jobs_pb2.JOB_STATE_RUNNING, 0)
    label = queue.replace("\\", "\\\\").replace('"', '\\"')
    lines = [
        "# HELP queue_length The number of outstanding jobs in the queue",
        "# TYPE queue_length gauge",
        f"queue_length {queued + running}",
        "# HELP jobwire_jobs Jobs of the queue by state",
        "# TYPE jobwire_jobs gauge",
    ]
    for state in (
        jobs_pb2.JOB_STATE_QUEUED,
        jobs_pb2.JOB_STATE_RUNNING,
        jobs_pb2.JOB_STATE_FINISHED,
    ):
        name = jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()
        lines.append(f'jobwire_jobs{{queue="{label}",state="{name}"}} {counts.get(state, 0)}')
    lines += [
        "# HELP jobwire_workers Workers connected to the queue",
        "# TYPE jobwire_workers gauge",
        f'jobwire_workers{{queue="{label}"}} {len(workers)}',
        "# HELP jobwire_worker_slots Job slots of the connected workers",
        "# TYPE jobwire_worker_slots gauge",
        f'jobwire_worker_slots{{queue="{label}"}} {sum(w.cpus for w in workers)}',
    ]
    return "\n".join(lines) + "\n"
