"""Parsing of the duration and size strings that job definitions carry."""

from __future__ import annotations

import re

from google.protobuf import timestamp_pb2

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
    "weeks": 604800.0,
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zµ]+)\s*", re.IGNORECASE)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_duration(text: str) -> float:
    """Seconds in `text`: `"90s"`, `"20m"`, `"1h30m"`, `"1.5h"`; a bare number is milliseconds."""
    stripped = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        return float(stripped) / 1000
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(stripped):
        unit = match.group(2).lower()
        if match.start() != position or unit not in _DURATION_UNITS:
            break
        total += float(match.group(1)) * _DURATION_UNITS[unit]
        position = match.end()
    if not stripped or position != len(stripped):
        raise ValueError(f"not a duration: {text!r} (try '30s', '20m' or '1h30m')")
    return total


def parse_size(text: str) -> int:
    """Bytes in `text`: `"1024"`, `"512m"`, `"2g"`, `"1GB"`, `"1.5GiB"`; units are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try '512m' or '2g')")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** _SIZE_POWERS[unit])


def format_duration(seconds: float) -> str:
    """`seconds` as a short duration string (`"1h30m"`, `"2.5s"`, `"30d"`)."""
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [
        f"{days}d" if days else "",
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp for Unix time `seconds` (microsecond precision)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(round(seconds * 1e6))
    return stamp
