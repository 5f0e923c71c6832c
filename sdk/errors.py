"""What the SDK raises: one exception tree, one table from gRPC status codes.

    JobwireError                  anything the SDK reports
     ├── ServerUnavailable        the server cannot be reached (UNAVAILABLE), even after retries
     │    └── Timeout             no answer within the call's deadline (DEADLINE_EXCEEDED)
     ├── InvalidRequest           the server rejected the request (INVALID_ARGUMENT)
     │    └── InvalidDefinition   a job definition that cannot run (checked locally first)
     ├── NotFound                 NOT_FOUND
     │    ├── JobNotFound         no job with that id (in that queue)
     │    └── FileNotFound        no blob with that key, or no such input/output of a job
     ├── TooLarge                 an upload past the server's limit (RESOURCE_EXHAUSTED)
     ├── JobFailed                a job finished without running to its end (error, timeout, cancel, …)
     └── RequestFailed            any other gRPC failure; `code` says which

Every error but JobFailed carries the gRPC status `code` it came from (None when
raised locally). Raw `grpc.aio.AioRpcError`s never escape the SDK.
"""

from __future__ import annotations

import re

import grpc

from jobwire.states import reason_name
from jobwire.v1 import jobs_pb2


class JobwireError(Exception):
    """Base of every error the SDK raises."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ServerUnavailable(JobwireError):
    """The server cannot be reached: down, wrong address, TLS mismatch, network."""


class Timeout(ServerUnavailable):
    """The server did not answer within the call's deadline."""


class InvalidRequest(JobwireError):
    """The server rejected the request as malformed; the message says what to fix."""


class InvalidDefinition(InvalidRequest):
    """A job definition that cannot run; the message names the field."""


class NotFound(JobwireError):
    """The job, file, input or output does not exist."""


class JobNotFound(NotFound):
    """No job with that id (in that queue)."""


class FileNotFound(NotFound):
    """No blob with that key, or no such input or output of a job."""


class TooLarge(JobwireError):
    """An upload exceeds the server's size limit."""


class RequestFailed(JobwireError):
    """Any other failure of a call; `code` is its gRPC status."""


class JobFailed(JobwireError):
    """A job finished without running to its end: `result.reason` says how, `result.message` why."""

    def __init__(self, job_id: str, result: jobs_pb2.JobResult) -> None:
        reason = reason_name(result.reason)
        super().__init__(f"job {job_id} finished: {reason}" + (f": {result.message}" if result.message else ""))
        self.job_id, self.result = job_id, result


_BY_CODE: dict[grpc.StatusCode, type[JobwireError]] = {
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLarge,
}


# How gRPC (BoringSSL) reports a certificate it could not verify, or one for another name.
_UNTRUSTED = re.compile(r"CERTIFICATE_VERIFY_FAILED: [^:)]+|Peer name \S+ is not in peer certificate")


def translate(error: grpc.aio.AioRpcError, *, target: str, not_found: type[NotFound] = NotFound) -> JobwireError:
    """The SDK error for a failed call; `not_found` is the NotFound subclass the call looks up."""
    return status_error(error.code(), error.details() or "", target=target, not_found=not_found)


def status_error(
    code: grpc.StatusCode, details: str, *, target: str, not_found: type[NotFound] = NotFound
) -> JobwireError:
    """The SDK error for a gRPC status, of a call or of one message's answer (`SubmitJobStream`)."""
    details = details or code.name
    if code == grpc.StatusCode.UNAVAILABLE and (untrusted := _UNTRUSTED.search(details)):
        return ServerUnavailable(
            f"the jobwire server at {target} has a TLS certificate this client does not trust ({untrusted[0]}): "
            "give the CA that signed it (--ca-file, or root_certificates)",
            code,
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailable(f"cannot reach the jobwire server at {target} ({details})", code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(f"the jobwire server at {target} did not answer in time", code)
    if code == grpc.StatusCode.NOT_FOUND:
        return not_found(details, code)
    if code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("invalid definition"):
        return InvalidDefinition(details, code)
    return _BY_CODE.get(code, RequestFailed)(details, code)
