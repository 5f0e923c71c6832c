"""The worker daemon: dial out, register, pump the stream, back off and reconnect.

Jobs outlive a stream: a reconnect re-registers the attempts still running,
and results the server has not acknowledged are sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
from dataclasses import dataclass
from typing import TypeAlias

import grpc
from google.protobuf import duration_pb2

import jobwire
from jobwire.core.batching import take_ready
from jobwire.core.units import format_duration
from jobwire.files import FileClient
from jobwire.v1 import jobs_pb2, workers_pb2, workers_pb2_grpc
from jobwire.worker.errors import StreamEnded
from jobwire.worker.execution import ATTEMPT_LABEL, GPUS_LABEL, JOB_LABEL, WORKER_LABEL, Execution
from jobwire.worker.gpus import GpuPool
from jobwire.worker.runner import DockerRuntime
from jobwire.worker.settings import WorkerSettings
from jobwire.worker.staging import Staging

log = logging.getLogger(__name__)
OUTBOX_SIZE = 256
Call: TypeAlias = "grpc.aio.StreamStreamCall[workers_pb2.ConnectRequest, workers_pb2.ConnectResponse]"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class Outbox:
    """Messages for the server in order, except heartbeats, which go first: a backlog of log batches
    must never delay the heartbeat that keeps the worker's leases."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.PriorityQueue[tuple[int, int, workers_pb2.ConnectRequest]] = asyncio.PriorityQueue(size)
        self._sequence = itertools.count()

    async def put(self, message: workers_pb2.ConnectRequest) -> None:
        priority = 0 if message.HasField("heartbeat") else 1
        await self._queue.put((priority, next(self._sequence), message))

    async def get(self) -> workers_pb2.ConnectRequest:
        """The next message, with whatever else is queued now as one batch."""
        messages = take_ready((await self._queue.get())[2], self._queue, lambda entry: entry[2])
        if len(messages) == 1:
            return messages[0]
        return workers_pb2.ConnectRequest(batch=workers_pb2.ConnectRequestBatch(messages=messages))


@dataclass
class _Running:
    attempt: int
    task: asyncio.Task[None]


