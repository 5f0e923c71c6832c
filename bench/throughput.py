"""Figure 2, control-plane throughput: jobs/s through one server and simulated workers, vs arq and Celery on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

from bench import peers
from bench.fake_runtime import FakeRuntime
from bench.redis import private_redis
from bench.runner import Context, Measurement, until
from bench.stack import Stack, running_stack, spawn, unique
from jobwire import Client
from jobwire.worker.daemon import Daemon
from jobwire.worker.runner import DockerRuntime
from jobwire.worker.settings import WorkerSettings

MODES = ("batches", "one by one")
GOAL = "≥ 1,000 and > 1"
Submit = Callable[[int], Awaitable[object]]


async def run(ctx: Context) -> list[Measurement]:
    ours = await _jobwire(ctx)
    async with private_redis(ctx.scratch) as redis_url:
        arq = await peers.arq_rates(ctx, redis_url)
        celery = await peers.celery_rates(ctx, redis_url)
    rows = []
    for mode in MODES:
        for name, theirs in (("arq", arq[mode]), ("Celery", celery[mode])):
            ratio = ours[mode] / theirs
            met = ours[mode] >= 1000 and ratio > 1
            metric = f"jobs/s, {ctx.sizes['throughput_jobs']} submitted {mode}"
            base = f"{name} on Redis"
            rows.append(Measurement("2 control plane", metric, ours[mode], "jobs/s", base, theirs, ratio, GOAL, met))
    return rows


async def _jobwire(ctx: Context) -> dict[str, float]:
    """Jobs/s per mode, both modes through the same server and workers."""
    sizes, rates = ctx.sizes, {}
    stack_and_workers = _simulated_stack(ctx)
    async with stack_and_workers as (stack, queue), Client(stack.target) as client:

        async def done() -> int:
            return int((await client.queue_status(queue)).finished)

        for mode in ("warm-up", *MODES):
            nonce, before = uuid.uuid4().hex, await done()

            async def submit(index: int, nonce: str = nonce) -> object:
                return await client.submit(queue, image="bench/none", command=f"noop {nonce} {index}")

            async def finished(before: int = before) -> int:
                return await done() - before

            if mode == "warm-up":
                await peers.warm_up(submit, finished)
                continue
            rates[mode] = await timed(submit, finished, sizes["throughput_jobs"], sizes["throughput_in_flight"], mode)
            ctx.say(f"jobwire, submitted {mode}: {rates[mode]:.0f} jobs/s")
    return rates


@contextlib.asynccontextmanager
async def _simulated_stack(ctx: Context) -> AsyncIterator[tuple[Stack, str]]:
    async with running_stack(ctx.scratch) as stack, simulated_workers(ctx, stack) as queue:
        yield stack, queue


@contextlib.asynccontextmanager
async def simulated_workers(ctx: Context, stack: Stack) -> AsyncIterator[str]:
    """Real worker daemons whose runtime runs nothing, in a process of their own (as the peers' workers
    are, and as real workers would be); yields their queue once all have registered."""
    queue, count = unique("bench-throughput"), ctx.sizes["throughput_workers"]
    slots = str(ctx.sizes["throughput_slots"])
    args = [sys.executable, "-m", "bench.throughput", stack.target, queue, str(count), slots]
    workers = await spawn([*args, str(stack.directory)], stack.directory / f"{queue}.log", cwd=peers.ROOT)
    try:
        async with Client(stack.target) as client:

            async def registered() -> bool:
                if workers.process.returncode is not None:
                    raise RuntimeError(f"simulated workers exited: {workers.log.read_text()[-2000:]}")
                return len((await client.queue_status(queue)).workers) == count

            await until(registered, timeout=60)
        yield queue
    finally:
        await workers.stop()


async def _serve(target: str, queue: str, count: int, slots: int, directory: Path) -> None:
    """`count` worker daemons on a FakeRuntime, serving `queue` until terminated."""
    daemons = []
    for _ in range(count):
        worker_id = unique("bench-sim")
        settings = WorkerSettings(
            queue=queue, server=target, cpus=slots, data_directory=directory / worker_id, worker_id=worker_id
        )
        daemons.append(Daemon(settings, cast(DockerRuntime, FakeRuntime())))
    await asyncio.gather(*(daemon.run() for daemon in daemons))


async def timed(submit: Submit, finished: Callable[[], Awaitable[int]], total: int, in_flight: int, mode: str) -> float:
    """Jobs/s from the first submission to the last job finished, submitting `in_flight` at once or one by one."""
    start = time.perf_counter()
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
    return total / (time.perf_counter() - start)


if __name__ == "__main__":  # the simulated workers' process: TARGET QUEUE COUNT SLOTS DIRECTORY
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])))
