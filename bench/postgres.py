"""Figure 8, PostgreSQL: a job's whole life on PostgreSQL against SQLite, and 1, 2 and 3 replicas.

The figure-2 workload (no-op jobs, simulated workers in a process of their own, real `jobwire server`
processes) on a private PostgreSQL cluster (the tests' `PostgresCluster`: Debian's binaries, its own
folder and port, durability off as SQLite's `synchronous=NORMAL` WAL is: no fsync per commit;
servers connect over its Unix socket, as a server on the database's machine would) and on
SQLite, alternated (SQLite, then PostgreSQL, round after round; medians reported), since other load
on the machine shifts absolute rates. Servers run with their default limits (`--max-queued-jobs`,
`--max-queue-bytes`), so every submission checks them, as in production.

Measured for each run: jobs/s from the first submission to the last job finished; CPU ms per job of
every process of the figure (servers, workers, client and PostgreSQL's backends alike; not the whole
machine's, which other load shares: `tree_cpu_seconds`); and, from
PostgreSQL's side (`pg_stat_statements`, `track = all`, reset before each run), the statements per job
run by the servers' connections: those a server sent (each one round trip between a server and
PostgreSQL: asyncpg sends one statement per exchange, BEGIN and COMMIT included) and all of them
(triggers' statements too). The benchmark's own progress reads (`GetQueueStatus`) and the figure's
queries are left out of the counts.

Replicas: 1, 2 and 3 `jobwire server` processes on one database, each with one client and an equal
share of the simulated workers; each client submits its share of the jobs to its own replica, one by
one (each after the last one's answer) in one row, in batches in the other. That is what replicas are
for: more clients than one server process (one core of Python) can answer. The goal (2 replicas do
more than 1) is set on both rows. One by one, each client waits on its server's round trips to
PostgreSQL and a second server answers a second client meanwhile. In batches one replica already
keeps a 2-core machine busy (PostgreSQL's backends use about as much CPU as the server), so there
more replicas add only their own overhead (pools, sessions, claims skipping each other's locked rows);
and on 2 cores, 3 replicas plus PostgreSQL, workers and clients share the same two cores, so 3 cannot
do much more than 2. Both rows are shown as measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import peers
from bench.runner import Context, Measurement, until
from bench.stack import CLOCK_TICKS, JOBWIRE, Service, spawn, unique, wait_ready
from bench.throughput import noop_definition
from jobwire import Client
from jobwire.cli.services import free_port
from tests.services import PostgresCluster

FIGURE = "8 PostgreSQL"
MODES = ("one by one", "batches")
_OURS = "query NOT LIKE '%pg_stat%' AND query NOT LIKE '%GROUP BY state%'"
"""The statements counted: not this figure's own, nor the progress reads (`queue_counts`)."""
_SENT = r"toplevel AND query !~ '\m(NEW|OLD)\.'"
"""The statements a server sent: top level, but not a trigger's deferred to the commit (those run
at the top level too, and name the trigger's NEW or OLD row)."""


def tree_cpu_seconds() -> float:
    """CPU time used so far by this process and every process under it, those that ended included
    (the servers, the simulated workers, PostgreSQL's postmaster and backends, SQLite inside the
    servers): what this figure costs, and not what other load on the machine does."""
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        used[pid] = sum(int(field) for field in fields[11:15]) / CLOCK_TICKS
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


@dataclass(frozen=True)
class Run:
    """One run: its rate and costs (the statement counts are NaN on SQLite)."""

    jobs_per_second: float
    cpu_ms_per_job: float
    statements: float = float("nan")
    round_trips: float = float("nan")


