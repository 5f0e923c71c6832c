"""The worker's settings: each declared once here, with its help, default and parser.

`jobwire worker` takes one option per field (`jobwire.cli.services`), except fields marked `INTERNAL`.
Adding an option is adding a field here."""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Annotated, Literal

from cyclopts import Parameter, Token

from jobwire.core.options import DURATION, EGRESS_ALLOW, SIZE


def parse_gpus(spec: str) -> tuple[str, ...]:
    """GPU device ids from `2` (devices 0 and 1), `device=1,3` or `all` (every device nvidia-smi lists)."""
    spec = spec.strip().strip("'\"")
    if spec.startswith("device="):
        return tuple(d.strip() for d in spec.removeprefix("device=").split(",") if d.strip())
    if spec == "all":
        return tuple(str(i) for i in range(_count_gpus()))
    try:
        return tuple(str(i) for i in range(int(spec)))
    except ValueError:
        raise ValueError(f"expected a count, 'device=1,3' or 'all', not {spec!r}") from None


def _count_gpus() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def _gpus(_: object, tokens: Sequence[Token]) -> tuple[str, ...]:
    return parse_gpus(tokens[0].value)


def _show_gpus(devices: tuple[str, ...]) -> str:
    return f"device={','.join(devices)}" if devices else "0"


GPUS = Parameter(
    alias="-g", converter=_gpus, show_default=_show_gpus, metavar="N|device=1,3|all", n_tokens=1, negative_iterable=()
)


CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL", "NET_BIND_SERVICE")
"""What ordinary images need as root: own and reach their files (package managers, chown in
entrypoints), change user (`su`, `gosu`, apt's `_apt`), signal their own processes, listen on a port
below 1024. Docker's defaults also keep NET_RAW (raw sockets: ARP and ICMP spoofing on the job
network), MKNOD, SYS_CHROOT, SETFCAP, SETPCAP, FSETID and AUDIT_WRITE, which no ordinary job needs."""


@functools.cache
def _machine_cpus() -> int:
    """The machine's CPUs, read once: `os.cpu_count` reads a file under /sys on every call."""
    return os.cpu_count() or 1


@functools.cache
def _physical_pages() -> int:
    """The machine's pages of physical memory, read once."""
    return os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker serves, where it connects, and how much it runs at once."""

    queue: str
    """The queue to serve."""
    _: KW_ONLY
    server: Annotated[str, Parameter(alias="-s")] = "localhost:8080"
    """The server's gRPC address (Envoy's port or the server's own)."""
    cpus: Annotated[int, Parameter(alias="-c")] = 1
    """Most jobs to run at once."""
    gpus: Annotated[tuple[str, ...], GPUS] = ()
    """GPUs to offer: a count (`2`), a device list (`device=1,3`) or `all`."""
    data_directory: Annotated[Path, Parameter(alias="-d")] = Path("/tmp/jobwire-worker")
    """Where job files, the blob cache and the worker id live."""
    max_job_duration: Annotated[float, DURATION, Parameter(alias="-t")] = 3600.0
    """Longest a job may run here; a job's own `maxDuration` may be shorter."""
    worker_id: Annotated[str, Parameter(name="id")] = ""
    """The worker's id; by default one is created once and kept in the data directory."""
    credential: str = ""
    """The queue's worker credential, from `jobwire queue new` (prefer JOBWIRE_CREDENTIAL: command
    lines are visible to every user of the machine); a queue that exists only by name needs none."""
    drain_timeout: Annotated[float, DURATION] = 60.0
    """On shutdown, how long running jobs may take to finish before they are handed back."""
    default_memory: Annotated[int, SIZE] = 0
    """Memory of each job (its slot's share; a job's `requirements.memory` may ask for less, not
    more); 0: this machine's memory divided by `--cpus`."""
    pids_limit: int = 4096
    """Most processes a job's container may have."""
    capabilities: tuple[str, ...] = CAPABILITIES
    """The Linux capabilities a job's container keeps; every other one is dropped."""
    container_log_size: Annotated[int, SIZE] = 16 * 1024**2
    """Most bytes of a job's output the Docker engine keeps in its own log (jobwire reads the output
    as it is written; the engine's log serves only a job followed again after a worker restart)."""
    disk_size: Annotated[int, SIZE] = 0
    """Most bytes a job may write to its container's own filesystem (0: no limit; needs a storage
    driver that supports it, such as overlay2 on XFS with project quotas)."""
    container_runtime: str = ""
    """The Docker runtime to run jobs with, e.g. `runsc` (gVisor) once installed; empty: Docker's default."""
    job_network: Literal["jobs", "none"] = "jobs"
    """The network of jobs' containers and their build steps: `jobs`, a bridge of their own that reaches
    the internet but not the other jobs; `none`, no network at all (a job then needs everything in its
    image and inputs, and a build cannot download)."""
    max_outputs: int = 20_000
    """Most output files a job may leave; beyond them (or the server's own limit) it finishes as an
    error naming the limit, with no outputs."""
    max_output_size: Annotated[int, SIZE] = 10 * 1024**3
    """Most bytes a job's output files may hold in total (or the server's own limit, if smaller)."""
    tls: bool = False
    """Dial the server over TLS even when `--server` is a bare `host:port` (`https://…` implies it)."""
    ca_file: Annotated[Path | None, Parameter(show_default=True)] = None
    """PEM root certificates to trust for the server's TLS certificate (none: the system's)."""
    egress_allow: Annotated[tuple[str, ...], EGRESS_ALLOW] = ()
    """Hosts and networks (`10.0.0.0/8,files.lab.example`) that jobs' `url` inputs and build contexts
    may be fetched from although they are loopback, link-local, private or otherwise not public
    (refused by default). A URL naming the server's own `/f/KEY` is always fetched, over the worker's
    connection."""
    max_download_size: Annotated[int, SIZE] = 10 * 1024**3
    """Largest `url` input or build context the worker fetches."""
    git_archive_base: str = "https://github.com"
    """Where a build context naming a Git repository (`https://[user:token@]github.com/OWNER/REPO`,
    optionally `/tree/REF`, or a repository on this base's own host) is fetched from as the archive
    of its ref (`OWNER/REPO/archive/refs/heads/REF.zip`, then `OWNER/REPO/archive/REF.zip`): GitHub's
    by default; a GitHub Enterprise or any Git host serving archives the same way."""
    upload_patience: Annotated[float, DURATION] = 3600.0
    """How long the worker keeps retrying to store a finished job's output files while the server is
    unreachable or out of space or its bucket fails, before the job finishes as an error. An output
    the server refuses for good (past its size limit) is an error at once."""

    def job_memory_default(self) -> int:
        """A job's memory share: `default_memory`, else the machine's physical memory per slot."""
        if self.default_memory:
            return self.default_memory
        return _physical_pages() // max(self.cpus, 1) * os.sysconf("SC_PAGE_SIZE")  # whole pages

    def job_cpus_default(self) -> float:
        """A job's CPU share: the machine's CPUs per slot."""
        return _machine_cpus() / max(self.cpus, 1)

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

    def secret(self) -> str:
        """The worker's secret, which proves its id to the server: made on the first start and kept
        in the data directory, readable by its owner only."""
        path = self.data_directory / "worker-secret"
        if path.exists():
            return path.read_text().strip()
        self.data_directory.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secret + "\n")
        return secret
