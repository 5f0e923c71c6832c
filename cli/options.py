"""Options taken from settings dataclasses for a command that exposes only some of their fields (`up`).

`jobwire server` and `jobwire worker` take their settings dataclass whole (`Parameter(name="*")`);
`subset` is for a command that combines parts of several: each field keeps the type, parser and
help it was declared with, so nothing about a setting is written twice."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Annotated, Any

import docstring_parser
from cyclopts import Parameter


def help_texts(settings: type) -> dict[str, str]:
    """Each field's help: its attribute docstring, on one line."""
    parsed = docstring_parser.parse_from_object(settings)
    return {param.arg_name: " ".join((param.description or "").split()) for param in parsed.params}


def subset(name: str, picks: Mapping[str, tuple[type, str]], defaults: Mapping[str, Any]) -> type[Any]:
    """A frozen dataclass whose field `new` is `picks[new] = (Settings, field)`: that field's type, parser,
    help and default, unless `defaults[new]` gives another."""
    fields = []
    for new, (settings, old) in picks.items():
        declared = {field.name: field for field in dataclasses.fields(settings)}[old]
        hint = typing.get_type_hints(settings, include_extras=True)[old]
        default = defaults.get(new, declared.default)
        option = Annotated[hint, Parameter(help=help_texts(settings)[old])]  # type: ignore[valid-type]  # known at run time
        fields.append((new, option, dataclasses.field(default=default)))
    made = dataclasses.make_dataclass(name, fields, frozen=True, kw_only=True)
    made.__module__ = __name__  # cyclopts resolves a dataclass's field types in its module
    return made
