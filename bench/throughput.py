"""Figure 2, control-plane throughput: jobs/s through one server and simulated workers, vs arq and Celery on Redis.

"batches": jobwire sends `in_flight` jobs per SubmitJobs call and Celery a group of as many per
publish, one call after another; arq, which has no call for many jobs, keeps `in_flight`
enqueues going at once. "one by one": each job is submitted after the last one's answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import peers
from bench.fake_runtime import FakeRuntime
from bench.redis import private_redis
from bench.runner import Context, Measurement, until
from bench.stack import Service, Stack, cpu_seconds, machine_busy_seconds, running_stack, spawn, unique
from jobwire import Client
from jobwire.v1 import definition_pb2, jobs_pb2
from jobwire.worker.daemon import Daemon
from jobwire.worker.settings import WorkerSettings

MODES = ("batches", "one by one")
UNARY = "one by one, SubmitJob calls"
"""jobwire only: one by one as a unary call each instead of the SDK's submission stream."""
GOAL = "≥ 1,000 and > 1"
Submit = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class Rate:
    """How fast one mode went, and what it cost: the CPU time of every process on the machine (server,
    workers, client, Redis: whatever ran) per job. On a machine of C cores the rate cannot pass
    C / that cost, so the cost is what bounds a system that keeps the cores busy."""

    jobs_per_second: float
    cpu_ms_per_job: float

    def __str__(self) -> str:
        return f"{self.jobs_per_second:.0f} jobs/s, {self.cpu_ms_per_job:.2f} CPU ms per job (all processes)"


FIGURE = "2 control plane"


async def run(ctx: Context) -> list[Measurement]:
    ours, floor = await _jobwire(ctx)
    async with private_redis(ctx.scratch) as redis_url:
        arq = await peers.arq_rates(ctx, redis_url)
        celery = await peers.celery_rates(ctx, redis_url)
    rows = []
    for mode in MODES:
        mine = ours[mode]
        for name, theirs in (("arq", arq[mode]), ("Celery", celery[mode])):
            ratio = mine.jobs_per_second / theirs.jobs_per_second
            met = mine.jobs_per_second >= 1000 and ratio > 1
            metric = f"jobs/s, {ctx.sizes['throughput_jobs']} submitted {mode}"
            base, rate = f"{name} on Redis", theirs.jobs_per_second
            rows.append(Measurement(FIGURE, metric, mine.jobs_per_second, "jobs/s", base, rate, ratio, GOAL, met))
        for name, theirs in (("arq", arq[mode]), ("Celery", celery[mode])):
            metric, cost = f"CPU per job, all processes, submitted {mode}", mine.cpu_ms_per_job
            ratio, base = cost / theirs.cpu_ms_per_job, f"{name} on Redis"
            rows.append(Measurement(FIGURE, metric, cost, "ms", base, theirs.cpu_ms_per_job, ratio, "-"))
    unary, theirs = ours[UNARY], arq["one by one"]
    metric = f"jobs/s, {ctx.sizes['throughput_jobs']} submitted one by one as SubmitJob calls (as curl and grpcurl do)"
    base, rate = "arq on Redis, one by one", theirs.jobs_per_second
    ratio = unary.jobs_per_second / rate
    rows.append(Measurement(FIGURE, metric, unary.jobs_per_second, "jobs/s", base, rate, ratio, "-"))
    metric, cost = "CPU per job, all processes, submitted one by one as SubmitJob calls", unary.cpu_ms_per_job
    rows.append(Measurement(FIGURE, metric, cost, "ms", base, theirs.cpu_ms_per_job, cost / theirs.cpu_ms_per_job, "-"))
    for call, (rate, server_ms) in floor.items():
        metric = f"one by one, no job run: {call}, each after the last one's answer (server {server_ms:.2f} ms each)"
        base, theirs = "arq on Redis, a whole job one by one", arq["one by one"].jobs_per_second
        rows.append(Measurement(FIGURE, metric, rate, "/s", base, theirs, rate / theirs, "-"))
    return rows


