"""Submissions as messages on one `SubmitJobStream` the client keeps open.

A unary call costs gRPC's Python layer about as much as the server's whole work of storing a job, so
a client that submits job after job, waiting for each answer, sends them on one stream instead: a
message each way per job. The stream opens on the first submission, and again after it ends (a
proxy's idle timeout, a replica restarting); a submission whose stream broke before its answer is
sent again, as a retried `SubmitJob` would be: submissions are content-addressed, so sending one
twice stores one job. Submissions larger than `STREAM_LIMIT`, and every submission to a server
without the stream (UNIMPLEMENTED), go as `SubmitJob` calls."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import grpc

from jobwire.connection import RESUMABLE, Calls
from jobwire.errors import Timeout, status_error
from jobwire.v1 import jobs_pb2, jobs_pb2_grpc

STREAM_LIMIT = 1024 * 1024
"""Bytes of a submission sent on the stream; larger ones go as `SubmitJob` calls, so that one over the
server's message limit fails alone (RESOURCE_EXHAUSTED ends a stream, and every submission on it)."""
_STATUS = {status.value[0]: status for status in grpc.StatusCode}
"""gRPC status codes by number, as a `SubmitJobError` carries them."""


class _Broken(Exception):
    """The stream ended before answering; `code` is how (OK: the server closed it)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Submissions:
    """The kept-open stream of one client: `submit` sends a submission and awaits its answer."""

    def __init__(self, stub: Callable[[], jobs_pb2_grpc.JobServiceAsyncStub], calls: Calls) -> None:
        self._stub, self._calls = stub, calls
        self._call: grpc.aio.StreamStreamCall[jobs_pb2.SubmitJobStreamRequest, jobs_pb2.SubmitJobStreamResponse]
        self._open = False
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[jobs_pb2.SubmitJobStreamResponse]] = {}
        self._tags = itertools.count(1)
        self._writing = asyncio.Lock()
        self._unary = False  # the server has no stream: every submission is a SubmitJob call

    async def submit(self, request: jobs_pb2.SubmitJobRequest) -> jobs_pb2.SubmitJobResponse:
        """Store one submission (retrying UNAVAILABLE and broken streams as `Calls.unary` retries)."""
        if self._unary or request.ByteSize() > STREAM_LIMIT:
            return await self._calls.unary(self._stub().SubmitJob, request)
        delays = self._calls.retry.delays()
        while True:
            try:
                async with asyncio.timeout(self._calls.timeout):
                    answer = await self._send(request)
            except TimeoutError:
                raise Timeout(f"the jobwire server at {self._calls.target} did not answer in time") from None
            except _Broken as broken:
                if broken.code == grpc.StatusCode.UNIMPLEMENTED:
                    self._unary = True
                    return await self._calls.unary(self._stub().SubmitJob, request)
                resumable = broken.code in RESUMABLE or broken.code == grpc.StatusCode.OK
                if not resumable or (delay := next(delays, None)) is None:
                    raise status_error(broken.code, broken.details, target=self._calls.target) from None
                await asyncio.sleep(delay)
                continue
            if answer.HasField("submitted"):
                return answer.submitted
            code = _STATUS.get(answer.error.code, grpc.StatusCode.UNKNOWN)
            if code != grpc.StatusCode.UNAVAILABLE or (delay := next(delays, None)) is None:
                raise status_error(code, answer.error.message, target=self._calls.target)
            await asyncio.sleep(delay)

    async def _send(self, request: jobs_pb2.SubmitJobRequest) -> jobs_pb2.SubmitJobStreamResponse:
        if not self._open:
            self._call = self._stub().SubmitJobStream()
            self._open = True
            self._reader = asyncio.create_task(self._read(self._call))
        call, tag = self._call, next(self._tags)
        answer: asyncio.Future[jobs_pb2.SubmitJobStreamResponse] = asyncio.get_running_loop().create_future()
        self._pending[tag] = answer
        try:
            async with self._writing:
                # If the stream ended, the reader fails this submission with how.
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(jobs_pb2.SubmitJobStreamRequest(tag=tag, submission=request))
            return await answer
        finally:
            self._pending.pop(tag, None)

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[jobs_pb2.SubmitJobStreamRequest, jobs_pb2.SubmitJobStreamResponse],
    ) -> None:
        """Hand each answer to its submission; when the stream ends, fail those still waiting."""
        broken = _Broken(grpc.StatusCode.OK, "the server closed the submission stream")
        try:
            async for response in call:
                answer = self._pending.get(response.tag)
                if answer is not None and not answer.done():
                    answer.set_result(response)
        except grpc.aio.AioRpcError as error:
            broken = _Broken(error.code(), error.details() or "")
        finally:
            if self._call is call:
                self._open = False
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(broken)

    async def close(self) -> None:
        """End the stream (submissions waiting on it fail as cancelled)."""
        if self._open:
            self._open = False
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
