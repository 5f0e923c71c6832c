"""A job against its worker, on real dockerd: it cannot change what other jobs read, build beyond its
limits, or keep more than the container contract gives it (capabilities, memory, the engine's log)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import docker
import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format

from jobwire.server.app import build_server
from jobwire.server.settings import ServerSettings
from jobwire.v1 import definition_pb2, jobs_pb2, jobs_pb2_grpc
from jobwire.worker.builds import build_tag
from jobwire.worker.daemon import Daemon
from jobwire.worker.docker_runtime import DockerRuntime
from jobwire.worker.settings import CAPABILITIES, WorkerSettings
from tests.conftest import BUSYBOX, PYTHON, Stack, StartWorker, WorkerHandle, eventually, wait_finished
from tests.test_builds import tar_gz

pytestmark = pytest.mark.docker
_CAPABILITY_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6, "SETUID": 7}
_CAPABILITY_BITS |= {"NET_BIND_SERVICE": 10}


async def submit(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, **fields: object) -> str:
    definition = json_format.ParseDict(fields, definition_pb2.JobDefinition())
    return (await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(queue=queue, definition=definition))).job_id


async def run(jobs: jobs_pb2_grpc.JobServiceStub, queue: str, **fields: object) -> jobs_pb2.Job:
    return await wait_finished(jobs, await submit(jobs, queue, **fields), timeout=90, queue=queue)


def run_log(job: jobs_pb2.Job) -> str:
    return "".join(chunk.text for chunk in job.result.logs)


ATTACK = """
echo evil > /inputs/x && echo ALLOWED write
echo evil >> /inputs/x && echo ALLOWED append
chmod 666 /inputs/x && echo ALLOWED chmod
mv /inputs/x /inputs/y && echo ALLOWED rename
rm -f /inputs/x && echo ALLOWED remove
echo evil > /inputs/new && echo ALLOWED create
echo attacked
"""


async def test_a_job_cannot_change_what_the_next_job_or_a_build_reads(
    rest: httpx.AsyncClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    worker = await start_worker(queue, cpus=1)  # one worker: one blob cache for all three jobs
    archive = tar_gz(
        {
            "Dockerfile": f"FROM {BUSYBOX}\nCOPY message.txt /message.txt\n".encode(),
            "message.txt": f"the original {queue}\n".encode(),
        }
    )
    key = hashlib.sha256(archive).hexdigest()
    assert (await rest.put(f"/f/{key}", content=archive)).status_code == 200
    x = {"type": "key", "value": key}
    attack = await run(
        jobs,
        queue,
        image=BUSYBOX,
        command="sh /inputs/attack.sh",
        inputs={"x": x, "attack.sh": {"type": "utf8", "value": ATTACK}},
    )
    assert "attacked" in run_log(attack), (attack.result.message, run_log(attack))
    assert "ALLOWED" not in run_log(attack)
    reader = await run(jobs, queue, image=BUSYBOX, command="sha256sum /inputs/x", inputs={"x": x})
    assert run_log(reader).split()[0] == key
    cached = worker.daemon.settings.data_directory / "cache" / "blobs" / key
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == key
    built = await run(jobs, queue, build={"context": f"/f/{key}"}, command="cat /message.txt")
    assert built.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, built.result.message
    assert run_log(built) == f"the original {queue}\n"


def build_containers(client: docker.DockerClient, marker: str) -> list[str]:
    """The build-step containers whose command carries `marker` (the classic builder's have no labels)."""
    listed = client.api.containers(all=True)
    return [c["Id"] for c in listed if marker in str(c.get("Command", ""))]


async def gone(client: docker.DockerClient, marker: str) -> bool:
    async def none_left() -> bool:
        return not build_containers(client, marker)

    await eventually(none_left, "the build step's container to be gone", timeout=15)
    return True


async def test_a_build_step_past_the_time_limit_times_out_and_leaves_no_container(
    docker_client: docker.DockerClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    marker = f"sleep 60 # {queue}"
    job_id = await submit(jobs, queue, build={"dockerfile": f"FROM {BUSYBOX}\nRUN {marker}\n"}, maxDuration="5s")
    job = await wait_finished(jobs, job_id, timeout=30)  # the step alone would take 60 s
    assert job.finish_reason == jobs_pb2.FINISH_REASON_TIMED_OUT, job.result.message
    assert "time limit of 5s" in job.result.message
    assert await gone(docker_client, marker)


async def test_a_cancelled_build_stops_its_step_which_ran_in_the_job_network_within_its_limits(
    docker_client: docker.DockerClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue, cpus=2)
    marker = f"sleep 60 # cancelled {queue}"
    build = {"dockerfile": f"FROM {BUSYBOX}\nRUN {marker}\n"}
    job_id = await submit(jobs, queue, build=build, requirements={"memory": "96m", "cpus": 0.5})

    async def limited() -> bool:  # the pids limit comes a moment after the step starts
        steps = [
            docker_client.api.inspect_container(step)["HostConfig"] for step in build_containers(docker_client, marker)
        ]
        return any(step["PidsLimit"] == 4096 for step in steps)

    await eventually(limited, "the build step to run within its limits", timeout=30)
    (step,) = [
        docker_client.api.inspect_container(step)["HostConfig"] for step in build_containers(docker_client, marker)
    ]
    assert step["NetworkMode"] == "jobwire-jobs"
    assert (step["Memory"], step["MemorySwap"]) == (96 << 20, 96 << 20)
    assert step["CpuQuota"] / step["CpuPeriod"] == 0.5
    await jobs.CancelJob(jobs_pb2.CancelJobRequest(queue=queue, job_id=job_id))
    job = await wait_finished(jobs, job_id, timeout=30)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_CANCELLED
    assert await gone(docker_client, marker)


async def test_a_build_step_is_held_to_the_jobs_memory(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue)
    allocate = f"RUN python3 -c \"b = b'x' * (256 << 20); print('allocated {queue}')\"\n"
    job = await run(jobs, queue, build={"dockerfile": f"FROM {PYTHON}\n{allocate}"}, requirements={"memory": "64m"})
    assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR, job.result.message
    assert "the image build failed" in job.result.message
    fits = await run(jobs, queue, build={"dockerfile": f"FROM {PYTHON}\n{allocate}"}, requirements={"memory": "512m"})
    assert fits.finish_reason == jobs_pb2.FINISH_REASON_SUCCESS, fits.result.message


PROFILE = (
    "grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status;"
    " cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max;"
    " cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null"
    " || cat /sys/fs/cgroup/cpu.max"
)


async def test_the_default_profile_is_the_documented_capabilities_memory_share_and_cpus(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue, cpus=2)
    job = await run(jobs, queue, image=BUSYBOX, command=f'sh -c "{PROFILE}"')
    lines = run_log(job).split()
    assert job.result.exit_code == 0, (job.result.message, lines)
    expected = sum(1 << _CAPABILITY_BITS[name] for name in CAPABILITIES)
    assert int(lines[lines.index("CapEff:") + 1], 16) == expected
    assert int(lines[lines.index("CapBnd:") + 1], 16) == expected
    assert lines[lines.index("NoNewPrivs:") + 1] == "1"
    memory, quota, period = lines[-3:]  # cgroup v1: three files; v2: memory.max, then cpu.max's two
    assert int(memory) == os.sysconf("SC_PHYS_PAGES") // 2 * os.sysconf("SC_PAGE_SIZE")
    assert int(quota) / int(period) == (os.cpu_count() or 1) / 2


async def test_a_job_asking_for_more_than_its_share_gets_its_share(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, start_worker: StartWorker
) -> None:
    await start_worker(queue, cpus=2)
    share = os.sysconf("SC_PHYS_PAGES") // 2 * os.sysconf("SC_PAGE_SIZE")
    command = 'sh -c "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"'
    greedy = await run(jobs, queue, image=BUSYBOX, command=command, requirements={"memory": str(4 * share)})
    assert int(run_log(greedy)) == share
    modest = await run(jobs, queue, image=BUSYBOX, command=command, requirements={"memory": "64m"})
    assert int(run_log(modest)) == 64 * 1024 * 1024


@pytest_asyncio.fixture(loop_scope="session")
async def small_logs(tmp_path: Path, docker_images: None) -> AsyncIterator[tuple[jobs_pb2_grpc.JobServiceStub, str]]:
    """A server keeping 1 MiB of each log and a worker whose containers' engine log is capped at 1 MiB."""
    settings = ServerSettings(data_directory=tmp_path / "server", host="127.0.0.1", port=0, max_log_chars=1 << 20)
    server = await build_server(settings)
    started = asyncio.Event()
    served = asyncio.create_task(server.run(started))
    await started.wait()
    queue = f"q-logs-{os.urandom(8).hex()}"
    worker = WorkerSettings(
        queue=queue,
        server=f"127.0.0.1:{server.port}",
        data_directory=tmp_path / "worker",
        container_log_size=1 << 20,
        max_job_duration=300,
    )
    runtime = DockerRuntime.from_env(worker.cpus)
    daemon = Daemon(worker, runtime)
    handle = WorkerHandle(daemon, runtime, asyncio.create_task(daemon.run()))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield jobs_pb2_grpc.JobServiceStub(channel), queue
        await handle.stop()
    served.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await served


@pytest.mark.timeout(300)
async def test_a_loud_job_keeps_the_engines_log_under_its_cap(
    docker_client: docker.DockerClient, small_logs: tuple[jobs_pb2_grpc.JobServiceStub, str]
) -> None:
    jobs, queue = small_logs
    loud = "yes 0123456789012345678901234567890123456789012345678901234567890123456789 | head -c 300000000"
    job_id = await submit(jobs, queue, image=BUSYBOX, command=f"sh -c '{loud}; echo END; sleep 300'")
    containers: list[str] = []

    async def printed() -> bool:  # all of it, and the engine logged all of it
        containers[:] = [c["Id"] for c in docker_client.api.containers(filters={"label": f"io.jobwire.job={job_id}"})]
        return bool(containers) and b"END" in docker_client.api.logs(containers[0], tail=1)

    await eventually(printed, "the job to print 300 MB", timeout=240)
    container = containers[0]
    path = Path(docker_client.api.inspect_container(container)["LogPath"])
    kept = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    assert kept <= 1 << 20, kept
    await jobs.CancelJob(jobs_pb2.CancelJobRequest(queue=queue, job_id=job_id))
    job = await wait_finished(jobs, job_id, timeout=60)
    logs = await jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job_id, kind=jobs_pb2.LOG_KIND_RUN))
    text = "".join(chunk.text for chunk in logs.chunks)
    assert job.finish_reason == jobs_pb2.FINISH_REASON_CANCELLED
    assert len(text) >= 1 << 20 and text.startswith("0123456789"), len(text)


