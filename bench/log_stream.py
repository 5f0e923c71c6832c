"""Figure 4, log streaming: a container printing many lines; how soon a following client has all of them, in order."""

from __future__ import annotations

import time
import uuid

from bench.runner import Context, Measurement
from bench.stack import BUSYBOX, real_worker, running_stack, unique
from jobwire import Client


async def run(ctx: Context) -> list[Measurement]:
    lines = ctx.sizes["log_lines"]
    queue = unique("bench-logs")
    expected = "".join(f"{n}\n" for n in range(1, lines + 1))
    async with running_stack(ctx.scratch) as stack, real_worker(stack, queue, cpus=1), Client(stack.target) as client:
        command = f"sh -c 'seq 1 {lines}; true {uuid.uuid4().hex}'"
        job = await client.submit(queue, image=BUSYBOX, command=command)
        pieces = [chunk.text async for chunk in job.logs(follow=True)]
        followed = time.time()
        result = await job.wait(60)
    received = "".join(pieces)
    if received != expected:
        raise AssertionError(f"the follower got {received.count(chr(10))} lines, not exactly 1..{lines} in order")
    started = result.start_time.ToNanoseconds() / 1e9
    own = max(result.duration.ToNanoseconds() / 1e9, 1e-3)  # the engine's clock can be coarser than a tiny run
    delivered = lines / (followed - started)
    lag = followed - (started + own)
    ctx.say(f"container ran {own:.2f} s; the follower had every line {lag:.2f} s after it ended")
    rate_metric = f"{lines:,} lines followed, lines/s from container start"
    return [
        Measurement(
            "4 log streaming",
            rate_metric,
            delivered,
            "lines/s",
            "the container's own rate",
            lines / own,
            delivered / (lines / own),
            "≥ 200,000 lines/s",
            delivered >= 200_000,
        ),
        Measurement(
            "4 log streaming",
            "follower done after the container ended",
            lag,
            "s",
            "the container's run time",
            own,
            (own + lag) / own,
            "≤ 1 s after",
            lag <= 1,
        ),
    ]
