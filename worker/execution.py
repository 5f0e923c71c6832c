"""One attempt of a job on this worker: inputs, image, container, logs, outputs, result."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from jobwire.core.command import split_command
from jobwire.core.definition import has_build
from jobwire.core.units import format_duration, parse_duration, parse_size, timestamp
from jobwire.v1 import jobs_pb2, workers_pb2
from jobwire.worker.builds import Builder
from jobwire.worker.errors import JobError, StagingError
from jobwire.worker.job_logs import JobLog, Send
from jobwire.worker.runtime import (
    LABEL,
    STDOUT,
    ContainerRuntime,
    ContainerSpec,
    Outcome,
    resume_container,
    run_container,
)
from jobwire.worker.settings import WorkerSettings
from jobwire.worker.staging import OutputLimits, Staging

_ASSIGNMENT = "assignment.binpb"
log = logging.getLogger(__name__)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_SMALL_FOLDER_OUTPUTS = 64
"""Most outputs a folder removed on the loop may hold (see `Execution._remove_folder`)."""
_START_LINGER = 0.01
"""Seconds the report that a container started is held back: a container that ends meanwhile has its
start reported with its result, one message instead of two (see `Execution._started`)."""
JOB_LABEL, ATTEMPT_LABEL, WORKER_LABEL = f"{LABEL}.job", f"{LABEL}.attempt", f"{LABEL}.worker"
QUEUE_LABEL = f"{LABEL}.queue"
GPUS_LABEL = f"{LABEL}.gpus"
DEADLINE_LABEL = f"{LABEL}.deadline"
"""When the attempt's time limit ends, in whole seconds since the epoch: its container must be gone by then."""


