"""`python -m bench [--quick] [--only 1,2] [--size name=value] [--out DIR]`: run figures, print, write results."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import tempfile
import time
import traceback
from pathlib import Path

from bench.runner import RESULTS, Context, Measurement, machine, sizes, table, write

FIGURES = {
    "1": "bench.overhead",
    "2": "bench.throughput",
    "3": "bench.full_load",
    "4": "bench.log_stream",
    "5": "bench.transfer",
    "6": "bench.scale",
    "7": "bench.log_reads",
    "8": "bench.postgres",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every figure runs")
    parser.add_argument("--only", default=",".join(FIGURES), help="figures to run, e.g. 1,4")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE", help="override one size")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where last.json and last.md go")
    return parser.parse_args(argv)


async def run(options: argparse.Namespace) -> tuple[list[Measurement], dict[str, str]]:
    chosen = sizes(options.quick, dict(s.split("=", 1) for s in options.size), os.environ)
    rows: list[Measurement] = []
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="jobwire-bench-") as scratch:
        for name in options.only.split(","):
            module = importlib.import_module(FIGURES[name.strip()])
            print(f"figure {name}: {module.__doc__}", flush=True)
            started = time.perf_counter()
            try:
                measured = await module.run(Context(chosen, Path(scratch), options.quick))
            except Exception as error:  # one broken figure must not hide the others
                traceback.print_exc()
                where = traceback.extract_tb(error.__traceback__)[-1]
                errors[name] = f"{error!r} at {Path(where.filename).name}:{where.lineno}"
                continue
            print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)
            print(table(measured), flush=True)
            rows.extend(measured)
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    info = machine()
    print(f"machine: {info['cores']} cores, {info['cpu']}, load {info['load_average']}", flush=True)
    rows, errors = asyncio.run(run(options))
    info["load_average_after"] = machine()["load_average"]
    print("\n" + table(rows))
    print(f"\nwritten: {write(rows, errors, info, options.out)}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