OwnWorker = Callable[..., Awaitable[None]]


@pytest_asyncio.fixture(loop_scope="session")
async def own_worker(stack: Stack, docker_images: None, tmp_path: Path) -> AsyncIterator[OwnWorker]:
    """Start a worker with settings of the test's own: `await own_worker(queue, pids_limit=32)`."""
    handles: list[WorkerHandle] = []

    async def start(queue: str, **fields: object) -> None:
        directory = tmp_path / f"own-worker-{len(handles)}"
        settings = WorkerSettings(queue=queue, server=stack.grpc_target, data_directory=directory, **fields)  # type: ignore[arg-type]
        runtime = DockerRuntime.from_env(settings.cpus)
        daemon = Daemon(settings, runtime)
        handles.append(WorkerHandle(daemon, runtime, asyncio.create_task(daemon.run())))
        await asyncio.wait_for(daemon.registered.wait(), 30)

    yield start
    for handle in handles:
        await handle.stop()


async def test_a_build_step_is_held_to_the_pids_limit(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, own_worker: OwnWorker
) -> None:
    await own_worker(queue, pids_limit=32)
    # (the limit is set as the engine names the step's container: a step may fork for a few ms before)
    forks = f"sleep 2; for i in $(seq 100); do sleep 10 & done; echo forked 100 {queue}"
    job = await run(jobs, queue, build={"dockerfile": f"FROM {BUSYBOX}\nRUN {forks}\n"})
    assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR, job.result.message
    logs = await jobs.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job.id, kind=jobs_pb2.LOG_KIND_BUILD))
    assert "can't fork" in "".join(chunk.text for chunk in logs.chunks)


