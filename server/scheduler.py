"""Job lifecycle: submission, assignment to workers, fenced results, cancels and leases.

Every transition is one atomic store call; the bus only tells the other
parts (watchers, worker sessions, other replicas) that something changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence

from jobwire.core.definition import MAX_BATCH_JOBS, MAX_RESULT_OUTPUTS, DefinitionError, job_id, shown, validate
from jobwire.core.units import format_duration
from jobwire.server import topics, webhooks
from jobwire.server.bus import EventBus, Subscription
from jobwire.server.errors import InvalidArgument, NotFound, TooLarge, Unavailable
from jobwire.server.metrics import Metrics, queue_metrics
from jobwire.server.settings import ServerSettings
from jobwire.server.store import StateStore
from jobwire.server.store.base import (
    DEFAULT_NAMESPACE,
    FINISHED_HOOK,
    POSITION_LIMIT,
    QUEUED_HOOK,
    Attempt,
    Cancelled,
    Holder,
    QueueFull,
    Room,
    Submission,
    Webhook,
)
from jobwire.server.store.rows import job_summary, job_url_view
from jobwire.server.trust import Trust
from jobwire.v1 import definition_pb2, jobs_pb2, workers_pb2

__all__ = ["Attempt", "Holder", "Scheduler", "check_queue", "job_url_view"]
log = logging.getLogger(__name__)
_QUEUE_NAME_MAX = 256
EXPIRE_BATCH = 1000


class Scheduler:
    """The domain core of the server and the one face its adapters (servicers, worker sessions) call:
    they hold no store and no bus. Knows nothing of gRPC. Every job it returns to an adapter shows its
    definition without credentials (`definition.shown`); only a worker's claim carries them."""

    def __init__(
        self,
        store: StateStore,
        bus: EventBus,
        settings: ServerSettings,
        clock: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self.store, self.bus, self.settings, self.clock = store, bus, settings, clock
        self.metrics = metrics

    @functools.cached_property
    def trust(self) -> Trust:
        """Who may work a queue and who a worker is: checked when a worker registers."""
        return Trust(self.store, self.settings, self.clock)

    async def ping(self) -> None:
        """Unavailable when the state store cannot be reached."""
        try:
            await self.store.ping()
        except Exception as error:
            raise Unavailable(f"state store unreachable: {type(error).__name__}") from None

    async def submit(
        self,
        queue: str,
        definition: definition_pb2.JobDefinition,
        control: definition_pb2.JobControl,
        claimed_id: str = "",
    ) -> jobs_pb2.Job:
        """Validate and enqueue in `queue`; the job's run there, returned as is when it is queued, running
        or has a final result (only a result earned in this queue answers; other queues' runs of
        the same definition neither answer nor hold it back)."""
        check_queue(queue)
        submission = self._checked(definition, control, claimed_id)
        ((job, queued),) = await self._store_submissions(queue, [submission])
        await self._submitted(job, queued, submission, control, replaces=True)
        await self._announce(queue, [job] if queued else [])
        if job.state == jobs_pb2.JOB_STATE_QUEUED:
            job.waiting_reason = await self.waiting_reason(job, definition.requirements.gpus)
        return _shown(job)

    async def submit_many(self, queue: str, requests: Sequence[jobs_pb2.SubmitJobRequest]) -> list[jobs_pb2.Job]:
        """`submit` of each request, in order, stored in one transaction: all or none (an invalid
        one is named by its index). The jobs come without waiting reasons."""
        check_queue(queue)
        if not 1 <= len(requests) <= MAX_BATCH_JOBS:
            raise InvalidArgument(f"submit 1 to {MAX_BATCH_JOBS:,} jobs at once, not {len(requests):,}")
        submissions = []
        for index, request in enumerate(requests):
            try:
                if request.queue not in ("", queue):
                    raise InvalidArgument(f"queue {request.queue!r} is not the call's queue {queue!r}")
                submissions.append(self._checked(request.definition, request.control, request.id))
            except InvalidArgument as error:
                raise InvalidArgument(f"jobs[{index}]: {error}") from None
        stored = await self._store_submissions(queue, submissions)
        # As if submitted one by one: the last job of a namespace is the one that replaces the others.
        last = {submission.namespace: index for index, submission in enumerate(submissions)}
        for index, ((job, queued), submission) in enumerate(zip(stored, submissions, strict=True)):
            await self._submitted(job, queued, submission, requests[index].control, last[submission.namespace] == index)
        await self._announce(queue, [job for job, queued in stored if queued])
        return [_shown(job) for job, _ in stored]

    async def _announce(self, queue: str, queued: Sequence[jobs_pb2.Job]) -> None:
        """Tell the watchers of each job `queued` and the queue's workers (one notice for all), at once:
        published together, they go out together (one NOTIFY statement on PostgreSQL, not one each)."""
        if queued:
            await asyncio.gather(
                *(self.publish_job(job) for job in queued),
                self.bus.publish(topics.queue(queue), topics.work_notice(len(queued))),
            )

    async def _store_submissions(
        self, queue: str, submissions: Sequence[Submission]
    ) -> list[tuple[jobs_pb2.Job, bool]]:
        """The submissions stored (`StateStore.submit`) if the queue has room for what they add, else
        TooLarge: queued jobs (`--max-queued-jobs`) and bytes of definitions (`--max-queue-bytes`).

        The store checks the limits inside the submission (see `StateStore.submit`): on SQLite exactly,
        however many submissions race for a queue's last places; on PostgreSQL submissions committing
        at the same moment may pass them by what they add at once. Only what grows counts: a
        resubmission of a job the queue holds queued adds no job, and one of a run it holds (queued,
        running or finished) no bytes, so it is answered even by a full queue."""
        room = Room(self.settings.max_queued_jobs, self.settings.max_queue_bytes)
        try:
            return await self.store.submit(queue=queue, jobs=submissions, now=self.clock(), room=room)
        except QueueFull as full:
            if full.jobs:
                raise TooLarge(
                    f"queue {queue!r} holds {full.queued:,} queued jobs, the limit is {room.max_jobs:,}"
                    " (max-queued-jobs): wait for workers to take some, or cancel some"
                ) from None
            raise TooLarge(
                f"queue {queue!r} holds {full.held:,} bytes of job definitions, the limit is {room.max_bytes:,}"
                " (max-queue-bytes): put large inputs in files (by key) instead of inline"
            ) from None

    async def expire_queued(self) -> int:
        """End the jobs that waited in their queues past `--queued-ttl` as expired (their finished
        webhooks fire; watchers are told); returns how many."""
        ttl = self.settings.queued_ttl
        if not ttl:
            return 0
        count, now = 0, self.clock()
        while ended := await self.store.expire_queued(now - ttl, EXPIRE_BATCH, format_duration(ttl), now):
            count += len(ended)
            for job in ended:
                await self.publish_job(job)
        if count:
            log.info("expired %d job(s) queued longer than %s", count, format_duration(ttl))
        return count

    def _checked(
        self, definition: definition_pb2.JobDefinition, control: definition_pb2.JobControl, claimed_id: str
    ) -> Submission:
        """The submission, once the definition, callbacks and claimed id hold."""
        try:
            validate(definition)
        except DefinitionError as error:
            raise InvalidArgument(f"invalid definition: {error}") from None
        for callback in (control.callbacks.queued, control.callbacks.finished):
            if callback.url and not callback.url.startswith(("http://", "https://")):
                raise InvalidArgument(f"callback url {callback.url!r} must start with http:// or https://")
        new_id = job_id(definition)
        if claimed_id and claimed_id != new_id:
            raise InvalidArgument(f"id {claimed_id!r} does not match the definition, whose id is {new_id}")
        namespace = control.namespace if control.HasField("namespace") and control.namespace else DEFAULT_NAMESPACE
        return Submission(new_id, definition, namespace)

    async def _submitted(
        self,
        job: jobs_pb2.Job,
        queued: bool,
        submission: Submission,
        control: definition_pb2.JobControl,
        replaces: bool,
    ) -> None:
        """After a job is stored: its webhooks added, and (`replaces`) the other jobs of its namespace on
        the queue cancelled (`_announce` then tells its watchers and the queue's workers)."""
        if queued:
            log.debug("job %s queued on %r", job.id, job.queue)
        await self._add_webhooks(job, submission.namespace, control, queued)
        if replaces and submission.namespace != DEFAULT_NAMESPACE:
            for replaced in await self.store.replace_in_namespace(
                queue=job.queue, namespace=submission.namespace, keep=job.id, now=self.clock()
            ):
                await self._after_end(replaced, f"replaced by job {job.id}")

    async def _add_webhooks(
        self, job: jobs_pb2.Job, namespace: str, control: definition_pb2.JobControl, queued: bool
    ) -> None:
        """`queued` fires when this submission (re)queued the job; `finished` whenever the job finishes
        (at once when it already has: a cached result)."""
        callbacks = control.callbacks
        for event, callback, armed in (
            (QUEUED_HOOK, callbacks.queued, True),
            (FINISHED_HOOK, callbacks.finished, False),
        ):
            if callback.url and (queued or event == FINISHED_HOOK):
                body = webhooks.body(job.id, job.queue, namespace, callback)
                hook = Webhook(job.id, job.queue, event, callback.url, body)
                await self.store.add_webhook(hook, armed=armed, now=self.clock())

    async def get_job(self, job_id: str, queue: str = "") -> jobs_pb2.Job:
        """The job's run in `queue` (without one: the run an id-only read shows, see
        `StateStore.get_job`), with a waiting reason while queued; NotFound if unknown. Adapters show
        an id-only read through `job_url_view`."""
        job = await self.store.get_job(job_id, queue=queue)
        if job is None:
            where = f" in queue {queue!r}" if queue else ""
            raise NotFound(f"job {job_id} not found{where}")
        if job.state == jobs_pb2.JOB_STATE_QUEUED:
            job.waiting_reason = await self.waiting_reason(job, job.definition.requirements.gpus)
        return _shown(job)

    async def waiting_reason(self, job: jobs_pb2.Job, needs: int) -> str:
        """Why a queued job (needing `needs` GPU devices) is not running yet, in words a person can act on
        (from one store read: the queue's capacity and the job's place together)."""
        capacity, position = await self.store.waiting(job.queue, job.id, seen_since=self._live_since())
        if not capacity.workers:
            return f"no worker is connected to queue {job.queue!r}; start one with `jobwire worker {job.queue}`"
        if needs > capacity.most_gpus:
            most = capacity.most_gpus
            return (
                f"needs {needs} GPU(s) but no worker on {job.queue!r} has that many (the most is {most});"
                f" start one with `jobwire worker {job.queue} --gpus {needs}`"
            )
        ahead = f"{position:,}+" if position >= POSITION_LIMIT else str(position)
        if needs:
            return f"needs {needs} GPU(s): waiting for a worker with that many free; {ahead} job(s) ahead"
        if capacity.busy >= capacity.slots:
            workers, slots = capacity.workers, capacity.slots
            return f"all {slots} slots of the {workers} worker(s) on {job.queue!r} are busy; {ahead} job(s) ahead"
        return f"waiting for a worker to take it; {ahead} job(s) ahead"

    async def list_jobs(self, queue: str, *, state: int, after: str, limit: int) -> tuple[list[jobs_pb2.Job], str]:
        """A page of the queue's jobs after cursor `after` ('' first): live ones in queue order, then
        the most recently finished; and the next cursor ('': the last page)."""
        try:
            return await self.store.list_jobs(queue, state=state, after=after, limit=limit)
        except ValueError:
            raise InvalidArgument("invalid page_token; pass the next_page_token of the previous page") from None

    async def queue_status(self, queue: str) -> jobs_pb2.GetQueueStatusResponse:
        """The queue's jobs counted by state, and its live workers."""
        counts = await self.store.queue_counts(queue)
        return jobs_pb2.GetQueueStatusResponse(
            queue=queue,
            queued=counts.get(jobs_pb2.JOB_STATE_QUEUED, 0),
            running=counts.get(jobs_pb2.JOB_STATE_RUNNING, 0),
            finished=counts.get(jobs_pb2.JOB_STATE_FINISHED, 0),
            workers=await self.live_workers(queue),
        )

    async def queue_metrics(self, queue: str) -> str:
        """The queue's Prometheus text."""
        counts = await self.store.queue_counts(queue)
        return queue_metrics(queue, counts, await self.live_workers(queue), self.metrics)

    async def live_workers(self, queue: str) -> list[jobs_pb2.WorkerInfo]:
        """Workers of the queue heard from within a lease."""
        return await self.store.list_workers(queue, seen_since=self._live_since())

    async def worker_seen(self, info: jobs_pb2.WorkerInfo, *, queue: str, session: str) -> None:
        """Record a connected worker's registration or heartbeat."""
        await self.store.upsert_worker(info, queue=queue, session=session)

    async def worker_gone(self, worker_id: str, *, session: str) -> None:
        """The worker's stream `session` ended: forget it unless a newer stream replaced it (its jobs
        keep their leases until they expire)."""
        await self.store.remove_worker(worker_id, session=session)

    async def gpus_needed(self, queue: str, job_id: str) -> int:
        """GPU devices the job's run in `queue` needs (0 for a run the store no longer has)."""
        job = await self.store.get_job(job_id, queue=queue)
        return job.definition.requirements.gpus if job is not None else 0

    def worker_messages(self, worker_id: str) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """What the scheduler sends the worker (cancels), from any replica."""
        return self.bus.subscribe(topics.worker(worker_id))

    def _live_since(self) -> float:
        """Workers heard from since then are live: within a lease."""
        return self.clock() - self.settings.lease_seconds

    async def cancel(self, queue: str, job_id: str, namespace: str) -> jobs_pb2.Job:
        """Cancel for one namespace (`*`: all); the container is stopped when none is left."""
        _need_queue(queue, f"cancelling needs the job's queue: POST /q/{{queue}}/j/{job_id}/cancel")
        cancelled = await self.store.cancel(
            queue=queue, job_id=job_id, namespace=namespace or DEFAULT_NAMESPACE, now=self.clock()
        )
        if cancelled is None:
            raise NotFound(f"job {job_id} not found in queue {queue!r}")
        await self._after_end(cancelled, "cancelled by a client")
        return _shown(cancelled.job)

    async def delete(self, queue: str, job_id: str) -> jobs_pb2.Job:
        """Delete the job's run in `queue` and its cached result; a running container is stopped.
        A job id alone deletes nothing: it names no queue's run."""
        _need_queue(queue, f"deleting needs the job's queue: DELETE /q/{{queue}}/j/{job_id}")
        deleted = await self.store.delete(queue=queue, job_id=job_id, now=self.clock())
        if deleted is None:
            raise NotFound(f"job {job_id} not found in queue {queue!r}")
        await self._after_end(deleted, "deleted by a client")
        return _shown(deleted.job)

    async def _after_end(self, ended: Cancelled, reason: str) -> None:
        await self.publish_job(ended.job)
        if ended.stop is not None:
            stop = workers_pb2.JobCancel(job_id=ended.stop.job_id, attempt=ended.stop.attempt, reason=reason)
            message = workers_pb2.ConnectResponse(cancel=stop)
            await self.bus.publish(topics.worker(ended.worker_id), message.SerializeToString())

    async def copy(self, job_id: str, source: str, queue: str, control: definition_pb2.JobControl) -> jobs_pb2.Job:
        """Submit the definition of the job's run in queue `source` to `queue` (a run of its own there)."""
        _need_queue(source, f"copying needs the job's queue: POST /q/{{queue}}/j/{job_id}/copy")
        job = await self.store.get_job(job_id, queue=source)
        if job is None:
            raise NotFound(f"job {job_id} not found in queue {source!r}")
        return await self.submit(queue, job.definition, control)

    async def claim(self, queue: str, holder: Holder, gpus: int, count: int) -> list[jobs_pb2.Job]:
        """Assign up to `count` of the queue's oldest waiting jobs that fit in `gpus` devices to the worker."""
        lease = self.settings.lease_seconds
        jobs = await self.store.claim(queue=queue, holder=holder, now=self.clock(), lease=lease, gpus=gpus, count=count)
        for job in jobs:
            log.debug("job %s assigned to %s (attempt %d)", job.id, holder.worker_id, job.attempt)
        await asyncio.gather(*(self.publish_job(job) for job in jobs))  # together: one NOTIFY for all
        return jobs

    async def started(self, attempt: Attempt, holder: Holder) -> bool:
        """The attempt's container started; False if stale."""
        job = await self.store.start(attempt, holder, self.clock())
        if job is not None:
            await self.publish_job(job)
        return job is not None

    async def finished(
        self, attempt: Attempt, holder: Holder, result: jobs_pb2.JobResult, *, started: bool = False
    ) -> jobs_pb2.Job | None:
        """Record the attempt's result (and its container's start first, when `started`); None (logged)
        if the attempt is stale."""
        result.attempt = attempt.attempt
        self._bound_outputs(result)
        job = await self.store.finish(attempt, holder, result, self.clock(), started=started)
        if job is None:
            log.warning("rejected result of stale attempt %d of job %s", attempt.attempt, attempt.job_id)
            return None
        # Each success at DEBUG, like queued and assigned (a busy server finishes thousands a second);
        # other endings at INFO, where an operator looks.
        level = logging.DEBUG if job.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "job %s finished: %s", job.id, jobs_pb2.FinishReason.Name(job.finish_reason))
        self.metrics.finished(job)
        await self.publish_job(job)
        return job

    def _bound_outputs(self, result: jobs_pb2.JobResult) -> None:
        """A result listing more outputs than the server's limits (which workers learn at registration
        and obey; one that did not) becomes an error naming the limit: stored as sent, every route
        would have to serve it (at 100,000 outputs the REST routes answered 500)."""
        count, size = len(result.outputs), sum(len(name) + ref.ByteSize() for name, ref in result.outputs.items())
        if count > self.settings.max_outputs:
            message = f"too many outputs: more than {self.settings.max_outputs} files (the server's limit, max-outputs)"
        elif size > MAX_RESULT_OUTPUTS:
            message = (
                f"outputs too big for a result: their names and references pass {MAX_RESULT_OUTPUTS // 1024**2} MiB"
            )
        else:
            return
        result.outputs.clear()
        result.reason, result.message = jobs_pb2.FINISH_REASON_ERROR, message

    async def release(self, attempt: Attempt, holder: Holder, reason: str) -> bool:
        """The worker gave the attempt back unfinished: re-queue the job now; False if stale."""
        job = await self.store.release(attempt, holder, reason, self.clock())
        if job is not None:
            await self._requeued([(job, attempt)])
        return job is not None

    async def renew(self, holder: Holder, attempts: Sequence[Attempt]) -> list[Attempt]:
        """Extend the worker's leases; returns its stale attempts."""
        now = self.clock()
        return await self.store.renew(holder, attempts, now + self.settings.lease_seconds, now)

    async def reconnect(self, holder: Holder, held: Sequence[Attempt]) -> list[Attempt]:
        """A worker registered holding `held`: take those into its new session and renew them, re-queue
        its other jobs; returns the stale ones."""
        now = self.clock()
        stale = await self.store.retake(holder, held, now + self.settings.lease_seconds, now)
        kept = [attempt for attempt in held if attempt not in stale]
        lost = await self.store.requeue_worker(holder.worker_id, kept, now, queue=holder.queue)
        await self._requeued(lost)
        return stale

    async def reap(self) -> None:
        """Re-queue jobs whose worker went silent past its lease, the grace period (run forever).

        Running jobs first get a whole new lease: while this server was down their workers could not
        renew, and they deserve the grace period to reconnect."""
        await self.store.extend_leases(self.clock() + self.settings.lease_seconds)
        while True:
            await self._requeued(await self.store.requeue_expired(self.clock()))
            await asyncio.sleep(self.settings.reap_interval_seconds)

    async def _requeued(self, lost: Sequence[tuple[jobs_pb2.Job, Attempt]]) -> None:
        for job, attempt in lost:
            log.warning("job %s: attempt %d lost its worker; re-queued", job.id, attempt.attempt)
            await self.publish_job(job)
            await self.bus.publish(topics.queue(job.queue), topics.work_notice(1))

    async def publish_job(self, job: jobs_pb2.Job) -> None:
        """Tell watchers of the job's run the new state (without definition, result logs and history)."""
        message = jobs_pb2.WatchJobResponse(job=job_summary(job))
        await self.bus.publish(topics.job(job.queue, job.id), message.SerializeToString())


def _shown(job: jobs_pb2.Job) -> jobs_pb2.Job:
    """The job as adapters may show it: its definition without credentials."""
    if job.HasField("definition"):
        job.definition.CopyFrom(shown(job.definition))
    return job


def _need_queue(queue: str, words: str) -> None:
    """Refuse an id-only request that would change a run: a job id names no queue's run."""
    if not queue:
        raise InvalidArgument(words)
    check_queue(queue)


def check_queue(queue: str) -> None:
    """Reject an empty, overlong or path-like queue name."""
    if not queue or len(queue) > _QUEUE_NAME_MAX or "/" in queue or "\0" in queue:
        raise InvalidArgument(f"invalid queue name {queue!r} (1-{_QUEUE_NAME_MAX} characters, no '/')")
