"""A container runtime that runs nothing: the worker's `ContainerRuntime`, answering at once.

Only for measuring the control plane (figure 2): the real server, store, streams and
protocol run; each "container" starts, prints one line and exits 0 immediately.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from jobwire.worker.runtime import STDOUT, BuildSpec, ContainerSpec, Piece, Progress, State


class FakeRuntime:
    """Every image is here, every container prints `done` and exits 0; nothing survives a restart."""

    def __init__(self) -> None:
        self.runs = 0

    async def prepare(self) -> None:
        pass

    async def ensure_image(self, image: str, progress: Progress) -> None:
        pass

    async def has_image(self, tag: str) -> bool:
        return True

    async def build(self, spec: BuildSpec, progress: Progress) -> None:
        pass

    async def create(self, spec: ContainerSpec) -> str:
        self.runs += 1
        return f"fake-{self.runs}"

    async def attach(self, container_id: str) -> AsyncGenerator[Piece, None]:
        return _done()

    async def logs(self, container_id: str) -> AsyncGenerator[Piece, None]:
        return _done()

    async def start(self, container_id: str) -> None:
        pass

    async def wait(self, container_id: str) -> int:
        return 0

    async def inspect(self, container_id: str) -> State:
        now = time.time()
        return State("exited", now, now)

    async def kill(self, container_id: str) -> None:
        pass

    async def remove(self, container_id: str) -> None:
        pass

    async def ours(self, labels: dict[str, str]) -> list[dict[str, str]]:
        return []


async def _done() -> AsyncGenerator[Piece, None]:
    yield STDOUT, b"done\n", ""
