"""What the MCP tools answer: jobs as plain JSON a model reads, outputs as links."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from jobwire.client import Client
from jobwire.states import reason_name, state_name
from jobwire.v1 import definition_pb2, jobs_pb2


def job_url(client: Client, job_id: str, queue: str = "") -> str:
    """The job's REST URL: in its queue when the queue is known (that URL shows the queue's run)."""
    return f"{client.public_url}/q/{quote(queue, safe='')}/j/{job_id}" if queue else f"{client.public_url}/j/{job_id}"


def output_link(client: Client, job_id: str, path: str, ref: definition_pb2.DataRef, queue: str = "") -> str:
    """Where an output's bytes are: its own URL for a `url` ref, else the job's output route."""
    if ref.type == "url":
        return ref.value.string_value
    return f"{job_url(client, job_id, queue)}/outputs/{quote(path)}"


def log_text(chunks: Iterable[jobs_pb2.LogChunk]) -> str:
    """Log chunks as the text the container wrote."""
    return "".join(chunk.text for chunk in chunks)


def job_view(client: Client, job: jobs_pb2.Job, *, queue: str = "", full: bool = False) -> dict[str, Any]:
    """A job as JSON: id, URL, state and why it waits; with `full`, its result and outputs as links."""
    view: dict[str, Any] = {
        "id": job.id,
        "url": job_url(client, job.id, queue),
        "state": state_name(job.state),
        "namespaces": list(job.namespaces),
        "attempt": job.attempt,
    }
    if job.waiting_reason:
        view["waiting_reason"] = job.waiting_reason
    if job.state == jobs_pb2.JOB_STATE_FINISHED:
        view["finish_reason"] = reason_name(job.finish_reason)
    if full and job.HasField("result"):
        view["result"] = _result(client, job.id, job.result, queue)
    return view


def _result(client: Client, job_id: str, result: jobs_pb2.JobResult, queue: str) -> dict[str, Any]:
    view: dict[str, Any] = {
        "reason": reason_name(result.reason),
        "exit_code": result.exit_code if result.HasField("exit_code") else None,
        "duration_seconds": result.duration.ToTimedelta().total_seconds(),
        "outputs": {
            path: output_link(client, job_id, path, ref, queue) for path, ref in sorted(result.outputs.items())
        },
    }
    if result.message:
        view["message"] = result.message
    if result.oom_killed:
        view["oom_killed"] = True
    return view
