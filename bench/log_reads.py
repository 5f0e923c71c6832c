"""Figure 7, long-log reads: `result.json` of a 256 Mi-character log vs a 10-line one; `/healthz` meanwhile."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable

import httpx

from bench.runner import Context, Measurement, median
from bench.stack import BUSYBOX, real_worker, running_stack, unique
from jobwire import Client

_LINE = "a-line-of-a-long-log,-the-same-over-and-over"


async def run(ctx: Context) -> list[Measurement]:
    size, calls = ctx.sizes["long_log_mib"] * 1024 * 1024, ctx.sizes["read_calls"]
    queue, nonce = unique("bench-reads"), uuid.uuid4().hex
    async with (
        running_stack(ctx.scratch, envoy=True) as stack,
        real_worker(stack, queue, cpus=1),
        Client(stack.target) as client,
    ):
        short = await client.submit(queue, image=BUSYBOX, command=f"sh -c 'seq 1 10; true {nonce}'")
        long = await client.submit(queue, image=BUSYBOX, command=f"sh -c 'yes {_LINE} | head -c {size}; true {nonce}'")
        await short.wait(600)
        await long.wait(7200)
        async with httpx.AsyncClient(base_url=stack.rest, timeout=600) as rest:
            paths = {name: f"/q/{queue}/j/{job.id}/result.json" for name, job in (("short", short), ("long", long))}
            tail = (await rest.get(paths["long"])).json()["result"]
            if int(tail.get("logsStart", 0)) == 0 or not tail["logs"][-1]["text"].endswith(_end(size)):
                raise AssertionError("the long log's result does not carry its tail")
            idle = [await _timed(rest.get("/healthz")) for _ in range(calls)]
            shorts = [await _timed(rest.get(paths["short"])) for _ in range(calls)]
            longs, during = await _while_reading(rest, paths["long"], calls)
    ctx.say(f"{len(during)} health calls during {calls} reads of the long log's result.json")
    figure, small, big = "7 long-log reads", median(shorts), median(longs)
    return [
        Measurement(
            figure,
            f"result.json of a job with a {size // 1024 // 1024} Mi-character log, median",
            big,
            "s",
            "the same of a 10-line job",
            small,
            big / small,
            "≤ 0.25 s (its tail is 1 MiB)",
            big <= 0.25,
            notes="the result carries the log's last 1 MiB; the whole log is never read",
        ),
        Measurement(
            figure,
            "/healthz while that result.json is read, slowest",
            max(during),
            "s",
            "/healthz idle, median",
            median(idle),
            max(during) / median(idle),
            "≤ 0.1 s",
            max(during) <= 0.1,
        ),
    ]


async def _while_reading(rest: httpx.AsyncClient, path: str, calls: int) -> tuple[list[float], list[float]]:
    """`calls` reads of `path` one after another, and health calls one after another until they end."""
    reads, health, done = list[float](), list[float](), asyncio.Event()

    async def read() -> None:
        for _ in range(calls):
            reads.append(await _timed(rest.get(path)))
        done.set()

    async def probe() -> None:
        while not done.is_set():
            health.append(await _timed(rest.get("/healthz")))

    await asyncio.gather(read(), probe())
    return reads, health


def _end(size: int) -> str:
    """The last characters the long job prints: `yes` repeats the line, `head` cuts it at `size`."""
    line = _LINE + "\n"
    return "".join(line[i % len(line)] for i in range(size - 20, size))


async def _timed(call: Awaitable[httpx.Response]) -> float:
    started = time.perf_counter()
    (await call).raise_for_status()
    return time.perf_counter() - started
