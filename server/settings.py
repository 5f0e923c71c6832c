"""The server's settings, filled at the CLI edge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs to know; defaults are the embedded single-machine setup."""

    data_directory: Path = Path("./jobwire-data")
    database: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    public_url: str = "http://localhost:8080"
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    inline_limit: int = 200
    max_upload_size: int = 10 * 1024**3
    reap_interval_seconds: float = 1.0
    retention_seconds: float = 30 * 24 * 3600.0
    sweep_interval_seconds: float = 3600.0
    max_log_entries: int = 1_000_000