@contextlib.asynccontextmanager
async def _cluster() -> AsyncIterator[PostgresCluster]:
    """The tests' throwaway cluster, restarted once with pg_stat_statements loaded."""
    cluster = PostgresCluster()
    try:
        await asyncio.to_thread(cluster.start)
        connection = await asyncpg.connect(cluster.dsn())
        try:
            await connection.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        finally:
            await connection.close()
        await asyncio.to_thread(cluster.halt)
        await asyncio.to_thread(cluster.resume)
        connection = await asyncpg.connect(cluster.dsn())
        try:  # known once the library is loaded
            await connection.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
            await connection.execute("SELECT pg_reload_conf()")
        finally:
            await connection.close()
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def _servers(ctx: Context, count: int, database: str) -> list[tuple[Service, str]]:
    """`count` servers (on `database`, or each on SQLite in its own folder when empty)."""
    started = []
    for _ in range(count):
        directory = ctx.scratch / unique("server")
        directory.mkdir(parents=True)
        port = free_port()
        args = [JOBWIRE, "server", "--host", "127.0.0.1", "--port", str(port), "--data-directory", str(directory)]
        if database:
            args += ["--database", database]
        server = await spawn(args, directory / "server.log")
        started.append((server, f"127.0.0.1:{port}"))
        await wait_ready(f"127.0.0.1:{port}", server)
    return started


