"""The server's settings, filled at the CLI edge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs to know; defaults are the embedded single-machine setup."""

    data_directory: Path = Path("./jobwire-data")
    database: str = ""
    """State store URL: `postgresql://…` (several replicas share it; the event bus then runs over it
    too), `sqlite:///PATH`, or empty for `<data_directory>/jobwire.db`."""
    blobs: str = ""
    """Blob store URL: `s3://bucket/prefix`, or empty for `<data_directory>/blobs`."""
    s3_endpoint: str = ""
    """The S3-compatible service's URL (MinIO, moto, …) as the server reaches it; empty: AWS."""
    s3_public_endpoint: str = ""
    """The same service's URL as clients reach it, for presigned URLs; empty: `s3_endpoint`."""
    s3_region: str = ""
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
    max_log_chars: int = 256 * 1024 * 1024
