"""Figure 1, job overhead: submit → finished result of a trivial container, vs `docker run --rm` of it."""

from __future__ import annotations

import time
import uuid

from bench.runner import Context, Measurement, median
from bench.stack import BUSYBOX, docker_run, real_worker, running_stack, unique
from jobwire import Client


async def run(ctx: Context) -> list[Measurement]:
    runs = ctx.sizes["overhead_runs"]
    queue = unique("bench-overhead")
    nonce = uuid.uuid4().hex
    jobwire_times: list[float] = []
    docker_times: list[float] = []
    async with running_stack(ctx.scratch) as stack, real_worker(stack, queue, cpus=1), Client(stack.target) as client:
        await docker_run(BUSYBOX, "true")  # warm the engine's caches for both sides
        await _one(client, queue, f"{nonce}-warm")
        for index in range(runs):  # interleaved, so drift in the machine's load hits both alike
            start = time.perf_counter()
            await docker_run(BUSYBOX, "true")
            docker_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            await _one(client, queue, f"{nonce}-{index}")
            jobwire_times.append(time.perf_counter() - start)
    ours, theirs = median(jobwire_times), median(docker_times)
    ctx.say(f"jobwire {[round(t, 3) for t in jobwire_times]}; docker run {[round(t, 3) for t in docker_times]}")
    ratio = ours / theirs
    return [
        Measurement(
            "1 job overhead",
            f"submit → result, median of {runs}",
            ours,
            "s",
            "docker run --rm",
            theirs,
            ratio,
            "≤ 1.25",
            ratio <= 1.25,
        )
    ]


async def _one(client: Client, queue: str, nonce: str) -> None:
    # A different env per run makes each a new job (identical definitions are one job, cached).
    job = await client.submit(queue, image=BUSYBOX, command="true", env={"BENCH": nonce})
    await job.wait(timeout=120)
