"""GPU devices of a worker, handed to jobs whole: `requirements.gpus: N` takes N free devices."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class GpuPool:
    """The worker's devices (`--gpus`), each lent to at most one job at a time."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices)
        self.lent: set[str] = set()

    @property
    def free(self) -> list[str]:
        return [device for device in self.devices if device not in self.lent]

    def take(self, count: int) -> list[str]:
        """`count` free devices, lowest first; ValueError when there are not that many."""
        if count > len(self.free):
            raise ValueError(
                f"the job needs {count} GPU(s); this worker has {len(self.free)} free of {len(self.devices)}"
            )
        taken = self.free[:count]
        self.lent.update(taken)
        return taken

    def take_these(self, devices: Iterable[str]) -> list[str]:
        """Mark devices as lent again (a job resumed after a restart keeps its devices)."""
        taken = [device for device in devices if device in self.devices]
        self.lent.update(taken)
        return taken

    def give_back(self, devices: Iterable[str]) -> None:
        self.lent.difference_update(devices)
