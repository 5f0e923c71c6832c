"""What every chaos scenario shares: its processes, the container record from dockerd, the jobs, the row.

A scenario gets a `Run` (its own queue, scratch folder and processes), starts a server and workers,
submits jobs, injects its fault, and returns a `Row` built by `Run.row`: finish reasons from the
server, containers per job and concurrent duplicates from dockerd's events, containers left behind
from dockerd once the run settled, and the guarantees the scenario asserts, each broken one a
`failures` entry (printed as FAIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.protobuf import json_format

from bench.stack import BUSYBOX, JOBWIRE, Service, spawn, wait_ready
from jobwire import Client
from jobwire.cli.services import free_port
from jobwire.v1 import definition_pb2, jobs_pb2

QUEUE_LABEL = "io.jobwire.queue"
JOB_LABEL = "io.jobwire.job"
WORKER_LABEL = "io.jobwire.worker"
KILL_BOUND = 5.0
"""Seconds within which a cancel or a time limit must have stopped its container."""


def reason_name(reason: int) -> str:
    name: str = jobs_pb2.FinishReason.Name(reason)
    return name.removeprefix("FINISH_REASON_").lower().replace("_", " ")


@dataclass
class Container:
    """One container of a job, as dockerd reported it (times in seconds since the epoch)."""

    id: str
    job: str
    worker: str = ""
    created: float = 0.0
    started: float | None = None
    died: float | None = None
    exit_code: str = ""


class Containers:
    """dockerd's container events for one queue (`docker events --filter label=…`), kept as they come."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.by_id: dict[str, Container] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._since = 0.0

    def _args(self) -> list[str]:
        return [
            "docker",
            "events",
            "--format",
            "{{json .}}",
            "--filter",
            "type=container",
            "--filter",
            f"label={QUEUE_LABEL}={self.queue}",
        ]

    async def start(self) -> None:
        """Follow the events live (scenarios wait on them); `stop` reads them again up to its moment."""
        self._since = time.time()
        self._process = await asyncio.create_subprocess_exec(
            *self._args(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for line in self._process.stdout:
            with contextlib.suppress(ValueError, KeyError):
                self._take(json.loads(line))

    def _take(self, event: dict[str, object]) -> None:
        actor = event["Actor"]
        assert isinstance(actor, dict)
        attributes = actor.get("Attributes", {})
        at = int(str(event["timeNano"])) / 1e9
        container = self.by_id.setdefault(
            str(actor["ID"]),
            Container(str(actor["ID"]), attributes.get(JOB_LABEL, ""), attributes.get(WORKER_LABEL, "")),
        )
        action = str(event["Action"])
        if action == "create":
            container.created = at
        elif action == "start":
            container.started = at
        elif action == "die":
            container.died = at
            container.exit_code = attributes.get("exitCode", "")

    async def stop(self) -> None:
        """Stop following; then replay every event from the start to now (`--until` ends the stream), so
        that what the live stream had not delivered yet is counted too."""
        if self._process is None or self._process.returncode is not None:
            return
        self._process.kill()
        await self._process.wait()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
        replay = await asyncio.create_subprocess_exec(
            *self._args(),
            "--since",
            f"{self._since - 1:.3f}",
            "--until",
            f"{time.time():.3f}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await replay.communicate()
        for line in out.splitlines():
            with contextlib.suppress(ValueError, KeyError):
                self._take(json.loads(line))

    def of(self, job_id: str) -> list[Container]:
        return [c for c in self.by_id.values() if c.job == job_id]

    def concurrent_duplicates(self) -> int:
        """Jobs of which two containers ran at the same time (start..die overlapping)."""
        now = time.time()
        jobs: dict[str, list[tuple[float, float]]] = {}
        for c in self.by_id.values():
            if c.started is not None:
                jobs.setdefault(c.job, []).append((c.started, c.died if c.died is not None else now))
        count = 0
        for spans in jobs.values():
            spans.sort()
            if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)):
                count += 1
        return count

    def rerun_after(self, worker_id: str, moment: float) -> float | None:
        """Seconds from `moment` (the worker's death) until each job it ran had started again elsewhere."""
        orphans = {c.job for c in self.by_id.values() if c.worker == worker_id and c.started and c.started < moment}
        restarts = []
        for job in orphans:
            later = [c.started for c in self.of(job) if c.worker != worker_id and c.started and c.started > moment]
            if not later:
                return None
            restarts.append(min(later) - moment)
        return max(restarts, default=None)

    def died_after(self, job_id: str, moment: float) -> float | None:
        """Seconds from `moment` until the job's last running container died; 0 if none ran; None if one runs."""
        spans = [c for c in self.of(job_id) if c.started is not None]
        if not spans:
            return 0.0
        if any(c.died is None for c in spans):
            return None
        return max(0.0, max(c.died for c in spans if c.died is not None) - moment)


async def docker_lines(*args: str) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    return out.decode().split()


async def left_behind(queue: str) -> list[str]:
    return await docker_lines("ps", "-aq", "--filter", f"label={QUEUE_LABEL}={queue}")


@dataclass
class Row:
    """One scenario's line of the table."""

    scenario: str
    jobs: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    containers_max: int = 0
    containers_left: int = 0
    duplicates: int = 0
    kill_max: float | None = None
    recover: float | None = None
    failures: list[str] = field(default_factory=list)
    notes: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Run:
    """One scenario's queue, folder, processes and measurements; `close` kills and removes what is left."""

    directory: Path
    quick: bool
    queue: str = field(default_factory=lambda: f"chaos-{uuid.uuid4().hex}")
    containers: Containers = field(init=False)
    clients: list[Client] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.containers = Containers(self.queue)

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)

    async def server(self, *, port: int = 0, name: str = "server", extra: Iterable[str] = ()) -> Server:
        port = port or free_port()
        data = self.directory / name
        data.mkdir(exist_ok=True)
        args = [JOBWIRE, "server", "--host", "127.0.0.1", "--port", str(port), "--data-directory", str(data)]
        server = Server([*args, *extra], data / "server.log", f"127.0.0.1:{port}", data)
        await server.start()
        self.servers.append(server)
        return server

    async def worker(
        self, target: str, *, cpus: int = 2, worker_id: str = "", extra: Iterable[str] = (), data: Path | None = None
    ) -> Worker:
        worker_id = worker_id or f"chaos-w-{uuid.uuid4().hex[:8]}"
        data = data or self.directory / worker_id
        data.mkdir(exist_ok=True)
        args = [JOBWIRE, "worker", self.queue, "--server", target, "--cpus", str(cpus), "--id", worker_id]
        worker = Worker([*args, "--data-directory", str(data), *extra], data / "worker.log", worker_id)
        await worker.start()
        self.workers.append(worker)
        return worker

    def client(self, target: str) -> Client:
        client = Client(target, timeout=30)
        self.clients.append(client)
        return client

    async def wait_workers(self, client: Client, count: int, timeout: float = 60) -> None:
        async def registered() -> bool:
            with contextlib.suppress(Exception):
                return len((await client.queue_status(self.queue)).workers) >= count
            return False

        await until(registered, timeout, f"{count} worker(s) on the queue")

    async def submit(self, client: Client, command: str, **fields: object) -> str:
        definition = json_format.ParseDict(
            {"image": BUSYBOX, "command": command, **fields}, definition_pb2.JobDefinition()
        )
        job_id: str = (await client.submit(self.queue, definition)).id
        return job_id

    async def states(self, client: Client, ids: Iterable[str]) -> dict[str, jobs_pb2.Job]:
        found: dict[str, jobs_pb2.Job] = {}
        for job_id in ids:
            with contextlib.suppress(Exception):
                found[job_id] = await client.job(job_id, self.queue).get()
        return found

    async def wait_finished(self, client: Client, ids: list[str], timeout: float) -> dict[str, jobs_pb2.Job]:
        """Until every job finished or `timeout` passed; the jobs as the server has them (the unfinished too)."""
        deadline = time.monotonic() + timeout
        jobs: dict[str, jobs_pb2.Job] = {}
        while time.monotonic() < deadline:
            jobs = await self.states(client, ids)
            if len(jobs) == len(ids) and all(j.state == jobs_pb2.JOB_STATE_FINISHED for j in jobs.values()):
                return jobs
            await asyncio.sleep(0.5)
        return jobs

    async def settle(self, timeout: float) -> list[str]:
        """Wait up to `timeout` for the queue's containers to be gone; the ids of those still there."""
        deadline = time.monotonic() + timeout
        while (left := await left_behind(self.queue)) and time.monotonic() < deadline:  # noqa: ASYNC110 - dockerd asked
            await asyncio.sleep(0.5)
        return left

    async def row(
        self,
        name: str,
        ids: list[str],
        jobs: dict[str, jobs_pb2.Job],
        *,
        expect: set[str],
        settle: float = 20,
        kill_max: float | None = None,
        recover: float | None = None,
        notes: str = "",
    ) -> Row:
        """The table's row: counts from `jobs` (the server) and dockerd; FAIL for each broken guarantee."""
        left = await self.settle(settle)
        await self.containers.stop()
        row = Row(name, jobs=len(ids), kill_max=kill_max, recover=recover, notes=notes)
        for job_id in ids:
            job = jobs.get(job_id)
            if job is None or job.state != jobs_pb2.JOB_STATE_FINISHED:
                row.lost += 1
                continue
            reason = reason_name(job.finish_reason)
            row.finished[reason] = row.finished.get(reason, 0) + 1
        row.containers_max = max((len(self.containers.of(j)) for j in ids), default=0)
        row.containers_left = len(left)
        row.duplicates = self.containers.concurrent_duplicates()
        if row.lost:
            row.failures.append(f"{row.lost} lost (not finished)")
        if unexpected := {r: n for r, n in row.finished.items() if r not in expect}:
            messages = {
                job.result.message[:200]
                for job in jobs.values()
                if job.state == jobs_pb2.JOB_STATE_FINISHED and reason_name(job.finish_reason) not in expect
            }
            row.failures.append(f"finished {unexpected}, expected only {sorted(expect)}: {' | '.join(messages)}")
        if row.duplicates:
            row.failures.append(f"{row.duplicates} job(s) ran twice at once")
        if row.containers_left:
            states = await docker_lines("inspect", "--format", "{{.State.Status}}", *left)
            counted = {state: states.count(state) for state in sorted(set(states))}
            row.failures.append(f"{row.containers_left} container(s) left after {settle:.0f} s {counted}")
        if kill_max is not None and not kill_max <= KILL_BOUND:
            row.failures.append(f"a kill took {kill_max:.1f} s (bound {KILL_BOUND:.0f} s)")
        return row

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        for process in [*self.workers, *self.servers]:
            await process.kill()
        await self.containers.stop()
        if ids := await left_behind(self.queue):
            await docker_lines("rm", "-f", *ids)