async def _run(ctx: Context, mode: str, replicas: int, cluster: PostgresCluster | None) -> Run:
    """One run of `mode` through `replicas` servers (on a fresh database of `cluster`, or on SQLite)."""
    database, stats = "", None
    if cluster is not None:
        database = await cluster.create_database(socket=True)
        stats = await asyncpg.connect(database)
        await stats.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    servers: list[tuple[Service, str]] = []
    workers: list[Service] = []
    folders = Path(tempfile.mkdtemp(prefix="jobwire-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    queue = unique("bench-pg")
    try:
        servers = await _servers(ctx, replicas, database)
        count, slots = ctx.sizes["throughput_workers"], str(ctx.sizes["throughput_slots"])
        for index, (_, target) in enumerate(servers):
            share = count // replicas + (index < count % replicas)
            args = [sys.executable, "-m", "bench.throughput", target, queue, str(share), slots, str(folders)]
            workers.append(await spawn(args, ctx.scratch / f"{queue}-{index}.log", cwd=peers.ROOT))
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(Client(target)) for _, target in servers]

            async def registered() -> bool:
                for worker in workers:
                    if worker.process.returncode is not None:
                        raise RuntimeError(f"simulated workers exited: {worker.log.read_text()[-2000:]}")
                return len((await clients[0].queue_status(queue)).workers) == count

            await until(registered, timeout=60)
            return await _timed(ctx, mode, clients, queue, stats)
    finally:
        for worker in workers:
            await worker.stop()
        for server, _ in servers:
            await server.stop()
        if stats is not None:
            await stats.close()
        shutil.rmtree(folders, ignore_errors=True)


async def _timed(ctx: Context, mode: str, clients: list[Client], queue: str, stats: asyncpg.Connection | None) -> Run:
    """Each client submits its share of the jobs to its server (after a warm-up job each), until all ran."""
    replicas, batch = len(clients), ctx.sizes["throughput_in_flight"]
    share = ctx.sizes["postgres_jobs"] // replicas
    total, nonce = share * replicas, uuid.uuid4().hex

    def noop(index: int) -> dict[str, str]:
        return noop_definition(nonce, index)

    async def all_done(goal: int) -> None:
        async def done() -> bool:
            return int((await clients[0].queue_status(queue)).finished) >= goal

        await until(done, interval=0.05)

    async def submit_share(client: Client, first: int) -> None:
        if mode == "one by one":
            for index in range(first, first + share):
                await client.submit(queue, noop(index))
            return
        for start in range(first, first + share, batch):
            await client.submit_many(queue, [noop(n) for n in range(start, min(start + batch, first + share))])

    # warm-up: each replica's connections, statements and workers
    await asyncio.gather(*(client.submit(queue, noop(-1 - n)) for n, client in enumerate(clients)))
    await all_done(replicas)
    counts_before = await _counts(stats)
    busy, started = tree_cpu_seconds(), asyncio.get_running_loop().time()
    await asyncio.gather(*(submit_share(client, n * share) for n, client in enumerate(clients)))
    await all_done(total + replicas)
    elapsed = asyncio.get_running_loop().time() - started
    cpu = (tree_cpu_seconds() - busy) * 1000 / total
    if stats is None:
        return Run(total / elapsed, cpu)
    statements, round_trips = (
        (after - before) / total for after, before in zip(await _counts(stats), counts_before, strict=True)
    )
    return Run(total / elapsed, cpu, statements, round_trips)


async def _counts(stats: asyncpg.Connection | None) -> tuple[float, float]:
    """(statements, statements the servers sent) so far in this database."""
    if stats is None:
        return (0.0, 0.0)
    row = await stats.fetchrow(
        f"SELECT COALESCE(SUM(calls), 0), COALESCE(SUM(calls) FILTER (WHERE {_SENT}), 0)"
        f" FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        f" AND {_OURS}"
    )
    assert row is not None  # an aggregate answers one row
    return (float(row[0]), float(row[1]))


def _median(runs: list[Run], field: str) -> float:
    return float(statistics.median(getattr(run, field) for run in runs))


async def run(ctx: Context) -> list[Measurement]:
    rounds, counts = ctx.sizes["postgres_rounds"], tuple(range(1, ctx.sizes["postgres_replicas"] + 1))
    sqlite: dict[str, list[Run]] = {mode: [] for mode in MODES}
    pg: dict[tuple[str, int], list[Run]] = {(mode, n): [] for mode in MODES for n in counts}
    async with _cluster() as cluster:
        for round_ in range(rounds):
            for mode in MODES:
                sqlite[mode].append(await _run(ctx, mode, 1, None))
                ctx.say(f"round {round_ + 1}, {mode}, SQLite: {_shown(sqlite[mode][-1])}")
                for n in counts:
                    pg[(mode, n)].append(await _run(ctx, mode, n, cluster))
                    ctx.say(f"round {round_ + 1}, {mode}, PostgreSQL, {n} replica(s): {_shown(pg[(mode, n)][-1])}")
    rows = []
    jobs = ctx.sizes["postgres_jobs"]
    for mode in MODES:
        lite, one = sqlite[mode], pg[(mode, 1)]
        rate, base = _median(one, "jobs_per_second"), _median(lite, "jobs_per_second")
        metric = f"jobs/s, {jobs} submitted {mode}, one server: PostgreSQL"
        rows.append(
            Measurement(FIGURE, metric, rate, "jobs/s", "SQLite", base, rate / base, "≥ 0.5", rate / base >= 0.5)
        )
        cost, base = _median(one, "cpu_ms_per_job"), _median(lite, "cpu_ms_per_job")
        metric = f"CPU per job, all processes (PostgreSQL's too), submitted {mode}: PostgreSQL"
        rows.append(Measurement(FIGURE, metric, cost, "ms", "SQLite", base, cost / base, "≤ 2", cost / base <= 2))
        for field, words in (
            ("round_trips", "round trips to PostgreSQL per job (statements servers sent, BEGIN and COMMIT included)"),
            ("statements", "statements per job (triggers' included)"),
        ):
            value = _median(one, field)
            rows.append(
                Measurement(FIGURE, f"{words}, submitted {mode}", value, "", "-", float("nan"), float("nan"), "-")
            )
        base = _median(pg[(mode, 1)], "jobs_per_second")
        for n in counts[1:]:
            rate = _median(pg[(mode, n)], "jobs_per_second")
            metric = f"jobs/s, {n} replicas on PostgreSQL, a client each, submitted {mode}"
            goal, met = ("> 1", rate / base > 1) if n == 2 else ("-", None)
            rows.append(Measurement(FIGURE, metric, rate, "jobs/s", "1 replica", base, rate / base, goal, met))
    return rows


def _shown(run: Run) -> str:
    text = f"{run.jobs_per_second:.0f} jobs/s, {run.cpu_ms_per_job:.2f} CPU ms/job"
    if run.statements == run.statements:
        text += f", {run.round_trips:.1f} round trips, {run.statements:.1f} statements per job"
    return text
