"""`python -m bench.chaos [--quick] [--only a,b] [--out DIR]`: run the fault scenarios, print and write the table."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import traceback
from pathlib import Path

from bench.chaos.harness import Row, running, table, write
from bench.chaos.scenarios import SCENARIOS
from bench.runner import RESULTS, machine


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small variants the tests run")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"scenarios, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where chaos.json and chaos.md go")
    return parser.parse_args(argv)


async def run_one(name: str, scratch: Path, quick: bool) -> Row:
    """One scenario in its own folder and queue; an exception is its row's failure, not the end of the run."""
    started = time.perf_counter()
    try:
        async with running(scratch / name, quick) as run:
            row = await SCENARIOS[name](run)
    except Exception as error:
        traceback.print_exc()
        row = Row(name, failures=[f"the scenario broke: {error!r}"])
    row.seconds = round(time.perf_counter() - started, 1)
    return row


async def run(options: argparse.Namespace) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="jobwire-chaos-") as scratch:
        for name in (n.strip() for n in options.only.split(",")):
            print(f"scenario {name}", flush=True)
            row = await run_one(name, Path(scratch), options.quick)
            print(f"  ({row.seconds:.1f} s) {'ok' if row.ok else 'FAIL: ' + '; '.join(row.failures)}", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    info = machine()
    print(f"machine: {info['cores']} cores, {info['cpu']}, load {info['load_average']}", flush=True)
    rows = asyncio.run(run(options))
    info["load_average_after"] = machine()["load_average"]
    print("\n" + table(rows))
    print(f"\nwritten: {write(rows, info, options.out)}")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