@dataclass
class Process:
    """A `jobwire` subprocess that can be killed (-9), terminated and started again with the same arguments."""

    args: list[str]
    log: Path
    service: Service = field(init=False)

    async def start(self) -> None:
        self.service = await spawn(self.args, self.log)

    async def kill(self) -> None:
        if self.service.process.returncode is None:
            self.service.process.kill()
            await self.service.process.wait()

    async def terminate(self, timeout: float = 120) -> int | None:
        if self.service.process.returncode is None:
            self.service.process.terminate()
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.service.process.wait(), timeout)
        return None

    @property
    def alive(self) -> bool:
        return self.service.process.returncode is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Server(Process):
    target: str = ""
    data: Path = Path()

    async def start(self) -> None:
        await super().start()
        await wait_ready(self.target, self.service)


@dataclass
class Worker(Process):
    worker_id: str = ""


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running(directory: Path, quick: bool) -> AsyncIterator[Run]:
    run = Run(directory, quick)
    directory.mkdir(parents=True, exist_ok=True)
    await run.containers.start()
    try:
        yield run
    finally:
        await run.close()


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def table(rows: list[Row]) -> str:
    """The markdown table: one line per scenario, FAIL beside each broken guarantee."""
    lines = [
        "| scenario | jobs | finished by reason | lost | containers per job (max / left) "
        "| concurrent duplicates | slowest kill | time to recover | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        failed = " ".join(row.failures)

        def mark(value: str, broken: bool) -> str:
            return f"{value} **FAIL**" if broken else value

        finished = ", ".join(f"{reason} {n}" for reason, n in sorted(row.finished.items())) or "-"
        kill_broken = row.kill_max is not None and not row.kill_max <= KILL_BOUND
        lines.append(
            f"| {row.scenario} | {row.jobs} | {mark(finished, 'expected only' in failed)} "
            f"| {mark(str(row.lost), row.lost > 0)} "
            f"| {row.containers_max} / {mark(str(row.containers_left), row.containers_left > 0)} "
            f"| {mark(str(row.duplicates), row.duplicates > 0)} | {mark(_seconds(row.kill_max), kill_broken)} "
            f"| {_seconds(row.recover)} | {'ok' if row.ok else 'FAIL'} |"
        )
    return "\n".join(lines)


def write(rows: list[Row], info: dict[str, object], directory: Path) -> Path:
    """bench/results/chaos.json (raw) and chaos.md (the table, the machine line, each failure spelled out)."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = {"machine": info, "rows": [asdict(r) | {"ok": r.ok} for r in rows]}
    (directory / "chaos.json").write_text(json.dumps(raw, indent=2) + "\n")
    header = f"Machine: {info['cores']} cores, {info['cpu']}, load {info['load_average']} at {info['time']}\n\n"
    details = (
        "".join(f"\n- {row.scenario}: {'; '.join(row.failures)}" for row in rows if row.failures)
        or "\n- every guarantee held"
    )
    notes = "".join(f"\n- {row.scenario}: {row.notes}" for row in rows if row.notes)
    markdown = directory / "chaos.md"
    markdown.write_text(header + table(rows) + "\n\nFailures:\n" + details + "\n\nNotes:\n" + notes + "\n")
    return markdown
