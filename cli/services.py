"""Long-running commands: `server`, `worker`, and `up` (server + Envoy + a local worker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
from collections.abc import Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import httpx
from cyclopts import Parameter

from jobwire.agents.http import AgentsServer
from jobwire.cli.console import CliError
from jobwire.cli.front import WILDCARDS, browser_origins, private_hosts, tls_secret
from jobwire.cli.options import subset
from jobwire.cli.webui import DEFAULT_DIRECTORY, WebServer
from jobwire.client import Client
from jobwire.core import egress
from jobwire.envoy import config as envoy_config
from jobwire.server.app import build_server
from jobwire.server.settings import ServerSettings
from jobwire.worker.daemon import Daemon
from jobwire.worker.docker_runtime import DockerRuntime
from jobwire.worker.errors import Refused
from jobwire.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


async def server(settings: Annotated[ServerSettings | None, Parameter(name="*")] = None) -> None:
    """Run the jobwire gRPC server and its agents' HTTP app (put Envoy in front for REST, gRPC-Web, MCP)."""
    settings = settings or ServerSettings()
    built = await build_server(settings)
    if not settings.mcp_port:
        await _until_signal(built.run())
        return
    loopback = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
    loopback = f"[{loopback}]" if ":" in loopback and not loopback.startswith("[") else loopback
    agents = agents_server(f"{loopback}:{built.port}", settings.public_url, settings.host, settings.mcp_port)

    async def both() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(built.run())
            group.create_task(agents.run())

    await _until_signal(both())


def agents_server(target: str, public_url: str, host: str = "127.0.0.1", port: int = 0) -> AgentsServer:
    """The agents' HTTP app (MCP, /llms.txt) for the gRPC server at `target`, on host:port."""
    try:
        return AgentsServer(Client(target, public_url=public_url), host, port)
    except OSError as error:
        raise CliError(f"cannot listen on {host}:{port} for MCP ({error.strerror}); see --mcp-port") from None


async def worker(settings: Annotated[WorkerSettings, Parameter(name="*")], *, debug: bool = False) -> None:
    """Run a worker: dial out to the server, take jobs of QUEUE, run them in Docker.

    The first SIGTERM or Ctrl-C drains: no new jobs, running ones get `--drain-timeout` to finish,
    the rest go back to the queue at once. A second one stops at once (jobs are then re-queued
    after the server's grace period, or resumed if the worker comes back with the same id).

    Parameters
    ----------
    debug
        Log every message of the worker stream.
    """
    if debug:
        logging.getLogger("jobwire").setLevel(logging.DEBUG)
    daemon = Daemon(settings, _docker(settings.cpus))
    try:
        await _until_signal(daemon.run(), drain=lambda: daemon.drain(settings.drain_timeout))
    except Refused as refused:
        raise CliError(str(refused)) from None


# The settings `up` exposes, by the names it gives them.
UP_SETTINGS = {
    "grpc_port": (ServerSettings, "port"),
    "queue": (WorkerSettings, "queue"),
    "cpus": (WorkerSettings, "cpus"),
    "max_job_duration": (WorkerSettings, "max_job_duration"),
    "egress_allow": (WorkerSettings, "egress_allow"),
}
# Where `up` needs another default than the worker's: a queue for its worker, 2 jobs at once so
# that a first sweep shows jobs running side by side, and the private networks (one person's machine
# on their own network; loopback, where Envoy and the server live, and link-local stay refused) as
# what url inputs, build contexts and webhooks may reach.
UP_DEFAULTS = {"queue": "local", "cpus": 2, "egress_allow": egress.PRIVATE_NETWORKS}
Local = subset("Local", UP_SETTINGS, UP_DEFAULTS)