async def test_a_writable_layer_cap_or_a_runtime_the_engine_lacks_is_a_clear_error(
    docker_client: docker.DockerClient, jobs: jobs_pb2_grpc.JobServiceStub, queue: str, own_worker: OwnWorker
) -> None:
    driver = docker_client.info()["DriverStatus"]
    if ["Backing Filesystem", "xfs"] in driver:
        pytest.skip("this engine may support a writable layer cap")
    await own_worker(queue, disk_size=1 << 30)
    job = await run(jobs, queue, image=BUSYBOX, command=f"echo {queue}")
    assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR
    assert "storage-opt" in job.result.message, job.result.message
    other = f"{queue}-runsc"
    await own_worker(other, container_runtime="runsc")
    job = await run(jobs, other, image=BUSYBOX, command=f"echo {other}")
    assert job.finish_reason == jobs_pb2.FINISH_REASON_ERROR
    assert "runsc" in job.result.message, job.result.message


def test_a_build_is_tagged_by_its_definition_and_its_contexts_bytes() -> None:
    build = json_format.ParseDict({"context": "https://example.com/c.tar.gz"}, definition_pb2.ImageBuild())
    first, again = build_tag(build, "a" * 64), build_tag(build, "a" * 64)
    assert first == again != build_tag(build, "b" * 64)  # the URL now serves other bytes: built again
    other = json_format.ParseDict(
        {"context": "https://example.com/c.tar.gz", "target": "x"}, definition_pb2.ImageBuild()
    )
    assert build_tag(other, "a" * 64) != first
    blob = json_format.ParseDict({"context": f"/f/{'c' * 64}"}, definition_pb2.ImageBuild())
    assert build_tag(blob) == build_tag(blob, "c" * 64)  # a blob context's key is its bytes' digest


async def test_a_worker_with_no_job_network_gives_its_jobs_none(
    jobs: jobs_pb2_grpc.JobServiceStub, queue: str, own_worker: OwnWorker
) -> None:
    """`--job-network none`: a job sees only its loopback device; the default job network gives it one more."""
    command = f'sh -c "ls /sys/class/net; echo {queue}"'
    await own_worker(queue)
    assert "eth0" in run_log(await run(jobs, queue, image=BUSYBOX, command=command)).split()
    isolated = f"{queue}-none"
    await own_worker(isolated, job_network="none")
    job = await run(jobs, isolated, image=BUSYBOX, command=command)
    assert job.result.exit_code == 0, job.result.message
    assert run_log(job).split() == ["lo", queue]
