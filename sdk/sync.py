"""The blocking facade for scripts and notebooks: the same calls as `Client`, without `await`.

    with SyncClient("localhost:8080") as client:
        job = client.submit("local", image="python:3.12", command="python -V")
        print(job.wait().exit_code)

It runs a private event loop in a background thread, so it also works where a
loop is already running (Jupyter).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack

from jobwire.client import DEFAULT_TARGET, Client, Definition, SubmitOptions
from jobwire.connection import Retry
from jobwire.files import Progress
from jobwire.job import Job
from jobwire.v1 import definition_pb2, jobs_pb2

T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread; coroutines are run on it and awaited from here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jobwire-sync", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> list[T]:
            try:
                return [await anext(iterator)]
            except StopAsyncIteration:
                return []

        try:
            while item := self.run(step()):
                yield item[0]
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                self.run(close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class SyncClient:
    """A blocking `Client`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = 30.0,
        retry: Retry | None = None,
        public_url: str = "",
    ) -> None:
        self.client = Client(
            target, tls=tls, root_certificates=root_certificates, timeout=timeout, retry=retry, public_url=public_url
        )
        self._loop = _Loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the background loop."""
        self._loop.run(self.client.close())
        self._loop.stop()

    def submit(self, queue: str, definition: Definition | None = None, **options: Unpack[SubmitOptions]) -> SyncJob:
        """See `Client.submit`."""
        return SyncJob(self._loop.run(self.client.submit(queue, definition, **options)), self._loop)

    def submit_many(
        self, queue: str, definitions: Iterable[Definition], *, namespace: str | None = None
    ) -> list[SyncJob]:
        """See `Client.submit_many`."""
        jobs = self._loop.run(self.client.submit_many(queue, definitions, namespace=namespace))
        return [SyncJob(job, self._loop) for job in jobs]

    def job(self, job_id: str, queue: str = "") -> SyncJob:
        """A handle on an existing job (no call is made)."""
        return SyncJob(self.client.job(job_id, queue), self._loop)

    def jobs(self, queue: str, *, state: jobs_pb2.JobState.ValueType | None = None) -> Iterator[jobs_pb2.Job]:
        """See `Client.jobs`."""
        return self._loop.iterate(self.client.jobs(queue, state=state))

    def queue_status(self, queue: str) -> jobs_pb2.GetQueueStatusResponse:
        """See `Client.queue_status`."""
        return self._loop.run(self.client.queue_status(queue))

    def queue_metrics(self, queue: str) -> str:
        """See `Client.queue_metrics`."""
        return self._loop.run(self.client.queue_metrics(queue))


class SyncJob:
    """A blocking `Job`."""

    def __init__(self, job: Job, loop: _Loop) -> None:
        self.job, self._loop = job, loop
        self.id, self.queue, self.url = job.id, job.queue, job.url

    def __repr__(self) -> str:
        return f"SyncJob({self.id!r}, queue={self.queue!r})"

    def get(self) -> jobs_pb2.Job:
        """See `Job.get`."""
        return self._loop.run(self.job.get())

    def result(self) -> jobs_pb2.JobResult | None:
        """See `Job.result`."""
        return self._loop.run(self.job.result())

    def wait(self, timeout: float | None = None) -> jobs_pb2.JobResult:
        """See `Job.wait`."""
        return self._loop.run(self.job.wait(timeout))

    def logs(self, *, follow: bool = False, kind: Literal["run", "build"] = "run") -> Iterator[jobs_pb2.LogChunk]:
        """See `Job.logs`."""
        return self._loop.iterate(self.job.logs(follow=follow, kind=kind))

    def outputs(self) -> dict[str, definition_pb2.DataRef]:
        """See `Job.outputs`."""
        return self._loop.run(self.job.outputs())

    def download(self, directory: str | Path, *, progress: Progress | None = None) -> list[Path]:
        """See `Job.download`."""
        return self._loop.run(self.job.download(directory, progress=progress))

    def cancel(self, namespace: str = "") -> jobs_pb2.Job:
        """See `Job.cancel`."""
        return self._loop.run(self.job.cancel(namespace))

    def delete(self) -> None:
        """See `Job.delete`."""
        self._loop.run(self.job.delete())
