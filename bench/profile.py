"""`python -m bench.profile [--label NAME] [--jobs N] [--tries N] [--out DIR]` (`make profile`): where
the server's CPU goes on the submit and claim paths, recorded with py-spy while figure 2's two jobwire
modes (and its unary one by one) run.

The setup is figure 2's (`bench.throughput`): a real `jobwire server` process, simulated workers (real
worker daemons on a fake runtime, in a process of their own) and the client in this process. For each
mode ("batches": SubmitJobs of `throughput_in_flight` jobs, one call after another; "one by one":
`client.submit` awaited one after another, on the SDK's submission stream since it has one; "one by
one, SubmitJob calls": a unary SubmitJob call each, as the SDK made before the stream and as curl does)
py-spy records the server, the workers' process and this process (`py-spy record --pid PID --rate 250
--format raw --nonblocking`), started just before the mode and stopped with SIGINT (py-spy writes on
interrupt) after its last job finished; on a busy machine a mode runs again (`--tries`, see `record`)
and the try whose samples best match its CPU time is kept.
The CPU per job is a process's CPU time over the mode (as figure 2 measures it) per job; a category's
µs per job is its share of the server's samples times the server's CPU per job.

Why `--nonblocking` and no `--native`: py-spy keeps only samples of threads it sees running, and it
sees that right only when it does not stop the process to sample it. Measured here (400 jobs a mode):
without pausing, the server's samples matched its CPU time (143 samples for 127 expected from
/proc, 34 for 33); pausing (py-spy's default, and the only way `--native` works) counted the idle
threads too (3 to 12 times the samples: the executor's threads blocked on their queue, gRPC's poller
in epoll_wait) and slowed the run 2.5 to 6 times, and grpc's Cython frames came out as bare addresses
(the module is stripped). So a C or Cython function counts in the innermost Python frame that called
it (a protobuf parse, sqlite3's `execute` in `SqliteDatabase.one`), and a few such frames are told
apart by being innermost (below).

Outputs in `--out` (default `bench/results/profile`): `<label>.md`, the tables, and
`<label>-<mode>[-workers|-client].txt.gz`, the folded stacks py-spy wrote (one line per stack: frames
root first, separated by `;`, each `function (file:line)`, then a space and the number of samples).

Categories of the server's samples. Each frame of a stack gets the category of the first rule below it
matches, or none; the sample goes to the category of the innermost frame that got one, or to "other"
if none did. So SQL run from the claim path counts as "SQLite statements", and the claim path's own
share is its Python work around the statements.

- WAL checkpoints: `SqliteStore._checkpoint` / `_checkpoint_forever` (the checkpoint thread).
- commits: `SqliteStore._commit_when_quiet` (the group commit's COMMIT and the futures it resolves).
- SQLite statements: `SqliteDatabase.*` (every statement of the shared SQL) and `SqliteStore._transaction`
  (BEGIN, SAVEPOINT, RELEASE; not the wait for the commit, which is no CPU).
- logs: anything in `server/logs.py` (the log hub).
- finish path: `WorkerSession._on_finished`, `_on_released`, `Scheduler.finished`, `Scheduler.release`.
- claim path: `WorkerSession._fill` / `_fill_forever`, `Scheduler.claim`, `SqliteStore.claim` (its one
  inline "is anything waiting" SELECT counts here), anything in `server/waiting.py` (the waiting lines).
- submit path: `JobServicer.SubmitJob` / `SubmitJobs` / `_submit` / `SubmitJobStream` (and its
  `answer`), `Scheduler.submit` / `submit_many` and the scheduler's helpers they call
  (`_store_submissions`, `_checked`, `_submitted`, `_add_webhooks`, `publish_job`).
- gRPC machinery, in three rows (and their sum):
  - poller thread: `Thread.run` when innermost (the only thread whose target is no Python code is
    gRPC's poller, Cython's `_poll_wrapper`; the executor's threads show `_worker`);
  - selector wake-ups: the asyncio selector (`*.select` of selectors.py: epoll_wait, woken by the
    poller) and `_read_from_self`, `_process_self_data`, `_process_events`;
  - calls and streams: frames of grpc's package (`grpc/aio/...`), and these when innermost:
    `Handle._run` (a callback or task step running no Python frame: with native frames, 87% of those
    samples were in grpc's Cython, the RPC handlers' coroutines that parse, call the servicer and
    serialise, and the rest in C task steps), `_send` and `WorkerServicer.Connect` (the worker
    stream's `context.write` and read, Cython), `SubmitJobStream` and its `answer` (the submission
    stream's read and `context.write`).
- worker stream, other: the rest of `server/sessions.py` and `server/servicers/workers.py` (receiving and
  dispatching the stream's messages, heartbeats, the outbox) and `Scheduler.started` / `renew`.
- event loop: asyncio's own turn (`BaseEventLoop._run_once`, `run_forever`, and `Handle._run` when it
  is not innermost but nothing inner is categorised).
- other: everything else (e.g. the bus, metrics, protobuf's Python helpers, garbage collection).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import peers
from bench.runner import RESULTS, Context, machine, sizes
from bench.throughput import MODES, UNARY, _cpu_by_process, _simulated_stack, mode_calls, timed, timed_batches
from jobwire import Client

PY_SPY = str(Path(sys.executable).parent / "py-spy")
RATE = 250
EXCESS = 1.3
"""Server samples per sample its CPU time accounts for, above which a mode's profile is taken again."""
OUT = RESULTS / "profile"
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

