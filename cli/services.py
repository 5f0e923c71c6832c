"""Long-running commands: `server`, `worker`, and `up` (server + Envoy + a local worker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
from collections.abc import Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import httpx
from cyclopts import Parameter

from jobwire.cli.console import CliError
from jobwire.cli.webui import DEFAULT_DIRECTORY, WebServer
from jobwire.core.units import parse_duration, parse_size
from jobwire.envoy import config as envoy_config
from jobwire.server.app import build_server
from jobwire.server.settings import ServerSettings
from jobwire.worker.daemon import Daemon
from jobwire.worker.runner import DockerRuntime
from jobwire.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


async def server(
    *,
    host: str = "0.0.0.0",
    port: int = 50051,
    data_directory: Path = Path("./jobwire-data"),
    database: str = "",
    blobs: str = "",
    s3_endpoint: str = "",
    s3_public_endpoint: str = "",
    s3_region: str = "",
    public_url: str = "http://localhost:8080",
    worker_grace: str = "30s",
    retention: str = "30d",
) -> None:
    """Run the jobwire gRPC server (put Envoy in front of it for REST and gRPC-Web).

    Parameters
    ----------
    host
        Address to listen on.
    port
        gRPC port.
    data_directory
        Where the SQLite database and the blobs live.
    database
        State store URL: `postgresql://USER:PASSWORD@HOST/DB` lets several replicas share the state
        (and their event bus then runs over it, with LISTEN/NOTIFY); empty means the SQLite file
        `<data-directory>/jobwire.db`.
    blobs
        Blob store URL: `s3://BUCKET/PREFIX` keeps files in an S3-compatible bucket (credentials from
        the usual AWS sources, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); empty means
        `<data-directory>/blobs`.
    s3_endpoint
        URL of the S3-compatible service (MinIO, moto, ...) as this server reaches it; empty for AWS.
    s3_public_endpoint
        URL of the same service as clients and workers reach it, used in presigned URLs; empty: the
        same as `--s3-endpoint`.
    s3_region
        The bucket's region; empty: from the AWS configuration, else us-east-1.
    public_url
        Base URL of the REST API as users reach it (used in JOB_URL_PREFIX).
    worker_grace
        How long a silent worker (no heartbeat, no stream) keeps its jobs before they are re-queued
        as worker-lost; a worker that reconnects within it keeps them, with no restart.
    retention
        How long finished jobs (results, logs, history) are kept.
    """
    settings = ServerSettings(
        data_directory=data_directory,
        database=database,
        blobs=blobs,
        s3_endpoint=s3_endpoint,
        s3_public_endpoint=s3_public_endpoint,
        s3_region=s3_region,
        host=host,
        port=port,
        public_url=public_url,
        lease_seconds=parse_duration(worker_grace),
        retention_seconds=parse_duration(retention),
    )
    built = await build_server(settings)
    await _until_signal(built.run())


async def worker(
    queue: str,
    *,
    server: Annotated[str, Parameter(name=["--server", "-s"])] = "localhost:8080",
    cpus: Annotated[int, Parameter(name=["--cpus", "-c"])] = 1,
    gpus: Annotated[str, Parameter(name=["--gpus", "-g"])] = "0",
    data_directory: Annotated[Path, Parameter(name=["--data-directory", "-d"])] = Path("/tmp/jobwire-worker"),
    max_job_duration: Annotated[str, Parameter(name=["--max-job-duration", "-t"])] = "1h",
    id: str = "",
    drain_timeout: str = "1m",
    default_memory: str = "",
    pids_limit: int = 4096,
    debug: bool = False,
) -> None:
    """Run a worker: dial out to the server, take jobs of QUEUE, run them in Docker.

    The first SIGTERM or Ctrl-C drains: no new jobs, running ones get `--drain-timeout` to finish,
    the rest go back to the queue at once. A second one stops at once (jobs are then re-queued
    after the server's grace period, or resumed if the worker comes back with the same id).

    Parameters
    ----------
    queue
        The queue to serve.
    server
        The server's gRPC address (Envoy's port or the server's own).
    cpus
        Most jobs to run at once.
    gpus
        GPUs to offer: a count (`2`), a device list (`device=1,3`) or `all`.
    data_directory
        Where job files, the blob cache and the worker id live.
    max_job_duration
        Longest a job may run here; a job's own `maxDuration` may be shorter.
    id
        The worker's id; by default one is created once and kept in the data directory.
    drain_timeout
        On shutdown, how long running jobs may take to finish before they are handed back.
    default_memory
        Memory limit of jobs whose definition sets none (`requirements.memory`); default 80% of
        this machine's memory.
    pids_limit
        Most processes a job's container may have.
    debug
        Log every message of the worker stream.
    """
    if debug:
        logging.getLogger("jobwire").setLevel(logging.DEBUG)
    settings = WorkerSettings(
        queue=queue,
        server=server,
        cpus=cpus,
        gpus=parse_gpus(gpus),
        data_directory=data_directory,
        max_job_duration=parse_duration(max_job_duration),
        worker_id=id,
        default_memory=parse_size(default_memory) if default_memory else 0,
        pids_limit=pids_limit,
    )
    daemon = Daemon(settings, _docker())
    await _until_signal(daemon.run(), drain=lambda: daemon.drain(parse_duration(drain_timeout)))


async def up(
    *,
    port: int = 8080,
    grpc_port: int = 50051,
    data_directory: Path = Path("./jobwire-data"),
    queue: str = "local",
    cpus: int = 2,
    max_job_duration: str = "1h",
    web_directory: Path = DEFAULT_DIRECTORY,
) -> None:
    """Run everything on this machine: server, Envoy on PORT, a worker on queue `local`, the web UI.

    Parameters
    ----------
    port
        Envoy's port: REST, gRPC and gRPC-Web.
    grpc_port
        The server's own gRPC port (loopback only).
    data_directory
        One folder for the database, blobs and the worker's files.
    queue
        The queue the local worker serves.
    cpus
        Most jobs the local worker runs at once.
    max_job_duration
        Longest a job may run on the local worker.
    web_directory
        The built web client (`make web` builds web/dist), served at http://localhost:PORT/.
    """
    data_directory = data_directory.resolve()
    settings = ServerSettings(
        data_directory=data_directory / "server",
        host="127.0.0.1",
        port=grpc_port,
        public_url=f"http://localhost:{port}",
    )
    worker_settings = WorkerSettings(
        queue=queue,
        server=f"127.0.0.1:{grpc_port}",
        cpus=cpus,
        data_directory=data_directory / "worker",
        max_job_duration=parse_duration(max_job_duration),
    )
    runtime = _docker()
    built = await build_server(settings)
    web = WebServer(web_directory)
    envoy_file = envoy_config.write(
        envoy_config.render(
            listen_port=port,
            upstreams=[("127.0.0.1", built.port)],
            descriptor_path=descriptor_path(),
            web=(web.host, web.port),
        ),
        data_directory / "envoy.yaml",
    )

    async def everything() -> None:
        started = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(built.run(started))
            await started.wait()
            group.create_task(Daemon(worker_settings, runtime).run())
            group.create_task(web.run())
            group.create_task(run_envoy(envoy_file, port))

    await _until_signal(everything())


def descriptor_path() -> Path:
    """The packaged descriptor set of jobwire.v1 that Envoy transcodes with."""
    return Path(str(resources.files("jobwire.v1").joinpath("jobwire.binpb")))


async def start_envoy(config_file: Path, port: int) -> asyncio.subprocess.Process:
    """Start Envoy and wait until it answers /healthz (through to the server)."""
    process = await asyncio.create_subprocess_exec(
        envoy_config.envoy_binary(), "-c", str(config_file), "--log-level", "warn", "--use-dynamic-base-id"
    )
    try:
        await _wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
    except BaseException:
        await stop_envoy(process)
        raise
    return process


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_local_envoy(
    upstreams: list[tuple[str, int]], config_file: Path, *, web: tuple[str, int] | None = None, attempts: int = 3
) -> tuple[asyncio.subprocess.Process, int]:
    """Envoy on a free loopback port in front of `upstreams`, and that port: for tests and benchmarks.

    The port is free when picked, but another process can bind it before Envoy does; a start that
    fails is tried again on another port."""

    def configured(port: int) -> Path:
        upstream = envoy_config.render(
            listen_host="127.0.0.1",
            listen_port=port,
            upstreams=upstreams,
            descriptor_path=descriptor_path(),
            web=web,
        )
        return envoy_config.write(upstream, config_file)

    for _ in range(attempts - 1):
        port = free_port()
        with contextlib.suppress(CliError):
            return await start_envoy(configured(port), port), port
    port = free_port()
    return await start_envoy(configured(port), port), port


async def stop_envoy(process: asyncio.subprocess.Process) -> None:
    """Terminate Envoy, killing it if it does not exit within 5 s."""
    if process.returncode is None:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
    if process.returncode is None:
        process.kill()
        await process.wait()


async def run_envoy(config_file: Path, port: int) -> None:
    """Run Envoy until cancelled; an exit of its own is an error."""
    process = await start_envoy(config_file, port)
    try:
        log.info("jobwire is up: web UI, REST, gRPC and gRPC-Web on http://localhost:%d/", port)
        code = await process.wait()
        raise CliError(f"envoy exited with code {code}")
    finally:
        await stop_envoy(process)


async def _wait_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            if process.returncode is not None:
                raise CliError(f"envoy exited with code {process.returncode} (port in use?)")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise CliError(f"envoy did not become healthy at {url}")


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
        raise CliError(f"--gpus: expected a count, 'device=1,3' or 'all', not {spec!r}") from None


def _count_gpus() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def _docker() -> DockerRuntime:
    try:
        return DockerRuntime.from_env()
    except Exception as error:
        raise CliError(f"cannot reach Docker ({error}); is dockerd running? (`make docker` starts one)") from None


async def _until_signal(
    work: Coroutine[Any, Any, None], drain: Callable[[], Coroutine[Any, Any, None]] | None = None
) -> None:
    """Run `work` until it ends or SIGTERM/SIGINT arrives, then cancel it cleanly; with `drain`, the
    first signal runs it and cancels `work` when it is done, a second one cancels at once."""
    task = asyncio.ensure_future(work)
    draining: list[asyncio.Future[None]] = []

    def on_signal() -> None:
        if drain is None or draining:
            task.cancel()
            return
        log.info("draining; signal again to stop at once")
        draining.append(asyncio.ensure_future(drain()))
        draining[0].add_done_callback(lambda _: task.cancel())

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped")
    except BaseExceptionGroup as group:
        errors = group.subgroup(CliError)
        if errors is None:
            raise
        raise _first(errors) from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error = group.exceptions[0]
    return _first(error) if isinstance(error, BaseExceptionGroup) else error