async def _jobwire(ctx: Context) -> tuple[dict[str, Rate], dict[str, tuple[float, float]]]:
    """Rates per mode, both modes through the same server and workers; and what bounds one by one
    (see `_call_floor`)."""
    sizes, rates = ctx.sizes, {}
    total, in_flight = sizes["throughput_jobs"], sizes["throughput_in_flight"]
    stack_and_workers = _simulated_stack(ctx)
    async with stack_and_workers as (stack, queue, workers), Client(stack.target) as client:
        for mode in ("warm-up", *MODES, UNARY):
            submit, call, submit_many, finished = await mode_calls(client, queue)
            if mode == "warm-up":
                await peers.warm_up(submit, finished)
                continue
            used = _cpu_by_process(stack.server.pid, workers.pid)
            if mode == "batches":  # as Celery's batches: one call for many jobs, one call after another
                rates[mode] = await timed_batches(submit_many, finished, total, in_flight)
            else:
                rates[mode] = await timed(call if mode == UNARY else submit, finished, total, in_flight, "one by one")
            split = ", ".join(
                f"{name} {(now - used[name]) * 1000 / total:.2f}"
                for name, now in _cpu_by_process(stack.server.pid, workers.pid).items()
            )
            ctx.say(f"jobwire, submitted {mode}: {rates[mode]}; CPU ms per job by process: {split}")
        floor = await _call_floor(client, stack, total)
        ctx.say("one by one, no job run: " + ", ".join(f"{c} {r:.0f}/s ({ms:.2f} ms)" for c, (r, ms) in floor.items()))
    return rates, floor


class ModeCalls(NamedTuple):
    """One mode's calls (of jobs no other mode submitted): `client.submit` of a no-op job by its index
    (the SDK's submission stream), the same as one unary SubmitJob call (as curl or grpcurl would),
    `client.submit_many` of jobs by their indices (one SubmitJobs call), and how many jobs of the
    queue finished since the calls were made."""

    submit: Submit
    call: Submit
    submit_many: Callable[[range], Awaitable[object]]
    finished: Callable[[], Awaitable[int]]


async def mode_calls(client: Client, queue: str) -> ModeCalls:
    nonce = uuid.uuid4().hex

    async def done() -> int:
        return int((await client.queue_status(queue)).finished)

    before = await done()

    async def submit(index: int) -> object:
        return await client.submit(queue, noop_definition(nonce, index))

    async def call(index: int) -> object:
        request = jobs_pb2.SubmitJobRequest(queue=queue, definition=noop_message(noop_definition(nonce, index)))
        return await client.job_service.SubmitJob(request)

    async def submit_many(jobs: range) -> object:
        return await client.submit_many(queue, [noop_definition(nonce, n) for n in jobs])

    async def finished() -> int:
        return await done() - before

    return ModeCalls(submit, call, submit_many, finished)


def noop_definition(nonce: str, index: int) -> dict[str, str]:
    """A job the simulated workers finish at once, unique to `nonce` and `index`."""
    return {"image": "bench/none", "command": f"noop {nonce} {index}"}


def noop_message(definition: dict[str, str]) -> definition_pb2.JobDefinition:
    return definition_pb2.JobDefinition(**definition)


