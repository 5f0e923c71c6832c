"""Figure 3, real containers at full load: trivial jobs on one worker with `--cpus 2`, vs `docker run` two at a time."""

from __future__ import annotations

import asyncio
import time
import uuid

from bench.runner import Context, Measurement, until
from bench.stack import BUSYBOX, docker_run, real_worker, running_stack, unique
from jobwire import Client


async def run(ctx: Context) -> list[Measurement]:
    total = ctx.sizes["load_jobs"]
    queue, nonce = unique("bench-load"), uuid.uuid4().hex
    gate = asyncio.Semaphore(2)

    async def one_docker_run() -> None:
        async with gate:
            await docker_run(BUSYBOX, "true")

    await docker_run(BUSYBOX, "true")  # warm the engine
    start = time.perf_counter()
    await asyncio.gather(*(one_docker_run() for _ in range(total)))
    theirs = total / (time.perf_counter() - start)
    async with running_stack(ctx.scratch) as stack, real_worker(stack, queue, cpus=2), Client(stack.target) as client:
        await (await client.submit(queue, image=BUSYBOX, command="true", env={"BENCH": f"{nonce}-warm"})).wait(120)
        start = time.perf_counter()
        for index in range(total):
            await client.submit(queue, image=BUSYBOX, command="true", env={"BENCH": f"{nonce}-{index}"})

        async def all_done() -> bool:
            return (await client.queue_status(queue)).finished >= total + 1

        await until(all_done, 0.1)
        ours = total / (time.perf_counter() - start)
    ratio = ours / theirs
    metric = f"{total} trivial jobs, worker --cpus 2"
    baseline = "docker run --rm, 2 at a time"
    return [Measurement("3 full load", metric, ours, "jobs/s", baseline, theirs, ratio, "≥ 0.9", ratio >= 0.9)]
