"""The composition root: builds the grpc.aio server from settings and runs it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobwire.core import egress
from jobwire.server.blobs import BlobStore, open_blobs
from jobwire.server.bus import EventBus, open_bus
from jobwire.server.logs import LogHub
from jobwire.server.metrics import Metrics
from jobwire.server.retention import Retention
from jobwire.server.scheduler import Scheduler
from jobwire.server.servicers.files import FileServicer
from jobwire.server.servicers.jobs import JobServicer
from jobwire.server.servicers.queues import QueueServicer
from jobwire.server.servicers.server import ServerServicer
from jobwire.server.servicers.workers import WorkerServicer
from jobwire.server.settings import ServerSettings
from jobwire.server.store import StateStore, open_store
from jobwire.server.waiting import Lines
from jobwire.server.webhooks import Webhooks
from jobwire.v1 import (
    files_pb2,
    files_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    queues_pb2,
    queues_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
)

log = logging.getLogger(__name__)
Loop = Callable[[], Coroutine[None, None, None]]
RETRY_FIRST, RETRY_MOST = 0.5, 10.0
"""Seconds a background loop waits before it starts again after an error: doubling, capped."""
RECOVERED_AFTER = 5.0
"""Seconds a restarted loop must run without an error to count as recovered (and log so)."""
MAX_MESSAGE = 64 * 1024 * 1024
SERVICES = [
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    files_pb2.DESCRIPTOR.services_by_name["FileService"].full_name,
    server_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name,
    queues_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name,
    workers_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
]
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A fixed receive window per stream. With BDP probing, gRPC sizes it by how fast bytes
    # arrive, not by how fast the handler takes them: a fast sender (Envoy relaying a REST
    # upload) had up to 160 MiB of one upload buffered in the server. 4 MiB keeps 1 MiB
    # chunks flowing (and one upload at ~80 MB/s over a 50 ms round trip).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
]


@dataclass
class Server:
    """A built server: the grpc.aio server, the port it listens on, what it owns (closed when it
    stops) and the loops it runs beside the calls."""

    grpc_server: grpc.aio.Server
    port: int
    store: StateStore
    scheduler: Scheduler
    health: health.aio.HealthServicer
    blobs: BlobStore
    bus: EventBus
    loops: list[Loop]

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Serve until cancelled, then stop gracefully."""
        await self.grpc_server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("jobwire server listening on port %d", self.port)
        if started is not None:
            started.set()
        try:
            async with asyncio.TaskGroup() as group:
                for loop in self.loops:
                    group.create_task(supervised(loop)())
        finally:
            try:
                await self.health.enter_graceful_shutdown()
                await self.grpc_server.stop(grace=2)
            finally:
                await self.bus.close()
                await self.blobs.close()
                await self.store.close()


def supervised(loop: Loop, name: str = "") -> Loop:
    """`loop`, kept running: an error (the database down, a full disk…) never ends it, nor the
    server. The first error of an outage is logged once with its cause, later ones only at debug
    level; the loop starts again after 0.5 s, 1 s, 2 s, … (at most RETRY_MOST apart), and once it has
    run RECOVERED_AFTER seconds without an error it logs that it recovered."""
    name = name or getattr(loop, "__qualname__", repr(loop))

    async def run() -> None:
        failures = 0
        while True:
            task = asyncio.create_task(loop(), name=name)
            try:
                if failures:
                    done, _ = await asyncio.wait([task], timeout=RECOVERED_AFTER)
                    if not done:
                        log.warning("%s: recovered after %d retries", name, failures)
                        failures = 0
                await task
                return  # a loop that ends by itself is done
            except asyncio.CancelledError:
                task.cancel()
                raise
            except Exception as error:
                if failures == 0:
                    log.warning(
                        "%s failed (%s: %s); retrying with backoff until it recovers", name, type(error).__name__, error
                    )
                else:
                    log.debug("%s failed again: %s: %s", name, type(error).__name__, error)
                delay = min(RETRY_FIRST * 2**failures, RETRY_MOST)
                failures += 1
            await asyncio.sleep(delay)

    return run


async def build_server(settings: ServerSettings, clock: Callable[[], float] = time.time) -> Server:
    """Wire store, blobs, bus, scheduler and servicers into a server bound to its port."""
    settings.data_directory.mkdir(parents=True, exist_ok=True)
    store = await open_store(settings.database, settings.data_directory)
    blobs = await open_blobs(
        settings.blobs,
        settings.data_directory,
        endpoint=settings.s3_endpoint,
        public_endpoint=settings.s3_public_endpoint,
        region=settings.s3_region,
    )
    bus = await open_bus(settings.database)
    metrics = Metrics()
    scheduler = Scheduler(store, bus, settings, clock, metrics)
    logs = LogHub(store, bus, settings.max_log_chars)
    lines = Lines(bus)  # this replica's worker sessions waiting for work, by queue
    server = grpc.aio.server(options=GRPC_OPTIONS)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(scheduler, logs, blobs), server)
    files_pb2_grpc.add_FileServiceServicer_to_server(FileServicer(blobs, settings.max_upload_size, metrics), server)
    server_pb2_grpc.add_ServerServiceServicer_to_server(ServerServicer(scheduler, settings), server)
    queues_pb2_grpc.add_QueueServiceServicer_to_server(QueueServicer(scheduler), server)
    workers_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(scheduler, logs, lines, clock), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    retention = Retention(
        store, blobs, clock, settings.retention_seconds, settings.sweep_interval_seconds, scheduler.expire_queued
    )
    loops = [scheduler.reap, retention.run, Webhooks(store, clock, egress.Policy(settings.egress_allow)).run]
    return Server(server, port, store, scheduler, health_servicer, blobs, bus, loops)
