"""The worker's settings, filled at the CLI edge."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker serves, where it connects, and how much it runs at once."""

    queue: str
    server: str = "localhost:8080"
    cpus: int = 1
    gpus: tuple[str, ...] = ()
    data_directory: Path = Path("/tmp/jobwire-worker")
    max_job_duration: float = 3600.0
    worker_id: str = ""
    inline_limit: int = 200
    default_memory: int = 0
    """Memory limit of jobs that ask for none (0: 80% of this machine's memory)."""
    pids_limit: int = 4096

    def job_memory_default(self) -> int:
        """`default_memory`, else 80% of the machine's physical memory."""
        if self.default_memory:
            return self.default_memory
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)

    def resolved_id(self) -> str:
        """`worker_id`, else the id persisted in the data directory (created once)."""
        if self.worker_id:
            return self.worker_id
        path = self.data_directory / "worker-id"
        if path.exists():
            return path.read_text().strip()
        self.data_directory.mkdir(parents=True, exist_ok=True)
        new_id = f"w-{uuid.uuid4().hex[:12]}"
        path.write_text(new_id + "\n")
        return new_id
