"""`make chaos` at its quick size: each scenario's guarantees hold (0 lost, 0 concurrent duplicates,
0 containers left, kills within 5 s, replicas and followers survive).

The scenarios are `bench/chaos/scenarios.py`, run on real processes, dockerd, PostgreSQL and a tmpfs
exactly as `make chaos` runs them. Four run by default (about 25 s: the kills and the stream resets,
whose guarantees no other test measures from dockerd's events); the others run in `make chaos` and
here with JOBWIRE_CHAOS_ALL=1: the slow ones (a worker that never returns waits out the grace and a
12 s job, the SIGTERM drain, the kill and reconnect rounds), and three whose faults dedicated tests
already put to the real components in less time (PostgreSQL stopped and the server's full disk:
tests/test_outages.py; a replica killed under followers through Envoy: tests/test_followers.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.chaos.__main__ import run_one

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]

FAST = [
    "cancels",
    "time-limits",
    "cancel-during-create",
    "stream-reset",
]
SLOW = [
    "replica-kill-followers",
    "disk-full-server",
    "postgres-stop",
    "worker-kill-restart",
    "worker-kill",
    "server-kill",
    "stream-stall",
    "sigterm-drain",
    "postgres-restart",
    "disk-full-worker",
]
slow = pytest.mark.skipif(
    not os.environ.get("JOBWIRE_CHAOS_ALL"), reason="slow: `make chaos` runs it (JOBWIRE_CHAOS_ALL=1 here)"
)


@pytest.mark.usefixtures("docker_images")
@pytest.mark.parametrize("name", [*FAST, *(pytest.param(name, marks=slow) for name in SLOW)])
async def test_scenario_keeps_its_guarantees(name: str, tmp_path: Path) -> None:
    row = await run_one(name, tmp_path, quick=True)
    assert row.jobs > 0, row
    assert row.ok, f"{row.scenario}: {'; '.join(row.failures)} ({row})"


def test_every_scenario_has_a_quick_variant_here() -> None:
    from bench.chaos.scenarios import SCENARIOS

    assert sorted([*FAST, *SLOW]) == sorted(SCENARIOS)
