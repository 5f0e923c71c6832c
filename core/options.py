"""How settings that people write in human units read from the command line: durations and sizes.

A settings dataclass marks such a field `Annotated[float, DURATION]` (or `SIZE`); the CLI's options are
derived from the dataclasses, so a field's parser, its default's display and its help live with it."""

from __future__ import annotations

from collections.abc import Sequence

from cyclopts import Parameter, Token

from jobwire.core.egress import parse_allow
from jobwire.core.units import format_duration, parse_duration, parse_size


def _duration(_: object, tokens: Sequence[Token]) -> float:
    return parse_duration(tokens[0].value)


def _size(_: object, tokens: Sequence[Token]) -> int:
    return parse_size(tokens[0].value)


def _egress_allow(_: object, tokens: Sequence[Token]) -> tuple[str, ...]:
    return parse_allow(token.value for token in tokens)


def _show_allow(entries: tuple[str, ...]) -> str:
    return ",".join(entries) or "none"


DURATION = Parameter(converter=_duration, show_default=format_duration, metavar="DURATION", n_tokens=1)
"""Seconds, given as `30s`, `20m`, `1h30m` or `30d`."""
SIZE = Parameter(converter=_size, metavar="SIZE", n_tokens=1)
"""Bytes, given as `512m`, `4g` or `1GiB`."""
EGRESS_ALLOW = Parameter(
    converter=_egress_allow, show_default=_show_allow, metavar="HOST|NETWORK,…", negative_iterable=()
)
"""Allow-list entries of the egress policy (`jobwire.core.egress`), comma-separated or repeated."""
INTERNAL = Parameter(parse=False)
"""Not a command-line option: a knob that tests and benchmarks turn."""
