"""The peers' baselines for figure 2: arq and Celery on Redis with no-op tasks.

Each task does one Redis INCR so that the benchmark can tell when all have run (one round
trip more than jobwire's simulated jobs need: it slows the peers slightly, never jobwire).
The workers run in their own process, as jobwire's server does.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.runner import Context, until
from bench.stack import spawn, unique

if TYPE_CHECKING:
    from bench.throughput import Rate

ROOT = Path(__file__).parent.parent
DONE = "bench:done"


# arq: `python -m bench.peers arq REDIS_URL QUEUE SLOTS` runs its worker.
async def arq_noop(ctx: dict[str, Any]) -> None:
    await ctx["redis"].incr(DONE)


def _arq_worker(url: str, queue: str, slots: int) -> None:
    from arq.connections import RedisSettings
    from arq.worker import run_worker

    # A short poll (arq's default is 0.5 s) and as many jobs at once as jobwire's workers have slots.
    settings = {"functions": [arq_noop], "queue_name": queue, "max_jobs": slots, "poll_delay": 0.005}
    run_worker(type("Settings", (), {**settings, "redis_settings": RedisSettings.from_dsn(url)}))


async def arq_rates(ctx: Context, url: str) -> dict[str, Rate]:
    from arq import create_pool
    from arq.connections import RedisSettings

    from bench.throughput import MODES, timed

    sizes, queue = ctx.sizes, unique("bench-arq")
    slots = sizes["throughput_workers"] * sizes["throughput_slots"]
    log = ctx.scratch / f"{queue}.log"
    worker = await spawn([sys.executable, "-m", "bench.peers", "arq", url, queue, str(slots)], log, cwd=ROOT)
    pool = await create_pool(RedisSettings.from_dsn(url))
    try:

        async def submit(index: int) -> object:
            return await pool.enqueue_job("arq_noop", _queue_name=queue)

        async def finished() -> int:
            return int(await pool.get(DONE) or 0)

        await warm_up(submit, finished)
        rates = {}
        for mode in MODES:
            await pool.delete(DONE)
            rates[mode] = await timed(submit, finished, sizes["throughput_jobs"], sizes["throughput_in_flight"], mode)
            ctx.say(f"arq, submitted {mode}: {rates[mode]}")
    finally:
        await pool.aclose()
        await worker.stop()
    return rates


# Celery: the app reads its broker from BENCH_REDIS_URL, so the worker process builds the same one.
def celery_app() -> Any:
    import redis
    from celery import Celery

    app = Celery("bench", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
    counter = redis.Redis.from_url(app.conf.broker_url)

    @app.task(name="noop")
    def noop() -> None:
        counter.incr(DONE)

    return app


app = celery_app() if os.environ.get("BENCH_REDIS_URL") else None


async def celery_rates(ctx: Context, url: str) -> dict[str, Rate]:
    import redis

    from bench.throughput import MODES

    sizes, queue = ctx.sizes, unique("bench-celery")
    os.environ["BENCH_REDIS_URL"] = url
    client_app = celery_app()
    noop = client_app.tasks["noop"]
    counter = redis.Redis.from_url(url)
    counter.delete(DONE)
    args = [sys.executable, "-m", "celery", "-A", "bench.peers:app", "worker", "-Q", queue, "--loglevel", "warning"]
    # prefork with one process per core: Celery's default concurrency.
    args += ["-c", str(os.cpu_count() or 2), "--without-gossip", "--without-mingle", "--without-heartbeat"]
    worker = await spawn(args, ctx.scratch / f"{queue}.log", cwd=ROOT)
    try:
        await warm_up(lambda _: asyncio.to_thread(noop.apply_async, queue=queue), _counter(counter))
        rates = {}
        for mode in MODES:
            counter.delete(DONE)
            rates[mode] = await _celery_rate(noop, queue, counter, sizes, mode)
            ctx.say(f"Celery, submitted {mode}: {rates[mode]}")
    finally:
        await worker.stop()
        counter.close()
    return rates


async def _celery_rate(noop: Any, queue: str, counter: Any, sizes: Any, mode: str) -> Rate:
    from celery import group

    from bench.throughput import timed, timed_batches

    total, in_flight = sizes["throughput_jobs"], sizes["throughput_in_flight"]
    if mode == "batches":  # a group of `in_flight` tasks per publish

        async def submit(jobs: range) -> object:
            return await asyncio.to_thread(group(noop.si() for _ in jobs).apply_async, queue=queue)

        return await timed_batches(submit, _counter(counter), total, in_flight)

    async def one(index: int) -> object:
        return await asyncio.to_thread(noop.apply_async, queue=queue)

    return await timed(one, _counter(counter), total, 1, mode)


async def warm_up(submit: Any, finished: Any) -> None:
    """One task through the started worker, so that its start-up is not timed."""
    await submit(-1)

    async def one() -> bool:
        return bool(await finished() >= 1)

    await until(one, 0.05, 120)


def _counter(counter: Any) -> Any:
    async def finished() -> int:
        return int(await asyncio.to_thread(counter.get, DONE) or 0)

    return finished


if __name__ == "__main__":
    if sys.argv[1] == "arq":
        _arq_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
