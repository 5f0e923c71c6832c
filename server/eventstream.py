"""A job followed over plain HTTP: server-sent events, or the raw run log as text.

Turns the log hub's WatchJobResponse stream into HttpBody chunks that Envoy's transcoder
streams as they come. Events (each `data:` one JSON line, the proto's JSON mapping):

    event: job        data: Job          the job's state, first and on every change
    event: run-log    data: LogBatch     new chunks of the run log; `id:` is the run-log cursor
    event: build-log  data: LogBatch     new chunks of the build log
    event: final      data: Job          the job finished; the stream ends
    event: error      data: {code, message}   the stream failed after it started
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from jobwire.server.errors import dependency_error, status_code
from jobwire.v1 import jobs_pb2

EVENT_STREAM = "text/event-stream"
TEXT = "text/plain; charset=utf-8"
_KINDS = {jobs_pb2.LOG_KIND_RUN: "run-log", jobs_pb2.LOG_KIND_BUILD: "build-log"}


async def events(watch: AsyncIterator[jobs_pb2.WatchJobResponse]) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """Server-sent events for a job's watch stream, ending with `final` (or `error`)."""
    last: jobs_pb2.Job | None = None
    content_type = EVENT_STREAM
    try:
        async for message in watch:
            if message.HasField("job"):
                last = message.job
                text = event("job", message.job)
            else:
                cursor = message.logs.start + len(message.logs.chunks)
                ident = cursor if message.logs.kind == jobs_pb2.LOG_KIND_RUN else None
                text = event(_KINDS.get(message.logs.kind, "log"), message.logs, ident)
            yield httpbody_pb2.HttpBody(content_type=content_type, data=text.encode())
            content_type = ""
    except Exception as error:  # a ServerError, or a dependency failing (the database restarting…)
        if (known := dependency_error(error)) is None:
            raise
        failure = {"code": status_code(known).name, "message": str(known)}
        yield httpbody_pb2.HttpBody(content_type=content_type, data=_event("error", json.dumps(failure)).encode())
        return
    if last is not None:
        yield httpbody_pb2.HttpBody(content_type=content_type, data=event("final", last).encode())


async def text(watch: AsyncIterator[jobs_pb2.WatchJobResponse]) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """The run log's text as it is written; the first (possibly empty) message goes out at once."""
    content_type = TEXT
    async for message in watch:
        if message.HasField("job") and content_type:
            yield httpbody_pb2.HttpBody(content_type=content_type)
            content_type = ""
        elif message.HasField("logs") and message.logs.kind == jobs_pb2.LOG_KIND_RUN:
            data = "".join(chunk.text for chunk in message.logs.chunks).encode()
            yield httpbody_pb2.HttpBody(content_type=content_type, data=data)
            content_type = ""


def event(name: str, message: Message, ident: int | None = None) -> str:
    """One server-sent event carrying `message` as one line of JSON."""
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    prefix = f"id: {ident}\n" if ident is not None else ""
    return prefix + _event(name, json.dumps(data, separators=(",", ":"), ensure_ascii=False))


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"
