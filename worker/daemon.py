"""The worker daemon: dial out, register, pump the stream, back off and reconnect.

Jobs outlive a stream: a reconnect re-registers the attempts still running,
and results the server has not acknowledged are sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

import grpc
from google.protobuf import duration_pb2

import jobwire
from jobwire.connection import Target, open_channel
from jobwire.core import egress
from jobwire.core.units import format_duration
from jobwire.files import FileClient
from jobwire.v1 import jobs_pb2, workers_pb2, workers_pb2_grpc
from jobwire.worker.errors import BadMessage, Refused, StreamEnded
from jobwire.worker.execution import (
    ATTEMPT_LABEL,
    DEADLINE_LABEL,
    GPUS_LABEL,
    JOB_LABEL,
    WORKER_LABEL,
    Execution,
)
from jobwire.worker.gpus import GpuPool
from jobwire.worker.outbox import Outbox
from jobwire.worker.runtime import LABEL, ContainerRuntime
from jobwire.worker.settings import WorkerSettings
from jobwire.worker.staging import Staging
from jobwire.worker.validation import check_assignment, check_attempt

log = logging.getLogger(__name__)
OUTBOX_SIZE = 256
Call: TypeAlias = "grpc.aio.StreamStreamCall[workers_pb2.ConnectRequest, workers_pb2.ConnectResponse]"
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
"""What the server answers a registration it will never accept (see `Refused`)."""
EXPIRED_AFTER = 60.0
"""How long past its deadline label a container of another worker is left alone (its own worker,
if alive, removes it at the deadline)."""
SWEEP_INTERVAL = 60.0
"""How often a worker looks for containers left past their deadline (see `Daemon.remove_expired`)."""
FIRST_RECONNECT = 0.5
"""The first pause before reconnecting; each next one doubles, up to `reconnect_cap`."""
RECONNECTS_WITHIN_GRACE = 4
"""A worker cut off from the server tries again at least this often within the server's grace (its
lease), so that it is back before its jobs are re-queued: the pauses stop growing at a quarter of it."""
MAX_RECONNECT = 30.0
"""The longest pause between reconnects, however long the grace."""
UNKNOWN_GRACE = 20.0
"""The grace assumed before the server has said its own (the server's default is 30 s)."""
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class Stop(enum.Enum):
    """Why an attempt's task was cancelled."""

    CANCEL = "the server asked to stop it"
    RELEASE = "the worker is shutting down and gives it back"


@dataclass
class Attempt:
    """One attempt on this worker, from its assignment until the server acknowledged its result
    (its logs may need resending until then)."""

    execution: Execution
    task: asyncio.Task[None] | None = None
    stop: Stop | None = None
    result: workers_pb2.ConnectRequest | None = None
    """Its JobFinished or JobReleased, once there is one, until the server acknowledges it."""

    @property
    def running(self) -> bool:
        return self.result is None


Key: TypeAlias = "tuple[str, int]"


class Daemon:
    """Serves one queue until cancelled."""

    def __init__(self, settings: WorkerSettings, runtime: ContainerRuntime) -> None:
        self.settings, self.runtime = settings, runtime
        self.worker_id = settings.resolved_id()
        self.secret = settings.secret()
        self.outbox = Outbox(OUTBOX_SIZE)
        self.retry: workers_pb2.ConnectRequest | None = None
        self.attempts: dict[Key, Attempt] = {}
        self.answer = workers_pb2.WorkerRegistered()
        """The server's latest answer to a registration: its URL and the limits this worker obeys."""
        self.answered = asyncio.Event()  # set at the first registration, never cleared
        self.registered = asyncio.Event()  # set while registered
        self.draining = False
        self.gpus = GpuPool(settings.gpus)
        self.all_acked = asyncio.Event()

    def channel(self) -> grpc.aio.Channel:
        """A channel to the server, as the SDK dials it: plain or TLS, by `--server` and `--tls`."""
        target = Target.parse(self.settings.server, True if self.settings.tls else None)
        certificates = self.settings.ca_file.read_bytes() if self.settings.ca_file else None
        return open_channel(target, certificates, CHANNEL_OPTIONS)

    async def server(self) -> workers_pb2.WorkerRegistered:
        """What the server said at registration, once it has said it."""
        await self.answered.wait()
        return self.answer

    async def _public_url(self) -> str:
        return (await self.server()).public_url

    async def run(self) -> None:
        """Connect and serve forever, reconnecting with exponential backoff and jitter; raises `Refused`
        when the server refuses the registration (jobs still running here are stopped)."""
        await self.runtime.prepare()
        async with self.channel() as channel:
            staging = Staging(
                FileClient(channel),
                self.settings.data_directory / "cache" / "blobs",
                policy=egress.Policy(self.settings.egress_allow),
                max_download=self.settings.max_download_size,
                download_time=self.settings.max_job_duration,
                public_url=self._public_url,
                upload_patience=self.settings.upload_patience,
            )
            try:
                async with asyncio.TaskGroup() as jobs:
                    await self.remove_expired()
                    await self._resume(jobs, staging)
                    jobs.create_task(self._remove_expired_forever())
                    await self._connect_forever(workers_pb2_grpc.WorkerServiceStub(channel), jobs, staging)
            except* Refused as refused:
                raise refused.exceptions[0] from None

    async def _connect_forever(
        self, stub: workers_pb2_grpc.WorkerServiceAsyncStub, jobs: asyncio.TaskGroup, staging: Staging
    ) -> None:
        delays = self._reconnect_delays()
        while True:
            try:
                await self._session(stub, jobs, staging)
            except (grpc.aio.AioRpcError, StreamEnded) as error:
                detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                if isinstance(error, grpc.aio.AioRpcError) and error.code() in _REFUSALS:
                    raise Refused(f"the server refused this worker: {detail}") from None
                log.warning("connection to %s lost (%s); reconnecting", self.settings.server, detail)
            if self.registered.is_set():
                delays = self._reconnect_delays()
            self.registered.clear()
            await asyncio.sleep(next(delays))

    async def _session(
        self, stub: workers_pb2_grpc.WorkerServiceAsyncStub, jobs: asyncio.TaskGroup, staging: Staging
    ) -> None:
        call = stub.Connect()
        await call.write(workers_pb2.ConnectRequest(register=self._registration()))
        first = await call.read()
        if not isinstance(first, workers_pb2.ConnectResponse) or not first.HasField("registered"):
            raise StreamEnded("the server did not accept the registration")
        self.answer = registered = first.registered
        for stale in registered.stale:
            self._stop(stale.job_id, stale.attempt, "the server no longer holds this attempt")
        log.info("worker %s registered on queue %r at %s", self.worker_id, self.settings.queue, self.settings.server)
        self.registered.set()
        self.answered.set()
        if self.draining:
            await call.write(self._heartbeat_message())
        for cursor in registered.log_cursors:
            attempt = self.attempts.get((cursor.job_id, cursor.attempt))
            if attempt is not None and (resend := attempt.execution.logs[cursor.kind].resume_at(cursor)):
                await call.write(resend)
        for each in list(self.attempts.values()):
            if each.result is not None:
                await call.write(each.result)
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

    def reconnect_cap(self) -> float:
        """The longest pause between reconnects: a quarter of the server's grace (its lease) as it said at
        the last registration (`UNKNOWN_GRACE` before any), so that several tries fall within it, and
        never more than `MAX_RECONNECT`."""
        grace = self.answer.lease_duration.ToTimedelta().total_seconds() or UNKNOWN_GRACE
        return min(max(grace / RECONNECTS_WITHIN_GRACE, FIRST_RECONNECT), MAX_RECONNECT)

    def _reconnect_delays(self) -> Iterator[float]:
        """Pauses between reconnects, forever: exponential from `FIRST_RECONNECT`, capped by
        `reconnect_cap` (read at each pause), each with jitter (half to all of it)."""
        delay = FIRST_RECONNECT
        while True:
            delay = min(delay, self.reconnect_cap())
            yield delay * random.uniform(0.5, 1.0)
            delay *= 2

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
            credential=self.settings.credential,
            secret=self.secret,
        )

    def _held(self) -> list[workers_pb2.AttemptRef]:
        """Attempts running here, and finished ones whose result the server has not acknowledged yet
        (so a re-registration does not give them up before the result arrives)."""
        return [workers_pb2.AttemptRef(job_id=job_id, attempt=attempt) for job_id, attempt in sorted(self.attempts)]

    def _running(self) -> list[Attempt]:
        return [attempt for attempt in self.attempts.values() if attempt.running]

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

    async def _read(self, call: Call, jobs: asyncio.TaskGroup, staging: Staging) -> None:
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
                acked = self.attempts.get((message.finished_ack.job_id, message.finished_ack.attempt))
                if acked is not None and acked.result is not None:  # only attempts of ours: checked ids
                    del self.attempts[(message.finished_ack.job_id, message.finished_ack.attempt)]
                if not any(attempt.result for attempt in self.attempts.values()):
                    self.all_acked.set()
            case "batch":
                for each in message.batch.messages:
                    self._dispatch(each, jobs, staging)

    async def remove_expired(self) -> None:
        """Remove the containers of any jobwire worker on this machine whose attempt's deadline passed
        `EXPIRED_AFTER` ago: their worker died and did not come back (a live one removes its own at
        the deadline). So a container never outlives its job's time limit by more than that plus
        `SWEEP_INTERVAL` while some worker runs on the machine."""
        now = time.time()
        for labels in await self.runtime.ours({LABEL: "true"}):
            try:
                deadline = float(labels.get(DEADLINE_LABEL, "inf"))
            except ValueError:
                continue
            if deadline + EXPIRED_AFTER < now and labels.get(WORKER_LABEL) != self.worker_id:
                log.warning(
                    "removing container %s of job %s: worker %s left it past its deadline",
                    labels["id"][:12],
                    labels.get(JOB_LABEL, "?"),
                    labels.get(WORKER_LABEL, "?"),
                )
                await self.runtime.remove(labels["id"])

    async def _remove_expired_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.remove_expired()
            except Exception:  # the engine is busy or restarting: the next sweep tries again
                log.warning("could not look for expired containers", exc_info=True)

    async def _resume(self, jobs: asyncio.TaskGroup, staging: Staging) -> None:
        """Re-attach to the containers an earlier run of this worker (same id) left behind; they are
        re-registered with the server, which keeps their attempts if their lease has not run out."""
        for labels in await self.runtime.ours({WORKER_LABEL: self.worker_id}):
            job_id, attempt = labels.get(JOB_LABEL, ""), labels.get(ATTEMPT_LABEL, "")
            assignment = (
                Execution.saved_assignment(self.settings, job_id, int(attempt)) if _ours(job_id, attempt) else None
            )
            if assignment is None or self._runs(job_id):
                log.warning("removing container %s of this worker: nothing to resume it with", labels["id"][:12])
                await self.runtime.remove(labels["id"])
                continue
            log.info("re-attaching to job %s (attempt %d), still running on this machine", job_id, attempt)
            devices = self.gpus.take_these(filter(None, labels.get(GPUS_LABEL, "").split(",")))
            self._start(assignment, jobs, staging, container_id=labels["id"], devices=devices)

    def _runs(self, job_id: str) -> bool:
        return any(attempt.execution.job_id == job_id for attempt in self._running())

    def _start(
        self,
        assignment: workers_pb2.JobAssignment,
        jobs: asyncio.TaskGroup,
        staging: Staging,
        container_id: str = "",
        devices: list[str] | None = None,
    ) -> None:
        try:
            check_attempt(assignment.job_id, assignment.attempt)
        except BadMessage as error:  # no folder, container or report can be made with it: drop it
            log.warning("ignoring an assignment from the server: %s", error)
            return
        if self._runs(assignment.job_id):
            log.warning("job %s is already running here; ignoring a second assignment", assignment.job_id)
            return
        execution = Execution(
            assignment, self.settings, self.worker_id, self.runtime, staging, self.outbox.put, self.server
        )
        try:
            check_assignment(assignment, self.settings.queue)
            execution.gpu_devices = (
                self.gpus.take(assignment.definition.requirements.gpus) if devices is None else devices
            )
        except (BadMessage, ValueError) as error:  # refused, or more GPUs than we have: the job's error
            execution.gpu_devices, container_id = [], ""
            execution.refusal = (
                f"the worker refused this assignment: {error}" if isinstance(error, BadMessage) else str(error)
            )
        if container_id:
            execution.rereads()
        attempt = self.attempts[(assignment.job_id, assignment.attempt)] = Attempt(execution)
        attempt.task = jobs.create_task(self._execute(attempt, container_id))

    def _stop(self, job_id: str, attempt: int, reason: str) -> None:
        """Cancel an attempt of ours; the ids are only looked up among them (any others do nothing)."""
        stopped = self.attempts.get((job_id, attempt))
        if stopped is not None and stopped.running and stopped.task is not None:
            log.info("stopping job %s (attempt %d): %s", job_id, attempt, reason)
            stopped.stop = Stop.CANCEL
            stopped.task.cancel()

    async def drain(self, timeout: float) -> None:
        """Shut down gently: take no new job, let running ones finish for up to `timeout` seconds, give
        the rest back to the server (re-queued at once), and wait briefly for the server to confirm."""
        self.draining = True
        log.info(
            "draining: %d job(s) running; giving them %s to finish", len(self._running()), format_duration(timeout)
        )
        await self.outbox.put(self._heartbeat_message())
        await self._until_done(timeout)
        for attempt in self._running():
            log.info("giving job %s back to the server", attempt.execution.job_id)
            attempt.stop = Stop.RELEASE
            if attempt.task is not None:
                attempt.task.cancel()
        await self._until_done(10)
        if any(attempt.result for attempt in self.attempts.values()):
            self.all_acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_acked.wait(), 10)

    async def _until_done(self, timeout: float) -> None:
        if tasks := [attempt.task for attempt in self._running() if attempt.task is not None]:
            await asyncio.wait(tasks, timeout=timeout)

    async def _execute(self, attempt: Attempt, container_id: str) -> None:
        execution = attempt.execution
        log.info("running job %s (attempt %d)", execution.job_id, execution.attempt)
        try:
            result = await (execution.resume(container_id) if container_id else execution.run())
        except asyncio.CancelledError:
            if attempt.stop is None:
                raise  # the worker is shutting down
            result = None
        except Exception as error:  # a bug must not take the worker down: report it as the job's error
            log.exception("job %s failed", execution.job_id)
            result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_ERROR, message=f"worker error: {error!r}")
        finally:
            self.gpus.give_back(execution.gpu_devices)
        attempt.result = self._result_message(attempt, result)
        if attempt.result.HasField("finished") and (start := execution.held_start()) is not None:
            attempt.result.finished.started.CopyFrom(start)  # reported with the result: one message
        else:
            await execution.report_started()
        await self.outbox.put(attempt.result)
        if result is not None or attempt.stop is Stop.CANCEL:
            log.info(
                "job %s finished: %s",
                execution.job_id,
                jobs_pb2.FinishReason.Name(attempt.result.finished.result.reason),
            )

    @staticmethod
    def _result_message(attempt: Attempt, result: jobs_pb2.JobResult | None) -> workers_pb2.ConnectRequest:
        """JobReleased for an attempt given back before it ended, else JobFinished (cancelled if stopped)."""
        job_id, number = attempt.execution.job_id, attempt.execution.attempt
        if result is None and attempt.stop is Stop.RELEASE:
            released = workers_pb2.JobReleased(job_id=job_id, attempt=number, reason="the worker is shutting down")
            return workers_pb2.ConnectRequest(released=released)
        if result is None:
            result = jobs_pb2.JobResult(reason=jobs_pb2.FINISH_REASON_CANCELLED, message="stopped on request")
        finished = workers_pb2.JobFinished(job_id=job_id, attempt=number, result=result)
        return workers_pb2.ConnectRequest(finished=finished)


def _ours(job_id: str, attempt: str) -> bool:
    """Whether a container's labels name an attempt well enough to look for its saved assignment."""
    try:
        check_attempt(job_id, int(attempt))
    except (BadMessage, ValueError):
        return False
    return True
