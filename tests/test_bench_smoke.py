"""Every benchmark figure runs at `--quick` size and yields numbers (no timing is asserted)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from bench.__main__ import FIGURES, parse, run

pytestmark = [pytest.mark.docker, pytest.mark.envoy, pytest.mark.timeout(300)]


@pytest.mark.usefixtures("docker_images")
async def test_each_figure_produces_a_number(tmp_path: Path) -> None:
    pytest.importorskip("arq", reason="the peers are the `bench` extra: make bench installs them")
    pytest.importorskip("celery", reason="the peers are the `bench` extra: make bench installs them")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is missing: make bench installs Debian's")
    rows, errors = await run(parse(["--quick", "--out", str(tmp_path)]))
    assert errors == {}
    assert {row.figure.split()[0] for row in rows} == set(FIGURES)
    for row in rows:
        assert math.isfinite(row.value), row