Rule = Callable[[str, str, bool], bool]
"""Whether a frame (function, file, whether it is the stack's innermost) belongs to a category."""


def _named(*names: str) -> Rule:
    """Frames whose function (its qualified name, as py-spy shows it) is one of `names`."""
    wanted = frozenset(names)
    return lambda name, _file, _leaf: name in wanted


def _in_file(*suffixes: str) -> Rule:
    return lambda _name, file, _leaf: file.endswith(suffixes)


def _leaf(*names: str) -> Rule:
    """Frames of `names` that are innermost: running C or Cython code, which py-spy does not show."""
    wanted = frozenset(names)
    return lambda name, _file, leaf: leaf and name in wanted


def _outer(*names: str) -> Rule:
    """Frames of `names` that are not innermost (see `_leaf`)."""
    wanted = frozenset(names)
    return lambda name, _file, leaf: not leaf and name in wanted


def _any(*rules: Rule) -> Rule:
    return lambda name, file, leaf: any(rule(name, file, leaf) for rule in rules)


def _grpc(_name: str, file: str, _leaf: bool) -> bool:
    return file.startswith("grpc/") or "/grpc/" in file


def _selector(name: str, file: str, _leaf: bool) -> bool:
    wakeups = ("._read_from_self", "._process_self_data", "._process_events")
    return (file.endswith("selectors.py") and name.endswith(".select")) or name.endswith(wakeups)


OTHER = "other"
STREAM_IO = ("JobServicer.SubmitJobStream", "JobServicer.SubmitJobStream.<locals>.answer")
"""The submission stream's reading and writing frames: innermost, they run grpc's Cython."""
CATEGORIES: list[tuple[str, Rule]] = [
    ("WAL checkpoints", _named("SqliteStore._checkpoint", "SqliteStore._checkpoint_forever")),
    ("commits", _named("SqliteStore._commit_when_quiet")),
    (
        "SQLite statements",
        _any(_named("SqliteStore._transaction"), lambda name, _file, _leaf: name.startswith("SqliteDatabase.")),
    ),
    ("logs", _in_file("server/logs.py")),
    (
        "finish path",
        _named("WorkerSession._on_finished", "WorkerSession._on_released", "Scheduler.finished", "Scheduler.release"),
    ),
    (
        "claim path",
        _any(
            _named("WorkerSession._fill", "WorkerSession._fill_forever", "Scheduler.claim", "SqliteStore.claim"),
            _in_file("server/waiting.py"),
        ),
    ),
    (
        "submit path",
        _any(
            _outer(*STREAM_IO),
            _named(
                "JobServicer.SubmitJob",
                "JobServicer.SubmitJobs",
                "JobServicer._submit",
                "Scheduler.submit",
                "Scheduler.submit_many",
                "Scheduler._store_submissions",
                "Scheduler._checked",
                "Scheduler._submitted",
                "Scheduler._add_webhooks",
                "Scheduler.publish_job",
            ),
        ),
    ),
    ("gRPC machinery: poller thread", _leaf("Thread.run")),
    ("gRPC machinery: selector wake-ups", _selector),
    (
        "gRPC machinery: calls and streams",
        _any(_grpc, _leaf("Handle._run", "_send", "WorkerServicer.Connect", *STREAM_IO)),
    ),
    (
        "worker stream, other",
        _any(_in_file("server/sessions.py", "servicers/workers.py"), _named("Scheduler.started", "Scheduler.renew")),
    ),
    ("event loop", _named("BaseEventLoop._run_once", "BaseEventLoop.run_forever", "Handle._run")),
]
ORDER = [name for name, _ in CATEGORIES] + [OTHER]


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame of a folded stack, root first (the line numbers dropped)."""
    found = []
    for frame in stack.split(";") if stack else []:
        match = FRAME.match(frame)
        found.append((match["name"], match["file"]) if match else (frame, ""))
    return found


def _labels(stack: list[tuple[str, str]]) -> Iterator[str]:
    """The category of each frame that has one, innermost first."""
    for depth, (name, file) in enumerate(reversed(stack)):
        for label, rule in CATEGORIES:
            if rule(name, file, depth == 0):
                yield label
                break


def category(stack: list[tuple[str, str]]) -> str:
    """The category of a sample: that of its innermost frame any rule matches (see the module's docstring)."""
    return next(_labels(stack), OTHER)


def parse(lines: Iterable[str]) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """The stacks of a py-spy raw (folded) file and their sample counts."""
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if count.isdigit():
            yield frames(stack), int(count)


@dataclass
class Summary:
    """A folded profile summed up: samples per category, per function (self and inclusive)."""

    samples: int = 0
    categories: collections.Counter[str] = field(default_factory=collections.Counter)
    within: collections.Counter[str] = field(default_factory=collections.Counter)  # a frame of it anywhere
    own: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)


