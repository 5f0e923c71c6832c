"""The server's settings: each declared once here, with its help, default and parser.

`jobwire server` takes one option per field (`jobwire.cli.services`), except fields marked `INTERNAL`:
knobs for tests and benchmarks. Adding an option is adding a field here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter

from jobwire.core.options import DURATION, EGRESS_ALLOW, INTERNAL, SIZE


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything the server needs to know; defaults are the embedded single-machine setup."""

    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = 50051
    """gRPC port."""
    mcp_port: int = 0
    """Port (on `--host`) of the HTTP app for AI agents, which Envoy routes `/mcp`, `/mcp/health` and
    `/llms.txt` to: MCP over Streamable HTTP, talking to this server's gRPC port (the reference
    deployment uses 50052); 0, the default, runs none (`jobwire up` always runs it)."""
    data_directory: Path = Path("./jobwire-data")
    """Where the SQLite database and the blobs live."""
    database: str = ""
    """State store URL: `postgresql://USER:PASSWORD@HOST/DB` lets several replicas share the state (and
    their event bus then runs over it, with LISTEN/NOTIFY); empty means the SQLite file
    `<data-directory>/jobwire.db`."""
    blobs: str = ""
    """Blob store URL: `s3://BUCKET/PREFIX` keeps files in an S3-compatible bucket (credentials from the
    usual AWS sources, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); empty means
    `<data-directory>/blobs`."""
    s3_endpoint: str = ""
    """URL of the S3-compatible service (MinIO, moto, ...) as this server reaches it; empty for AWS."""
    s3_public_endpoint: str = ""
    """URL of the same service as clients and workers reach it, used in presigned URLs; empty: the same
    as `--s3-endpoint`."""
    s3_region: str = ""
    """The bucket's region; empty: from the AWS configuration, else us-east-1."""
    public_url: str = "http://localhost:8080"
    """Base URL of the REST API as users reach it (used in JOB_URL_PREFIX)."""
    offered_queue: str = ""
    """A queue the server names to anyone who asks (its web page offers it to a first visit) while a
    worker serves it; `jobwire up` offers its local queue. Empty: none, as a public server should (a
    queue's name is the right to use it)."""
    lease_seconds: Annotated[float, DURATION, Parameter(name="worker-grace")] = 30.0
    """How long a silent worker (no heartbeat, no stream) keeps its jobs before they are re-queued as
    worker-lost; a worker that reconnects within it keeps them, with no restart."""
    require_worker_credential: bool = False
    """Refuse workers on queues without a worker credential (those that exist only by name): a public
    server sets it, so that only queues made by `jobwire queue new` are served, by their credential's
    holders."""
    egress_allow: Annotated[tuple[str, ...], EGRESS_ALLOW] = ()
    """Hosts and networks (`10.0.0.0/8,hooks.lab.example`) that webhooks may call although they are
    loopback, link-local, private or otherwise not public (refused by default)."""
    retention_seconds: Annotated[float, DURATION, Parameter(name="retention")] = 30 * 24 * 3600.0
    """How long finished jobs (results, logs, history) are kept."""
    queued_ttl: Annotated[float, DURATION] = 28 * 24 * 3600.0
    """How long a job may wait in its queue for a worker; past it, it finishes as expired (and is
    forgotten after `--retention`, its definition's bytes with it). 0 keeps queued jobs forever."""
    max_queued_jobs: int = 100_000
    """Most jobs one queue may hold queued; a submission past it is refused (RESOURCE_EXHAUSTED, HTTP
    429). 0: no limit."""
    max_queue_bytes: Annotated[int, SIZE] = 1024**3
    """Most bytes of job definitions (inline inputs included) one queue may hold, its queued,
    running and finished jobs' together (finished ones until `--retention` forgets them); a
    submission past it is refused (RESOURCE_EXHAUSTED, HTTP 429). Uploaded files count toward no
    queue: a file is shared by its key. 0: no limit."""
    heartbeat_seconds: Annotated[float, INTERNAL] = 5.0
    """How often workers are told to send a heartbeat."""
    inline_limit: Annotated[int, INTERNAL] = 200
    """Largest file, in bytes, that clients send inline in a submission rather than as a blob."""
    max_upload_size: Annotated[int, INTERNAL] = 10 * 1024**3
    """Largest blob, in bytes, the server accepts."""
    reap_interval_seconds: Annotated[float, INTERNAL] = 1.0
    """How often expired leases are looked for."""
    sweep_interval_seconds: Annotated[float, INTERNAL] = 3600.0
    """How often finished jobs past retention are swept."""
    max_outputs: int = 20_000
    """Most output files a job's result may list; a worker leaving more reports the job as an error
    (workers learn it when they register, and obey the smaller of it and their own limit)."""
    max_output_size: Annotated[int, SIZE] = 10 * 1024**3
    """Most bytes a job's output files may hold in total; workers learn it when they register and
    obey the smaller of it and their own limit (the server sees only the result, not the files)."""
    max_log_chars: Annotated[int, INTERNAL] = 256 * 1024 * 1024
    """Most characters of text kept per log (a notice marks the cut)."""
