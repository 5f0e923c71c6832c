"""What `job add` submits: its flags and a definition on stdin, as the SDK's submit options."""

from __future__ import annotations

import sys
from json import loads
from pathlib import Path
from typing import Any

from jobwire import SubmitOptions
from jobwire.cli.console import CliError
from jobwire.errors import InvalidDefinition

DEFAULT_IMAGE = "alpine:latest"


def stdin_definition() -> tuple[dict[str, Any], str | None]:
    """The definition JSON on stdin (a bare definition or the seed's `{definition, control}`) and its namespace."""
    return parsed_definition(sys.stdin.read(), "stdin")


def definition_lines(text: str, where: str) -> list[dict[str, Any]]:
    """The definitions of a JSON Lines text, one a line (blank lines skipped), each read as
    `parsed_definition` reads one (a line's `control` is not used: `add-many` takes `--namespace`)."""
    return [
        parsed_definition(line, f"line {number} of {where}")[0]
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def parsed_definition(text: str, where: str) -> tuple[dict[str, Any], str | None]:
    """A definition JSON (bare, or the seed's `{definition, control}`) and its namespace, if any."""
    try:
        payload = loads(text)
    except ValueError as error:
        raise InvalidDefinition(f"invalid definition on {where}: {error}") from None
    if not isinstance(payload, dict):
        raise InvalidDefinition(f"invalid definition on {where}: expected a JSON object")
    if "definition" not in payload:
        return payload, None
    definition, control = payload["definition"], payload.get("control") or {}
    if not isinstance(definition, dict) or not isinstance(control, dict):
        raise InvalidDefinition(f"invalid definition on {where}: `definition` and `control` must be objects")
    return definition, control.get("namespace")


def submit_options(
    base: dict[str, Any] | None,
    image: str,
    files: list[Path] | None,
    command: str | None,
    env: list[str] | None,
    gpus: int | None,
    max_duration: str | None,
    build_file: Path | None,
    context: Path | None,
    git: str | None = None,
) -> SubmitOptions:
    """The SDK's submit options from the flags (only those given, so a stdin definition keeps its own)."""
    options: SubmitOptions = {}
    built = bool(base and ("image" in base or "build" in base)) or any(
        given is not None for given in (build_file, context, git)
    )
    if image or not built:
        options["image"] = image or DEFAULT_IMAGE  # the seed's default
    if files:
        options["files"] = files
    if command is not None:
        options["command"] = command
    if env:
        options["env"] = dict(_pair(text) for text in env)
    if gpus is not None:
        options["gpus"] = gpus
    if max_duration is not None:
        options["max_duration"] = max_duration
    _add_build(options, build_file, context, git)
    return options


def _add_build(options: SubmitOptions, build_file: Path | None, context: Path | None, git: str | None) -> None:
    """The build flags: a Dockerfile's contents, a local context folder or a Git repository."""
    if build_file is not None:
        try:
            options["dockerfile"] = build_file.read_text()
        except OSError as error:
            raise InvalidDefinition(f"cannot read --build-file {build_file}: {error.strerror}") from None
    if context is not None:
        options["context"] = context
    if git is not None:
        options["git"] = git


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CliError(f"--env expects KEY=VALUE, not {text!r}", 2)
    return key, value