def _scaffolding(name: str, file: str) -> bool:
    """Frames under (nearly) every sample, left out of the inclusive table: the entry point, the event
    loop's and the threads' own frames."""
    return (
        file.startswith(("asyncio/", "cyclopts/", "concurrent/futures/"))
        or file in ("threading.py", "jobwire", "cli/app.py")
        or name == "<module>"
    )


def summarise(lines: Iterable[str]) -> Summary:
    summary = Summary()
    for stack, count in parse(lines):
        summary.samples += count
        summary.categories[category(stack)] += count
        for label in set(_labels(stack)):
            summary.within[label] += count
        names = [f"{name} ({file})" if file else name for name, file in stack] or ["(no stack)"]
        summary.own[names[-1]] += count
        for name in {f"{name} ({file})" for name, file in stack if not _scaffolding(name, file)}:
            summary.inclusive[name] += count
    return summary


def _share(count: int, summary: Summary) -> float:
    return 100 * count / summary.samples if summary.samples else 0.0


def category_table(summary: Summary, cpu_us_per_job: float) -> list[str]:
    lines = [
        "| category | % of samples | CPU µs per job | % with a frame of it anywhere (what it calls included) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in ORDER:
        share = _share(summary.categories[name], summary)
        within = f"{_share(summary.within[name], summary):.1f}" if name != OTHER else "-"
        lines.append(f"| {name} | {share:.1f} | {share * cpu_us_per_job / 100:.0f} | {within} |")
    grpc = sum(summary.categories[name] for name in ORDER if name.startswith("gRPC machinery"))
    share = _share(grpc, summary)
    lines.append(f"| gRPC machinery, its three rows together | {share:.1f} | {share * cpu_us_per_job / 100:.0f} | - |")
    lines.append(f"| **all** ({summary.samples} samples) | 100 | {cpu_us_per_job:.0f} | 100 |")
    return lines


def function_table(title: str, counts: collections.Counter[str], summary: Summary, top: int = 15) -> list[str]:
    lines = [f"| {title} | % of samples |", "| --- | ---: |"]
    for name, count in counts.most_common(top):
        shown = name.replace("|", "\\|")
        lines.append(f"| `{shown}` | {_share(count, summary):.1f} |")
    return lines


@dataclass
class Recorded:
    """One mode's run: its rate, CPU per job by process, and the folded files written (by process)."""

    mode: str
    jobs_per_second: float
    cpu_ms_per_job: dict[str, float]
    files: dict[str, Path]
    jobs: int
    tries: int = 1

    @property
    def excess(self) -> float:
        """The server's samples over those its CPU time accounts for (1: none beyond)."""
        expected = self.cpu_ms_per_job["server"] / 1000 * self.jobs * RATE
        return summarise(_read(self.files["server"])).samples / expected if expected else float("inf")


class Recorder:
    """`py-spy record` of one process, from `start` to `stop` (SIGINT: py-spy writes its file then)."""

    def __init__(self, pid: int, output: Path) -> None:
        self.pid, self.output = pid, output
        self.process: asyncio.subprocess.Process | None = None
        self.said = b""

    async def start(self) -> None:
        args = [PY_SPY, "record", "--pid", str(self.pid), "--rate", str(RATE), "--format", "raw"]
        args += ["--output", str(self.output), "--nonblocking"]
        self.process = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(30):  # it says so once it samples
                while b"Sampling process" not in self.said:
                    line = await self.process.stdout.readline()
                    if not line:
                        break
                    self.said += line
        except TimeoutError:
            pass
        if b"Sampling process" not in self.said:
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
            raise RuntimeError(f"py-spy on pid {self.pid} failed: {self.said.decode(errors='replace')}")

    def interrupt(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)

    async def finish(self) -> Path:
        """Once interrupted: py-spy's file, gzipped."""
        assert self.process is not None
        rest, _ = await asyncio.wait_for(self.process.communicate(), 60)
        self.said += rest
        if not self.output.exists():
            raise RuntimeError(f"py-spy on pid {self.pid} wrote nothing: {self.said.decode(errors='replace')}")
        packed = self.output.with_suffix(".txt.gz")
        with self.output.open("rb") as raw, gzip.open(packed, "wb", compresslevel=9) as out:
            out.write(raw.read())
        self.output.unlink()
        return packed


@contextlib.asynccontextmanager
async def recording(pids: dict[str, int], stem: Path) -> AsyncIterator[dict[str, Path]]:
    """Record each process (`server` goes to `<stem>.txt`, the others to `<stem>-<name>.txt`); yields
    the dict that holds the gzipped files once the block ends."""
    recorders = {
        name: Recorder(pid, stem.with_name(stem.name + ("" if name == "server" else f"-{name}") + ".txt"))
        for name, pid in pids.items()
    }
    files: dict[str, Path] = {}
    started = []
    try:
        for name, recorder in recorders.items():
            try:
                await recorder.start()
            except RuntimeError as error:  # the client is py-spy's parent: ptrace may forbid it
                if name == "server":
                    raise
                print(f"  not recorded: {error}", flush=True)
                continue
            started.append(recorder)
        yield files
    finally:
        for recorder in started:  # all first: the gzipping below must not be in the client's profile
            recorder.interrupt()
        for name, recorder in recorders.items():
            if recorder in started:
                files[name] = await recorder.finish()


async def record(ctx: Context, label: str, out: Path, tries: int) -> list[Recorded]:
    """Figure 2's jobwire modes through one server and its simulated workers, each recorded; a mode is
    run again (up to `tries` times in all) while its server's samples exceed its CPU time by over 30%
    (a busy machine, see `report`), and the try with the least excess is kept."""
    total, in_flight = ctx.sizes["throughput_jobs"], ctx.sizes["throughput_in_flight"]
    done: list[Recorded] = []
    async with _simulated_stack(ctx) as (stack, queue, workers), Client(stack.target) as client:
        warm_up = await mode_calls(client, queue)
        await peers.warm_up(warm_up.submit, warm_up.finished)
        for mode in (*MODES, UNARY):
            best: Recorded | None = None
            for attempt in range(1, tries + 1):
                submit, call, submit_many, finished = await mode_calls(client, queue)
                pids = {"server": stack.server.pid, "workers": workers.pid, "client": os.getpid()}
                stem = out / f"{label}-{re.sub(r'[^A-Za-z]+', '-', mode)}-try{attempt}"
                async with recording(pids, stem) as files:
                    used = _cpu_by_process(stack.server.pid, workers.pid)
                    if mode == "batches":
                        rate = await timed_batches(submit_many, finished, total, in_flight)
                    else:
                        rate = await timed(call if mode == UNARY else submit, finished, total, 1, "one by one")
                    now = _cpu_by_process(stack.server.pid, workers.pid)
                cpu = {name: (now[name] - used[name]) * 1000 / total for name in now}
                run = Recorded(mode, rate.jobs_per_second, cpu, files, total, attempt)
                split = ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
                ctx.say(
                    f"{mode}, try {attempt}: {rate.jobs_per_second:.0f} jobs/s; CPU ms per job by process: "
                    f"{split}; server samples / CPU time {run.excess:.2f}"
                )
                worse, best = (best, run) if best is None or run.excess < best.excess else (run, best)
                for path in worse.files.values() if worse is not None else ():
                    path.unlink()
                if best.excess <= EXCESS:
                    break
            assert best is not None
            final = {name: Path(str(path).replace(f"-try{best.tries}", "")) for name, path in best.files.items()}
            for name, path in best.files.items():
                path.replace(final[name])
            best.files = final
            done.append(best)
    return done


def _read(path: Path) -> list[str]:
    with gzip.open(path, "rt") as folded:
        return folded.readlines()


def _commit() -> str:
    try:
        args = ["git", "rev-parse", "--short", "HEAD"]
        return subprocess.run(args, capture_output=True, text=True, check=True, cwd=peers.ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(label: str, ctx: Context, runs: list[Recorded], info: dict[str, object], tries: int) -> str:
    """The markdown page: what was run, then per mode the server's categories and top functions, and
    the workers' and client's top functions."""
    sz = ctx.sizes
    rates = "; ".join(
        f"{r.mode}: {r.jobs_per_second:,.0f} jobs/s, CPU ms per job "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in r.cpu_ms_per_job.items())
        for r in runs
    )
    lines = [
        f"# Profile `{label}`: the submit and claim paths (commit {_commit()})",
        "",
        f"`python -m bench.profile --label {label} --jobs {sz['throughput_jobs']} --tries {tries}`"
        f" at {info['time']} on {info['cores']} cores ({info['cpu']}, load "
        f"{info['load_average']} before, shared with other runs), Python {info['python']}: figure 2's setup "
        f"(one `jobwire server` on SQLite, {sz['throughput_workers']} simulated workers of "
        f"{sz['throughput_slots']} slots in one process, the client in the profiler's process), "
        f'{sz["throughput_jobs"]:,} no-op jobs per mode, "batches" as SubmitJobs of '
        f'{sz["throughput_in_flight"]} one call after another, "one by one" as `client.submit` awaited one '
        'after another (on the SDK\'s submission stream where it has one), "one by one, SubmitJob calls" as '
        f"unary SubmitJob calls awaited one after another. py-spy {_py_spy_version()} sampled each process {RATE} "
        "times a second "
        "(`--nonblocking`, no native frames), only running threads; the percentages are "
        f"shares of the server's samples, the µs per job those shares of the server's CPU time per job "
        f"over the mode. Rates while profiled (three py-spy processes sharing the cores): {rates}. "
        "Categories: see `bench/profile.py` (a sample goes to its innermost categorised frame, so SQL run "
        "by a path counts as SQLite statements). The folded stacks are beside this file "
        f"(`{label}-<mode>.txt.gz`, `-workers`, `-client`).",
    ]
    for run in runs:
        server = summarise(_read(run.files["server"]))
        us = run.cpu_ms_per_job["server"] * 1000
        heading = f"{run.jobs_per_second:,.0f} jobs/s, {us:.0f} CPU µs per job, try {run.tries}"
        lines += ["", f"## {run.mode}: server ({heading})", ""]
        expected = run.cpu_ms_per_job["server"] / 1000 * sz["throughput_jobs"] * RATE
        lines += [
            f"{server.samples} samples for {expected:.0f} expected from the server's CPU time. Samples beyond "
            "it are threads py-spy saw as running that were not on a core: waits caught as they ended (it "
            "reads a thread's state and its stack at two moments; the selector and poller rows are upper "
            "bounds) and, on a busy machine, threads ready to run but waiting for a core."
            + (
                " **Here the samples exceed the CPU time by over 30%: the shares are of time ready to run "
                "rather than of CPU; profile again on a quieter machine.**"
                if server.samples > EXCESS * expected
                else ""
            ),
            "",
            *category_table(server, us),
        ]
        lines += ["", *function_table("top 15 by self time", server.own, server)]
        lines += ["", *function_table("top 15 by inclusive time (no loop or entry frames)", server.inclusive, server)]
        for name in ("workers", "client"):
            if name in run.files:
                other = summarise(_read(run.files[name]))
                ms = run.cpu_ms_per_job[name]
                expected = ms / 1000 * sz["throughput_jobs"] * RATE
                title = f"{ms * 1000:.0f} CPU µs per job, {other.samples} samples for {expected:.0f} expected"
                lines += ["", f"### {run.mode}: {name} ({title})", ""]
                lines += function_table("top 8 by self time", other.own, other, top=8)
    return "\n".join(lines) + "\n"


def _py_spy_version() -> str:
    try:
        return subprocess.run([PY_SPY, "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default=f"after-{_commit()}", help="names the files (default after-<commit>)")
    parser.add_argument("--jobs", type=int, default=4000, help="jobs per mode (default 4000)")
    parser.add_argument("--tries", type=int, default=3, help="runs of a mode at most, on a busy machine (default 3)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the files go (default {OUT})")
    options = parser.parse_args(argv)
    if not Path(PY_SPY).exists():
        raise SystemExit(f"{PY_SPY} is missing: install the bench extra (make profile does)")
    options.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    chosen = sizes(False, {"throughput_jobs": str(options.jobs)}, os.environ)
    with tempfile.TemporaryDirectory(prefix="jobwire-profile-") as scratch:
        ctx = Context(chosen, Path(scratch), quick=False)
        runs = asyncio.run(record(ctx, options.label, options.out, options.tries))
        page = options.out / f"{options.label}.md"
        page.write_text(report(options.label, ctx, runs, info, options.tries))
    print(f"written: {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
