"""WorkerService: one bidirectional stream per connected worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from jobwire.core.batching import take_ready
from jobwire.server.errors import Context, abort_on_failure, grpc_errors
from jobwire.server.logs import LogHub
from jobwire.server.scheduler import Scheduler
from jobwire.server.sessions import ProtocolError, WorkerSession
from jobwire.server.waiting import Lines
from jobwire.v1 import workers_pb2, workers_pb2_grpc


class WorkerServicer(workers_pb2_grpc.WorkerServiceServicer):
    """Pumps a worker's stream into its WorkerSession and the session's outbox back out."""

    def __init__(self, scheduler: Scheduler, logs: LogHub, lines: Lines, clock: Callable[[], float]) -> None:
        self.scheduler, self.logs, self.lines, self.clock = scheduler, logs, lines, clock
        # The handler task of each worker's newest stream: a worker that reconnects before its old
        # stream timed out here (a half-open connection) replaces it, so no job is assigned on a stream
        # nobody reads. Only a stream that proved the worker's secret (`admit`) gets that far.
        self.streams: dict[str, asyncio.Task[object]] = {}

    # Responses go out through context.write from a pump task, so this handler returns None.
    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[workers_pb2.ConnectRequest], context: Context
    ) -> None:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        try:
            if first is None or not first.HasField("register"):
                raise ProtocolError("the first message must be `register`")
            session = WorkerSession(self.scheduler, self.logs, self.lines, first.register, self.clock)
        except ProtocolError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        async with grpc_errors(context):
            await session.admit()
        current = asyncio.current_task()
        assert current is not None
        if (previous := self.streams.get(session.worker_id)) is not None:
            previous.cancel()
        self.streams[session.worker_id] = current
        await context.write(workers_pb2.ConnectResponse(registered=await session.open()))
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(_send(session, context))
                runner = group.create_task(session.run())
                try:
                    async for request in requests:
                        await session.receive(request, group)
                finally:
                    pump.cancel()
                    runner.cancel()
        except* ProtocolError as errors:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(errors.exceptions[0]))
        except* Exception as errors:  # the store down, a full disk: UNAVAILABLE / RESOURCE_EXHAUSTED
            await abort_on_failure(context, errors)
            raise
        finally:
            if self.streams.get(session.worker_id) is current:
                del self.streams[session.worker_id]
            with contextlib.suppress(Exception):
                await session.close()


async def _send(session: WorkerSession, context: Context) -> None:
    """Write the session's messages, whatever is queued at once as one batch."""
    while True:
        messages = take_ready(await session.outbox.get(), session.outbox, lambda message: message)
        batch = workers_pb2.ConnectResponseBatch(messages=messages)
        await context.write(messages[0] if len(messages) == 1 else workers_pb2.ConnectResponse(batch=batch))
