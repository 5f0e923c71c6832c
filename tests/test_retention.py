"""Retention on the real SQLite store and filesystem blobs: old finished jobs and unreferenced blobs go."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from google.protobuf import struct_pb2

from jobwire.core.definition import job_id
from jobwire.server.blobs.filesystem import FileBlobStore
from jobwire.server.retention import Retention
from jobwire.server.store.base import Attempt, Holder
from jobwire.server.store.sqlite import SqliteStore
from jobwire.v1 import definition_pb2, jobs_pb2
from tests.conftest import submit_one

DAY = 24 * 3600.0
NOW = 1_000 * DAY


async def put(blobs: FileBlobStore, data: bytes, written: float) -> str:
    key = hashlib.sha256(data).hexdigest()
    writer = await blobs.writer(key)
    await writer.write(data)
    await writer.commit()
    os.utime(blobs.root / key, (written, written))
    return key


def key_ref(key: str) -> definition_pb2.DataRef:
    return definition_pb2.DataRef(type="key", value=struct_pb2.Value(string_value=key))


async def test_sweep_forgets_old_jobs_and_blobs_no_job_refers_to(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "jobs.db")
    blobs = FileBlobStore(tmp_path / "blobs")
    try:
        old_input = await put(blobs, b"input of an old job", NOW - 40 * DAY)
        live_input = await put(blobs, b"input of a queued job", NOW - 40 * DAY)
        orphan_recent = await put(blobs, b"uploaded yesterday", NOW - DAY)
        old = definition_pb2.JobDefinition(image="x", inputs={"a": key_ref(old_input)})
        await submit_one(store, job_id=job_id(old), definition=old, queue="q", namespace="_", now=NOW - 40 * DAY)
        worker = Holder("w", "session", "q")
        (claimed,) = await store.claim(queue="q", holder=worker, now=NOW - 40 * DAY, lease=30)
        finished = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_SUCCESS)
        await store.finish(Attempt(claimed.id, claimed.attempt), worker, finished, NOW - 40 * DAY)
        live = definition_pb2.JobDefinition(image="x", inputs={"b": key_ref(live_input)})
        await submit_one(store, job_id=job_id(live), definition=live, queue="q", namespace="_", now=NOW - 35 * DAY)

        await Retention(store, blobs, lambda: NOW, retention=30 * DAY, interval=3600).sweep()

        assert await store.get_job(job_id(old)) is None
        assert await store.get_job(job_id(live)) is not None
        assert await blobs.size(old_input) is None  # its only job is gone
        assert await blobs.size(live_input) is not None  # a queued job still needs it
        assert await blobs.size(orphan_recent) is not None  # younger than the retention period
    finally:
        await store.close()