async def _call_floor(client: Client, stack: Stack, total: int) -> dict[str, tuple[float, float]]:
    """Calls/s and server CPU ms per call of calls made one after another with no job run: the health
    check gRPC's own library serves (nothing of jobwire's but the process), SubmitJob to a queue no
    worker serves, and the same submission as a message on the SDK's `SubmitJobStream`. A job
    submitted one by one costs at least the last; the first is what gRPC's Python layer alone costs a
    call."""
    unserved, nonce = unique("bench-unserved"), uuid.uuid4().hex
    async with grpc.aio.insecure_channel(stack.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        calls: dict[str, Callable[[int], Awaitable[object]]] = {
            "grpc.health.v1.Health/Check calls": lambda _: health.Check(health_pb2.HealthCheckRequest()),
            "SubmitJob calls": lambda index: client.job_service.SubmitJob(
                jobs_pb2.SubmitJobRequest(queue=unserved, definition=noop_message(noop_definition(nonce, index)))
            ),
            "SubmitJobStream messages": lambda index: client.submit(unserved, noop_definition(nonce, -index - 2)),
        }
        floor = {}
        for name, call in calls.items():
            await call(-1)
            used, start = cpu_seconds(stack.server.pid), time.perf_counter()
            for index in range(total):
                await call(index)
            floor[name] = (total / (time.perf_counter() - start), (cpu_seconds(stack.server.pid) - used) * 1000 / total)
    return floor


def _cpu_by_process(server: int, workers: int) -> dict[str, float]:
    """CPU seconds used so far by the server, the simulated workers and this process (the client)."""
    own = os.times()
    return {"server": cpu_seconds(server), "workers": cpu_seconds(workers), "client": own.user + own.system}


@contextlib.asynccontextmanager
async def _simulated_stack(ctx: Context) -> AsyncIterator[tuple[Stack, str, Service]]:
    async with running_stack(ctx.scratch) as stack, simulated_workers(ctx, stack) as (queue, workers):
        yield stack, queue, workers


@contextlib.asynccontextmanager
async def simulated_workers(ctx: Context, stack: Stack) -> AsyncIterator[tuple[str, Service]]:
    """Real worker daemons whose runtime runs nothing, in a process of their own (as the peers' workers
    are, and as real workers would be); yields their queue and process once all have registered.

    Their data directory (each job's folders) is on tmpfs where the machine has /dev/shm: the worker's
    default, /tmp/jobwire-worker, is tmpfs on Debian 13, Fedora and Arch, and creating a file costs a
    disk's metadata work elsewhere (~0.3 ms on the VMs we measure on), which is not the control plane."""
    queue, count = unique("bench-throughput"), ctx.sizes["throughput_workers"]
    slots = str(ctx.sizes["throughput_slots"])
    args = [sys.executable, "-m", "bench.throughput", stack.target, queue, str(count), slots]
    tmpfs = Path("/dev/shm")
    folders = Path(tempfile.mkdtemp(prefix="jobwire-bench-", dir=tmpfs if tmpfs.is_dir() else stack.directory))
    workers = await spawn([*args, str(folders)], stack.directory / f"{queue}.log", cwd=peers.ROOT)
    try:
        async with Client(stack.target) as client:

            async def registered() -> bool:
                if workers.process.returncode is not None:
                    raise RuntimeError(f"simulated workers exited: {workers.log.read_text()[-2000:]}")
                return len((await client.queue_status(queue)).workers) == count

            await until(registered, timeout=60)
        yield queue, workers
    finally:
        await workers.stop()
        shutil.rmtree(folders, ignore_errors=True)


async def _serve(target: str, queue: str, count: int, slots: int, directory: Path) -> None:
    """`count` worker daemons on a FakeRuntime, serving `queue` until terminated."""
    daemons = []
    for _ in range(count):
        worker_id = unique("bench-sim")
        settings = WorkerSettings(
            queue=queue, server=target, cpus=slots, data_directory=directory / worker_id, worker_id=worker_id
        )
        daemons.append(Daemon(settings, FakeRuntime()))
    await asyncio.gather(*(daemon.run() for daemon in daemons))


async def timed_batches(
    submit: Callable[[range], Awaitable[object]], finished: Callable[[], Awaitable[int]], total: int, size: int
) -> Rate:
    """`timed` one by one, `size` jobs per submission (given their indices), one after another."""

    async def every(index: int) -> object:
        return None if index % size else await submit(range(index, min(index + size, total)))

    return await timed(every, finished, total, 1, "one by one")


async def timed(submit: Submit, finished: Callable[[], Awaitable[int]], total: int, in_flight: int, mode: str) -> Rate:
    """The rate from the first submission to the last job finished, submitting `in_flight` at once or one by one."""
    start, busy = time.perf_counter(), machine_busy_seconds()
    if mode == "batches":
        gate = asyncio.Semaphore(in_flight)

        async def gated(index: int) -> None:
            async with gate:
                await submit(index)

        await asyncio.gather(*(gated(index) for index in range(total)))
    else:
        for index in range(total):
            await submit(index)

    async def all_done() -> bool:
        return await finished() >= total

    await until(all_done)
    return Rate(total / (time.perf_counter() - start), (machine_busy_seconds() - busy) * 1000 / total)


if __name__ == "__main__":  # the simulated workers' process: TARGET QUEUE COUNT SLOTS DIRECTORY
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])))
