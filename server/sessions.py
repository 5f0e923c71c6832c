"""One connected worker: registration, filling its slots, and the messages it sends."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable

from google.protobuf import duration_pb2

from jobwire.core.units import timestamp
from jobwire.server.bus import Lagged
from jobwire.server.logs import LogHub
from jobwire.server.scheduler import Attempt, Holder, Scheduler
from jobwire.server.waiting import Line, Lines
from jobwire.v1 import jobs_pb2, workers_pb2

log = logging.getLogger(__name__)
OUTBOX_SIZE = 1024
HANDLING_LIMIT = 64
"""Messages of one worker handled at once (see `WorkerSession.receive`)."""


class ProtocolError(Exception):
    """The worker broke the stream's protocol (e.g. did not register first)."""


class WorkerSession:
    """The server's side of one worker stream; `outbox` holds what to send it."""

    def __init__(
        self,
        scheduler: Scheduler,
        logs: LogHub,
        lines: Lines,
        register: workers_pb2.RegisterWorker,
        clock: Callable[[], float],
    ) -> None:
        if not register.worker_id or not register.queue:
            raise ProtocolError("the first message must be `register` with a worker_id and a queue")
        self.scheduler, self.logs, self.lines, self.register = scheduler, logs, lines, register
        self.clock = clock
        self.worker_id, self.queue = register.worker_id, register.queue
        self.session_id = uuid.uuid4().hex
        self.holder = Holder(self.worker_id, self.session_id, self.queue)  # fences what this stream may act on
        self.outbox: asyncio.Queue[workers_pb2.ConnectResponse] = asyncio.Queue(OUTBOX_SIZE)
        self.running: dict[str, int] = {}
        self.gpus_used: dict[str, int] = {}  # GPU devices each running job holds
        self.wake = asyncio.Event()
        self.draining = False
        self.credential: str | None = None
        """Digest of the queue's worker credential this session serves under (None: an open queue)."""
        self.revoked = False  # that credential was revoked: no new jobs
        self._handling = asyncio.Semaphore(HANDLING_LIMIT)
        self._latest: dict[str, asyncio.Task[None]] = {}  # the last message handled of each job

    async def admit(self) -> None:
        """Check what the worker presents: the queue's worker credential and its own secret (raises
        Unauthenticated or PermissionDenied). Must pass before `open`."""
        register = self.register
        self.credential = await self.scheduler.trust.admit(
            self.queue, self.worker_id, register.credential, register.secret
        )

    async def open(self) -> workers_pb2.WorkerRegistered:
        """Accept the registration: keep the attempts the worker still holds, report the stale ones."""
        held = [Attempt(a.job_id, a.attempt) for a in self.register.running]
        stale = await self.scheduler.reconnect(self.holder, held)
        self.running = {a.job_id: a.attempt for a in held if a not in stale}
        for job_id in self.running:
            self.gpus_used[job_id] = await self.scheduler.gpus_needed(self.queue, job_id)
        await self._save_info()
        log.info(
            "worker %s connected to queue %r (%d slots)",
            self.worker_id,
            self.queue,
            self.register.cpus,
        )
        settings = self.scheduler.settings
        cursors = [
            await self.logs.cursor(Attempt(job_id, attempt), kind, self.queue)
            for job_id, attempt in self.running.items()
            for kind in (jobs_pb2.LOG_KIND_BUILD, jobs_pb2.LOG_KIND_RUN)
        ]
        return workers_pb2.WorkerRegistered(
            log_cursors=cursors,
            worker_id=self.worker_id,
            heartbeat_interval=duration_pb2.Duration(seconds=round(settings.heartbeat_seconds)),
            lease_duration=duration_pb2.Duration(seconds=round(settings.lease_seconds)),
            stale=[workers_pb2.AttemptRef(job_id=a.job_id, attempt=a.attempt) for a in stale],
            public_url=settings.public_url,
            inline_limit=settings.inline_limit,
            max_outputs=settings.max_outputs,
            max_output_size=settings.max_output_size,
        )

    async def run(self) -> None:
        """Fill slots (first at once, then when woken) and relay bus messages until cancelled."""
        async with self.lines.joined(self.queue) as line, asyncio.TaskGroup() as group:
            group.create_task(line.listening())
            group.create_task(self._fill_forever(line))
            group.create_task(self._relay_worker())

    async def close(self) -> None:
        """The stream ended: forget the connection (its jobs keep their leases until they expire)."""
        await self.scheduler.worker_gone(self.worker_id, session=self.session_id)
        log.info("worker %s disconnected", self.worker_id)

    async def receive(self, request: workers_pb2.ConnectRequest, group: asyncio.TaskGroup) -> None:
        """Handle a message from the worker (each of a batch) in a task of `group`: messages about
        different jobs do not wait for each other's store commits, those about one job (and the
        heartbeats among themselves) are handled in the order sent. Waits while `HANDLING_LIMIT`
        messages are in hand."""
        if request.HasField("batch"):
            messages = list(request.batch.messages)
            if any(message.HasField("batch") for message in messages):
                raise ProtocolError("a batch may not hold another batch")
        else:
            messages = [request]
        for message in messages:
            await self._handling.acquire()
            subject = _subject(message)
            task = group.create_task(self._handle_after(self._latest.get(subject), message))
            self._latest[subject] = task
            task.add_done_callback(functools.partial(self._handled, subject))

    async def _handle_after(self, previous: asyncio.Task[None] | None, message: workers_pb2.ConnectRequest) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await self.handle(message)

    def _handled(self, subject: str, task: asyncio.Task[None]) -> None:
        self._handling.release()
        if self._latest.get(subject) is task:
            del self._latest[subject]

    async def handle(self, request: workers_pb2.ConnectRequest) -> None:
        """Act on one message from the worker (not a batch)."""
        match request.WhichOneof("message"):
            case "heartbeat":
                await self._on_heartbeat(request.heartbeat)
            case "started":
                attempt = Attempt(request.started.job_id, request.started.attempt)
                if not await self.scheduler.started(attempt, self.holder):
                    await self._stale(attempt, "the job is no longer assigned to this attempt")
            case "logs":
                attempt = Attempt(request.logs.job_id, request.logs.attempt)
                logs = request.logs
                if not await self.logs.append(attempt, self.holder, logs.kind, logs.chunks, logs.start):
                    await self._stale(attempt, "logs of an attempt the server no longer holds")
            case "finished":
                await self._on_finished(request.finished)
            case "released":
                await self._on_released(request.released)
            case "register":
                raise ProtocolError("`register` may only be the first message")
            case _:
                raise ProtocolError("empty message")

    async def _on_heartbeat(self, heartbeat: workers_pb2.Heartbeat) -> None:
        if heartbeat.draining and not self.draining:
            log.info("worker %s is draining: no new jobs for it", self.worker_id)
            self.draining = True
        held = [Attempt(a.job_id, a.attempt) for a in heartbeat.running]
        for attempt in await self.scheduler.renew(self.holder, held):
            await self._stale(attempt, "the job is no longer assigned to this attempt")
        await self._save_info()

    async def _on_released(self, released: workers_pb2.JobReleased) -> None:
        attempt = Attempt(released.job_id, released.attempt)
        self._forget(attempt)
        if not await self.scheduler.release(attempt, self.holder, released.reason or "no reason given"):
            await self._stale(attempt, "release of an attempt the server no longer holds; ignored")
        ack = workers_pb2.AttemptRef(job_id=attempt.job_id, attempt=attempt.attempt)
        await self.outbox.put(workers_pb2.ConnectResponse(finished_ack=ack))

    def _forget(self, attempt: Attempt) -> None:
        """The attempt no longer holds a slot. The session claims for the slot at once only if it was
        full (so out of its queue's line) or the attempt held GPU devices (a job waiting for devices
        may fit now): a slot freed beside free ones waits in line as they do, since work for them
        wakes the line (see `jobwire.server.waiting`), and a claim there would find nothing."""
        if self.running.get(attempt.job_id) == attempt.attempt:
            was_full = not self.free_slots()
            del self.running[attempt.job_id]
            if self.gpus_used.pop(attempt.job_id, 0) or was_full:
                self.wake.set()

    async def _on_finished(self, finished: workers_pb2.JobFinished) -> None:
        attempt = Attempt(finished.job_id, finished.attempt)
        self._forget(attempt)
        result = finished.result
        result.worker_id = self.worker_id
        if await self.scheduler.finished(attempt, self.holder, result, started=finished.HasField("started")) is None:
            await self._stale(attempt, "result of an attempt the server no longer holds; it was discarded")
        ack = workers_pb2.AttemptRef(job_id=attempt.job_id, attempt=attempt.attempt)
        await self.outbox.put(workers_pb2.ConnectResponse(finished_ack=ack))

    async def _stale(self, attempt: Attempt, reason: str) -> None:
        log.warning("worker %s, job %s attempt %d: %s", self.worker_id, attempt.job_id, attempt.attempt, reason)
        self._forget(attempt)
        stale = workers_pb2.StaleAttempt(job_id=attempt.job_id, attempt=attempt.attempt, reason=reason)
        await self.outbox.put(workers_pb2.ConnectResponse(stale=stale))

    def free_slots(self) -> int:
        return 0 if self.draining or self.revoked else self.register.cpus - len(self.running)

    def free_gpus(self) -> int:
        return len(self.register.gpus) - sum(self.gpus_used.values())

    async def _fill_forever(self, line: Line) -> None:
        """Claim jobs for the free slots: at once, then whenever a slot frees or the queue's line
        wakes this session for new work (see `jobwire.server.waiting`)."""
        try:
            while True:
                if self.free_slots():
                    await self._fill(line)
                if not self.free_slots() or line.park(self):
                    await self.wake.wait()
                    self.wake.clear()
                    if line.leave(self) and not self.free_slots():  # woken for work it cannot take
                        line.pass_on()
        finally:
            if line.leave(self):  # woken for work, then gone before claiming it
                line.pass_on()

    async def _fill(self, line: Line) -> None:
        if self.credential is not None and not await self.scheduler.trust.may_work(self.queue, self.credential):
            # What it runs goes on (its results come from the session holding the attempts); it takes
            # nothing new, and its next registration is refused.
            log.warning("worker %s: the queue credential it registered with was revoked; no new jobs", self.worker_id)
            self.revoked = True
            line.pass_on()
            return
        free, free_gpus = self.free_slots(), self.free_gpus()
        jobs = await self.scheduler.claim(self.queue, self.holder, free_gpus, free)
        for job in jobs:
            self.running[job.id] = job.attempt
            self.gpus_used[job.id] = job.definition.requirements.gpus
            assignment = workers_pb2.JobAssignment(
                job_id=job.id, attempt=job.attempt, definition=job.definition, queue=self.queue
            )
            await self.outbox.put(workers_pb2.ConnectResponse(assignment=assignment))
        line.pass_on(None if len(jobs) == free else self.free_gpus())

    async def _relay_worker(self) -> None:
        async with self.scheduler.worker_messages(self.worker_id) as subscription:
            while True:
                try:
                    async for payload in subscription:
                        await self.outbox.put(workers_pb2.ConnectResponse.FromString(payload))
                except Lagged:  # only cancels travel here; the worker's heartbeats learn of the rest as stale
                    log.warning("worker %s fell behind on its messages", self.worker_id)

    async def _save_info(self) -> None:
        info = jobs_pb2.WorkerInfo(
            id=self.worker_id,
            cpus=self.register.cpus,
            gpus=self.register.gpus,
            last_seen_time=timestamp(self.clock()),
            version=self.register.version,
            hostname=self.register.hostname,
            max_job_duration=self.register.max_job_duration,
        )
        await self.scheduler.worker_seen(info, queue=self.queue, session=self.session_id)


def _subject(message: workers_pb2.ConnectRequest) -> str:
    """The job a message is about ("" for heartbeats and messages about none)."""
    kind = message.WhichOneof("message")
    return getattr(message, kind).job_id if kind in ("started", "logs", "finished", "released") else ""
