"""What the worker checks in every message from the server before it touches a path, a container or
a URL with it.

The server is not trusted blindly: a job id becomes a folder name (`jobs/{id}-{attempt}`, removed
whole after the attempt) and a container label, a definition's names become paths under that folder.
An id that is not a job id, an attempt that is not a positive number, a queue this worker does not
serve or a definition that would not pass submission is refused here, before any of that happens."""

from __future__ import annotations

import re

from jobwire.core.definition import DefinitionError, check_files
from jobwire.v1 import workers_pb2
from jobwire.worker.errors import BadMessage

_JOB_ID = re.compile(r"[0-9a-f]{64}")
_MAX_ATTEMPT = 2**31 - 1


def check_attempt(job_id: str, attempt: int) -> None:
    """Raises `BadMessage` unless `job_id` is a job id (64 lowercase hex digits) and `attempt` a
    positive attempt number."""
    if not _JOB_ID.fullmatch(job_id):
        raise BadMessage(f"not a job id: {job_id[:80]!r} (64 lowercase hex digits)")
    if not 0 < attempt <= _MAX_ATTEMPT:
        raise BadMessage(f"not an attempt number: {attempt} (a positive number)")


def check_assignment(assignment: workers_pb2.JobAssignment, queue: str) -> None:
    """Raises `BadMessage` unless the assignment's attempt is well formed (`check_attempt`), it is
    of `queue`, and its definition's files are safe (names relative, no `..`, refs well formed): the
    rest of a definition the worker hands to the engine as it is."""
    check_attempt(assignment.job_id, assignment.attempt)
    if assignment.queue != queue:
        raise BadMessage(f"an assignment of queue {assignment.queue[:80]!r}, not of the queue this worker serves")
    try:
        check_files(assignment.definition)
    except DefinitionError as error:
        raise BadMessage(f"an invalid definition: {error}") from None