class Daemon:
    """Serves one queue until cancelled."""

    def __init__(self, settings: WorkerSettings, runtime: DockerRuntime) -> None:
        self.settings, self.runtime = settings, runtime
        self.worker_id = settings.resolved_id()
        self.outbox = Outbox(OUTBOX_SIZE)
        self.retry: workers_pb2.ConnectRequest | None = None
        self.running: dict[str, _Running] = {}
        self.unacked: dict[tuple[str, int], workers_pb2.ConnectRequest] = {}
        # Every execution until the server acknowledged its result: their logs may need resending.
        self.executions: dict[tuple[str, int], Execution] = {}
        self.public_url = ""
        self.registered = asyncio.Event()
        self.stopping: set[tuple[str, int]] = set()
        self.releasing: set[tuple[str, int]] = set()
        self.draining = False
        self.gpus = GpuPool(settings.gpus)
        self.all_acked = asyncio.Event()

    async def run(self) -> None:
        """Connect and serve forever, reconnecting with exponential backoff and jitter."""
        await self.runtime.prepare()
        async with grpc.aio.insecure_channel(self.settings.server, options=CHANNEL_OPTIONS) as channel:
            staging = Staging(FileClient(channel), self.settings.data_directory / "cache" / "blobs")
            async with asyncio.TaskGroup() as jobs:
                await self._resume(jobs, staging)
                backoff = 0.5
                while True:
                    try:
                        await self._session(workers_pb2_grpc.WorkerServiceStub(channel), jobs, staging)
                    except (grpc.aio.AioRpcError, StreamEnded) as error:
                        detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                        log.warning("connection to %s lost (%s); reconnecting", self.settings.server, detail)
                    if self.registered.is_set():
                        backoff = 0.5
                    self.registered.clear()
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, 30.0)

    async def _session(
        self, stub: workers_pb2_grpc.WorkerServiceAsyncStub, jobs: asyncio.TaskGroup, staging: Staging
    ) -> None:
        call = stub.Connect()
        await call.write(workers_pb2.ConnectRequest(register=self._registration()))
        first = await call.read()
        if not isinstance(first, workers_pb2.ConnectResponse) or not first.HasField("registered"):
            raise StreamEnded("the server did not accept the registration")
        registered = first.registered
        self.public_url = registered.public_url
        for stale in registered.stale:
            self._stop(stale.job_id, stale.attempt, "the server no longer holds this attempt")
        log.info(
            "worker %s registered on queue %r at %s",
            self.worker_id,
            self.settings.queue,
            self.settings.server,
        )
        self.registered.set()
        if self.draining:
            await call.write(self._heartbeat_message())
        for cursor in registered.log_cursors:
            execution = self.executions.get((cursor.job_id, cursor.attempt))
            if execution is not None and (resend := execution.logs[cursor.kind].resume_at(cursor)):
                await call.write(resend)
        for message in list(self.unacked.values()):
            await call.write(message)
        interval = registered.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._write(call))
                beat = group.create_task(self._heartbeat(interval))
                try:
                    await self._read(call, jobs, staging)
                finally:
                    writer.cancel()
                    beat.cancel()
        except* (grpc.aio.AioRpcError, StreamEnded) as lost:
            raise lost.exceptions[0] from None  # the stream broke: reconnect

    def _registration(self) -> workers_pb2.RegisterWorker:
        return workers_pb2.RegisterWorker(
            worker_id=self.worker_id,
            queue=self.settings.queue,
            cpus=self.settings.cpus,
            gpus=self.settings.gpus,
            version=jobwire.__version__,
            max_job_duration=duration_pb2.Duration(seconds=round(self.settings.max_job_duration)),
            running=self._held(),
            hostname=socket.gethostname(),
        )

    def _held(self) -> list[workers_pb2.AttemptRef]:
        """Attempts running here, and finished ones whose result the server has not acknowledged yet
        (so a re-registration does not give them up before the result arrives)."""
        held = {(job_id, running.attempt) for job_id, running in self.running.items()} | set(self.unacked)
        return [workers_pb2.AttemptRef(job_id=job_id, attempt=attempt) for job_id, attempt in sorted(held)]

    async def _write(self, call: Call) -> None:
        while True:
            message = self.retry or await self.outbox.get()
            self.retry = message
            log.debug("→ %s", message.WhichOneof("message"))
            await call.write(message)
            self.retry = None

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.outbox.put(self._heartbeat_message())

    def _heartbeat_message(self) -> workers_pb2.ConnectRequest:
        return workers_pb2.ConnectRequest(heartbeat=workers_pb2.Heartbeat(running=self._held(), draining=self.draining))

    async def _read(
        self,
        call: Call,
        jobs: asyncio.TaskGroup,
        staging: Staging,
    ) -> None:
        while True:
            message = await call.read()
            if not isinstance(message, workers_pb2.ConnectResponse):  # grpc.aio.EOF
                raise StreamEnded("the server closed the stream")
            self._dispatch(message, jobs, staging)

    def _dispatch(self, message: workers_pb2.ConnectResponse, jobs: asyncio.TaskGroup, staging: Staging) -> None:
        log.debug("← %s", message.WhichOneof("message"))
        match message.WhichOneof("message"):
            case "assignment":
                self._start(message.assignment, jobs, staging)
            case "cancel":
                self._stop(message.cancel.job_id, message.cancel.attempt, message.cancel.reason)
            case "stale":
                self._stop(message.stale.job_id, message.stale.attempt, message.stale.reason)
            case "finished_ack":
                acked = (message.finished_ack.job_id, message.finished_ack.attempt)
                self.unacked.pop(acked, None)
                self.executions.pop(acked, None)
                if not self.unacked:
                    self.all_acked.set()
            case "batch":
                for each in message.batch.messages:
                    self._dispatch(each, jobs, staging)

    async def _resume(self, jobs: asyncio.TaskGroup, staging: Staging) -> None:
        """Re-attach to the containers an earlier run of this worker (same id) left behind; they are
        re-registered with the server, which keeps their attempts if their lease has not run out."""
        for labels in await self.runtime.ours({WORKER_LABEL: self.worker_id}):
            job_id, attempt = labels.get(JOB_LABEL, ""), int(labels.get(ATTEMPT_LABEL) or 0)
            assignment = Execution.saved_assignment(self.settings, job_id, attempt)
            if assignment is None or job_id in self.running:
                log.warning("removing container %s of this worker: nothing to resume it with", labels["id"][:12])
                await self.runtime.remove(labels["id"])
                continue
            log.info("re-attaching to job %s (attempt %d), still running on this machine", job_id, attempt)
            devices = self.gpus.take_these(filter(None, labels.get(GPUS_LABEL, "").split(",")))
            self._start(assignment, jobs, staging, container_id=labels["id"], devices=devices)

    def _start(
        self,
        assignment: workers_pb2.JobAssignment,
        jobs: asyncio.TaskGroup,
        staging: Staging,
        container_id: str = "",
        devices: list[str] | None = None,
    ) -> None:
        if assignment.job_id in self.running:
            log.warning("job %s is already running here; ignoring a second assignment", assignment.job_id)
            return
        execution = Execution(
            assignment,
            self.settings,
            self.worker_id,
            self.runtime,
            staging,
            self.outbox.put,
            self.public_url,
        )
        try:
            execution.gpu_devices = (
                self.gpus.take(assignment.definition.requirements.gpus) if devices is None else devices
            )
        except ValueError as error:  # the server assigned more than we have: say so as the job's error
            execution.gpu_devices, container_id = [], ""
            execution.refusal = str(error)
        if container_id:
            execution.rereads()
        task = jobs.create_task(self._execute(execution, container_id))
        self.running[assignment.job_id] = _Running(assignment.attempt, task)
        self.executions[(assignment.job_id, assignment.attempt)] = execution

    def _stop(self, job_id: str, attempt: int, reason: str) -> None:
        running = self.running.get(job_id)
        if running is not None and running.attempt == attempt:
            log.info("stopping job %s (attempt %d): %s", job_id, attempt, reason)
            self.stopping.add((job_id, attempt))
            running.task.cancel()

    async def drain(self, timeout: float) -> None:
        """Shut down gently: take no new job, let running ones finish for up to `timeout` seconds, give
        the rest back to the server (re-queued at once), and wait briefly for the server to confirm."""
        self.draining = True
        log.info("draining: %d job(s) running; giving them %s to finish", len(self.running), format_duration(timeout))
        await self.outbox.put(self._heartbeat_message())
        if self.running:
            await asyncio.wait([running.task for running in self.running.values()], timeout=timeout)
        for job_id, running in list(self.running.items()):
            log.info("giving job %s back to the server", job_id)
            self.releasing.add((job_id, running.attempt))
            running.task.cancel()
        if self.running:
            await asyncio.wait([running.task for running in self.running.values()], timeout=10)
        if self.unacked:
            self.all_acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_acked.wait(), 10)

    async def _execute(self, execution: Execution, container_id: str) -> None:
        log.info("running job %s (attempt %d)", execution.job_id, execution.attempt)
        key = (execution.job_id, execution.attempt)
        try:
            result = await (execution.resume(container_id) if container_id else execution.run())
        except asyncio.CancelledError:
            if key in self.releasing:
                self.releasing.discard(key)
                self.running.pop(execution.job_id, None)
                released = workers_pb2.JobReleased(
                    job_id=execution.job_id, attempt=execution.attempt, reason="the worker is shutting down"
                )
                self.unacked[key] = workers_pb2.ConnectRequest(released=released)
                await self.outbox.put(self.unacked[key])
                return
            if key not in self.stopping:
                raise  # the worker is shutting down
            self.stopping.discard(key)
            result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_CANCELLED, message="stopped on request")
        except Exception as error:  # a bug must not take the worker down: report it as the job's error
            log.exception("job %s failed", execution.job_id)
            result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_ERROR, message=f"worker error: {error!r}")
        finally:
            self.running.pop(execution.job_id, None)
            self.gpus.give_back(execution.gpu_devices)
        finished = workers_pb2.JobFinished(job_id=execution.job_id, attempt=execution.attempt, result=result)
        message = workers_pb2.ConnectRequest(finished=finished)
        self.unacked[(execution.job_id, execution.attempt)] = message
        await self.outbox.put(message)
        log.info("job %s finished: %s", execution.job_id, jobs_pb2.FinishReason.Name(result.reason))
