"""The shared runner: sizes, the measurements each figure returns, the table and the result files."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Measurement:
    """One row of the table: jobwire's number, the baseline's, and their ratio against the goal."""

    figure: str
    metric: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float
    goal: str
    met: bool | None = None
    notes: str = ""


@dataclass
class Sizes:
    """Every size a figure reads; full by default, tiny with `--quick`, each overridable by name."""

    values: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.values[name]


FULL = {
    "overhead_runs": 15,  # figure 1: jobs (and `docker run`s) timed one after another
    "throughput_jobs": 2000,  # figure 2: jobs per mode
    "throughput_workers": 8,
    "throughput_slots": 4,  # slots of each simulated worker
    "throughput_in_flight": 64,  # figure 2 "batches": submissions in flight at once
    "load_jobs": 200,  # figure 3
    "log_lines": 500_000,  # figure 4
    "file_mib": 1024,  # figure 5
    "file_repeats": 6,  # figure 5: rounds of every transfer and the raw copy (each first once); medians reported
    "idle_workers": 1000,  # figure 6
    "idle_seconds": 15,
    "queued_jobs": 100_000,
    "latency_calls": 20,
    "long_log_mib": 256,  # figure 7: the long log (Mi characters; the server keeps 256 Mi per log)
    "read_calls": 20,  # figure 7: result.json reads of each job
    "postgres_jobs": 2000,  # figure 8: jobs per run (workers, slots and batch size as figure 2's)
    "postgres_rounds": 2,  # figure 8: rounds of SQLite and PostgreSQL runs, alternated; medians reported
    "postgres_replicas": 3,  # figure 8: most server replicas on one PostgreSQL
}
QUICK = {
    "overhead_runs": 2,
    "throughput_jobs": 40,
    "throughput_workers": 2,
    "throughput_slots": 2,
    "throughput_in_flight": 8,
    "load_jobs": 4,
    "log_lines": 2000,
    "file_mib": 4,
    "file_repeats": 1,
    "idle_workers": 10,
    "idle_seconds": 1,
    "queued_jobs": 200,
    "latency_calls": 3,
    "long_log_mib": 4,
    "read_calls": 3,
    "postgres_jobs": 40,
    "postgres_rounds": 1,
    "postgres_replicas": 2,
}


def sizes(quick: bool, overrides: Mapping[str, str], environ: Mapping[str, str]) -> Sizes:
    """Defaults, then `JOBWIRE_BENCH_<NAME>` from the environment, then `--size name=value`."""
    chosen = dict(QUICK if quick else FULL)
    for name in chosen:
        if (env := environ.get(f"JOBWIRE_BENCH_{name.upper()}")) is not None:
            chosen[name] = int(env)
    for name, value in overrides.items():
        if name not in chosen:
            raise SystemExit(f"unknown size {name!r}; known: {', '.join(chosen)}")
        chosen[name] = int(value)
    return Sizes(chosen)


def machine() -> dict[str, object]:
    """Cores, CPU model, load and versions: recorded with every table."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _number(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(rows: list[Measurement]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| figure | metric | jobwire | baseline | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        met = {True: "yes", False: "no", None: "-"}[row.met]
        lines.append(
            f"| {row.figure} | {row.metric} | {_number(row.value)} {row.unit} "
            f"| {row.baseline}: {_number(row.baseline_value)} {row.unit} | {_number(row.ratio)} | {row.goal} | {met} |"
        )
    return "\n".join(lines)


Figure = Callable[["Context"], Awaitable[list[Measurement]]]


@dataclass
class Context:
    """What every figure gets: its sizes, a scratch folder, and a way to report progress."""

    sizes: Sizes
    scratch: Path
    quick: bool

    def say(self, text: str) -> None:
        print(f"  {text}", flush=True)


def write(rows: list[Measurement], errors: dict[str, str], info: dict[str, object], directory: Path) -> Path:
    """Write the raw JSON and the markdown table of this run; returns the markdown file."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = {"machine": info, "rows": [asdict(r) for r in rows], "errors": errors}
    (directory / "last.json").write_text(json.dumps(raw, indent=2) + "\n")
    header = f"Machine: {info['cores']} cores, {info['cpu']}, load {info['load_average']} at {info['time']}\n\n"
    failures = "".join(f"\n- figure {name} failed: {error}" for name, error in errors.items())
    markdown = directory / "last.md"
    markdown.write_text(header + table(rows) + "\n" + failures + "\n")
    return markdown


async def until(check: Callable[[], Awaitable[bool]], interval: float = 0.02, timeout: float = 3600) -> None:
    """Poll `check` until true: the systems measured tell their progress only when asked."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - no event to wait on across processes
            await asyncio.sleep(interval)
