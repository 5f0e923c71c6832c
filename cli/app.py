"""The `jobwire` command: every option also reads a `JOBWIRE_<OPTION>` environment variable.

Errors are one line on stderr with the exit codes of `jobwire.cli.console`.
"""

from __future__ import annotations

import logging
import sys

from cyclopts import App
from cyclopts.config import Env
from rich.console import Console
from rich.text import Text

import jobwire
from jobwire.cli.console import CliError, exit_code, fail
from jobwire.core.memory import keep_freed_buffers
from jobwire.errors import JobwireError

app = App(
    name="jobwire",
    help="Public compute queues: submit Docker jobs, run them on workers you bring.",
    version=jobwire.__version__,
    config=Env("JOBWIRE_", command=False),
    error_console=Console(stderr=True, soft_wrap=True, highlight=False),
    error_formatter=lambda error: Text(f"error: {' '.join(str(error).split())} (see --help)"),
)
app.command("jobwire.cli.jobs:job", help="Submit, inspect and follow jobs.")
app.command("jobwire.cli.queues:queue", help="Create queue names, watch queues and their workers.")
app.command("jobwire.cli.files:file", help="Upload, download and look up blobs by key.")
app.command("jobwire.cli.services:up", help="Run server, Envoy and a local worker on this machine.")
app.command("jobwire.cli.services:server", help="Run the jobwire gRPC server.")
app.command("jobwire.cli.services:worker", help="Run a worker that takes jobs of a queue.")
app.command("jobwire.cli.agents:mcp", help="Serve MCP over stdio for a local AI agent.")
app.register_install_completion_command(add_to_startup=False)


def main() -> None:
    """Console entry point: run the command; errors are one line and a distinct non-zero exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("mcp").setLevel(logging.WARNING)  # a line per MCP request otherwise
    keep_freed_buffers()  # servers, workers and `jobwire file` move big files
    try:
        result = app(_stdin_marker(sys.argv[1:]), exit_on_error=True)
    except (CliError, JobwireError) as error:
        fail(str(error), exit_code(error))
    except KeyboardInterrupt:
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)


def _stdin_marker(argv: list[str]) -> list[str]:
    """`job add QUEUE -` reads the definition from stdin; cyclopts takes a lone `-` for an option, so name it."""
    if argv[:2] == ["job", "add"] and "-" in argv:
        at = argv.index("-")
        return [*argv[:at], "--definition=-", *argv[at + 1 :]]
    return argv
