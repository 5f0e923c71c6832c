"""Job states and finish reasons in words, as the CLI prints them and `--state` reads them."""

from __future__ import annotations

from jobwire.v1 import jobs_pb2


def state_name(state: jobs_pb2.JobState.ValueType) -> str:
    """`running` for JOB_STATE_RUNNING."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def reason_name(reason: jobs_pb2.FinishReason.ValueType) -> str:
    """`timed out` for FINISH_REASON_TIMED_OUT."""
    return jobs_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").replace("_", " ").lower()


def parse_state(name: str) -> jobs_pb2.JobState.ValueType:
    """JOB_STATE_QUEUED for `queued` (or `JOB_STATE_QUEUED`); ValueError for anything else."""
    text = name.strip().upper()
    full = text if text.startswith("JOB_STATE_") else f"JOB_STATE_{text}"
    try:
        state = jobs_pb2.JobState.Value(full)
    except ValueError:
        state = jobs_pb2.JOB_STATE_UNSPECIFIED
    if state == jobs_pb2.JOB_STATE_UNSPECIFIED:
        raise ValueError(f"unknown job state {name!r} (queued, running or finished)")
    return state
