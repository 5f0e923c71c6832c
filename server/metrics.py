"""Prometheus text for a queue."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from jobwire.v1 import jobs_pb2

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value


class Metrics:
    """What this server process has seen since it started (counters reset on restart, as Prometheus expects)."""

    def __init__(self) -> None:
        self.durations: defaultdict[str, _Histogram] = defaultdict(_Histogram)
        self.bytes = {"uploaded": 0, "downloaded": 0}

    def finished(self, job: jobs_pb2.Job) -> None:
        if job.result.HasField("duration"):
            self.durations[job.queue].observe(job.result.duration.ToTimedelta().total_seconds())

    def lines(self, queue: str, label: str) -> list[str]:
        histogram = self.durations.get(queue, _Histogram())
        lines = [
            "# HELP jobwire_job_duration_seconds Run time of the queue's finished containers",
            "# TYPE jobwire_job_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip([*DURATION_BUCKETS, "+Inf"], histogram.counts, strict=True):
            cumulative += count
            lines.append(f'jobwire_job_duration_seconds_bucket{{queue="{label}",le="{bound}"}} {cumulative}')
        lines += [
            f'jobwire_job_duration_seconds_sum{{queue="{label}"}} {histogram.total}',
            f'jobwire_job_duration_seconds_count{{queue="{label}"}} {cumulative}',
            "# HELP jobwire_file_bytes_total Bytes of blobs moved through this server",
            "# TYPE jobwire_file_bytes_total counter",
        ]
        lines += [f'jobwire_file_bytes_total{{direction="{d}"}} {n}' for d, n in self.bytes.items()]
        return lines


def queue_metrics(
    queue: str, counts: Mapping[int, int], workers: Sequence[jobs_pb2.WorkerInfo], metrics: Metrics
) -> str:
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
        "# HELP jobwire_worker_gpus GPU devices of the connected workers",
        "# TYPE jobwire_worker_gpus gauge",
        f'jobwire_worker_gpus{{queue="{label}"}} {sum(len(w.gpus) for w in workers)}',
        *metrics.lines(queue, label),
    ]
    return "\n".join(lines) + "\n"