class Execution:
    """Runs one assignment to its result; never raises for a job's own failures."""

    def __init__(
        self,
        assignment: workers_pb2.JobAssignment,
        settings: WorkerSettings,
        worker_id: str,
        runtime: ContainerRuntime,
        staging: Staging,
        send: Send,
        server: Callable[[], Awaitable[workers_pb2.WorkerRegistered]],
    ) -> None:
        """`server` answers what the server said at registration (its URL, the limits to obey),
        once it has said it."""
        self.assignment, self.settings, self.worker_id = assignment, settings, worker_id
        self.runtime, self.staging, self.send, self.server = runtime, staging, send, server
        self.job_id, self.attempt = assignment.job_id, assignment.attempt
        self.directory = settings.data_directory / "jobs" / f"{self.job_id}-{self.attempt}"
        self.logs = {
            kind: JobLog(self.job_id, self.attempt, kind, send)
            for kind in (jobs_pb2.LOG_KIND_RUN, jobs_pb2.LOG_KIND_BUILD)
        }
        self.gpu_devices: list[str] = []  # set by the daemon from its GpuPool
        self.refusal = ""  # why this worker cannot run the job at all, if it cannot
        self.small_folder = False  # see _remove_folder
        self._start: workers_pb2.JobStarted | None = None  # the started report, while held back
        self._start_timer: asyncio.TimerHandle | None = None
        self._start_sent: asyncio.Future[None] | None = None  # its sending, once the linger ran out

    async def run(self) -> jobs_pb2.JobResult:
        """Stage, pull, run and collect; the result says what happened."""
        try:
            return await self._run()
        except JobError as error:
            await self._build_log(f"error: {error}\n")
            return self._error(str(error))
        except OSError as error:
            if error.errno not in _DISK_FULL:
                raise
            # The worker's own disk (its data directory): the job cannot run here now; its folder goes
            # below, and the next job finds the space it freed.
            message = f"the worker's disk is full ({self.settings.data_directory}): {error.strerror}"
            with contextlib.suppress(OSError):
                await self._build_log(f"error: {message}\n")
            return self._error(message)
        finally:
            await self._remove_folder()

    def rereads(self) -> None:
        """This attempt's container is to be followed again from its first output (the worker
        restarted): its run log waits for the server's cursor to learn how much of it to skip."""
        self.logs[jobs_pb2.LOG_KIND_RUN].placed.clear()

    async def resume(self, container_id: str) -> jobs_pb2.JobResult:
        """Follow this attempt's container, started before the worker restarted, to its result."""
        try:
            limit = self.time_limit()
            outcome = await resume_container(self.runtime, container_id, limit, self._on_output, self._started)
            return await self._result(outcome, self.time_limit())
        except JobError as error:
            return self._error(str(error))
        finally:
            await self._remove_folder()

    @classmethod
    def saved_assignment(cls, settings: WorkerSettings, job_id: str, attempt: int) -> workers_pb2.JobAssignment | None:
        """The assignment an earlier run of this worker saved for the attempt, if it is still there."""
        path = settings.data_directory / "jobs" / f"{job_id}-{attempt}" / _ASSIGNMENT
        try:
            return workers_pb2.JobAssignment.FromString(path.read_bytes())
        except (OSError, DecodeError):
            return None

    async def _run(self) -> jobs_pb2.JobResult:
        if self.refusal:
            raise StagingError(self.refusal)
        definition = self.assignment.definition
        inputs, outputs = self.directory / "inputs", self.directory / "outputs"
        self._make_folder(inputs, outputs)
        binds = await self.staging.write_inputs(definition, inputs, self.directory / "config")
        loop = asyncio.get_running_loop()

        built: list[str] = []  # lines of a build or a pull, if there was one

        def build_log(line: str) -> None:
            built.append(line)
            loop.call_soon_threadsafe(self.logs[jobs_pb2.LOG_KIND_BUILD].add, STDOUT, line.encode())

        deadline = loop.time() + self.time_limit()  # the build's time counts
        try:
            async with asyncio.timeout_at(deadline):
                image = await self._image(build_log)
        except TimeoutError:
            await self._build_log(f"timed out: stopped after its time limit of {format_duration(self.time_limit())}\n")
            return self._timed_out("while its image was built or pulled")
        if built:  # an image already there (most jobs) logs nothing: no loop turn for it
            await asyncio.sleep(0)  # let the last call_soon_threadsafe land
            await self.logs[jobs_pb2.LOG_KIND_BUILD].flush()
        # Read-only: its files are the worker's cached blobs (hard links), which no job may change.
        binds = [(str(inputs), "/inputs", True), (str(outputs), "/outputs", False), *binds]
        spec = self.container_spec(binds, image, (await self.server()).public_url)
        left_seconds = max(deadline - loop.time(), 0.1)
        # Its deadline on the container too: any worker on this machine removes it once past (see
        # `Daemon.remove_expired`), should this worker die and never return.
        labels = spec.labels | {DEADLINE_LABEL: str(math.ceil(time.time() + left_seconds))}
        left = dataclasses.replace(spec, timeout=left_seconds, labels=labels)
        if self.attempt > 1:
            await self._remove_earlier_attempts()
        outcome = await run_container(self.runtime, left, self._on_output, self._started)
        return await self._result(outcome, spec.timeout)

    async def _remove_earlier_attempts(self) -> None:
        """Remove this run's containers of earlier attempts on this machine: a worker that died holding
        one (and never came back) left it running, and the server, past the grace, gave the job to
        this attempt: the two must not run at once. (On another machine, its deadline bounds it.)"""
        run = {JOB_LABEL: self.job_id, QUEUE_LABEL: self.assignment.queue}
        for container in await self.runtime.ours(run):
            earlier = container.get(ATTEMPT_LABEL, "")
            if earlier.isdigit() and int(earlier) < self.attempt:
                log.info("removing attempt %s of job %s: its worker is gone", earlier, self.job_id)
                await self.runtime.remove(container["id"])

    async def _image(self, build_log: Callable[[str], None]) -> str:
        """The job's image: built (within the job's memory and CPUs, in the job network) or pulled."""
        definition = self.assignment.definition
        if not has_build(definition):
            await self.runtime.ensure_image(definition.image, build_log)
            return definition.image
        directory = self.settings.data_directory / "builds"
        limits = (self.memory(), self.nano_cpus(), self.settings.pids_limit, self.settings.job_network)
        builder = Builder(self.runtime, self.staging, directory, limits, self.settings.git_archive_base)
        return await builder.ensure_built(definition.build, build_log)

    def _make_folder(self, *folders: Path) -> None:
        """This attempt's folders, and its assignment beside them for a restarted worker to find.
        On the loop: a few small writes cost less there than a hop to a thread and back (see
        `_remove_folder`)."""
        os.makedirs(self.directory, exist_ok=True)
        for folder in folders:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
        with open(self.directory / _ASSIGNMENT, "wb") as saved:
            saved.write(self.assignment.SerializeToString())

    async def _result(self, outcome: Outcome, limit: float | None) -> jobs_pb2.JobResult:
        self.logs[jobs_pb2.LOG_KIND_RUN].end()
        await self.logs[jobs_pb2.LOG_KIND_RUN].flush()
        result = self._outcome(outcome, limit)
        outputs = await self.staging.collect_outputs(self.directory / "outputs", self._limits(await self.server()))
        for name, ref in outputs.items():
            result.outputs[name].CopyFrom(ref)
        definition = self.assignment.definition
        refs = [*definition.inputs.values(), *definition.config_files.values(), *outputs.values()]
        moved = any(ref.type in ("key", "url") for ref in refs)  # downloaded inputs, uploaded outputs
        self.small_folder = not moved and len(outputs) <= _SMALL_FOLDER_OUTPUTS
        return result

    def _limits(self, server: workers_pb2.WorkerRegistered) -> OutputLimits:
        """The worker's output limits, lowered by the server's (0 or less from the server: none of its own)."""
        count, size = self.settings.max_outputs, self.settings.max_output_size
        return OutputLimits(
            inline=server.inline_limit,
            count=min(count, server.max_outputs) if server.max_outputs > 0 else count,
            size=min(size, server.max_output_size) if server.max_output_size > 0 else size,
        )

    async def _remove_folder(self) -> None:
        """Remove this attempt's folder: on the loop when it is known to hold only what the definition
        carried and outputs small enough to be inlined, where a few unlinks cost far less than the hop
        to a thread (measured: ~0.2 ms of CPU per job, mostly the interpreter lock passed back and
        forth); in a thread when downloaded inputs or uploaded outputs may make it big, or its outputs
        were never collected."""
        if self.small_folder:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            await asyncio.to_thread(shutil.rmtree, self.directory, True)

    def container_spec(self, binds: list[tuple[str, str, bool]], image: str, public_url: str) -> ContainerSpec:
        """The container for this attempt, per the container contract (`public_url`: the server's)."""
        definition = self.assignment.definition
        env = dict(definition.env)
        prefix = f"{public_url.rstrip('/')}/j/{self.job_id}"
        env |= {
            "JOB_ID": self.job_id,
            "JOB_INPUTS": "/inputs",
            "JOB_OUTPUTS": "/outputs",
            "JOB_CACHE": "/job-cache",
            "JOB_URL_PREFIX": prefix,
            "JOB_INPUTS_URL_PREFIX": f"{prefix}/inputs/",
            "JOB_OUTPUTS_URL_PREFIX": f"{prefix}/outputs/",
        }
        if self.gpu_devices:  # the container sees its devices numbered from 0
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in range(len(self.gpu_devices)))
        return ContainerSpec(
            name=f"jobwire-{self.job_id[:12]}-{self.attempt}-{self.worker_id}",
            image=image,
            command=split_command(definition.command, definition.env) if definition.HasField("command") else None,
            entrypoint=(
                split_command(definition.entrypoint, definition.env) if definition.HasField("entrypoint") else None
            ),
            env=env,
            workdir=definition.workdir or None,
            binds=binds,
            labels={
                LABEL: "true",
                JOB_LABEL: self.job_id,
                ATTEMPT_LABEL: str(self.attempt),
                QUEUE_LABEL: self.assignment.queue,
                WORKER_LABEL: self.worker_id,
                GPUS_LABEL: ",".join(self.gpu_devices),
            },
            timeout=self.time_limit(),
            shm_size=parse_size(definition.shm_size) if definition.HasField("shm_size") else None,
            memory=self.memory(),
            pids_limit=self.settings.pids_limit,
            nano_cpus=self.nano_cpus(),
            gpu_devices=self.gpu_devices,
            capabilities=self.settings.capabilities,
            log_size=self.settings.container_log_size,
            disk_size=self.settings.disk_size,
            engine_runtime=self.settings.container_runtime,
            network=self.settings.job_network,
        )

    def memory(self) -> int:
        """The job's memory: its slot's share, or less if it asks for less."""
        requirements, share = self.assignment.definition.requirements, self.settings.job_memory_default()
        return min(parse_size(requirements.memory), share) if requirements.HasField("memory") else share

    def nano_cpus(self) -> int:
        """The job's CPUs (in billionths): its slot's share, or fewer if it asks for fewer."""
        requirements, share = self.assignment.definition.requirements, self.settings.job_cpus_default()
        return round((min(requirements.cpus, share) if requirements.HasField("cpus") else share) * 1e9)

    def time_limit(self) -> float:
        """The smallest of the definition's limits and the worker's `--max-job-duration`."""
        definition = self.assignment.definition
        limits = [self.settings.max_job_duration]
        if definition.HasField("max_duration"):
            limits.append(parse_duration(definition.max_duration))
        if definition.requirements.HasField("max_duration"):
            limits.append(parse_duration(definition.requirements.max_duration))
        return min(limits)

    async def _started(self) -> None:
        """Hold the started report back for `_START_LINGER` seconds: a container that ends meanwhile
        has its start reported with its result (`held_start`); its start time is now's either way.
        Logs need not wait for it: the server takes an attempt's logs from its assignment on."""
        started = workers_pb2.JobStarted(job_id=self.job_id, attempt=self.attempt, start_time=timestamp(time.time()))
        self._start = started
        self._start_timer = asyncio.get_running_loop().call_later(_START_LINGER, self._start_lingered)

    def _start_lingered(self) -> None:
        if (start := self.held_start()) is not None:
            self._start_sent = asyncio.ensure_future(self.send(workers_pb2.ConnectRequest(started=start)))

    def held_start(self) -> workers_pb2.JobStarted | None:
        """The started report, if it is still held back (it is then the caller's to send)."""
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        start, self._start = self._start, None
        return start

    async def report_started(self) -> None:
        """Send the started report now if it is held back; once it is on its way (however it left)."""
        if (start := self.held_start()) is not None:
            await self.send(workers_pb2.ConnectRequest(started=start))
        elif self._start_sent is not None:
            await self._start_sent

    async def _on_output(self, stream: jobs_pb2.LogStream.ValueType, data: bytes, stamp: str) -> None:
        await self.logs[jobs_pb2.LOG_KIND_RUN].placed.wait()
        self.logs[jobs_pb2.LOG_KIND_RUN].add(stream, data, stamp)
        await self.logs[jobs_pb2.LOG_KIND_RUN].soon()

    async def _build_log(self, text: str) -> None:
        self.logs[jobs_pb2.LOG_KIND_BUILD].add(STDOUT, text.encode())
        await self.logs[jobs_pb2.LOG_KIND_BUILD].flush()

    def _outcome(self, outcome: Outcome, limit: float | None) -> jobs_pb2.JobResult:
        result = jobs_pb2.JobResult(
            reason=jobs_pb2.FINISH_REASON_SUCCESS,
            exit_code=outcome.exit_code,
            start_time=timestamp(outcome.start_time),
            finish_time=timestamp(time.time()),
            oom_killed=outcome.oom_killed,
        )
        result.duration.FromNanoseconds(round((outcome.end_time - outcome.start_time) * 1e9))
        if outcome.timed_out:
            result.reason = jobs_pb2.FINISH_REASON_TIMED_OUT
            result.message = f"timed out: killed after its time limit of {format_duration(limit or 0)}"
        elif outcome.oom_killed:
            memory = self.assignment.definition.requirements.memory or "the worker's default"
            result.message = f"killed: out of memory (limit {memory}, exit code {outcome.exit_code})"
        elif outcome.exit_code != 0:
            result.message = f"the container exited with code {outcome.exit_code}"
        return result

    def _timed_out(self, when: str) -> jobs_pb2.JobResult:
        limit = format_duration(self.time_limit())
        return jobs_pb2.JobResult(
            reason=jobs_pb2.FINISH_REASON_TIMED_OUT,
            message=f"timed out {when}: stopped after its time limit of {limit}",
            finish_time=timestamp(time.time()),
        )

    def _error(self, message: str) -> jobs_pb2.JobResult:
        return jobs_pb2.JobResult(
            reason=jobs_pb2.FINISH_REASON_ERROR, message=message, finish_time=timestamp(time.time())
        )
