"""The scenarios: each starts real processes in its `Run`, injects one kind of fault, and returns its row.

Sizes are modest (the reference machine has 2 cores shared with other work): `quick` is the variant
the tests run. The server's grace period is short (`GRACE`) so that a lost worker is noticed within
the run; the guarantees do not depend on its length.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc

from bench.chaos.harness import Row, Run, Server, until
from bench.chaos.proxy import Proxy
from jobwire import Client, JobwireError
from jobwire.cli.services import start_local_envoy, stop_envoy
from jobwire.v1 import jobs_pb2
from tests.services import PostgresCluster

GRACE = "8s"
SHORT = "sh -c 'echo start; sleep 2; echo end'"


def short_jobs(run: Run) -> int:
    return 6 if run.quick else 24


async def started(run: Run, count: int, timeout: float = 90) -> None:
    """Until `count` containers of the queue have started (dockerd's word)."""

    async def check() -> bool:
        return sum(c.started is not None for c in run.containers.by_id.values()) >= count

    await until(check, timeout, f"{count} containers to start")


async def first_finish_after(run: Run, client: Client, ids: list[str], moment: float, timeout: float) -> float | None:
    """Seconds from `moment` until the server reports one more job finished than at `moment` (progress again)."""
    before = sum(j.state == jobs_pb2.JOB_STATE_FINISHED for j in (await run.states(client, ids)).values())
    if before == len(ids):
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = await run.states(client, ids)
        if sum(j.state == jobs_pb2.JOB_STATE_FINISHED for j in jobs.values()) > before:
            return time.time() - moment
        await asyncio.sleep(0.25)
    return None


async def worker_kill(run: Run, *, restart: bool) -> Row:
    """Restarted: 2 workers, one killed (-9) mid-job and started again 1 s later (3 rounds in the full run).
    Never back: the victim alone holds 2 jobs longer than the grace; a second worker with free slots is
    there when it dies, so a container the dead worker leaves running meets the job's second attempt."""
    server = await run.server(extra=["--worker-grace", GRACE])
    client = run.client(server.target)
    if restart:
        workers = [await run.worker(server.target, cpus=2) for _ in range(2)]
        await run.wait_workers(client, 2)
        ids = [await run.submit(client, SHORT, env={"N": str(n)}) for n in range(short_jobs(run))]
        await started(run, 2)
    else:
        workers = [await run.worker(server.target, cpus=2)]
        await run.wait_workers(client, 1)
        long = f"sh -c 'echo start; sleep {12 if run.quick else 30}; echo end'"
        ids = [await run.submit(client, long, env={"N": str(n)}) for n in range(2)]
        await started(run, 2)
        workers.append(await run.worker(server.target, cpus=2))
        await run.wait_workers(client, 2)
    rounds = 1 if run.quick or not restart else 3
    recover: float | None = None
    fault = time.time()
    for round_ in range(rounds):
        victim = workers[round_ % 2]
        await victim.kill()
        fault = time.time()
        run.say(f"killed worker {victim.worker_id} (-9)")
        if restart:
            await asyncio.sleep(1)
            await victim.start()
        recover = await first_finish_after(run, client, ids, fault, 120)
        await asyncio.sleep(3)
    jobs = await run.wait_finished(client, ids, 180)
    if not restart:  # recovered: each of the dead worker's jobs running again elsewhere
        recover = run.containers.rerun_after(workers[0].worker_id, fault)
    name = "worker kill -9, restarted" if restart else "worker kill -9, never back"
    return await run.row(name, ids, jobs, expect={"success"}, recover=recover, settle=20)


async def server_kill(run: Run) -> Row:
    server = await run.server(extra=["--worker-grace", GRACE])
    client = run.client(server.target)
    for _ in range(2):
        await run.worker(server.target, cpus=2)
    await run.wait_workers(client, 2)
    ids = [await run.submit(client, SHORT, env={"N": str(n)}) for n in range(short_jobs(run))]
    recover: float | None = None
    for _ in range(1 if run.quick else 2):
        await started(run, 2)
        await server.kill()
        run.say("killed the server (-9)")
        await asyncio.sleep(1)
        await server.start()
        fault = time.time()
        recover = await first_finish_after(run, client, ids, fault, 120)
    jobs = await run.wait_finished(client, ids, 180)
    return await run.row("server kill -9 (restarted)", ids, jobs, expect={"success"}, recover=recover)


async def stream_faults(run: Run, *, stall: bool) -> Row:
    server = await run.server(extra=["--worker-grace", GRACE])
    client = run.client(server.target)
    async with Proxy(server.target) as proxy:
        for _ in range(2):
            await run.worker(proxy.target, cpus=2)
        await run.wait_workers(client, 2)
        ids = [await run.submit(client, SHORT, env={"N": str(n)}) for n in range(short_jobs(run))]
        await started(run, 2)
        recover: float | None = None
        if stall:
            # shorter than the grace, then (full run) longer than it: the server re-queues, the worker returns
            for seconds in [4.0] if run.quick else [4.0, 12.0]:
                run.say(f"stalling every stream {seconds:.0f} s")
                fault = time.time()
                await proxy.stall(seconds)
                recover = await first_finish_after(run, client, ids, fault, 120)
        else:
            for _ in range(2 if run.quick else 4):
                run.say(f"reset {proxy.reset()} connection(s)")
                fault = time.time()
                recover = await first_finish_after(run, client, ids, fault, 120)
                await asyncio.sleep(1)
        jobs = await run.wait_finished(client, ids, 180)
    name = "streams stalled (TCP proxy)" if stall else "streams reset (TCP proxy)"
    return await run.row(name, ids, jobs, expect={"success"}, recover=recover)


async def concurrent_kills(run: Run, *, time_limit: bool) -> Row:
    """8 `sleep 60` jobs on one worker, all running; all cancelled at once, or all past a 2 s time limit."""
    server = await run.server()
    client = run.client(server.target)
    await run.worker(server.target, cpus=8)
    await run.wait_workers(client, 1)
    fields = {"max_duration": "2s"} if time_limit else {}
    ids = [await run.submit(client, f"sh -c 'echo {n}; sleep 60'", **fields) for n in range(8)]
    await started(run, 8)
    kills: list[float | None] = []
    if time_limit:
        jobs = await run.wait_finished(client, ids, 60)
        for job_id in ids:
            spans = [c for c in run.containers.of(job_id) if c.started is not None]
            died = run.containers.died_after(job_id, min(c.started for c in spans if c.started) + 2.0)
            kills.append(died)
    else:
        moment = time.time()
        await asyncio.gather(*(client.job(job_id, run.queue).cancel() for job_id in ids))
        jobs = await run.wait_finished(client, ids, 60)
        await asyncio.sleep(KILL_WAIT)
        kills = [run.containers.died_after(job_id, moment) for job_id in ids]
    worst = float("inf") if any(k is None for k in kills) else max((k for k in kills if k is not None), default=0.0)
    name = "8 concurrent time limits (2 s)" if time_limit else "8 concurrent cancels"
    expect = {"timed out"} if time_limit else {"cancelled"}
    row = await run.row(name, ids, jobs, expect=expect, kill_max=worst, settle=15)
    exited_zero = sum(c.exit_code == "0" for c in run.containers.by_id.values())
    if exited_zero:
        row.failures.append(f"{exited_zero} killed container(s) exited 0 (ran to their end)")
    return row


KILL_WAIT = 6.0
"""How long after the cancels their containers are given to die before the kill times are read."""


async def cancel_during_create(run: Run) -> Row:
    server = await run.server()
    client = run.client(server.target)
    await run.worker(server.target, cpus=4)
    await run.wait_workers(client, 1)
    chooser = random.Random(os.getpid())
    count = 20 if run.quick else 40

    async def one(n: int) -> str:
        job_id = await run.submit(client, f"sh -c 'echo {n}; sleep 30'")
        await asyncio.sleep(chooser.uniform(0, 0.06))
        await client.job(job_id, run.queue).cancel()
        return job_id

    ids: list[str] = []
    for batch in range(0, count, 4):  # four at a time: creates overlap with cancels, as under load
        ids += await asyncio.gather(*(one(n) for n in range(batch, min(count, batch + 4))))
    jobs = await run.wait_finished(client, ids, 60)
    return await run.row("cancel 0-60 ms after submit", ids, jobs, expect={"cancelled"}, settle=15)


async def sigterm_drain(run: Run) -> Row:
    server = await run.server()
    client = run.client(server.target)
    first = await run.worker(server.target, cpus=4, extra=["--drain-timeout", "3s"])
    await run.wait_workers(client, 1)
    ids = [await run.submit(client, f"sh -c 'echo {n}; sleep {1 if n < 2 else 8}; echo end'") for n in range(4)]
    await started(run, 4)
    fault = time.time()
    code = await first.terminate(60)
    drained = time.time() - fault
    await run.worker(server.target, cpus=4)
    jobs = await run.wait_finished(client, ids, 90)
    row = await run.row(
        "worker SIGTERM drain (3 s)", ids, jobs, expect={"success"}, recover=drained, notes="recover: the drain itself"
    )
    if code != 0:
        row.failures.append(f"the draining worker exited {code}")
    return row


@contextlib.contextmanager
def postgres() -> Iterator[PostgresCluster]:
    """The tests' throwaway cluster (`tests/services.py`: its own folder and port), removed after."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def replicas(run: Run, cluster: PostgresCluster, count: int = 2) -> list[Server]:
    """`count` replicas on a fresh database of `cluster`."""
    database = await cluster.create_database()
    return [
        await run.server(name=f"replica-{n}", extra=["--database", database, "--worker-grace", GRACE])
        for n in range(count)
    ]


async def postgres_outage(run: Run, *, stop_seconds: float) -> Row:
    """2 replicas on one PostgreSQL, jobs running; PostgreSQL stopped `stop_seconds` (0: a restart) and started."""
    with postgres() as cluster:
        a, b = await replicas(run, cluster)
        client = run.client(b.target)
        await run.worker(a.target, cpus=2)
        await run.worker(b.target, cpus=2)
        await run.wait_workers(client, 2)
        ids = [await run.submit(client, SHORT, env={"N": str(n)}) for n in range(short_jobs(run))]
        await started(run, 2)
        await asyncio.to_thread(cluster.halt)
        run.say(f"PostgreSQL stopped for {stop_seconds:.0f} s")
        await asyncio.sleep(stop_seconds)
        await asyncio.to_thread(cluster.resume)
        fault = time.time()
        down = [s for s in (a, b) if not s.alive]
        recover = await first_finish_after(run, client, ids, fault, 90) if not down else None
        jobs = await run.wait_finished(client, ids, 120) if not down else await run.states(client, ids)
        name = "PostgreSQL restart, 2 replicas"
        if stop_seconds:
            name = f"PostgreSQL stopped {stop_seconds:.0f} s, 2 replicas"
        row = await run.row(name, ids, jobs, expect={"success"}, recover=recover)
        if down:
            row.failures.insert(0, f"{len(down)} replica(s) exited")
        return row


async def replica_kill_followers(run: Run) -> Row:
    """2 replicas behind Envoy; followers (SDK, through Envoy) of a job printing 30 lines; one replica killed."""
    with postgres() as cluster:
        a, b = await replicas(run, cluster)
        upstreams = [("127.0.0.1", int(s.target.rpartition(":")[2])) for s in (a, b)]
        envoy, envoy_port = await start_local_envoy(upstreams, run.directory / "envoy.yaml")
        try:
            front = f"127.0.0.1:{envoy_port}"
            client = run.client(front)
            await run.worker(front, cpus=2)
            await run.wait_workers(client, 1)
            lines = 30
            command = f"sh -c 'for i in $(seq 1 {lines}); do echo line-$i; sleep 0.3; done'"
            ids = [await run.submit(client, command)]
            expected = "".join(f"line-{i}\n" for i in range(1, lines + 1))

            async def follow() -> str:
                follower = run.client(front)
                text = ""
                with contextlib.suppress(Exception):
                    async for chunk in follower.job(ids[0], run.queue).logs(follow=True):
                        text += chunk.text
                return text

            followers = [asyncio.create_task(follow()) for _ in range(4)]
            await started(run, 1)
            await asyncio.sleep(3)
            await a.kill()
            run.say("killed replica a (-9)")
            fault = time.time()
            texts = await asyncio.gather(*followers)
            recover = time.time() - fault
            jobs = await run.wait_finished(client, ids, 90)
        finally:
            await stop_envoy(envoy)
        complete = sum(text == expected for text in texts)
        row = await run.row(
            "replica kill -9, 4 followers via Envoy",
            ids,
            jobs,
            expect={"success"},
            recover=recover,
            notes=f"{complete}/4 followers ended with every line; recover: until the followers ended",
        )
        if complete < len(texts):
            row.failures.append(f"{len(texts) - complete} of {len(texts)} followers missed lines")
        return row


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `path` (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the file system holding `path` (a file of zeros until ENOSPC)."""
    filler = path / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        chunk = b"\0" * (1 << 20)
        while True:
            out.write(chunk)
            out.flush()
    return filler


async def disk_full(run: Run, *, on_server: bool) -> Row:
    """The server's (or the worker's) data directory on a small tmpfs, filled while jobs write outputs; freed."""
    if os.geteuid() != 0:
        return Row(f"disk full on the {'server' if on_server else 'worker'}", failures=["needs root (a real tmpfs)"])
    disk = run.directory / "disk"
    with tmpfs(disk, "64m"):
        if on_server:
            server = await run.server(name="disk/server")
        else:
            server = await run.server()
        client = run.client(server.target)
        await run.worker(server.target, cpus=2, data=None if on_server else disk / "worker")
        await run.wait_workers(client, 1)
        # the output is written first; the disk fills while the containers still run, so their results
        # (the upload of out.bin, the result, the logs) meet the full disk, on the server or the worker
        command = "sh -c 'head -c 2000000 /dev/urandom > /outputs/out.bin && echo written && sleep 4 && echo end'"
        ids = [await run.submit(client, command, env={"N": str(n)}) for n in range(2)]
        await started(run, 2)
        await asyncio.sleep(1.5)
        filler = await asyncio.to_thread(fill, disk)
        run.say("disk full")
        refused, unclear = 0, set[str]()
        for n in range(2, 6) if on_server else ():  # on a full worker a new job's own write would fail
            try:
                ids.append(await run.submit(client, command, env={"N": str(n)}))
            except JobwireError as error:  # a clear refusal is allowed while the disk is full
                refused += 1
                run.say(f"submit refused: {error}")
                if error.code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                    unclear.add(f"{error.code}: {str(error)[:120]}")
        await asyncio.sleep(6)
        filler.unlink()
        fault = time.time()
        alive = server.alive
        if alive and not on_server:  # and new work runs again once there is room
            ids += [await run.submit(client, command, env={"N": str(n)}) for n in range(2, 4)]
        recover = await first_finish_after(run, client, ids, fault, 60) if alive else None
        jobs = await run.wait_finished(client, ids, 90) if alive else {}
        where = "server" if on_server else "worker"
        row = await run.row(
            f"disk full on the {where} (tmpfs)",
            ids,
            jobs,
            expect={"success"},
            recover=recover,
            notes=f"{refused} submission(s) refused while full" if on_server else "",
        )
        if not alive:
            row.failures.insert(0, "the server exited")
        if unclear:
            row.failures.append(f"{len(unclear)} refusal(s) not RESOURCE_EXHAUSTED/UNAVAILABLE: {' | '.join(unclear)}")
        await run.close()  # before the tmpfs goes
        return row


Scenario = Callable[[Run], Awaitable[Row]]

SCENARIOS: dict[str, Scenario] = {
    "worker-kill-restart": lambda run: worker_kill(run, restart=True),
    "worker-kill": lambda run: worker_kill(run, restart=False),
    "server-kill": server_kill,
    "stream-reset": lambda run: stream_faults(run, stall=False),
    "stream-stall": lambda run: stream_faults(run, stall=True),
    "cancels": lambda run: concurrent_kills(run, time_limit=False),
    "time-limits": lambda run: concurrent_kills(run, time_limit=True),
    "cancel-during-create": cancel_during_create,
    "sigterm-drain": sigterm_drain,
    "postgres-stop": lambda run: postgres_outage(run, stop_seconds=5 if run.quick else 30),
    "postgres-restart": lambda run: postgres_outage(run, stop_seconds=0),
    "replica-kill-followers": replica_kill_followers,
    "disk-full-server": lambda run: disk_full(run, on_server=True),
    "disk-full-worker": lambda run: disk_full(run, on_server=False),
}
