"""A container runtime that runs nothing: the DockerRuntime interface, answering at once.

Only for measuring the control plane (figure 2): the real server, store, streams and
protocol run; each "container" starts, prints one line and exits 0 immediately.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from jobwire.worker.runner import STDOUT, ContainerSpec, Outcome, Output


class FakeRuntime:
    """prepare, ensure_image, run, resume, ours and remove, as worker/runner.py's DockerRuntime."""

    client = None  # builds need a Docker client; benchmark definitions never build

    def __init__(self) -> None:
        self.runs = 0

    async def prepare(self) -> None:
        pass

    async def ensure_image(self, image: str, progress: Callable[[str], object]) -> None:
        pass

    async def run(self, spec: ContainerSpec, output: Output, started: Callable[[], Awaitable[None]]) -> Outcome:
        await started()
        return await self._finish(output)

    async def resume(
        self, container_id: str, timeout: float, output: Output, started: Callable[[], Awaitable[None]]
    ) -> Outcome:
        return await self._finish(output)

    async def ours(self, labels: dict[str, str]) -> list[dict[str, str]]:
        return []  # nothing survives a restart: there were no containers

    async def remove(self, container_id: str) -> None:
        pass

    async def _finish(self, output: Output) -> Outcome:
        self.runs += 1
        now = time.time()
        await output(STDOUT, b"done\n", "")
        return Outcome(exit_code=0, timed_out=False, oom_killed=False, start_time=now, end_time=now)