async def up(
    *,
    port: int = 8080,
    listen: str = "127.0.0.1",
    allow_origin: tuple[str, ...] = (),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    data_directory: Path = ServerSettings.data_directory,
    web_directory: Path = DEFAULT_DIRECTORY,
    local: Annotated[Local | None, Parameter(name="*")] = None,  # type: ignore[valid-type]  # a class made at import
) -> None:
    """Run everything on this machine: server, Envoy on PORT, a worker on queue `local`, the web UI, and
    MCP for AI agents at /mcp (with /llms.txt).

    Parameters
    ----------
    port
        Envoy's port: REST, gRPC and gRPC-Web.
    listen
        Address Envoy listens on. Loopback by default: only this machine can reach it, and only by a
        loopback name (`localhost`, `127.0.0.1`, `[::1]`) or this address, so a web page whose name
        points here (DNS rebinding) gets a 403. `0.0.0.0` lets others in, by any name (anyone who can
        reach the port may then submit to queue `local`).
    allow_origin
        Origin (`https://host[:port]`) of a web page that may call this server from a browser; repeat
        for more; `*` lets any page call it (public CORS, as a public server's Envoy does). The web UI
        at http://localhost:PORT and http://127.0.0.1:PORT always may; list the origin you reach it by
        otherwise. A page on an origin not listed can neither read an answer nor submit.
    tls_cert
        Certificate chain (PEM) Envoy serves: PORT then speaks only TLS (https://, gRPC over HTTP/2).
        Replacing the file (moving a new one into its folder) takes effect without a restart.
    tls_key
        The certificate's private key (PEM); goes with `--tls-cert`.
    data_directory
        One folder for the database, blobs and the worker's files.
    web_directory
        The built web client (`make web` builds web/dist), served at http://localhost:PORT/.
    """
    local = local or Local()
    data_directory = data_directory.resolve()
    secret = tls_secret(tls_cert, tls_key, data_directory / "envoy-tls.yaml")
    scheme = "https" if secret else "http"
    # Only Envoy faces the network; the server listens on loopback, whatever `jobwire server` defaults to.
    settings = ServerSettings(
        data_directory=data_directory / "server",
        host="127.0.0.1",
        port=local.grpc_port,
        public_url=f"{scheme}://localhost:{port}",
        egress_allow=local.egress_allow,
        offered_queue=local.queue,
    )
    worker_settings = WorkerSettings(
        local.queue,
        server=f"127.0.0.1:{local.grpc_port}",
        cpus=local.cpus,
        data_directory=data_directory / "worker",
        max_job_duration=local.max_job_duration,
        egress_allow=local.egress_allow,
    )
    runtime = _docker(local.cpus)
    built = await build_server(settings)
    web = WebServer(web_directory)
    agents = agents_server(f"127.0.0.1:{built.port}", settings.public_url)
    envoy_file = envoy_config.write(
        envoy_config.render(
            listen_port=port,
            upstreams=[("127.0.0.1", built.port)],
            descriptor_path=descriptor_path(),
            web=(web.host, web.port),
            agents=[(agents.host, agents.port)],
            listen_host=listen,
            allowed_origins=browser_origins(port, allow_origin, scheme),
            allowed_hosts=private_hosts(listen, port),
            tls_secret=secret,
            file_limit=envoy_file_limit(),
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
            group.create_task(agents.run())
            group.create_task(run_envoy(envoy_file, port, host=listen, tls=secret is not None))

    await _until_signal(everything())


def descriptor_path() -> Path:
    """The packaged descriptor set of jobwire.v1 that Envoy transcodes with."""
    return Path(str(resources.files("jobwire.v1").joinpath("jobwire.binpb")))


def envoy_file_limit() -> int:
    """The open-file limit Envoy will start with: this process's soft limit raised to its hard
    limit (Envoy inherits it; above the hard limit only a privileged parent could go), so that its
    connection cap can be set below it (`envoy_config.render(file_limit=…)`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1_048_576 if hard == resource.RLIM_INFINITY else hard
    if soft != wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


async def start_envoy(
    config_file: Path, port: int, *, host: str = "127.0.0.1", tls: bool = False
) -> asyncio.subprocess.Process:
    """Start Envoy and wait until it answers /healthz on host:port (through to the server)."""
    process = await asyncio.create_subprocess_exec(
        envoy_config.envoy_binary(), "-c", str(config_file), "--log-level", "warn", "--use-dynamic-base-id"
    )
    probed = "127.0.0.1" if host in WILDCARDS else f"[{host}]" if ":" in host else host
    try:
        await _wait_healthy(f"{'https' if tls else 'http'}://{probed}:{port}/healthz", process)
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
    upstreams: list[tuple[str, int]],
    config_file: Path,
    *,
    web: tuple[str, int] | None = None,
    agents: list[tuple[str, int]] | None = None,
    tls_secret: Path | None = None,
    attempts: int = 3,
) -> tuple[asyncio.subprocess.Process, int]:
    """Envoy on a free loopback port in front of `upstreams`, and that port: for tests and benchmarks.

    With `tls_secret` (a `jobwire.envoy.tls.secret()` file) it speaks only TLS. The port is free when
    picked, but another process can bind it before Envoy does; a start that fails is tried again on
    another port."""

    def configured(port: int) -> Path:
        upstream = envoy_config.render(
            listen_host="127.0.0.1",
            listen_port=port,
            upstreams=upstreams,
            descriptor_path=descriptor_path(),
            web=web,
            agents=agents or (),
            tls_secret=tls_secret,
            file_limit=envoy_file_limit(),
        )
        return envoy_config.write(upstream, config_file)

    tls = tls_secret is not None
    for _ in range(attempts - 1):
        port = free_port()
        with contextlib.suppress(CliError):
            return await start_envoy(configured(port), port, tls=tls), port
    port = free_port()
    return await start_envoy(configured(port), port, tls=tls), port


async def stop_envoy(process: asyncio.subprocess.Process) -> None:
    """Terminate Envoy, killing it if it does not exit within 5 s."""
    if process.returncode is None:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
    if process.returncode is None:
        process.kill()
        await process.wait()


async def run_envoy(config_file: Path, port: int, *, host: str = "127.0.0.1", tls: bool = False) -> None:
    """Run Envoy until cancelled; an exit of its own is an error."""
    process = await start_envoy(config_file, port, host=host, tls=tls)
    try:
        scheme = "https" if tls else "http"
        log.info("jobwire is up: web UI, REST, gRPC and gRPC-Web on %s://localhost:%d/", scheme, port)
        code = await process.wait()
        raise CliError(f"envoy exited with code {code}")
    finally:
        await stop_envoy(process)


async def _wait_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    # Not verified: the certificate may name only the public host, and this asks only whether Envoy
    # is up, sending nothing that needs protecting.
    async with httpx.AsyncClient(verify=False) as client:
        for _ in range(200):
            if process.returncode is not None:
                raise CliError(f"envoy exited with code {process.returncode} (port in use?)")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise CliError(f"envoy did not become healthy at {url}")


def _docker(slots: int) -> DockerRuntime:
    try:
        return DockerRuntime.from_env(slots)
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
