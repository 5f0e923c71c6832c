"""Building Job messages from store rows, shared by the store backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jobwire.core.definition import is_sha256
from jobwire.core.units import timestamp
from jobwire.v1 import definition_pb2, jobs_pb2


def job_message(row: Sequence[Any], *, namespaces: Sequence[str]) -> jobs_pb2.Job:
    """A Job from (id, state, queue, attempt, worker_id, create_time, update_time, finish_reason)."""
    job_id, state, queue, attempt, worker_id, create_time, update_time, finish_reason = row
    return jobs_pb2.Job(
        id=job_id,
        state=state,
        queue=queue,
        attempt=attempt,
        worker_id=worker_id,
        create_time=timestamp(create_time),
        update_time=timestamp(update_time),
        finish_reason=finish_reason,
        namespaces=namespaces,
    )


def history_entry(
    kind: jobs_pb2.JobEventKind.ValueType, now: float, *, attempt: int = 0, worker_id: str = "", message: str = ""
) -> bytes:
    """One history entry, as the bytes that append it to a job's stored history: a job row keeps its
    history as `Job.history` encoded (entries one after another), so an entry is one append to the
    row a transition writes anyway, and `with_details` parses the whole of it at once."""
    entry = jobs_pb2.JobEvent(time=timestamp(now), kind=kind, attempt=attempt, worker_id=worker_id, message=message)
    return jobs_pb2.Job(history=[entry]).SerializeToString()


def finish_message(result: jobs_pb2.JobResult) -> str:
    """The history's words for a finish."""
    reason = jobs_pb2.FinishReason.Name(result.reason).removeprefix("FINISH_REASON_").lower()
    exit_code = f", exit code {result.exit_code}" if result.HasField("exit_code") else ""
    detail = f": {result.message}" if result.message else ""
    return f"finished ({reason}{exit_code}){detail}"


def job_summary(job: jobs_pb2.Job) -> jobs_pb2.Job:
    """A copy of the job without definition, history and result logs, as watchers get it."""
    summary = jobs_pb2.Job()
    summary.CopyFrom(job)
    summary.ClearField("definition")
    summary.ClearField("history")
    summary.result.ClearField("logs")
    if not job.HasField("result"):
        summary.ClearField("result")
    return summary


def job_url_view(job: jobs_pb2.Job) -> jobs_pb2.Job:
    """What an id-only read (a job URL) shows of a run: all but its queue. No queue field, no
    namespaces (their holders are the queue's submitters), no waiting reason (it names the queue),
    and the quoted queue name cut from the history and result messages (written before runs were
    per queue: "queued on 'q'"; the server's words name no queue now, a worker's are its own)."""
    view = jobs_pb2.Job()
    view.CopyFrom(job)
    for field in ("queue", "namespaces", "waiting_reason"):
        view.ClearField(field)
    quoted = repr(job.queue)
    for entry in view.history:
        entry.message = entry.message.replace(quoted, "its queue")
    if view.HasField("result"):
        view.result.message = view.result.message.replace(quoted, "its queue")
    return view


def blob_keys(definition: definition_pb2.JobDefinition) -> set[str]:
    """Keys of the blobs a definition reads: `key` refs of inputs and config files, an uploaded build context."""
    refs = [*definition.inputs.values(), *definition.config_files.values()]
    keys = {ref.value.string_value for ref in refs if ref.type == "key"}
    context = definition.build.context.removeprefix("/f/")
    if is_sha256(context):
        keys.add(context)
    return keys


def job_blob_keys(definition: bytes, result: bytes | None) -> set[str]:
    """Keys of the blobs a stored job refers to: those its definition reads (`blob_keys`), its outputs."""
    keys = blob_keys(definition_pb2.JobDefinition.FromString(definition))
    if result is not None:
        outputs = jobs_pb2.JobResult.FromString(result).outputs.values()
        keys |= {ref.value.string_value for ref in outputs if ref.type == "key"}
    return keys


def with_details(job: jobs_pb2.Job, definition: bytes, result: bytes | None, history: bytes) -> jobs_pb2.Job:
    """The job with its definition, result and stored history (see `history_entry`) filled in (its
    tags come from the definition)."""
    job.definition.ParseFromString(definition)
    if result is not None:
        job.result.ParseFromString(result)
    job.MergeFromString(history)
    job.tags.extend(job.definition.tags)
    return job


def worker_columns(info: jobs_pb2.WorkerInfo) -> tuple[int, int]:
    """The slots and GPU devices of a worker record, stored beside it for `capacity`."""
    return info.cpus, len(info.gpus)


def workers_with_jobs(infos: Sequence[bytes], running: Sequence[tuple[str, str]]) -> list[jobs_pb2.WorkerInfo]:
    """Stored worker records with the jobs the store holds running for each, from (worker_id, job_id) rows:
    the jobs table is the truth, so a finish or a claim shows at once without rewriting the record."""
    workers = [jobs_pb2.WorkerInfo.FromString(info) for info in infos]
    for worker in workers:
        del worker.running_job_ids[:]
    by_id = {worker.id: worker for worker in workers}
    for worker_id, job_id in sorted(running):
        if worker_id in by_id:
            by_id[worker_id].running_job_ids.append(job_id)
    return workers


def within_limit(stored_chars: int, chunks: Sequence[jobs_pb2.LogChunk], max_chars: int) -> list[jobs_pb2.LogChunk]:
    """`chunks` as a log already holding `stored_chars` characters of text keeps them under `max_chars`
    (0: no limit): the chunk that passes the limit is cut there and followed by a notice; nothing once
    a notice is stored (it takes the log past the limit)."""
    if not max_chars or stored_chars + sum(len(chunk.text) for chunk in chunks) <= max_chars:
        return list(chunks)
    if stored_chars > max_chars:
        return []
    kept = []
    for chunk in chunks:
        room = max_chars - stored_chars
        if len(chunk.text) > room:
            if room:
                kept.append(jobs_pb2.LogChunk(text=chunk.text[:room], stream=chunk.stream, time=chunk.time))
            break
        kept.append(chunk)
        stored_chars += len(chunk.text)
    text = f"\n[jobwire: log cut at {max_chars:,} characters; the rest of it was dropped]\n"
    return [*kept, jobs_pb2.LogChunk(text=text, stream=jobs_pb2.LOG_STREAM_STDERR)]


def already_stored(stored: int, start: int, count: int) -> int:
    """How many of `count` chunks numbered from `start` a log holding `stored` chunks already has.

    A batch starting past the stored end (a gap: earlier batches were lost in flight) counts as
    stored whole, so nothing is written out of place; the worker sends the missing ones again."""
    return count if start > stored else min(stored - start, count)
