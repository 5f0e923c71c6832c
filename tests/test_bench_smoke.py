"""Every benchmark figure runs at `--quick` size and yields numbers (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest

from bench.__main__ import FIGURES, parse, run

pytestmark = [pytest.mark.docker, pytest.mark.envoy, pytest.mark.timeout(300)]


@pytest.mark.usefixtures("docker_images")
async def test_each_figure_produces_a_number(tmp_path: Path) -> None:
    """All figures when the peers (`bench` extra, redis-server) are installed; otherwise every figure
    but 2, whose baselines are arq and Celery on Redis."""
    peers = all(importlib.util.find_spec(name) for name in ("arq", "celery")) and shutil.which("redis-server")
    figures = set(FIGURES) if peers else set(FIGURES) - {"2"}
    rows, errors = await run(parse(["--quick", "--out", str(tmp_path), "--only", ",".join(sorted(figures))]))
    assert errors == {}
    assert {row.figure.split()[0] for row in rows} == figures
    for row in rows:
        assert math.isfinite(row.value), row
