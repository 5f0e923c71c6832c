"""Real backing services for the scale-out tests: a throwaway PostgreSQL cluster and an S3 server.

PostgreSQL is Debian's (`make postgres` installs it): `initdb` into a fresh temporary
folder, `postgres` on a free loopback port with durability off (tests never need a crash
to survive), one database per test. As root the cluster runs as the `postgres` user, since
PostgreSQL refuses to run as root. The S3 server is moto's (`moto_server`), a subprocess.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from jobwire.cli.services import free_port


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed; `make postgres` installs Debian's (as `make test` does)")
    return Path(initdb).parent


class PostgresCluster:
    """A PostgreSQL cluster of its own in a temporary folder, listening on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="jobwire-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.process: subprocess.Popen[bytes] | None = None

    def _as_owner(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    def start(self) -> None:
        data = self.directory / "data"
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        subprocess.run(
            self._as_owner(str(self.bin / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8"),
            check=True,
            capture_output=True,
        )
        self.launch()

    def launch(self) -> None:
        """Start the postmaster on the cluster's data (again, after `halt`) and wait until it accepts."""
        data = self.directory / "data"
        options = ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        options += ["-c", "max_connections=300", "-c", f"unix_socket_directories={self.directory}"]
        with (self.directory / "postgres.log").open("ab") as log:
            self.process = subprocess.Popen(
                self._as_owner(
                    str(self.bin / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port), *options
                ),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        for _ in range(300):
            probe = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            )
            if probe.returncode == 0:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start: {(self.directory / 'postgres.log').read_text()[-2000:]}")

    def halt(self) -> None:
        """Stop the server (fast shutdown: open connections are ended), keeping its data for `resume`."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # its own session: runuser passes no signal on
            self.process.wait(60)

    def resume(self) -> None:
        """Start the server again on the same data and port (after `halt`)."""
        self.launch()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def socket_dsn(self, database: str = "postgres") -> str:
        """`dsn` over the cluster's Unix socket (as a server on the same machine would connect)."""
        return f"postgresql://{self.user}@/{database}?host={self.directory}&port={self.port}"

    async def create_database(self, *, socket: bool = False) -> str:
        """A fresh, empty database; returns its URL (over TCP, or `socket_dsn`)."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        connection = await asyncpg.connect(self.dsn())
        try:
            await connection.execute(f"CREATE DATABASE {name}")
        finally:
            await connection.close()
        return self.socket_dsn(name) if socket else self.dsn(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: smart shutdown is fine, nothing is connected by now
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """A started throwaway cluster, stopped and removed afterwards; the test fails if it cannot start."""
    cluster = PostgresCluster()
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        cluster.stop()
        pytest.fail(f"cannot start PostgreSQL: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


class S3Server:
    """moto's S3-compatible HTTP server on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.log = directory / "moto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=out, start_new_session=True
            )
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"moto_server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
