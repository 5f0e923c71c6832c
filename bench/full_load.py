"""Figure 3, real containers at full load: trivial jobs on one worker with `--cpus 2`, vs `docker run` two at a time."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from bench.runner import Context, Measurement, until
from bench.stack import BUSYBOX, docker_run, real_worker, running_stack, unique
from jobwire import Client
from jobwire.worker.docker_runtime import CACHE_VOLUME, NETWORK
from jobwire.worker.settings import WorkerSettings


async def run(ctx: Context) -> list[Measurement]:
    total = ctx.sizes["load_jobs"]
    queue, nonce = unique("bench-load"), uuid.uuid4().hex
    async with running_stack(ctx.scratch) as stack, real_worker(stack, queue, cpus=2), Client(stack.target) as client:
        # The first job also makes the engine create the jobs network and cache volume the worker uses.
        await (await client.submit(queue, image=BUSYBOX, command="true", env={"BENCH": f"{nonce}-warm"})).wait(120)
        plain = await _docker_rate(total)
        configured = await _docker_rate(total, *_as_the_worker_does(ctx.scratch))
        start = time.perf_counter()
        for index in range(total):
            await client.submit(queue, image=BUSYBOX, command="true", env={"BENCH": f"{nonce}-{index}"})

        async def all_done() -> bool:
            return (await client.queue_status(queue)).finished >= total + 1

        await until(all_done, 0.1)
        ours = total / (time.perf_counter() - start)
    metric = f"{total} trivial jobs, worker --cpus 2"
    return [
        Measurement(
            "3 full load",
            metric,
            ours,
            "jobs/s",
            "docker run --rm, 2 at a time",
            plain,
            ours / plain,
            "≥ 0.9",
            ours / plain >= 0.9,
        ),
        Measurement(
            "3 full load",
            metric,
            ours,
            "jobs/s",
            "the same, with the worker's container configuration",
            configured,
            ours / configured,
            "",
            notes="the jobs network (no traffic between jobs), limits, /inputs, /outputs and /job-cache mounts",
        ),
    ]


async def _docker_rate(total: int, *flags: str) -> float:
    """Containers per second that `docker run --rm FLAGS busybox true` runs, two at a time."""
    gate = asyncio.Semaphore(2)

    async def one() -> None:
        async with gate:
            await docker_run(*flags, BUSYBOX, "true")

    await one()  # the engine's first container of a kind is slower
    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - start)


def _as_the_worker_does(scratch: Path) -> list[str]:
    """`docker run` flags for what the worker gives every job's container (see `DockerRuntime`)."""
    mounts = []
    for name in ("inputs", "outputs"):
        (scratch / name).mkdir(exist_ok=True)
        mounts += ["--mount", f"type=bind,source={scratch / name},target=/{name}"]
    pids = str(WorkerSettings.pids_limit)  # the worker's default; the memory limit's size costs nothing
    limits = ["--memory", "1g", "--memory-swap", "1g", "--pids-limit", pids, "--security-opt", "no-new-privileges"]
    cache = ["--mount", f"type=volume,source={CACHE_VOLUME},target=/job-cache"]
    return ["--network", NETWORK, *limits, *mounts, *cache]
