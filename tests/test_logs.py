"""The log hub on a real SQLite store and bus: fencing and the per-log size limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from jobwire.core.definition import job_id
from jobwire.server.bus.memory import MemoryBus
from jobwire.server.logs import LogHub
from jobwire.server.store.base import Attempt, Holder
from jobwire.server.store.sqlite import SqliteStore
from jobwire.v1 import definition_pb2, jobs_pb2
from tests.conftest import submit_one

RUN = jobs_pb2.LOG_KIND_RUN


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "jobs.db")
    yield opened
    await opened.close()


def chunks(*texts: str) -> list[jobs_pb2.LogChunk]:
    return [jobs_pb2.LogChunk(text=text) for text in texts]


async def test_a_log_is_cut_at_its_limit_with_a_notice(store: SqliteStore) -> None:
    definition = definition_pb2.JobDefinition(image="x")
    await submit_one(store, job_id=job_id(definition), definition=definition, queue="q", namespace="_", now=1)
    worker = Holder("w", "session", "q")
    (job,) = await store.claim(queue="q", holder=worker, now=1, lease=30)
    attempt = Attempt(job.id, job.attempt)
    hub = LogHub(store, MemoryBus(), max_chars=10)
    assert await hub.append(attempt, worker, RUN, chunks("abc", "def"), 0)
    assert await hub.append(attempt, worker, RUN, chunks("ghi", "jkl", "mno"), 2)  # "j" fits, then the notice
    assert await hub.append(attempt, worker, RUN, chunks("f"), 5)  # dropped, but the attempt is not stale
    assert await hub.append(attempt, worker, RUN, chunks("ghi", "jkl"), 2)  # a resend: dropped too
    texts = [chunk.text for chunk in await store.read_logs(attempt, RUN, 0, 100, queue="q")]
    assert texts[:4] == ["abc", "def", "ghi", "j"] and len(texts) == 5 and "log cut at 10 characters" in texts[4]
    assert (await hub.cursor(attempt, RUN, "q")).stored == 5
    assert not await hub.append(Attempt(job.id, job.attempt + 1), worker, RUN, chunks("x"), 9)
