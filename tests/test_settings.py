"""`jobwire server`, `worker` and `up` take their options from the settings dataclasses, one declaration each."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import typing
from typing import Any

import docstring_parser
import pytest
from cyclopts import CycloptsError
from rich.console import Console

from jobwire.cli.app import app
from jobwire.cli.services import UP_DEFAULTS, UP_SETTINGS
from jobwire.core.units import format_duration
from jobwire.server.settings import ServerSettings
from jobwire.worker.settings import WorkerSettings

# Options that are no setting of the server or the worker, each declared by its command.
COMMAND_OWN = {
    "server": set[str](),
    "worker": {"--debug"},  # this process's log level
    # Envoy's port, address and allowed browser origins, one folder for all, the web client
    "up": {"--port", "--listen", "--allow-origin", "--tls-cert", "--tls-key", "--data-directory", "--web-directory"},
}
# Settings that are no options: knobs for tests and benchmarks.
INTERNAL = {
    "heartbeat_seconds",
    "inline_limit",
    "max_upload_size",
    "reap_interval_seconds",
    "sweep_interval_seconds",
    "max_log_chars",
}
# Fields whose flag is not their name, as README and deployments spell them.
FLAGS = {"lease_seconds": "--worker-grace", "retention_seconds": "--retention", "worker_id": "--id"}
DURATIONS = {"lease_seconds", "retention_seconds", "max_job_duration", "drain_timeout", "upload_patience", "queued_ttl"}


def help_rows(command: str) -> dict[str, str]:
    """`jobwire COMMAND --help` as printed: each option's first flag and the text beside it."""
    output = io.StringIO()
    app.help_print([command], console=Console(file=output, width=1000, color_system=None))
    rows = {}
    for line in output.getvalue().splitlines():
        if row := re.fullmatch(r"│\s*(?:\*\s+)?(?:[A-Z_]+ )?(?P<flag>--\S+).*?\s{2,}(?P<help>.+?)\s*│", line):
            rows[row["flag"]] = row["help"]
    return rows


def described(settings: type, field: str, flag: str, default: Any) -> str:
    """The help line a field's option should have: its docstring, environment variable and default."""
    docs = docstring_parser.parse_from_object(settings).params
    text = " ".join(next(doc.description or "" for doc in docs if doc.arg_name == field).split())
    assert text, f"{settings.__name__}.{field} has no help text"
    variable = "JOBWIRE_" + flag.removeprefix("--").replace("-", "_").upper()
    hint = typing.get_type_hints(settings)[field]
    choices = f"[choices: {', '.join(typing.get_args(hint))}] " if typing.get_origin(hint) is typing.Literal else ""
    return f"{text.replace('`', '')} {choices}[env var: {variable}] {shown_default(field, default)}"


def shown_default(field: str, default: Any) -> str:
    if default is dataclasses.MISSING:
        return "[required]"
    if field in DURATIONS:
        return f"[default: {format_duration(default)}]"
    if field == "gpus":
        return "[default: 0]"  # no devices
    if field == "egress_allow":
        return "[default: " + (",".join(default) or "none") + "]"
    return "[default: " + ('""' if default == "" else str(default)) + "]"


def declared(command: str) -> dict[str, str]:
    """What each option of `command` should say, from the settings dataclasses alone."""
    if command == "up":
        picked = {name: (*field, UP_DEFAULTS.get(name)) for name, field in UP_SETTINGS.items()}
    else:
        settings = ServerSettings if command == "server" else WorkerSettings
        picked = {f.name: (settings, f.name, None) for f in dataclasses.fields(settings) if f.name not in INTERNAL}
    lines = {}
    for name, (settings, field, override) in picked.items():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        default = next(f.default for f in dataclasses.fields(settings) if f.name == field)
        lines[flag] = described(settings, field, flag, default if override is None else override)
    return lines


@pytest.mark.parametrize("command", ["server", "worker", "up"])
def test_help_shows_every_setting_with_its_help_and_default_and_no_other_option(command: str) -> None:
    rows, expected = help_rows(command), declared(command)
    assert {flag: rows.get(flag) for flag in expected} == expected
    assert set(rows) - set(expected) == COMMAND_OWN[command]


def test_every_internal_setting_is_a_field() -> None:
    fields = {f.name for settings in (ServerSettings, WorkerSettings) for f in dataclasses.fields(settings)}
    assert fields >= INTERNAL


def parsed(*argv: str) -> Any:
    """The one object `jobwire ARGV` hands its command (its settings)."""
    _, bound, _ = app.parse_args(list(argv), exit_on_error=False, print_error=False)
    return next(iter(bound.arguments.values()))


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [name for name in os.environ if name.startswith("JOBWIRE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_human_units_and_the_environment_fill_the_settings(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("JOBWIRE_WORKER_GRACE", "15s")
    assert parsed("server", "--retention", "7d", "--host", "127.0.0.1") == ServerSettings(
        host="127.0.0.1", lease_seconds=15, retention_seconds=7 * 86400
    )
    worker = ["worker", "q", "-t", "20m", "--drain-timeout", "1m", "--default-memory", "4g", "-g", "device=1,3"]
    assert parsed(*worker, "--id", "w-1") == WorkerSettings(
        "q", max_job_duration=1200, drain_timeout=60, default_memory=4 * 1024**3, gpus=("1", "3"), worker_id="w-1"
    )
    local = parsed("up", "--grpc-port", "7", "--max-job-duration", "2h")
    assert (local.grpc_port, local.queue, local.cpus, local.max_job_duration) == (7, "local", 2, 7200)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["worker", "q", "--gpus", "lots"], "--gpus"),
        (["worker", "q", "--default-memory", "4x"], "--default-memory"),
        (["server", "--worker-grace", "soon"], "--worker-grace"),
        (["server", "--heartbeat-seconds", "1"], "--heartbeat-seconds"),  # internal: no option
    ],
)
def test_a_bad_value_or_an_internal_setting_is_an_error_naming_the_option(
    environment: pytest.MonkeyPatch, argv: list[str], option: str
) -> None:
    with pytest.raises(CycloptsError, match=option):
        parsed(*argv)
