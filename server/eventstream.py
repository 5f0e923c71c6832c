"""A job followed over plain HTTP: server-sent events, or the raw run log as text.

Turns the log hub's WatchJobResponse stream into HttpBody chunks that Envoy's transcoder
streams as they come. Events (each `data:` one JSON line, the proto's JSON mapping):

    event: job        data: Job          the job's state, first and on every change
    event: run-log    data: LogBatch     new chunks of the run log
    event: build-log  data: LogBatch     new chunks of the build log
    event: final      data: Job          the job finished; the stream ends
    event: error      data: {code, message}   the stream failed after it started

Log events carry the follower's position as their `id`: `ATTEMPT.RUN.BUILD` (the attempt, and the
chunks of its run and build logs sent so far). A reconnecting `EventSource` sends the last one back
as `Last-Event-ID`, and the stream resumes there: no chunk twice, none skipped, and an attempt that
is not the one of the id (the job was re-queued meanwhile) from its start. A plain number is the
run log's cursor, applied to the attempt the stream sends first.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from jobwire.server.errors import dependency_error, status_code
from jobwire.server.logs import Resume
from jobwire.v1 import jobs_pb2

EVENT_STREAM = "text/event-stream"
TEXT = "text/plain; charset=utf-8"
_KINDS = {jobs_pb2.LOG_KIND_RUN: "run-log", jobs_pb2.LOG_KIND_BUILD: "build-log"}
_START = Resume(0, 0)


def resume(last_event_id: str | None, since: int = 0) -> Resume:
    """The position a stream starts from: `Last-Event-ID` (`ATTEMPT.RUN.BUILD`, or a run-log cursor),
    else `since`; anything else is the start."""
    parts = (last_event_id or "").split(".")
    if since or not all(part.isdigit() for part in parts) or len(parts) not in (1, 3):
        return Resume(0, since)
    numbers = [int(part) for part in parts]
    return Resume(0, numbers[0]) if len(numbers) == 1 else Resume(*numbers)


async def events(
    watch: AsyncIterator[jobs_pb2.WatchJobResponse], start: Resume = _START
) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """Server-sent events for a job's watch stream (which starts at `start`), ending with `final`
    (or `error`)."""
    last: jobs_pb2.Job | None = None
    content_type = EVENT_STREAM
    attempt, cursors = start.attempt, {jobs_pb2.LOG_KIND_RUN: start.run, jobs_pb2.LOG_KIND_BUILD: start.build}
    try:
        async for message in watch:
            if message.HasField("job"):
                last = message.job
                text = event("job", message.job)
            else:
                batch = message.logs
                if batch.attempt != attempt:
                    if attempt:  # the hub sends another attempt's logs from their start
                        cursors = dict.fromkeys(cursors, 0)
                    attempt = batch.attempt
                cursors[batch.kind] = batch.start + len(batch.chunks)
                ident = f"{attempt}.{cursors[jobs_pb2.LOG_KIND_RUN]}.{cursors[jobs_pb2.LOG_KIND_BUILD]}"
                text = event(_KINDS.get(batch.kind, "log"), batch, ident)
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


def event(name: str, message: Message, ident: str | None = None) -> str:
    """One server-sent event carrying `message` as one line of JSON."""
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    prefix = f"id: {ident}\n" if ident is not None else ""
    return prefix + _event(name, json.dumps(data, separators=(",", ":"), ensure_ascii=False))


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"
