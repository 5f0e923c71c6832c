"""The `jobwire` command: every option also reads a `JOBWIRE_<OPTION>` environment variable."""

from __future__ import annotations

import logging
import sys

from cyclopts import App
from cyclopts.config import Env

import jobwire
from jobwire.cli.console import CliError, fail

app = App(
    name="jobwire",
    help="Public compute queues: submit Docker jobs, run them on workers you bring.",
    version=jobwire.__version__,
    config=Env("JOBWIRE_", command=False),
)
app.command("jobwire.cli.services:up")
app.command("jobwire.cli.services:server")
app.command("jobwire.cli.services:worker")
app.command("jobwire.cli.jobs:job")


def main() -> None:
    """Console entry point: run the command; errors are one line and a non-zero exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result = app(exit_on_error=True)
    except CliError as error:
        fail(str(error))
    except KeyboardInterrupt:
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)
