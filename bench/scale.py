"""Figure 6, scale: many idle workers (simulated streams) and a long queue; submit rate, list and status latency."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from bench.runner import Context, Measurement, median
from bench.stack import Stack, cpu_seconds, rss_bytes, running_stack, unique
from jobwire.v1 import (
    definition_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
)

STREAMS_PER_CHANNEL = 100
MiB = 1024 * 1024


async def run(ctx: Context) -> list[Measurement]:
    rows: list[Measurement] = []
    async with running_stack(ctx.scratch) as stack:
        rows += await _idle_workers(ctx, stack)
        rows += await _long_queue(ctx, stack)
    return rows


async def _idle_workers(ctx: Context, stack: Stack) -> list[Measurement]:
    count, seconds = ctx.sizes["idle_workers"], ctx.sizes["idle_seconds"]
    pid = stack.server.pid
    await asyncio.sleep(1)
    base_rss, base_cpu = rss_bytes(pid), await _cpu_share(pid, seconds)
    async with grpc.aio.insecure_channel(stack.target) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        alone = await _submit_rate(jobs, unique("bench-alone"), count)
        async with _idle_streams(stack, count) as queue:
            rss, cpu = rss_bytes(pid), await _cpu_share(pid, seconds)
            crowded = await _submit_rate(jobs, queue, count)
    ctx.say(f"server with {count} idle workers: {rss / MiB:.0f} MiB, {cpu:.1%} of a core")
    ctx.say(f"{count} jobs submitted to their queue: {crowded:.0f} jobs/s; to a queue with no worker {alone:.0f}")
    metric = f"server RSS, {count} idle workers connected"
    cpu_metric = f"server CPU (% of a core), {count} idle workers"
    return [
        Measurement("6 scale", metric, rss / MiB, "MiB", "no worker", base_rss / MiB, rss / base_rss, "-"),
        Measurement(
            "6 scale",
            cpu_metric,
            cpu * 100,
            "%",
            "no worker",
            base_cpu * 100,
            cpu / base_cpu if base_cpu else float("nan"),
            "-",
        ),
        Measurement(
            "6 scale",
            f"submit rate, {count:,} jobs to the queue of {count:,} idle workers (each job assigned)",
            crowded,
            "jobs/s",
            "to a queue with no worker",
            alone,
            crowded / alone,
            "-",
        ),
    ]


async def _submit_rate(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, count: int) -> float:
    """Jobs/s of `count` trivial jobs submitted to `queue`, 32 calls at a time."""
    nonce, gate = uuid.uuid4().hex, asyncio.Semaphore(32)

    async def submit(index: int) -> None:
        definition = definition_pb2.JobDefinition(image="bench/none", command=f"noop {nonce} {index}")
        async with gate:
            await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))

    start = time.perf_counter()
    await asyncio.gather(*(submit(index) for index in range(count)))
    return count / (time.perf_counter() - start)


async def _cpu_share(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


@contextlib.asynccontextmanager
async def _idle_streams(stack: Stack, count: int) -> AsyncIterator[str]:
    """`count` raw WorkerService.Connect streams of one slot on a queue of their own (yielded) that
    register, heartbeat, take the one job they may be assigned and never run it."""
    queue = unique("bench-idle")
    channels = [grpc.aio.insecure_channel(stack.target) for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    registered = asyncio.Semaphore(0)
    tasks = [
        asyncio.create_task(_idle_worker(channels[n // STREAMS_PER_CHANNEL], queue, registered)) for n in range(count)
    ]
    try:
        async with asyncio.timeout(300):
            for _ in range(count):
                await registered.acquire()
        yield queue
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


async def _idle_worker(channel: grpc.aio.Channel, queue: str, registered: asyncio.Semaphore) -> None:
    call = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
    worker_id, secret = unique("bench-idle-w"), uuid.uuid4().hex  # each worker id proves its secret
    register = workers_pb2.RegisterWorker(worker_id=worker_id, queue=queue, cpus=1, version="bench", secret=secret)
    await call.write(workers_pb2.ConnectRequest(register=register))
    first = await call.read()
    assert isinstance(first, workers_pb2.ConnectResponse)
    registered.release()
    interval = first.registered.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
    while True:
        await asyncio.sleep(interval)
        await call.write(workers_pb2.ConnectRequest(heartbeat=workers_pb2.Heartbeat()))


async def _long_queue(ctx: Context, stack: Stack) -> list[Measurement]:
    total, calls = ctx.sizes["queued_jobs"], ctx.sizes["latency_calls"]
    decile = max(total // 10, 1)
    queue, nonce = unique("bench-long"), uuid.uuid4().hex
    async with grpc.aio.insecure_channel(stack.target) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        done: list[float] = []
        gate = asyncio.Semaphore(32)

        async def submit(index: int) -> None:
            definition = definition_pb2.JobDefinition(image="bench/none", command=f"noop {nonce} {index}")
            async with gate:
                await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))
            done.append(time.perf_counter())

        start = time.perf_counter()
        await asyncio.gather(*(submit(index) for index in range(total)))
        early = decile / (done[decile - 1] - start)
        late = decile / (done[-1] - done[-decile - 1])
        ctx.say(f"{total} jobs queued in {done[-1] - start:.1f} s")
        info = server_pb2_grpc.ServerServiceStub(channel)
        trivial = await _latency(lambda: info.GetServerInfo(server_pb2.GetServerInfoRequest()), calls)
        listing = await _latency(lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(queue=queue, page_size=50)), calls)
        status = await _latency(lambda: jobs.GetQueueStatus(jobs_pb2.GetQueueStatusRequest(queue=queue)), calls)
    return [
        Measurement(
            "6 scale",
            f"submit rate at the last {decile:,} of {total:,} queued",
            late,
            "jobs/s",
            f"the first {decile:,}",
            early,
            late / early,
            "≥ 0.9",
            late / early >= 0.9,
        ),
        _latency_row(f"first list page (50) of {total:,} queued", listing, trivial),
        _latency_row(f"queue status with {total:,} queued", status, trivial),
    ]


def _latency_row(metric: str, ours: float, trivial: float) -> Measurement:
    ms = ours * 1000
    return Measurement("6 scale", metric, ms, "ms", "GetServerInfo", trivial * 1000, ours / trivial, "< 50 ms", ms < 50)


async def _latency(call: Callable[[], Awaitable[object]], times: int) -> float:
    """Median seconds of `times` calls made one after another."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - start)
    return median(seconds)
